"""Exact role masking around an arbitrary elementwise optimizer step (``state_storage="full"``).

The default, :mod:`egg_optim.core.compact`, leaves clone rows out of the step instead; this module steps whole
tensors and puts clone rows back, so clones keep their own optimizer-state rows.

Zeroing a clone's gradient is not masking: momentum and weight decay still move the row. Instead the clone
rows of every parameter, and of every optimizer-state tensor shaped like it, are saved before the base step
and written back after it, so they are bit-identical whatever the optimizer does. Rows that are not clones
are untouched: an elementwise optimizer gives them exactly the update it would give without the wrapper.

Clone gradient rows are zeroed before the step, so state that the optimizer creates lazily on its first
step starts, for clone rows, from what a zero gradient gives (zero moments, a zero momentum buffer).
Scalar state (Adam's ``step``) is shared by the whole tensor and is not per unit.

Parameters sharded by FSDP2 (DTensors, :mod:`egg_optim.core.sharding`) are masked on this rank's slice: an entry's
``index`` then holds the *local* positions of the clones this rank holds, and nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import axes
from .axes import Axis
from .sharding import local


@dataclass(frozen=True)
class MaskEntry:
    param: torch.Tensor
    index: torch.Tensor  # clone positions (in this rank's slice, for a sharded parameter), on its device
    dim: Axis = 0  # the parameter's unit axis (:mod:`egg_optim.core.axes`)


Saved = list[tuple[MaskEntry, torch.Tensor, dict[str, torch.Tensor]]]


def row_state_keys(param: torch.Tensor, state: Mapping[str, object]) -> list[str]:
    """Names of the full-size optimizer-state tensors of ``param`` (one slice per unit)."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape == param.shape]


@torch.no_grad()
def snapshot(entries: list[MaskEntry], opt_state: Mapping[torch.Tensor, dict]) -> Saved:
    saved: Saved = []
    for e in entries:
        st = opt_state.get(e.param, {})
        rows = {k: axes.select(local(st[k]), e.dim, e.index) for k in row_state_keys(e.param, st)}
        saved.append((e, axes.select(local(e.param), e.dim, e.index), rows))
        if e.param.grad is not None:
            axes.fill_(local(e.param.grad), e.dim, e.index, 0)
    return saved


@torch.no_grad()
def restore(saved: Saved, opt_state: Mapping[torch.Tensor, dict]) -> None:
    for e, p_rows, rows in saved:
        axes.copy_(local(e.param), e.dim, e.index, p_rows)
        st = opt_state.get(e.param, {})
        for k, v in rows.items():
            axes.copy_(local(st[k]), e.dim, e.index, v)
