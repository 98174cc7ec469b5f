"""Atomic, verified checkpoints (egg_optim.kit.checkpoint) around accelerate's save_state / load_state."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TinySeedNet, assert_same_state, model_state

pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from accelerate import Accelerator  # noqa: E402

from egg_optim import LeaderCloneOptimizer, RolePlan  # noqa: E402
from egg_optim.errors import EggOptimError  # noqa: E402
from egg_optim.kit import checkpoint as ckpt  # noqa: E402

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
    assert ckpt.remove_incomplete(tmp_path) == leftovers and not leftovers[0].exists()


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
