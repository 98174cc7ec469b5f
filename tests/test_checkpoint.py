"""Atomic, verified checkpoints (egg_recipes.checkpoint) around accelerate's save_state / load_state."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TinySeedNet, assert_same_state, model_state

pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from accelerate import Accelerator  # noqa: E402
from egg_recipes import checkpoint as ckpt  # noqa: E402

from egg_optim import LeaderCloneOptimizer, RolePlan  # noqa: E402
from egg_optim.errors import EggOptimError  # noqa: E402

PLAN = RolePlan(per_layer={"layer*.conv*": (0.4, 0.2)}, only_listed=True)


def _setup(seed: int = 0, plan: RolePlan = PLAN):
    torch.manual_seed(seed)
    acc = Accelerator(cpu=True)
    model = TinySeedNet()
    opt = LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), plan, clone_every=1, seed=seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    model, opt, sched = acc.prepare(model, opt, sched)
    return acc, model, opt, sched


def _train(model, opt, sched, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _lco(opt) -> LeaderCloneOptimizer:
    return opt.optimizer


def _roles_codes(opt):
    return {n: r.codes.clone() for n, r in _lco(opt).roles.items()}


def test_roundtrip_restores_weights_roles_and_optimizer(tmp_path):
    acc, model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    _lco(opt).elect_now()
    path = ckpt.save_checkpoint(acc, tmp_path / "ck", step=3, epoch=1, metadata={"position": 7})
    saved_state, saved_roles = model_state(model), _roles_codes(opt)
    saved_steps = _lco(opt).steps

    marker = json.loads((path / ckpt.MARKER_NAME).read_text())
    assert marker["step"] == 3 and marker["epoch"] == 1 and marker["metadata"] == {"position": 7}
    assert "model.safetensors" in marker["files"] and "optimizer.bin" in marker["files"]
    assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in marker["files"].values())
    assert not list(tmp_path.glob("*.tmp-*"))

    acc2, model2, opt2, sched2 = _setup(seed=1)  # different init and roles
    assert not all(torch.equal(a, b) for a, b in zip(saved_roles.values(), _roles_codes(opt2).values()))
    info = ckpt.load_checkpoint(acc2, path)
    assert info["metadata"]["position"] == 7
    assert_same_state(saved_state, model_state(model2))
    assert all(torch.equal(saved_roles[n], c) for n, c in _roles_codes(opt2).items())
    assert _lco(opt2).steps == saved_steps
    assert sched2.scheduler.last_epoch == sched.scheduler.last_epoch

    # continuing both gives the same weights
    _train(model, opt, sched, 2, seed=5)
    _train(model2, opt2, sched2, 2, seed=5)
    assert_same_state(model_state(model), model_state(model2))


def test_overwrite_replaces_only_when_complete(tmp_path):
    acc, model, opt, sched = _setup()
    ckpt.save_checkpoint(acc, tmp_path / "ck", step=1)
    _train(model, opt, sched, 1)
    ckpt.save_checkpoint(acc, tmp_path / "ck", step=2)
    assert ckpt.verify_checkpoint(tmp_path / "ck")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_missing_marker_refused(tmp_path):
    acc, model, opt, sched = _setup()
    path = ckpt.save_checkpoint(acc, tmp_path / "ck", step=1)
    (path / ckpt.MARKER_NAME).unlink()
    assert not ckpt.is_complete(path)
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(acc, path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_file_refused_and_nothing_changed(tmp_path, damage):
    acc, model, opt, sched = _setup()
    _train(model, opt, sched, 2)
    path = ckpt.save_checkpoint(acc, tmp_path / "ck", step=2)
    _train(model, opt, sched, 1)  # the live state now differs from the checkpoint
    before, roles_before, steps_before = model_state(model), _roles_codes(opt), _lco(opt).steps
    target = path / "model.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))  # same size, other bytes
    else:
        target.unlink()
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(acc, path)
    assert isinstance(info.value, EggOptimError)
    assert "model.safetensors" in str(info.value)
    assert_same_state(before, model_state(model))
    assert all(torch.equal(roles_before[n], c) for n, c in _roles_codes(opt).items())
    assert _lco(opt).steps == steps_before


def test_expect_mismatch_refused(tmp_path):
    acc, model, opt, sched = _setup()
    path = ckpt.save_checkpoint(acc, tmp_path / "ck", step=1, metadata={"plan": PLAN.signature(), "seed": 0})
    with pytest.raises(ckpt.CheckpointError, match="seed"):
        ckpt.load_checkpoint(acc, path, expect={"seed": 1})
    ckpt.load_checkpoint(acc, path, expect={"plan": PLAN.signature(), "seed": 0})


def test_other_model_refused_before_loading(tmp_path):
    acc, model, opt, sched = _setup()
    path = ckpt.save_checkpoint(acc, tmp_path / "ck", step=1)
    torch.manual_seed(0)
    other = TinySeedNet(widths=((1, 8, 16), (16, 8, 16), (16, 8, 8)))
    acc2 = Accelerator(cpu=True)
    o = LeaderCloneOptimizer(other, torch.optim.Adam(other.parameters()), PLAN)
    other, o = acc2.prepare(other, o)
    before = model_state(other)
    with pytest.raises(ckpt.CheckpointError, match="do not match"):
        ckpt.load_checkpoint(acc2, path)
    assert_same_state(before, model_state(other))


def test_failure_inside_load_state_rolls_back(tmp_path, monkeypatch):
    """The manifest is fine but the optimizer state belongs to another plan: accelerate has already loaded
    the weights when the optimizer refuses; everything must be rolled back."""
    acc, model, opt, sched = _setup()
    _train(model, opt, sched, 2)
    path = ckpt.save_checkpoint(acc, tmp_path / "ck", step=2)
    other_plan = RolePlan(per_layer={"layer*.conv*": (0.5, 0.1)}, only_listed=True)
    acc2, model2, opt2, sched2 = _setup(seed=3, plan=other_plan)
    before, roles_before = model_state(model2), _roles_codes(opt2)
    rng_before = torch.get_rng_state()
    with pytest.raises(ckpt.CheckpointError, match="nothing was changed"):
        ckpt.load_checkpoint(acc2, path)
    assert_same_state(before, model_state(model2))
    assert all(torch.equal(roles_before[n], c) for n, c in _roles_codes(opt2).items())
    assert torch.equal(rng_before, torch.get_rng_state())


def test_crash_mid_save_leaves_nothing_complete(tmp_path, monkeypatch):
    """A hard crash after accelerate wrote the files but before the marker: no cleanup runs (patched out),
    the target name never appears, the leftover is refused and ignored by latest_checkpoint."""
    acc, model, opt, sched = _setup()

    def boom(folder):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_manifest", boom)
    monkeypatch.setattr(ckpt, "_discard", lambda folder: None)  # a killed process cleans nothing up
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(acc, tmp_path / "checkpoint-5", step=5)
    assert not (tmp_path / "checkpoint-5").exists()
    leftovers = list(tmp_path.glob("checkpoint-5.tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    assert not (leftovers[0] / ckpt.MARKER_NAME).exists()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(acc, leftovers[0])
    assert ckpt.latest_checkpoint(tmp_path) is None
    monkeypatch.undo()
    files = sorted(p.name for p in leftovers[0].iterdir())
    # its files may be all there: moved aside, not deleted
    assert ckpt.recover_leftovers(tmp_path) == [
        (leftovers[0], tmp_path / "checkpoint-5.quarantine-1", "a save that was killed before it finished")
    ]
    assert sorted(p.name for p in (tmp_path / "checkpoint-5.quarantine-1").iterdir()) == files
    assert ckpt.latest_checkpoint(tmp_path) is None and ckpt.recover_leftovers(tmp_path) == []


def test_crash_while_overwriting_keeps_previous(tmp_path, monkeypatch):
    acc, model, opt, sched = _setup()
    ckpt.save_checkpoint(acc, tmp_path / "ck", step=1)
    real_save_state = acc.save_state

    def partial_save(output_dir, **kw):
        real_save_state(output_dir, **kw)  # every file written, then the save "crashes"
        raise RuntimeError("killed (simulated)")

    monkeypatch.setattr(acc, "save_state", partial_save)
    with pytest.raises(RuntimeError, match="simulated"):
        ckpt.save_checkpoint(acc, tmp_path / "ck", step=2)
    assert ckpt.verify_checkpoint(tmp_path / "ck")["step"] == 1
    assert not list(tmp_path.glob("*.tmp-*"))  # an exception (not a kill) cleans its temporary folder


def test_latest_and_list(tmp_path):
    acc, model, opt, sched = _setup()
    for step in (3, 10, 7):
        ckpt.save_checkpoint(acc, tmp_path / f"checkpoint-{step}", step=step)
    shutil.copytree(tmp_path / "checkpoint-10", tmp_path / "checkpoint-99")
    (tmp_path / "checkpoint-99" / ckpt.MARKER_NAME).unlink()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-7", "checkpoint-10"]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert ckpt.checkpoint_step(tmp_path / "checkpoint-10") == 10


# ---------------------------------------------------------------------------- manifest and marker integrity
def _rewrite_marker(path, edit, *, redigest: bool) -> None:
    marker_path = path / ckpt.MARKER_NAME
    marker = json.loads(marker_path.read_text())
    edit(marker)
    if redigest:
        marker[ckpt.DIGEST_KEY] = ckpt._marker_digest(marker)
    marker_path.write_text(json.dumps(marker, indent=1))


def test_unlisted_file_refused_and_nothing_changed(tmp_path):
    acc, model, opt, sched = _setup()
    path = ckpt.save_checkpoint(acc, tmp_path / "ck", step=1)
    _train(model, opt, sched, 1)
    before = model_state(model)
    (path / "sub").mkdir()
    (path / "sub" / "stray.bin").write_bytes(b"not saved by save_state")
    with pytest.raises(ckpt.CheckpointError, match=r"sub/stray\.bin not in its manifest"):
        ckpt.load_checkpoint(acc, path)
    assert not ckpt.is_complete(path) and ckpt.latest_checkpoint(tmp_path) is None
    assert_same_state(before, model_state(model))


def test_file_dropped_from_manifest_then_corrupted_is_refused(tmp_path):
    """The issue's case: an entry removed from the manifest, then its file damaged. Editing the marker breaks
    its own sha256; a marker rewritten with a fresh sha256 still does not list the file."""
    acc, model, opt, sched = _setup()
    path = ckpt.save_checkpoint(acc, tmp_path / "ck", step=1)
    drop = lambda marker: marker["files"].pop("optimizer.bin")
    _rewrite_marker(path, drop, redigest=False)
    (path / "optimizer.bin").write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.MARKER_NAME} does not match its marker_sha256"):
        ckpt.verify_checkpoint(path)
    _rewrite_marker(path, lambda marker: None, redigest=True)  # a consistent marker without optimizer.bin
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.bin not in its manifest"):
        ckpt.load_checkpoint(acc, path)


@pytest.mark.parametrize("damage", ["step", "truncate", "no_digest"])
def test_damaged_marker_refused_naming_it(tmp_path, damage):
    acc, model, opt, sched = _setup()
    path = ckpt.save_checkpoint(acc, tmp_path / "checkpoint-3", step=3)
    marker_path = path / ckpt.MARKER_NAME
    if damage == "step":  # valid JSON, one value changed
        _rewrite_marker(path, lambda m: m.update(step=30), redigest=False)
    elif damage == "truncate":
        marker_path.write_bytes(marker_path.read_bytes()[:-40])
    else:  # what an older format (or a hand-made marker) looks like
        _rewrite_marker(path, lambda m: (m.pop(ckpt.DIGEST_KEY), m.update(format=1)), redigest=False)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(acc, path)
    assert str(marker_path) in str(info.value)
    assert not isinstance(info.value, ckpt.IncompleteCheckpointError)  # damaged, not unfinished: kept
    assert ckpt.recover_leftovers(tmp_path) == [] and path.is_dir()


def test_missing_listed_file_is_incomplete(tmp_path):
    acc, model, opt, sched = _setup()
    path = ckpt.save_checkpoint(acc, tmp_path / "ck", step=1)
    (path / "optimizer.bin").unlink()
    with pytest.raises(ckpt.IncompleteCheckpointError, match=r"optimizer\.bin"):
        ckpt.verify_checkpoint(path)


# ---------------------------------------------------------------------------- leftovers, pruning
def _leftovers(root, acc):
    """Every kind of leftover next to one complete and one corrupt checkpoint."""
    good = ckpt.save_checkpoint(acc, root / "checkpoint-4", step=4)
    shutil.copytree(good, root / "checkpoint-6.tmp-0a1b2c3d")  # killed save (before the marker)
    (root / "checkpoint-6.tmp-0a1b2c3d" / ckpt.MARKER_NAME).unlink()
    shutil.copytree(good, root / "checkpoint-2.trash-deadbeef")  # killed prune
    shutil.copytree(good, root / "checkpoint-1")  # half deleted by an older version: a listed file gone
    (root / "checkpoint-1" / "model.safetensors").unlink()
    shutil.copytree(good, root / "checkpoint-3")  # marker deleted first
    (root / "checkpoint-3" / ckpt.MARKER_NAME).unlink()
    (root / "checkpoint-9").mkdir()  # everything but the folder deleted
    shutil.copytree(good, root / "checkpoint-5")  # corrupt (other bytes): kept for inspection
    (root / "checkpoint-5" / "optimizer.bin").write_bytes(b"junk")
    (root / "notes").mkdir()  # not ours
    return good


RECOVERED = [  # what the leftovers above become: nothing that might hold a state is deleted
    "checkpoint-1.quarantine-1", "checkpoint-3.quarantine-1", "checkpoint-4", "checkpoint-5",
    "checkpoint-6.quarantine-1", "notes",
]  # fmt: skip


def test_next_save_recovers_leftovers_and_deletes_no_state(tmp_path, caplog):
    acc, model, opt, sched = _setup()
    _leftovers(tmp_path, acc)
    ckpt.save_checkpoint(acc, tmp_path / "checkpoint-7", step=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*RECOVERED, "checkpoint-7"])
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-7"]
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and "\n" not in said[0]
    for moved in ("checkpoint-1 -> checkpoint-1.quarantine-1", "checkpoint-3 -> checkpoint-3.quarantine-1",
                  "checkpoint-6.tmp-0a1b2c3d -> checkpoint-6.quarantine-1"):  # fmt: skip
        assert moved in said[0]


def test_resume_path_recovers_leftovers_and_keeps_the_requested_folder(tmp_path, caplog):
    acc, model, opt, sched = _setup()
    good = _leftovers(tmp_path, acc)
    # an explicit, incomplete folder is not moved: loading it says what is wrong
    target = ckpt.resume_path(acc, tmp_path / "checkpoint-3", tmp_path)
    assert target == tmp_path / "checkpoint-3" and target.is_dir()
    with pytest.raises(ckpt.IncompleteCheckpointError, match="incomplete"):
        ckpt.load_checkpoint(acc, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {*RECOVERED, "checkpoint-3"} - {"checkpoint-3.quarantine-1"}
    )
    caplog.clear()
    assert ckpt.resume_path(acc, "latest", tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == RECOVERED
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and "checkpoint-3 -> checkpoint-3.quarantine-1" in said[0]
    assert "resuming from checkpoint-4, not from newer checkpoint-5 (damaged, kept" in said[0]  # newer, corrupt
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resume_path(acc, "latest", tmp_path / "empty")


def test_save_keep_prunes_oldest_and_keeps_the_new_one(tmp_path):
    acc, model, opt, sched = _setup()
    for step in (2, 4, 8):
        ckpt.save_checkpoint(acc, tmp_path / f"checkpoint-{step}", step=step)
    ckpt.save_checkpoint(acc, tmp_path / "other", step=1)  # not a checkpoint-N: never pruned
    # a resumed run saving step 6 next to a step-8 checkpoint of the abandoned run: step 6 stays
    ckpt.save_checkpoint(acc, tmp_path / "checkpoint-6", step=6, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8", "other"]
    with pytest.raises(ckpt.CheckpointError, match="keep"):
        ckpt.save_checkpoint(acc, tmp_path / "checkpoint-9", step=9, keep=-1)
    assert not (tmp_path / "checkpoint-9").exists()


def test_prune_killed_mid_delete_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """A kill while deleting: simulated by a removal that deletes the marker and one file, then stops. The
    checkpoint's name is already gone (renamed first); the leftover is cleared by the next clean-up."""
    acc, model, opt, sched = _setup()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(acc, tmp_path / f"checkpoint-{step}", step=step)

    def killed(folder):
        (folder / ckpt.MARKER_NAME).unlink(missing_ok=True)
        (folder / "model.safetensors").unlink(missing_ok=True)

    monkeypatch.setattr(ckpt, "_discard", killed)
    assert ckpt.prune_checkpoints(tmp_path, 1) == [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and names[2] == "checkpoint-3"
    assert names[0].startswith("checkpoint-1.trash-") and names[1].startswith("checkpoint-2.trash-")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3"]
    monkeypatch.undo()
    recovered = ckpt.recover_leftovers(tmp_path)  # removals that were asked for: finished
    assert len(recovered) == 2 and all(dst is None for _, dst, _ in recovered)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


# ---------------------------------------------------------------------------- storage failures while saving
@pytest.mark.parametrize("failure", ["oserror", "torch_zip_writer"])
def test_full_disk_during_save_is_one_line_and_keeps_previous(tmp_path, monkeypatch, failure):
    import errno
    from collections import namedtuple

    from egg_recipes import storage

    acc, model, opt, sched = _setup()
    ckpt.save_checkpoint(acc, tmp_path / "checkpoint-1", step=1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # part of the bytes reach the disk, then the device is full
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0))
    with pytest.raises(storage.StorageError) as info:
        ckpt.save_checkpoint(acc, tmp_path / "checkpoint-2", step=2)
    assert str(info.value) == f"no space left on device while writing {tmp_path / 'checkpoint-2'}"
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, EggOptimError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert ckpt.verify_checkpoint(tmp_path / "checkpoint-1")["step"] == 1


def test_run_settings_of_other_tools_checkpoints(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="cannot be checked"):
        ckpt.check_run_settings(folder, {"lr": 0.1})
    ckpt.write_run_settings(folder, {"lr": 0.1, "optim": "sgd", "seed": 0})
    ckpt.check_run_settings(folder, {"lr": 0.1, "optim": "sgd", "seed": 0})
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.check_run_settings(folder, {"lr": 0.5, "optim": "adamw_torch", "seed": 0})
    msg = str(info.value)
    assert "lr=0.1 (this run: 0.5)" in msg and "optim='sgd' (this run: 'adamw_torch')" in msg and "seed" not in msg
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.check_run_settings(tmp_path / "nope", {})


def test_every_mismatch_is_named(tmp_path):
    acc, model, opt, sched = _setup()
    path = ckpt.save_checkpoint(acc, tmp_path / "ck", step=1, metadata={"lr": 3e-4, "optimizer": "adam", "seed": 0})
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(acc, path, expect={"lr": 0.01, "optimizer": "sgd", "seed": 0})
    msg = str(info.value)
    assert "lr=0.0003 (this run: 0.01)" in msg and "optimizer='adam' (this run: 'sgd')" in msg
    assert "seed" not in msg and "\n" not in msg
