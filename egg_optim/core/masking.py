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
``index`` then holds the *local* positions of the clones this rank holds, and nothing is communicated. Where those
positions are a few runs (packed roles: the clones one run, cut by the shard boundary at most), the entry keeps
them and the rows are saved, zeroed and written back by strided copies, with no index op.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import axes
from .axes import Axis, Span
from .sharding import local


@dataclass(frozen=True)
class MaskEntry:
    param: torch.Tensor
    index: torch.Tensor  # clone positions (in this rank's slice, for a sharded parameter), on its device
    dim: Axis = 0  # the parameter's unit axis (:mod:`egg_optim.core.axes`)
    runs: list[Span] | None = None  # those positions as a few runs (:func:`axes.part_runs`), where they are

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t``'s clone slices (laid out as :func:`axes.select` gives them)."""
        if self.runs is None:
            return axes.select(t, self.dim, self.index)
        rows = axes.cut(t, self.dim, self.runs)
        return rows.clone() if rows._is_view() else rows  # (one run may come back as a view of ``t``)

    def put(self, t: torch.Tensor, rows: torch.Tensor) -> None:
        if self.runs is None:
            axes.copy_(t, self.dim, self.index, rows)
        else:
            axes.write_runs_(t, self.dim, self.runs, rows)

    def zero(self, t: torch.Tensor) -> None:
        if self.runs is None:
            axes.fill_(t, self.dim, self.index, 0)
        else:
            axes.fill_runs_(t, self.dim, self.runs, 0)


Saved = list[tuple[MaskEntry, torch.Tensor, dict[str, torch.Tensor]]]


def row_state_keys(param: torch.Tensor, state: Mapping[str, object]) -> list[str]:
    """Names of the full-size optimizer-state tensors of ``param`` (one slice per unit)."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape == param.shape]


@torch.no_grad()
def snapshot(entries: list[MaskEntry], opt_state: Mapping[torch.Tensor, dict]) -> Saved:
    saved: Saved = []
    for e in entries:
        st = opt_state.get(e.param, {})
        rows = {k: e.take(local(st[k])) for k in row_state_keys(e.param, st)}
        saved.append((e, e.take(local(e.param)), rows))
        if e.param.grad is not None:
            e.zero(local(e.param.grad))
    return saved


@torch.no_grad()
def restore(saved: Saved, opt_state: Mapping[torch.Tensor, dict]) -> None:
    for e, p_rows, rows in saved:
        e.put(local(e.param), p_rows)
        st = opt_state.get(e.param, {})
        for k, v in rows.items():
            e.put(local(st[k]), v)
