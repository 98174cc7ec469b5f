"""Block-parallel block-wise LFNN-l on 2 gloo processes (issue 23, item 3): the synchronous pipeline is the
one-process block-wise run, step for step (same parameters after training)."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import free_port
from torch import nn

from egg_optim.errors import ConfigError
from egg_optim.lfnn import LeaderFollowerLoss
from egg_optim.lfnn.pipeline import PipelineStage

STEPS = 4


class Net(nn.Module):
    """Two blocks: ``b1`` (local: 2 workers of 4 channels) and ``b2`` (the last block and the classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.b2 = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.b1(x))


def _loss(model: nn.Module) -> LeaderFollowerLoss:
    return LeaderFollowerLoss(
        model,
        num_classes=4,
        blocks={"b1": "b1"},
        block_workers=2,
        mode="lfnn_l",
        delta=0.5,
        aux_hidden=8,
        sync_selection=False,  # the block lives on one rank: its leaders are its own, not averaged over ranks
    )


def _batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


def _worker(rank: int, port: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    init = torch.load(os.path.join(tmp, "init.pt"))
    net = Net()
    net.load_state_dict(init["net"])
    if rank == 0:
        holder = nn.Sequential(OrderedDict(b1=net.b1))  # same module name, so the same aux-head key
        lf = _loss(holder)
        lf.load_state_dict(init["lf"])
        opt = torch.optim.Adam([*net.b1.parameters(), *lf.parameters()], lr=1e-2)
        stage = PipelineStage(net.b1, lambda out, y: lf.local_loss(), opt)
    else:
        opt = torch.optim.Adam(net.b2.parameters(), lr=1e-2)
        stage = PipelineStage(net.b2, F.cross_entropy, opt)
    for t in range(STEPS):
        x, y = _batch(t)
        if rank == 0:
            lf.set_targets(y)
        stage.step(x if rank == 0 else None, y)
    stage.block.eval()
    logits = stage.forward_only(_batch(STEPS)[0] if rank == 0 else None)
    assert (logits is None) == (rank == 0)
    shard = stage.state_dict()
    shard["eval_logits"] = logits
    try:  # a shard resumes only the rank that saved it, and nothing changes on refusal
        stage.load_state_dict({**shard, "rank": 1 - rank, "steps": 0})
        raise AssertionError("a shard of another rank was accepted")
    except ConfigError:
        assert stage.steps == STEPS
    if rank == 0:
        shard["lf"] = lf.state_dict()
    torch.save(shard, os.path.join(tmp, f"r{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_pipeline_equals_the_one_process_blockwise_run(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    net = Net()
    lf = _loss(net)
    torch.save({"net": net.state_dict(), "lf": lf.state_dict()}, tmp_path / "init.pt")
    opt = torch.optim.Adam([*net.parameters(), *lf.parameters()], lr=1e-2)
    for t in range(STEPS):  # the one-process block-wise LFNN-l run
        x, y = _batch(t)
        with lf.targets(y):
            out = net(x)
        opt.zero_grad()
        lf.loss(out).backward()
        opt.step()
    lf.remove()

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    assert r0["steps"] == r1["steps"] == STEPS
    for name, ref in [*net.b1.state_dict().items()]:
        assert torch.allclose(r0["block"][name], ref, atol=1e-6), f"b1.{name}"
    for name, ref in lf.state_dict().items():
        if isinstance(ref, torch.Tensor):
            assert torch.allclose(r0["lf"][name], ref, atol=1e-6), name
    for name, ref in net.b2.state_dict().items():
        assert torch.allclose(r1["block"][name], ref, atol=1e-6), f"b2.{name}"
    net.eval()
    with torch.no_grad():
        assert torch.allclose(r1["eval_logits"], net(_batch(STEPS)[0]), atol=1e-6)  # evaluation through the pipe
    moved = (r1["block"]["4.weight"] - torch.load(tmp_path / "init.pt")["net"]["b2.4.weight"]).abs().max()
    assert moved > 1e-3  # the comparison is not between two untrained copies


def test_pipeline_stage_needs_an_initialised_group():
    with pytest.raises(ConfigError, match="torch.distributed"):
        PipelineStage(nn.Linear(2, 2), F.mse_loss, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
