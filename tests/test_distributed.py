"""Role decisions agree across 2 CPU processes (gloo)."""

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _process_group(rank: int, world: int, port: int) -> Iterator[None]:
    """A gloo group for one spawned rank (1 thread), torn down after a closing barrier whatever happens."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(worker: Callable[..., None], tmp_path, *args) -> tuple[dict, dict]:
    """Run ``worker(rank, 2, port, out_dir, *args)`` on 2 processes; the two ranks' saved results."""
    tests_dir = os.path.dirname(__file__)
    os.environ["PYTHONPATH"] = tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), *args), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    return r0, r1


def _worker(
    rank: int, world: int, port: int, out_dir: str, use_ddp: bool, election: str, assign: str, mode: str, probe: bool
) -> None:
    with _process_group(rank, world, port):
        from conftest import TinySeedNet

        from egg_optim import LeaderCloneOptimizer, RolePlan

        torch.manual_seed(0)
        model = TinySeedNet()
        opt = LeaderCloneOptimizer(
            model,
            torch.optim.Adam(model.parameters(), lr=1e-2),
            RolePlan.preset("mild", table="mnist"),
            clone_every=2,
            elect_every=3,
            election=election,
            assign=assign,
            seed=7,
            clone_mode=mode,
        )
        gen = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
        if probe:  # coupled from one eager pass of this rank's own example, as before torch.compile
            opt.couple_norms(torch.randn(2, 1, 6, 6, generator=gen))
        net = torch.nn.parallel.DistributedDataParallel(model) if use_ddp else model
        for _ in range(9):
            net(torch.randn(4, 1, 6, 6, generator=gen)).logsumexp(1).mean().backward()
            opt.step()
            opt.zero_grad()
        torch.save(
            {
                "roles": {n: r.state() for n, r in opt.roles.items()},
                "params": {k: v.detach() for k, v in model.named_parameters()},
                "elections": opt.elections,
                "coupled": opt.coupled_norms,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        del net  # release DDP's reducer (and its gloo work) before tearing the group down


@pytest.mark.parametrize(
    "use_ddp, election, assign, mode, probe",
    [
        (False, "grad_norm", "random", "weight", False),
        (False, "taylor", "round_robin", "weight", False),
        (True, "grad_norm", "nearest", "weight", False),
        (True, "random", "random", "output", False),
        (True, "random", "random", "output", True),  # couple_norms(example): each rank probes its own batch
    ],
)
def test_two_ranks_elect_identically(tmp_path, use_ddp, election, assign, mode, probe):
    r0, r1 = _spawn(_worker, tmp_path, use_ddp, election, assign, mode, probe)
    assert r0["elections"] == r1["elections"] == 3
    assert r0["coupled"] == r1["coupled"] and len(r0["coupled"]) == 9  # every conv with its BatchNorm
    for name in r0["roles"]:
        for key in ("codes", "source_map"):
            assert torch.equal(r0["roles"][name][key], r1["roles"][name][key]), (name, key)
    if use_ddp:
        for k in r0["params"]:
            assert torch.equal(r0["params"][k], r1["params"][k]), k
    else:  # ranks trained on different data without gradient sync: weights differ, yet roles agree
        assert any(not torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])


def _nan_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with _process_group(rank, world, port):
        import warnings

        from conftest import TinySeedNet

        from egg_optim import LeaderCloneOptimizer

        torch.manual_seed(0)
        model = TinySeedNet()
        opt = LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), "mild", clone_mode="weight")
        net = torch.nn.parallel.DistributedDataParallel(model)
        gen = torch.Generator().manual_seed(100 + rank)
        for step in range(3):
            x = torch.randn(4, 1, 6, 6, generator=gen)
            if step == 2 and rank == 0:
                x[0, 0, 0, 0] = float("nan")  # one rank's batch: the all-reduced gradients are NaN on both
            net(x).logsumexp(1).mean().backward()
            opt.step()
            opt.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = opt.stats()
        clones = {}
        for name, layer in opt.layers.items():
            roles = opt.roles[name]
            clones[name] = layer.weight.detach()[roles.clones].clone()
        torch.save(
            {
                "cloned": {n: s["cloned_units"] for n, s in stats["layers"].items()},
                "clones": clones,
                "warned": sum("held NaN or inf" in str(c.message) for c in caught),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        del net


def test_two_ranks_keep_the_same_clones_when_the_gradients_are_not_finite(tmp_path):
    """Weight mode's clone event checks finiteness on the device at every step; under DDP a NaN in one rank's batch
    makes every rank's all-reduced gradients NaN, and every rank keeps the same clones (finite, equal across
    ranks) and counts and reports them alike at its next ``stats()``."""
    r0, r1 = _spawn(_nan_worker, tmp_path)
    assert r0["cloned"] == r1["cloned"] and r0["warned"] == r1["warned"] == 1
    for name in r0["clones"]:
        assert torch.equal(r0["clones"][name], r1["clones"][name]), name
        assert bool(torch.isfinite(r0["clones"][name]).all()), name  # the NaN step copied nothing into them
    assert all(c > 0 for c in r0["cloned"].values())  # the two finite steps cloned


def _mismatch_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with _process_group(rank, world, port):
        from conftest import TinySeedNet

        from egg_optim import LeaderCloneOptimizer, RolePlan
        from egg_optim.errors import PlanError

        torch.manual_seed(0)
        model = TinySeedNet()
        plan = RolePlan(0.5, 0.0, exclude=["fc1"] if rank == 1 else [])  # one rank would manage one layer fewer
        try:
            LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters()), plan)
            refused = ""
        except PlanError as exc:
            refused = str(exc)
        torch.save({"refused": refused}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ranks_that_would_manage_different_units_are_all_refused(tmp_path):
    """Ranks whose models or plans give different managed units are refused together at construction, naming what
    this rank manages, instead of mixing unrelated scores (or waiting forever) at the first election."""
    r0, r1 = _spawn(_mismatch_worker, tmp_path)
    for r in (r0, r1):
        assert "ranks of the process group would manage different layers" in r["refused"]


def _repack_worker(rank: int, world: int, port: int, out_dir: str, mode: str) -> None:
    with _process_group(rank, world, port):
        from egg_recipes import tiny_transformers as tiny

        from egg_optim import LeaderCloneOptimizer

        torch.manual_seed(0)
        model = tiny.make("mixtral")
        opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "mild", clone_mode=mode,
                                   elect_every=2, election="grad_norm", repack=True)  # fmt: skip
        net = torch.nn.parallel.DistributedDataParallel(model)
        for step in range(5):
            net(**tiny.inputs("mixtral", batch=2, seed=10 * step + rank)).loss.backward()  # each rank its own data
            opt.step()
            opt.zero_grad()
        torch.save(
            {
                "roles": {n: r.state() for n, r in opt.roles.items()},
                "order": opt.unit_order(),
                "params": {k: v.detach() for k, v in model.named_parameters()},
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        del net


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_two_ranks_repack_identically(tmp_path, mode):
    """EggConfig.repack under DDP: elections on scores averaged over the ranks, so every rank reorders the same
    units the same way and the replicas stay equal."""
    r0, r1 = _spawn(_repack_worker, tmp_path, mode)
    assert r0["order"] and r0["order"].keys() == r1["order"].keys()
    for name, order in r0["order"].items():
        assert torch.equal(order, r1["order"][name]), name
    assert any(not torch.equal(o, torch.arange(o.numel())) for o in r0["order"].values())
    for name in r0["roles"]:
        for key in ("codes", "source_map"):
            assert torch.equal(r0["roles"][name][key], r1["roles"][name][key]), (name, key)
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
