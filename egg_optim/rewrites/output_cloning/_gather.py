"""Expanding a layer's active units to all units (``y.index_select(dim, gather)``) and its adjoint, on torch's fast
kernels and in the layout the activations have."""

from __future__ import annotations

import torch

from ...core import axes
from ...core.axes import Cycle
from ...core.roles import Roles
from ..base import direct_apply

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


# From this many expanded elements, eager output mode folds clone gradients by sums; below, the backward is the
# gather's index_add. The index_add is an atomic scatter on a GPU, every clone of a layer adding into its one source
# (``assign="first"``) at the same addresses, and not deterministic; the fold is deterministic, but its autograd
# function costs about 60 us more host time per layer and step (bench_host.md; 35-40 us since it is called by its C
# entry point), which is what a small model waits for on a GPU. From about 2^24 elements (2^23 at today's host cost;
# kept until a GPU measures the saving) the fold's estimated saving of device time (a few ps per element; not
# measured) exceeds that host cost; the seed CIFAR CNN's layers expand to 2^18-2^25 elements at batch 128 (its
# four largest fold), 2^21-2^28 at 1024. On the CPU the two cost the same within noise (bench_norms.md). The GPU
# benchmark times the index_add control (bench_gpu.py ``-indexadd``).
FOLD_MIN_NUMEL = 1 << 24


class _ExpandPacked(torch.autograd.Function):
    """:func:`expand_units` forward (one gather), :func:`fold_tiled` backward (``torch.func`` transforms too)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(y, dim, gather, tile):
        # detached: expand_units returns a view of its 2-D gather, and an output of a custom Function that is a view
        # cannot be written in place (a ReLU(inplace=True) after the layer)
        return expand_units(y, dim, gather).detach()

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, dim, _, tile = inputs
        ctx.dim, ctx.tile, ctx.active = dim, tile, y.shape[dim]

    @staticmethod
    def backward(ctx, g):
        return fold_tiled(g, ctx.dim, ctx.tile, ctx.active), None, None, None


_expand_packed = direct_apply(_ExpandPacked)


def expand_packed(
    y: torch.Tensor, dim: int, gather: torch.Tensor, tile: Tile, min_numel: int | None = None
) -> torch.Tensor:
    """``y.index_select(dim, gather)`` on packed roles (``tile``), eager. From ``min_numel`` expanded elements
    (default :data:`FOLD_MIN_NUMEL`) its backward sums clone gradients into their sources by a reshaped sum (three
    kernels, deterministic) instead of the gather's ``index_add`` (two kernels)."""
    threshold = FOLD_MIN_NUMEL if min_numel is None else min_numel
    if y.numel() // y.shape[dim] * gather.numel() < threshold:
        return expand_units(y, dim, gather)
    return _expand_packed(y, dim, gather, tile)


def fold_tiled(g: torch.Tensor, dim: int, tile: Tile, active: int) -> torch.Tensor:
    """The adjoint of :func:`expand_tiled`: ``g``'s active units, plus each clone's gradient summed into its source
    (``active`` units out, in ``g``'s layout)."""
    active_first, (q, m, r), n = tile
    axis = dim % g.dim()
    out = axes.narrow(g, axis, (0 if active_first else n, active)).clone(memory_format=torch.preserve_format)
    clones = axes.narrow(g, axis, (active if active_first else 0, n))
    axes.narrow(out, axis, (q, m)).add_(axes.fold(clones, axis, m, r))
    return out


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
