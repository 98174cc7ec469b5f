"""Expanding a layer's active units to all units (``y.index_select(dim, gather)``) and its adjoint, on torch's fast
kernels and in the layout the activations have."""

from __future__ import annotations

import torch

from ...core import axes
from ...core.axes import Cycle
from ...core.roles import Roles

# packed roles, as the expansion sees them: (whether the active units come first, the clones' sources as a cycle
# over positions of the active output, the number of clones)
Tile = tuple[bool, Cycle, int]


def tile_of(roles: Roles) -> Tile | None:
    """``roles`` as a :data:`Tile` when the active units are one run, the clones the other, and the clones' sources
    cycle over a run of leaders (the default packed roles), else ``None``. Reads the roles on the host: call it
    when roles change."""
    active, clones, sources = roles.active_span, roles.clone_span, roles.source_cycle
    if active is None or clones is None or sources is None:
        return None
    q, m, r = sources
    return clones[0] == active[0] + active[1], (q - active[0], m, r), clones[1]


def expand_tiled(y: torch.Tensor, dim: int, tile: Tile) -> torch.Tensor:
    """What :func:`expand_units` computes on packed roles, without an index op: the active output and a broadcast of
    its sources' run, concatenated. Its backward is slices and a reshaped sum: no scatter (a compiled ``index_add``
    is an atomic scatter on GPUs and a scalar loop in inductor's CPU code). Eager, it takes one launch more than
    the ``index_select`` (the broadcast is materialised before the ``cat``), so it is used under ``torch.compile``."""
    active_first, cycle, n = tile
    axis = dim % y.dim()
    clones = axes.tiled(y, axis, cycle, n)
    return torch.cat([y, clones] if active_first else [clones, y], axis)


def _innermost(t: torch.Tensor) -> bool:
    """Whether ``t`` (N, C, *S) stores its channels innermost (``channels_last``; read from the strides, so a
    single channel counts too, as a convolution lays it out). Callers test ``t.stride(1) == 1`` first: it settles
    the common contiguous case in one call (this runs per managed layer and step, on the host)."""
    return t.dim() > 2 and t.movedim(1, -1).is_contiguous()


def expand_units(y: torch.Tensor, dim: int, gather: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``y.index_select(dim, gather)``, gathered through a 2-D view where that is faster or keeps the layout.

    * The last dim of a >2-D contiguous tensor: torch's CPU ``index_select`` takes a generic element-wise path there;
      expanding a Linear's (16, 128, 128) output to 256 units took 8.5 ms against 0.6 ms for the same data viewed as
      (2048, 128), and 68 ms against 5.7 ms at 512 -> 1024 units (1 thread).
    * The channels (dim 1) of a ``channels_last`` tensor: ``index_select`` returns a contiguous (NCHW) tensor, so
      every managed conv would hand the next layer the other layout, and the convolutions and norms around it
      would convert back and forth (forward and backward); gathered as the last dim of its (N, *S, C) view, the
      result stays ``channels_last``.

    The views change no values; their backward is the 2-D ``index_add_``, in the same layout. ``like``: the tensor
    whose layout the result takes (default ``y``; a fused norm passes the conv output its statistics came from).
    """
    if dim == 1:
        src = y if like is None else like
        if src.stride(1) == 1 and _innermost(src):
            last = y.movedim(1, -1)
            flat = last.reshape(-1, last.shape[-1]).index_select(1, gather)
            return flat.view(last.shape[:-1] + (gather.numel(),)).movedim(-1, 1)
    elif y.dim() > 2 and dim in (-1, y.dim() - 1) and y.is_contiguous():
        flat = y.view(-1, y.shape[-1]).index_select(1, gather)
        return flat.view(y.shape[:-1] + (gather.numel(),))
    return y.index_select(dim, gather)


def fold_units(g: torch.Tensor, gather: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`expand_units` along dim 1: zeros shaped like ``like`` with ``g``'s channels added at
    ``gather``, ``channels_last`` when ``like`` is."""
    if like.stride(1) == 1 and _innermost(like):
        last = like.movedim(1, -1)
        out = like.new_zeros(last.shape)
        out.view(-1, last.shape[-1]).index_add_(1, gather, g.movedim(1, -1).reshape(-1, g.shape[1]))
        return out.movedim(-1, 1)
    return g.new_zeros(like.shape).index_add_(1, gather, g)
