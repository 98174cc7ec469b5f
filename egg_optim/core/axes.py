"""Unit axes: where along a tensor its units' positions lie.

An ``int`` is one dimension (rows of a Linear weight: 0; its columns: 1). A pair ``(a, b)`` is two dimensions taken
together, position ``p = i_a * shape[b] + i_b``: the hidden neurons of each expert in transformers' fused 3-D MoE
weights (``[experts, 2 x inner, hidden]``: ``(0, 1)``; ``[experts, hidden, inner]``: ``(0, 2)``), where one dimension
alone would select a neuron of every expert. On a pair the operations index both dimensions of a view with
advanced indexing, so in-place writes reach the tensor; the slices they take (and compact optimizer state) are laid
out ``[positions, rest...]``.

Every function is the plain ``index_select`` / ``index_copy_`` / ``index_fill_`` for an ``int`` axis.

A :data:`Span` ``(start, length)`` is an index that is one ascending run of positions (:func:`span`, found once
when roles change): on an ``int`` axis its slices are ``narrow`` views, which cost no index op at all.
"""

from __future__ import annotations

import torch

Axis = int | tuple[int, int]
Span = tuple[int, int]
Cycle = tuple[int, int, int]  # (q, m, r): positions q + (k + r) % m, k = 0, 1, ... (see cycle)


def span(index: torch.Tensor) -> Span | None:
    """``(start, length)`` when ``index`` (ascending, no repeats, as :class:`~egg_optim.core.roles.Roles` keeps
    them) is one run ``start, start + 1, ...``; else ``None``. Reads the index on the host: call it when roles
    change, not per step."""
    n = int(index.numel())
    if n == 0:
        return None
    first, last = int(index[0]), int(index[-1])
    return (first, n) if last - first + 1 == n else None


def cycle(index: torch.Tensor) -> Cycle | None:
    """``(q, m, r)`` when ``index[k] == q + (k + r) % m`` for every ``k``: every entry the same position
    (``m = 1``), or cycling over the run ``q .. q + m - 1`` starting ``r`` into it (the last period may stop
    short). Clone sources with packed roles follow it (``assign="first"``: one leader; ``"round_robin"``: the
    leaders in turn, rotated once the first clones graduate), so a clone event, or folding clone columns into
    their sources, works on reshaped views. Host reads: call it when roles change."""
    n = int(index.numel())
    if n == 0:
        return None
    q, hi = int(index.min()), int(index.max())
    m, r = hi - q + 1, int(index[0]) - q
    if not torch.equal(index, q + (torch.arange(n, device=index.device) + r) % m):
        return None
    return q, m, r


def narrow(t: torch.Tensor, axis: int, where: Span) -> torch.Tensor:
    """The view of ``t``'s positions ``where`` along ``axis``: what :func:`select` copies for that span."""
    return t.narrow(axis, where[0], where[1])


def pick(t: torch.Tensor, axis: Axis, index: torch.Tensor, where: Span | None) -> torch.Tensor:
    """The slices of ``t`` at ``index`` along ``axis``: the ``narrow`` view when ``where`` is that index as one run
    (an ``int`` axis only), else :func:`select`'s gathered copy."""
    if where is not None:
        return narrow(t, axis, where)
    return select(t, axis, index)


def tiled(t: torch.Tensor, axis: int, where: Cycle, n: int) -> torch.Tensor:
    """``n`` positions cycling as ``where`` says (:func:`cycle`), as a new tensor: what :func:`select` gives for
    that index, by a broadcast copy instead of a gather."""
    q, m, r = where
    block = narrow(t, axis, (q, m)).unsqueeze(axis)
    sizes = list(block.shape)
    sizes[axis] = -(-(n + r) // m)  # whole periods, cut to n positions from r below
    return block.expand(sizes).flatten(axis, axis + 1).narrow(axis, r, n)


def tile_pieces(
    dst: torch.Tensor, axis: int, block: torch.Tensor, r: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """How to write ``block``'s ``m`` positions cycling from ``r`` into every position of ``dst`` along ``axis``
    (``dst[k] = block[(k + r) % m]``) in place, with no temporary: ``(destination view, source)`` pairs, at most
    three broadcast copies (a short first period, whole periods, a short last one), ``d.copy_(src)`` each (or a
    ``torch.where`` on a flag the host never reads). Views only: weight mode's clone event keeps them from step
    to step (:func:`egg_optim.core.cloning.copy_plan`)."""
    n, m = dst.shape[axis], block.shape[axis]
    if m == 1:  # every position the same: one broadcast copy
        return [(dst, block)]
    pieces, k = [], 0
    if r:
        k = min(m - r, n)
        pieces.append((narrow(dst, axis, (0, k)), narrow(block, axis, (r, k))))
    periods = (n - k) // m
    if periods:
        pieces.append((narrow(dst, axis, (k, periods * m)).unflatten(axis, (periods, m)), block.unsqueeze(axis)))
        k += periods * m
    if k < n:
        pieces.append((narrow(dst, axis, (k, n - k)), narrow(block, axis, (0, n - k))))
    return pieces


def replaced(t: torch.Tensor, axis: int, where: Span, block: torch.Tensor) -> torch.Tensor:
    """``t`` with its positions ``where`` along ``axis`` replaced by ``block``, as a new tensor: what :func:`copied`
    gives for that run, by a ``cat`` of views instead of an index copy (gradients reach ``t`` outside the run and
    whatever ``block`` was taken from)."""
    start, n = where
    pieces = [narrow(t, axis, (0, start)), block, narrow(t, axis, (start + n, t.shape[axis] - start - n))]
    return torch.cat([x for x in pieces if x.shape[axis]], axis)


def fold(t: torch.Tensor, axis: int, m: int, r: int = 0) -> torch.Tensor:
    """Sum ``t``'s positions ``k`` into ``(k + r) % m`` along ``axis`` (``m`` positions out): the inverse pattern
    of :func:`tiled`, by reshaped sums instead of an ``index_add``."""
    if r:  # r leading positions of zeros, then no rotation
        shape = list(t.shape)
        shape[axis] = r
        t = torch.cat([t.new_zeros(shape), t], axis)
    n = t.shape[axis]
    whole = n // m * m
    out = narrow(t, axis, (0, whole)).unflatten(axis, (n // m, m)).sum(axis)
    if whole == n:
        return out
    rest = n - whole
    tail = narrow(out, axis, (0, rest)) + narrow(t, axis, (whole, rest))
    return torch.cat([tail, narrow(out, axis, (rest, m - rest))], axis)


def _pair(t: torch.Tensor, axis: tuple[int, int], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if type(t).__name__ == "DTensor":
        from ..errors import PlanError

        raise PlanError(
            "a fused-experts tensor sharded by FSDP2 reached an operation on whole tensors (egg_optim works on each "
            "rank's own slice of it); please report this with the model, and leave the experts out of the plan "
            "meanwhile (RolePlan(exclude=['*.experts']))"
        )
    a, b = axis
    index = index.to(t.device)
    return t.movedim((a, b), (0, 1)), torch.div(index, t.shape[b], rounding_mode="floor"), index % t.shape[b]


# at most this many runs are cut by views (packed roles over a fused gate/up or qkv weight: 2-3 runs; a Mamba-2
# mixer's input projection [z | x | B | C | dt]: 5; each expert of fused MoE weights alike: 1-2), and along one
# dimension, where there are several, none shorter than MIN_RUN (one run is a view whatever its length); other
# positions (scattered roles) are gathered: one op, where a cut of many short runs would launch one per run (and as
# many in backward) to move little
MAX_RUNS, MIN_RUN = 5, 8


def part_runs(index: torch.Tensor, shape: torch.Size | tuple[int, ...], axis: Axis) -> list[Span] | None:
    """The positions ``index`` (ascending) takes as a few ``(start, length)`` runs along one dimension, for
    :func:`cut` and :func:`write_runs_` to do what :func:`select` and :func:`copy_` do by views and strided copies;
    ``None`` where they are more than :data:`MAX_RUNS` (along an ``int`` axis, or several and one shorter than
    :data:`MIN_RUN`).
    On a pair axis ``(a, b)`` whose dimension ``a`` holds parts (the experts of fused MoE weights) the runs are the
    offsets along ``b`` that every part takes alike (``None`` where they differ). Host reads: call it when roles
    change."""
    if index.numel() == 0:
        return None
    if isinstance(axis, int):
        offsets = index.cpu()
    else:
        parts, size = int(shape[axis[0]]), int(shape[axis[1]])
        if index.numel() % parts:
            return None
        offsets = index.cpu().view(parts, -1) - (torch.arange(parts) * size)[:, None]
        if not bool((offsets == offsets[0]).all()):
            return None
        offsets = offsets[0]
    runs: list[Span] = []
    for x in offsets.tolist():
        if runs and runs[-1][0] + runs[-1][1] == x:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        elif len(runs) == MAX_RUNS:
            return None
        else:
            runs.append((x, 1))
    if isinstance(axis, int) and len(runs) > 1 and min(n for _, n in runs) < MIN_RUN:
        return None
    return runs


def _block(t: torch.Tensor, dim: int, runs: list[Span]) -> torch.Tensor:
    return torch.cat([narrow(t, dim, r) for r in runs], dim) if len(runs) > 1 else narrow(t, dim, runs[0])


def cut(t: torch.Tensor, axis: Axis, runs: list[Span], layout: str = "rows") -> torch.Tensor:
    """The positions :func:`part_runs` found, as a new tensor: laid out as :func:`select` gives them
    (``layout="rows"``; on a pair axis ``[positions, rest...]``), or on a pair axis in ``t``'s own layout with
    fewer entries along ``axis[1]`` (``"tensor"``)."""
    block = _block(t, axis if isinstance(axis, int) else axis[1], runs)
    if layout == "tensor" or isinstance(axis, int):
        return block.contiguous()
    return block.movedim(axis, (0, 1)).flatten(0, 1).contiguous()


def write_runs_(t: torch.Tensor, axis: Axis, runs: list[Span], source: torch.Tensor) -> torch.Tensor:
    """:func:`copy_` of the positions :func:`part_runs` found (``source`` laid out as :func:`cut` gives them), by
    strided copies."""
    if isinstance(axis, int):
        b, whole = axis, source
    else:
        b, whole = axis[1], source.unflatten(0, (t.shape[axis[0]], -1)).movedim((0, 1), axis)
    at = 0
    for r in runs:
        narrow(t, b, r).copy_(whole.narrow(b, at, r[1]))
        at += r[1]
    return t


def fill_runs_(t: torch.Tensor, axis: Axis, runs: list[Span], value: float) -> torch.Tensor:
    """:func:`fill_` of the positions :func:`part_runs` found, by strided fills."""
    b = axis if isinstance(axis, int) else axis[1]
    for r in runs:
        narrow(t, b, r).fill_(value)
    return t


def positions(shape: torch.Size | tuple[int, ...], axis: Axis) -> int:
    """How many positions ``shape`` has along ``axis``."""
    return int(shape[axis]) if isinstance(axis, int) else int(shape[axis[0]]) * int(shape[axis[1]])


def slice_shape(shape: torch.Size | tuple[int, ...], axis: Axis, n: int) -> tuple[int, ...]:
    """The shape of ``n`` positions' slices of a tensor of ``shape`` (what :func:`select` returns)."""
    if isinstance(axis, int):
        return tuple(n if k == axis else size for k, size in enumerate(shape))
    return (n, *(size for k, size in enumerate(shape) if k not in axis))


def select(t: torch.Tensor, axis: Axis, index: torch.Tensor) -> torch.Tensor:
    """The slices of ``t`` at ``index`` along ``axis`` (a new tensor)."""
    if isinstance(axis, int):
        return t.index_select(axis, index.to(t.device))
    view, i, j = _pair(t, axis, index)
    return view[i, j]


def copy_(t: torch.Tensor, axis: Axis, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``t[index] = source`` along ``axis``, in place (``source`` laid out as :func:`select` returns it)."""
    if isinstance(axis, int):
        return t.index_copy_(axis, index.to(t.device), source)
    view, i, j = _pair(t, axis, index)
    view[i, j] = source.to(view.dtype)
    return t


def copied(t: torch.Tensor, axis: Axis, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with ``[index]`` along ``axis`` replaced by ``source`` (differentiable: gradients reach
    ``t``'s other positions and ``source``)."""
    if isinstance(axis, int):
        return t.index_copy(axis, index.to(t.device), source)
    a, b = axis
    view, i, j = _pair(t, axis, index)
    return view.index_put((i, j), source).movedim((0, 1), (a, b))


def fill_(t: torch.Tensor, axis: Axis, index: torch.Tensor, value: float) -> torch.Tensor:
    """``t[index] = value`` along ``axis``, in place."""
    if isinstance(axis, int):
        return t.index_fill_(axis, index.to(t.device), value)
    view, i, j = _pair(t, axis, index)
    view[i, j] = value
    return t


def units_of(param_shape: torch.Size | tuple[int, ...], value: object, axis: Axis) -> int | None:
    """Number of positions of a per-unit tensor shaped like a parameter of ``param_shape`` except along ``axis``
    (``None`` for a scalar or a foreign shape): full size, or compact (active positions only)."""
    if not torch.is_tensor(value) or value.dim() == 0:
        return None
    shape = tuple(value.shape)
    if isinstance(axis, int):
        others = (x != y for k, (x, y) in enumerate(zip(shape, param_shape)) if k != axis)
        if len(shape) != len(param_shape) or any(others):
            return None
        return int(shape[axis])
    if shape == tuple(param_shape):
        return positions(param_shape, axis)
    rest = tuple(n for k, n in enumerate(param_shape) if k not in axis)
    return int(shape[0]) if shape[1:] == rest else None


def as_rows(t: torch.Tensor, axis: Axis) -> torch.Tensor:
    """``t`` as ``[positions, rest]``: each position's entries in one row (a copy where it must be)."""
    if isinstance(axis, int):
        return t.movedim(axis, 0).flatten(1) if t.dim() > 1 else t.unsqueeze(1)
    return t.movedim(axis, (0, 1)).flatten(0, 1).flatten(1)
