"""The little of torch.distributed that role decisions need: one all-reduce of scores per election, one check at
construction that every rank manages the same units (and, for parameters sharded by FSDP2,
:mod:`egg_optim.core.sharding`)."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(t: torch.Tensor, group=None) -> torch.Tensor:
    """Average ``t`` over ranks (in place where possible) so every rank sees the same scores."""
    if not is_distributed():
        return t
    backend = dist.get_backend(group)
    work = t
    if backend == "nccl" and not t.is_cuda:
        work = t.cuda()
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    work /= dist.get_world_size(group)
    return work.to(t.device) if work is not t else t


def all_reduce_min(t: torch.Tensor, group=None) -> torch.Tensor:
    """The elementwise minimum of ``t`` over ranks (a decision every rank takes only if every rank agrees)."""
    if not is_distributed():
        return t
    work = t.cuda() if dist.get_backend(group) == "nccl" and not t.is_cuda else t
    dist.all_reduce(work, op=dist.ReduceOp.MIN, group=group)
    return work.to(t.device)


def same_on_all_ranks(text: str, group=None) -> bool:
    """Whether every rank of ``group`` holds the same ``text`` (compared by a 63-bit digest: one all-reduce)."""
    if not is_distributed():
        return True
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    t = all_reduce_min(torch.tensor([value, -value], dtype=torch.int64), group)
    return int(t[0]) == value == -int(t[1])


def derived_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and an event key (e.g. ``("elect", 3)``).

    Every random decision draws from a generator derived from the seed and the event counter, so all ranks
    draw the same numbers without communication, and a resumed run draws what an uninterrupted one would.
    """
    text = ":".join(str(k) for k in (seed, *keys)).encode()
    value = int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(value)
