"""Nothing lost, nothing silently accepted on resume (issue 21, cases 1, 2, 10 and 11): resuming and saving never
delete a checkpoint that might be complete (it is moved aside, ``<name>.quarantine-<n>``, and one warning line
says so); EggTrainer resumes all-or-nothing; bad step / epoch values, RNG files the resume could not restore,
unreadable files and full disks are typed errors that change nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from _digests import state_digest

pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from egg_recipes import checkpoint as ckpt  # noqa: E402
from egg_recipes import storage  # noqa: E402
from test_checkpoint import _setup, _train  # noqa: E402  (the same run as the checkpoint tests)

from egg_optim import CheckpointError, EggOptimError, LeaderCloneOptimizer, RolePlan  # noqa: E402


@pytest.fixture(autouse=True)
def _reset(reset_accelerate):
    yield


def _files(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its sha256: what must survive, byte for byte."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _saved(root: Path, steps=(2, 4)):
    acc, model, opt, sched = _setup()
    for step in steps:
        _train(model, opt, sched, 2, seed=step)
        ckpt.save_checkpoint(acc, root / f"checkpoint-{step}", step=step)
    return acc, model, opt, sched


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.fixture
def no_rmtree(monkeypatch):
    """Records every folder deleted; the test asserts none could hold a state."""
    deleted: list[Path] = []
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        deleted.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return deleted


# ---------------------------------------------------------------------------------------------- 1. never delete
@pytest.mark.parametrize("lost", ["egg_optim_checkpoint.json", "scheduler.bin"])
def test_resume_latest_moves_the_damaged_newest_aside_and_says_so_in_one_line(tmp_path, caplog, no_rmtree, lost):
    _saved(tmp_path)
    newest = tmp_path / "checkpoint-4"
    (newest / lost).unlink()
    files = _files(newest)
    acc, *_ = _setup(seed=1)
    assert ckpt.resume_path(acc, "latest", tmp_path) == tmp_path / "checkpoint-2"
    moved = tmp_path / "checkpoint-4.quarantine-1"
    assert not newest.exists() and _files(moved) == files  # model, optimizer, RNG: all kept, byte for byte
    said = _warnings(caplog)
    assert len(said) == 1 and "\n" not in said[0]
    assert "checkpoint-4 -> checkpoint-4.quarantine-1" in said[0] and "deleting nothing" in said[0]
    assert "resuming from checkpoint-2, not from newer checkpoint-4 (moved aside)" in said[0]
    assert no_rmtree == []
    # the quarantined folder is never picked, pruned or touched again
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    caplog.clear()
    assert ckpt.recover_leftovers(tmp_path) == [] and _warnings(caplog) == []


def test_next_save_keeps_a_complete_checkpoint_whose_marker_alone_is_missing(tmp_path, caplog, no_rmtree):
    acc, model, opt, sched = _saved(tmp_path)
    (tmp_path / "checkpoint-2" / ckpt.MARKER_NAME).unlink()
    files = _files(tmp_path / "checkpoint-2")
    ckpt.save_checkpoint(acc, tmp_path / "checkpoint-6", step=6, keep=2)
    assert _files(tmp_path / "checkpoint-2.quarantine-1") == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2.quarantine-1", "checkpoint-4", "checkpoint-6"]
    assert no_rmtree == []
    # the marker put back, the folder renamed back: a complete checkpoint again
    (tmp_path / "checkpoint-2.quarantine-1").rename(tmp_path / "checkpoint-2")
    assert "checkpoint-2" in _warnings(caplog)[0]


def test_save_over_a_folder_that_is_not_a_complete_checkpoint_moves_it_aside(tmp_path, caplog, no_rmtree):
    acc, model, opt, sched = _saved(tmp_path, steps=(2,))
    (tmp_path / "checkpoint-2" / ckpt.MARKER_NAME).unlink()
    files = _files(tmp_path / "checkpoint-2")
    ckpt.save_checkpoint(acc, tmp_path / "checkpoint-2", step=2)  # same name
    assert ckpt.verify_checkpoint(tmp_path / "checkpoint-2")["step"] == 2
    assert _files(tmp_path / "checkpoint-2.quarantine-1") == files
    assert no_rmtree == []


def _killed_overwrite(root: Path, monkeypatch, *, after_first_rename: bool):
    """A same-name save killed between its renames: ``ck.old-T`` (previous) and ``ck.tmp-T`` (new, complete)."""
    acc, model, opt, sched = _saved(root, steps=(2,))
    before = _files(root / "checkpoint-2")
    _train(model, opt, sched, 1, seed=9)
    real_replace = ckpt.os.replace

    def killed(src, dst):
        s, d = Path(src).name, Path(dst).name
        if (".tmp-" in s and d == "checkpoint-2") if after_first_rename else ".old-" in d:
            raise KeyboardInterrupt  # the process dies here: nothing after it runs
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed)
    monkeypatch.setattr(ckpt, "_abandon", lambda *a: None)  # a killed process cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(acc, root / "checkpoint-2", step=2, metadata={"new": True})
    monkeypatch.undo()
    return acc, before


def test_killed_same_name_overwrite_is_finished_not_deleted(tmp_path, monkeypatch, caplog, no_rmtree):
    acc, before = _killed_overwrite(tmp_path, monkeypatch, after_first_rename=True)
    (old,) = tmp_path.glob("checkpoint-2.old-*")
    (new,) = tmp_path.glob("checkpoint-2.tmp-*")
    assert not (tmp_path / "checkpoint-2").exists() and ckpt.is_complete(new, check_hashes=True)
    new_files = _files(new)
    assert ckpt.resume_path(acc, "latest", tmp_path) == tmp_path / "checkpoint-2"
    assert _files(tmp_path / "checkpoint-2") == new_files  # the finished save, installed
    assert ckpt.verify_checkpoint(tmp_path / "checkpoint-2")["metadata"] == {"new": True}
    assert _files(tmp_path / "checkpoint-2.quarantine-1") == before  # the one it replaced: kept aside
    assert no_rmtree == [] and len(_warnings(caplog)) == 1


def test_killed_save_before_replacing_keeps_both(tmp_path, monkeypatch, no_rmtree):
    acc, before = _killed_overwrite(tmp_path, monkeypatch, after_first_rename=False)
    (new,) = tmp_path.glob("checkpoint-2.tmp-*")
    new_files = _files(new)
    assert ckpt.resume_path(acc, "latest", tmp_path) == tmp_path / "checkpoint-2"
    assert _files(tmp_path / "checkpoint-2") == before  # untouched
    assert _files(tmp_path / "checkpoint-2.quarantine-1") == new_files  # the complete save: kept aside
    assert no_rmtree == []


def test_old_folder_alone_is_put_back(tmp_path, no_rmtree):
    acc, *_ = _saved(tmp_path, steps=(2,))
    files = _files(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2").rename(tmp_path / "checkpoint-2.old-0badc0de")
    assert ckpt.resume_path(acc, "latest", tmp_path) == tmp_path / "checkpoint-2"
    assert _files(tmp_path / "checkpoint-2") == files and no_rmtree == []


def test_only_asked_for_removals_delete(tmp_path, no_rmtree):
    """Pruning (keep=) and its leftovers are the only deletions: complete checkpoints the caller dropped."""
    acc, *_ = _saved(tmp_path, steps=(2, 4, 6))
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-1.trash-00ff00ff")
    ckpt.save_checkpoint(acc, tmp_path / "checkpoint-8", step=8, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert all(".trash-" in p.name for p in no_rmtree)


# ---------------------------------------------------------------------------------------------- recipes
def test_recipe_resume_latest_keeps_the_newest_without_marker(tmp_path, capsys, caplog):
    pytest.importorskip("sklearn")
    from egg_recipes import train_image

    out = tmp_path / "run"
    args = ["--batch-size", "64", "--max-train-samples", "256", "--max-eval-samples", "64", "--report-to", "none",
            "--no-progress", "--output-dir", str(out), "--max-steps", "4", "--save-every", "2",
            "--keep-checkpoints", "0"]  # fmt: skip
    assert train_image.main(args) == 0
    newest = out / "checkpoints" / "checkpoint-4"
    (newest / ckpt.MARKER_NAME).unlink()
    files = _files(newest)
    caplog.clear()
    assert train_image.main([*args, "--resume-from", "latest"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _files(out / "checkpoints" / "checkpoint-4.quarantine-1") == files
    assert any("not from newer checkpoint-4 (moved aside)" in m for m in _warnings(caplog))


# ---------------------------------------------------------------------------------------------- 10, 11: save
@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"step": 2, "epoch": -5}, "epoch must be an integer >= 0, got -5"),
        ({"step": "x"}, "step must be an integer >= 0, got 'x'"),
        ({"step": float("nan")}, "step must be an integer >= 0, got nan"),
        ({"step": -1}, "step must be an integer >= 0, got -1"),
        ({"step": True}, "step must be an integer >= 0, got True"),
        ({"step": 2.0}, "step must be an integer >= 0, got 2.0"),
    ],
)
def test_bad_step_or_epoch_refused_before_anything_is_written(tmp_path, kwargs, named):
    acc, model, opt, sched = _setup()
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace(")", r"\)")):
        ckpt.save_checkpoint(acc, tmp_path / "checkpoint-2", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_iostream_error_on_a_full_disk_is_a_storage_error(tmp_path, monkeypatch):
    import errno
    from collections import namedtuple

    acc, model, opt, sched = _setup()
    ckpt.save_checkpoint(acc, tmp_path / "checkpoint-1", step=1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(1, 1, 0))
    with pytest.raises(storage.StorageError) as info:
        ckpt.save_checkpoint(acc, tmp_path / "checkpoint-2", step=2)
    assert str(info.value) == f"no space left on device while writing {tmp_path / 'checkpoint-2'}"
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


# ---------------------------------------------------------------------------------------------- 10, 11: load
def _rehash(folder: Path) -> None:
    """Rewrite the manifest and the marker's own digest for the files as they are now (a careful forger)."""
    marker = json.loads((folder / ckpt.MARKER_NAME).read_text())
    marker["files"] = ckpt._manifest(folder)
    marker[ckpt.DIGEST_KEY] = ckpt._marker_digest(marker)
    (folder / ckpt.MARKER_NAME).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "garbage",
    [b"not a pickle", "wrong keys", "bad numpy state", "delete"],
)
def test_rng_file_that_would_not_restore_is_refused_and_nothing_changes(tmp_path, garbage):
    acc, model, opt, sched = _saved(tmp_path, steps=(2,))
    folder = tmp_path / "checkpoint-2"
    rng = folder / "random_states_0.pkl"
    if garbage == "wrong keys":
        torch.save({"step": 0}, rng)
    elif garbage == "bad numpy state":
        states = torch.load(rng, weights_only=False)
        states["numpy_random_seed"] = ("MT19937", [1, 2, 3], 0, 0, 0.0)
        torch.save(states, rng)
    elif garbage == "delete":
        rng.unlink()
    else:
        rng.write_bytes(garbage)
    _rehash(folder)
    acc2, model2, opt2, sched2 = _setup(seed=3)
    before = state_digest(model2, opt2, sched2)
    with pytest.raises(CheckpointError, match="random_states_0.pkl"):
        ckpt.load_checkpoint(acc2, folder)
    assert state_digest(model2, opt2, sched2) == before


def test_trainer_checkpoint_and_checkpoints_folder_are_named_for_what_they_are(tmp_path):
    acc, *_ = _saved(tmp_path / "checkpoints", steps=(2, 4))
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(acc, tmp_path / "checkpoints")
    msg = str(info.value)
    assert "is a folder of checkpoints (checkpoint-2, checkpoint-4), not a checkpoint" in msg
    assert "interrupted" not in msg and not isinstance(info.value, ckpt.IncompleteCheckpointError)
    trainer = tmp_path / "checkpoint-500"
    trainer.mkdir()
    (trainer / "trainer_state.json").write_text("{}")
    (trainer / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(acc, trainer)
    assert "is a transformers Trainer checkpoint" in str(info.value) and "interrupted" not in str(info.value)
    assert ckpt.recover_leftovers(tmp_path) == [] and trainer.is_dir()  # never moved: not ours


def test_unreadable_callback_state_is_a_checkpoint_error(tmp_path):
    from conftest import mlp

    from egg_optim.callbacks import STATE_FILE, CallbackRunner, RoleLogger

    model = mlp()
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5))
    runner = CallbackRunner([RoleLogger()], model=model, optimizer=opt)
    path = Path(runner.save(tmp_path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read .*{STATE_FILE}"):
        runner.load(tmp_path)


# ---------------------------------------------------------------------------------------------- 2. EggTrainer
def _trainer_parts():
    pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    from torch import nn
    from transformers import TrainingArguments

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x, labels=None):
            logits = self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
            loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    ds = datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch")

    def targs(out, **kw):
        base = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                    save_steps=3, logging_steps=1, learning_rate=1e-2, disable_tqdm=True, seed=0)  # fmt: skip
        return TrainingArguments(**{**base, **kw})

    return Net, ds, targs


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState

    Net, ds, targs = _trainer_parts()
    from egg_optim import EggConfig
    from egg_optim.integrations.transformers import EggTrainer

    out = tmp_path_factory.mktemp("trainer_run")
    torch.manual_seed(0)
    EggTrainer(model=Net(), args=targs(out), train_dataset=ds, egg=EggConfig(**TRAINER_EGG)).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out / "checkpoint-3"


TRAINER_EGG = dict(plan=RolePlan(0.4, 0.1), clone_every=2, elect_every=3, election="weight_norm")


def _truncate(folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "change, error, named",
    [
        ({"plan": RolePlan(0.5, 0.1)}, "StateDictMismatchError", "saved with plan"),
        ({"clone_mode": "output", "clone_every": "never"}, "StateDictMismatchError", "clone_mode='weight'"),
        ({"election": "random"}, "StateDictMismatchError", "election='weight_norm' (this optimizer: 'random')"),
        ({"elect_every": 2}, "StateDictMismatchError", "elect_every='3' (this optimizer: '2')"),
        ({"clone_noise": 0.1}, "StateDictMismatchError", "clone_noise=0.0 (this optimizer: 0.1)"),
        ({"assign": "random"}, "StateDictMismatchError", "assign='first' (this optimizer: 'random')"),
        ("optimizer.pt", "CheckpointError", "unreadable optimizer.pt"),
        ("scheduler.pt", "CheckpointError", "unreadable scheduler.pt"),
        ("egg_callbacks.pt", "CheckpointError", "unreadable egg_callbacks.pt"),
    ],
    ids=[
        "plan",
        "clone_mode",
        "election",
        "elect_every",
        "clone_noise",
        "assign",
        "trunc-optimizer",
        "trunc-scheduler",
        "trunc-callbacks",
    ],  # fmt: skip
)
def test_trainer_resume_is_all_or_nothing(trainer_checkpoint, tmp_path, change, error, named):
    """Another plan or option, or a file truncated by a killed save: refused with a typed error, and the live
    model's weights are what they were before train() (the Trainer loads them before the optimizer state)."""
    Net, ds, targs = _trainer_parts()
    from egg_optim import EggConfig
    from egg_optim.integrations.transformers import EggTrainer

    folder = trainer_checkpoint
    egg = dict(TRAINER_EGG)
    if isinstance(change, str):
        folder = tmp_path / "checkpoint-3"
        shutil.copytree(trainer_checkpoint, folder)
        _truncate(folder, change)
    else:
        egg.update(change)
    torch.manual_seed(5)
    model = Net()
    weights = lambda: {k: v for k, v in state_digest(model).items() if k != "rng"}  # train() reseeds the RNG
    before = weights()
    trainer = EggTrainer(model=model, args=targs(tmp_path / "out", max_steps=6), train_dataset=ds, egg=EggConfig(**egg))
    with pytest.raises(EggOptimError) as info:
        trainer.train(resume_from_checkpoint=str(folder))
    assert type(info.value).__name__ == error and named in str(info.value)
    assert weights() == before


def test_trainer_resume_with_the_same_settings_still_works(trainer_checkpoint, tmp_path):
    Net, ds, targs = _trainer_parts()
    from egg_optim import EggConfig
    from egg_optim.integrations.transformers import EggTrainer

    torch.manual_seed(5)
    trainer = EggTrainer(model=Net(), args=targs(tmp_path, max_steps=6), train_dataset=ds, egg=EggConfig(**TRAINER_EGG))
    trainer.train(resume_from_checkpoint=str(trainer_checkpoint))
    assert trainer.egg_optimizer.steps == 6 and trainer._egg_model_backup is None
