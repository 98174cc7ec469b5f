"""Graduation: clones become trained units over training without changing what the model computes at that moment,
with counts, state, schedules, resumes and refusals as documented (FSDP2: tests/test_fsdp.py)."""

from __future__ import annotations

import math
import os

import _fsdp_worker as w
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from egg_optim import EggConfig, LeaderCloneOptimizer, RolePlan
from egg_optim.core.graduation import Graduation, graduate_roles
from egg_optim.core.roles import Roles
from egg_optim.errors import ConfigError, PlanError

KINDS = ["seed", "mlp", "llama"]  # conv channels (with BatchNorm), Linear rows, MLP neurons and attention heads


def _still_norms(model: nn.Module) -> None:
    """BatchNorm running statistics that a train-mode forward does not move, so that eval outputs before and
    after a train-mode forward can be compared."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0


def _make(kind: str, **opts) -> tuple[nn.Module, LeaderCloneOptimizer]:
    if kind == "llama":
        pytest.importorskip("transformers")
    model = w.build(kind)
    _still_norms(model)
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opts = {"seed": 3, "assign": "random", **opts}
    return model, LeaderCloneOptimizer(model, base, RolePlan(leaders=0.3, independents=0.1), **opts)


def _train(model, opt, kind: str, steps: int, first: int = 0) -> None:
    for s in range(first, first + steps):
        w.loss_of(model, kind, w.batch(kind, s)).backward()
        opt.step()
        opt.zero_grad()


def _outputs(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    x = w.batch(kind, 99)
    out = {}
    with torch.no_grad():
        for mode in ("eval", "train"):
            model.train(mode == "train")
            y = model(x)
            out[mode] = (y.logits if hasattr(y, "logits") else y).clone()
    model.train()
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["output", "weight"])
def test_graduation_keeps_what_the_model_computes(kind, mode):
    """Trained apart first (clone weights differ from their sources in both modes), then each promotion leaves
    train- and eval-mode outputs as they were, while the counts reach the fraction and finally dense."""
    model, opt = _make(kind, clone_mode=mode, clone_every="never")
    _train(model, opt, kind, 4)
    for fraction in (0.6, 0.85, 1.0):
        before = _outputs(model, kind)
        graduated = opt.graduate(fraction)
        after = _outputs(model, kind)
        assert sum(graduated.values()) > 0
        for m in ("eval", "train"):
            torch.testing.assert_close(after[m], before[m], rtol=1e-5, atol=1e-5, msg=f"{kind}/{mode}/{m}")
        for name, roles in opt.roles.items():
            c = roles.counts()
            assert c["leaders"] + c["independents"] >= math.ceil(fraction * roles.num_units - 1e-9), name
        _train(model, opt, kind, 1, first=10)
    assert all(not r.has_clones for r in opt.roles.values())


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_noise_breaks_symmetry_by_the_amount_asked(mode):
    """graduate_noise perturbs the graduated units' rows (and the outputs with them); without it the graduated
    units of output mode start exactly as their sources."""
    runs = {}
    for noise in (0.0, 0.1):
        model, opt = _make("mlp", clone_mode=mode, clone_every=1, graduate_noise=noise)
        _train(model, opt, "mlp", 2)
        old = {n: r for n, r in opt.roles.items()}
        before = _outputs(model, "mlp")["eval"]
        opt.graduate(1.0)
        layer = opt.controller.layers["0"]
        roles = old["0"]
        wt = layer.module.weight.detach()
        diff = (wt[roles.clones] - wt[roles.sources]).abs().max()
        runs[noise] = (diff, (_outputs(model, "mlp")["eval"] - before).abs().max())
    assert runs[0.0][0] == 0 and runs[0.0][1] < 1e-6  # clone_every=1: weight-mode clones equal their sources too
    assert runs[0.1][0] > 1e-3 and runs[0.1][1] > 1e-4


@pytest.mark.parametrize("storage", ["compact", "full"])
@pytest.mark.parametrize("policy", ["copy", "reset", "keep"])
def test_optimizer_state_of_graduated_units(storage, policy):
    """copy: a graduated unit starts with its source's Adam moments; reset: with fresh (zero) ones; keep: full
    storage leaves its own rows, compact storage (which held none) gives fresh ones."""
    model, opt = _make("mlp", clone_mode="output", state_storage=storage, graduate_state=policy)
    _train(model, opt, "mlp", 3)
    roles = opt.roles["0"]
    p = opt.controller.layers["0"].module.weight
    own = opt.masked.state_dict(opt.controller.unit_params(opt.roles))  # full size, as saved
    saved = own["state"][next(i for i, q in enumerate(model.parameters()) if q is p)]["exp_avg_sq"].clone()
    opt.graduate(1.0)
    sq = opt.state[p]["exp_avg_sq"]
    assert sq.shape == p.shape  # no clones left: full size in both storages
    got = sq[roles.clones]
    if policy == "copy":
        torch.testing.assert_close(got, sq[roles.sources], rtol=0, atol=0)
        assert got.abs().sum() > 0
    elif policy == "reset" or storage == "compact":
        assert torch.count_nonzero(got) == 0
    else:
        torch.testing.assert_close(got, saved[roles.clones], rtol=0, atol=0)
    torch.testing.assert_close(sq[roles.active], saved[roles.active], rtol=0, atol=0)  # active rows untouched


def test_schedules_by_steps_and_epochs():
    model, opt = _make("mlp", clone_mode="output", graduate="3:0.7,5:1")
    active = []
    for s in range(6):
        _train(model, opt, "mlp", 1, first=s)
        active.append(sum(r.active.numel() for r in opt.roles.values()))
    assert active[0] == active[1] < active[2] == active[3] < active[4] == active[5]
    assert opt.stats()["graduated_to"] == 1.0
    model, opt = _make("mlp", clone_mode="output", graduate="epoch1:0.7,epoch2:1")
    assert opt.epoch_begin(0) is False
    _train(model, opt, "mlp", 1)
    assert opt.epoch_begin(1) is True and any(r.has_clones for r in opt.roles.values())
    assert opt.epoch_begin(1) is False  # a resumed epoch is not graduated twice
    assert opt.epoch_begin(2) is True and not any(r.has_clones for r in opt.roles.values())


def test_balanced_promotion_and_counts():
    roles = Roles(12, [0, 1], [2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 0, 0, 0, 0, 1, 1])
    out = graduate_roles(roles, 5, torch.Generator().manual_seed(0))
    assert out.counts() == {"leaders": 2, "independents": 6, "clones": 4}
    assert sorted(out.sources.tolist()) == [0, 0, 1, 1]  # taken from the source with the most copies first
    assert torch.equal(out.leaders, roles.leaders)


@settings(max_examples=40, deadline=None)
@given(
    clones=st.lists(st.integers(0, 3), min_size=1, max_size=20),
    k=st.integers(0, 20),
    seed=st.integers(0, 10),
)
def test_graduate_roles_property(clones, k, seed):
    """Any sources and count: a partition with exactly k more independents, leaders and remaining clones'
    sources unchanged, and per-source clone counts within one of each other after k >= the spread."""
    n_lead = 4
    n = n_lead + len(clones)
    roles = Roles(n, list(range(n_lead)), [], list(range(n_lead, n)), clones)
    k = min(k, roles.num_clones)
    out = graduate_roles(roles, k, torch.Generator().manual_seed(seed))
    assert out.num_clones == roles.num_clones - k and out.independents.numel() == k
    assert torch.equal(out.leaders, roles.leaders)
    assert torch.equal(out.source_map[out.clones], roles.source_map[out.clones])
    left = torch.bincount(out.sources, minlength=n_lead)
    had = torch.bincount(roles.sources, minlength=n_lead)
    assert bool((left <= had).all())
    if out.num_clones and k:  # greedy from the largest: no source keeps more than one above another it took from
        took = had - left
        assert int(left[took > 0].min()) >= int(left.max()) - 1


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_resume_across_a_graduation_is_exact(tmp_path, mode):
    """Checkpoint before and after a graduation point: a fresh model and optimizer that load it continue bit for
    bit as the uninterrupted run."""
    opts = dict(clone_mode=mode, graduate="3:0.7,6:1", graduate_noise=0.05)
    model, opt = _make("seed", **opts)
    saved = {}
    for s in range(8):
        if s in (2, 4):
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / f"ck{s}.pt")
        _train(model, opt, "seed", 1, first=s)
    ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for s in (2, 4):
        model2, opt2 = _make("seed", **opts)
        ck = torch.load(tmp_path / f"ck{s}.pt", weights_only=True)
        model2.load_state_dict(ck["model"])
        opt2.load_state_dict(ck["opt"])
        _train(model2, opt2, "seed", 8 - s, first=s)
        for k, v in model2.state_dict().items():
            assert torch.equal(v, ref[k]), (s, k)
        saved[s] = opt2.stats()["graduated_to"]
    assert saved == {2: 1.0, 4: 1.0}


def test_a_state_dict_saved_under_another_schedule_is_refused():
    model, opt = _make("mlp", clone_mode="output", graduate="2:0.7")
    _train(model, opt, "mlp", 3)
    sd = opt.state_dict()
    _, other = _make("mlp", clone_mode="output", graduate="2:0.9")
    with pytest.raises(Exception, match="graduate"):
        other.load_state_dict(sd)


def test_refusals():
    with pytest.raises(ConfigError, match="elect_every"):
        EggConfig(graduate="10:1", elect_every="epoch")
    for bad in ("10:1.5", "10:0.5,5:0.7", "10:0.8,20:0.5", "epoch1:0.5,20:1", "0:0.5", "ten:1"):
        with pytest.raises(ConfigError):
            EggConfig(graduate=bad)
    with pytest.raises(ConfigError, match="graduate_noise"):
        EggConfig(graduate_noise=-1.0)
    model, opt = _make("mlp", clone_mode="output")
    with pytest.raises(ConfigError, match="fraction"):
        opt.graduate(0.0)
    next(iter(opt.controller.layers.values())).module.weight.requires_grad_(False)
    before = {n: r.state() for n, r in opt.roles.items()}
    with pytest.raises(PlanError, match="frozen"):
        opt.graduate(1.0)
    for n, r in opt.roles.items():  # nothing changed
        assert torch.equal(r.state()["codes"], before[n]["codes"])


def test_text_form_round_trips_and_reaches_the_command_line():
    import argparse

    from egg_optim import add_config_arguments, config_from_args

    g = Graduation.parse("epoch2:0.75,epoch4:1")
    assert (g.unit, g.points, str(g)) == ("epochs", ((2, 0.75), (4, 1.0)), "epoch2:0.75,epoch4:1")
    assert Graduation.parse([(600, 0.75), (1200, 1)]) == Graduation.parse("600:0.75,1200:1")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--graduate", "600:0.75,1200:1", "--graduate-state", "reset"]))
    assert cfg.graduation.points == ((600, 0.75), (1200, 1.0)) and cfg.graduate_state == "reset"
    with pytest.raises(SystemExit):
        parser.parse_args(["--graduate", "600:2"])


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, opt = _make("seed", clone_mode="output", graduate="2:0.6,4:1", graduate_noise=0.05)
        net = torch.nn.parallel.DistributedDataParallel(model)
        seen = []
        for s in range(5):
            net(w.batch("seed", s, rank)).logsumexp(1).mean().backward()
            opt.step()
            opt.zero_grad()
            seen.append({n: r.state() for n, r in opt.roles.items()})
        params = {k: v.detach() for k, v in model.named_parameters()}
        torch.save({"roles": seen, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
        del net
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_graduate_identically(tmp_path):
    """Each rank sees other data; both graduate the same units at the same steps and keep identical weights."""
    os.environ["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")
    mp.spawn(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    for a, b in zip(r0["roles"], r1["roles"]):
        for n in a:
            assert torch.equal(a[n]["codes"], b[n]["codes"]) and torch.equal(a[n]["source_map"], b[n]["source_map"])
    assert any(len(set(s[n]["codes"].tolist())) == 3 for s in r0["roles"][:1] for n in s)  # clones at first
    assert all(2 not in s[n]["codes"].tolist() for s in r0["roles"][3:] for n in s)  # dense from step 4
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k


@pytest.mark.parametrize(("n_clones", "cycle"), [(9, 1), (9, 4), (8, 4)])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_packed_roles_promote_their_first_clones_and_stay_packed(n_clones, cycle, k):
    """Clones in one run with sources cycling over the leaders (packed first roles, assign "first" or
    "round_robin"): the first k clones graduate, so the active units stay one run (views, no gathers), and the
    promotion is as balanced as the greedy one."""
    n_lead = 4
    n = n_lead + n_clones
    roles = Roles(n, range(n_lead), [], range(n_lead, n), [i % cycle for i in range(n_clones)])
    out = graduate_roles(roles, k, torch.Generator().manual_seed(0))
    assert out.active_span == (0, n_lead + k) and out.clone_span == (n_lead + k, n_clones - k)
    assert torch.equal(out.source_map[out.clones], roles.source_map[out.clones])
    left = torch.bincount(out.sources, minlength=n_lead)[:cycle]
    assert int(left.max()) - int(left.min()) <= 1
