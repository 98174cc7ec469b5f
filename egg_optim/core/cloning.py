"""Weight cloning: each clone takes its source leader's unit (weight row, bias, norm entries; a block unit's
producer rows, not the consumer columns that read it: :meth:`ManagedLayer.copied_by_clones`).

``blend`` mixes (``1.0`` copies), ``noise`` adds Gaussian noise relative to each source row's RMS to break
the symmetry between a leader and its clones, and ``state`` says what happens to the clone's rows of the
optimizer state: ``"keep"`` them, ``"reset"`` them to a fresh value, or ``"copy"`` the leader's. (With compact
storage, :mod:`egg_optim.core.compact`, clone rows are not in the optimizer state; the policy then applies when a
clone becomes active.)

A parameter sharded by FSDP2 (:mod:`egg_optim.core.sharding`) may hold a clone on one rank and its source on
another. A copy (``noise`` included) moves only its sources' rows: the ranks holding them broadcast them (on packed
roles the sources' run, by views), each rank writes the clone rows it holds, and a copy within each rank's slice
(whole experts per rank; units along a dimension FSDP2 does not shard) moves nothing; the ranks agree on the
finiteness check. Otherwise (``blend``) the new rows are computed from the gathered tensor, exactly as one process
computes them, and each rank writes its own slice.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import ConfigError
from . import axes, sharding
from .axes import Axis, Span
from .compact import CLONE_STATES, Fresh, zero_fresh
from .masking import row_state_keys
from .roles import Roles
from .sharding import copy_positions_, full, is_sharded, local, localize, write_full_
from .units import ManagedLayer


def check_clone_options(blend: float, noise: float, state: str) -> None:
    for name, value in (("blend", blend), ("noise", noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"clone {name} must be a finite number, got {value!r}")
    if not 0.0 <= blend <= 1.0:
        raise ConfigError(f"clone blend {blend} is outside [0, 1]")
    if noise < 0:
        raise ConfigError(f"clone noise {noise} must be >= 0")
    if state not in CLONE_STATES:
        raise ConfigError(f"unknown clone state policy {state!r}; choose one of {CLONE_STATES}")


def _packed(roles: Roles, dim: Axis) -> bool:
    """Whether the clones are one run and their sources cycle over one (packed roles): rows are then read by
    broadcast copies and written through a view, with no index op."""
    return isinstance(dim, int) and roles.clone_span is not None and roles.source_cycle is not None


def _blended(t: torch.Tensor, roles: Roles, blend: float, dim: Axis) -> torch.Tensor:
    packed = _packed(roles, dim)
    if packed:
        src = axes.tiled(t, dim, roles.source_cycle, roles.num_clones)
    else:
        src = axes.select(t, dim, roles.on(t.device, "sources"))
    if blend == 1.0:
        return src
    own = axes.narrow(t, dim, roles.clone_span) if packed else axes.select(t, dim, roles.on(t.device))
    return torch.lerp(own, src, blend)


def _lead(dim: Axis) -> int:
    """Where the positions lie in slices taken along ``dim`` (:func:`axes.select`: a pair axis leads with them)."""
    return dim if isinstance(dim, int) else 0


def _noisy(rows: torch.Tensor, dim: Axis, noise: float, generator: torch.Generator | None) -> torch.Tensor:
    """``rows`` plus Gaussian noise of ``noise`` times each row's RMS (drawn on the CPU: every rank and device
    draws the same numbers from the same generator)."""
    lead = _lead(dim)
    moved = rows.movedim(lead, 0)
    flat = moved.reshape(moved.shape[0], -1)
    rms = flat.float().pow(2).mean(dim=1).sqrt().to(rows.dtype)
    eps = torch.randn(flat.shape, generator=generator, dtype=torch.float32).to(rows)
    return (flat + noise * rms[:, None] * eps).reshape(moved.shape).movedim(0, lead)


def set_row_state(
    t: torch.Tensor,
    st: Mapping[str, torch.Tensor],
    dim: Axis,
    clones: torch.Tensor,
    sources: torch.Tensor,
    state: str,
    *,
    group: Mapping | None = None,
    fresh: Fresh = zero_fresh,
) -> None:
    """Full-size optimizer state ``st`` of ``t``: the ``clones`` positions take their ``sources``' rows
    (``"copy"``) or a fresh value (``"reset"``); ``"keep"`` leaves them."""
    if state == "keep":
        return
    for key in row_state_keys(t, st):
        if state == "copy":
            copy_positions_(st[key], dim, clones, sources)
        else:
            where = localize(st[key], dim, clones)[1]
            axes.fill_(local(st[key]), dim, where, fresh(key, group or {}))


@torch.no_grad()
def perturb_units(layer: ManagedLayer, units: Roles, noise: float, generator: torch.Generator | None = None) -> None:
    """Add Gaussian noise (``noise`` times each row's RMS) to the rows the ``units.clones`` own in the tensors
    clones copy (:meth:`ManagedLayer.copied_by_clones`), computed from the whole tensor as one process would."""
    if noise <= 0 or not units.has_clones:
        return
    for pname, p in layer.params:
        if not layer.copied_by_clones(pname):
            continue
        dim, roles = layer.dim_of(pname), layer.roles_of(pname, units)
        whole = full(p)
        rows = _noisy(axes.select(whole, dim, roles.clones), dim, noise, generator)
        if is_sharded(p):
            write_full_(p, axes.copied(whole, dim, roles.clones, rows))
        else:
            axes.copy_(p, dim, roles.clones, rows)


def _bad_units(rows: torch.Tensor, dim: Axis, clone_units: int) -> torch.Tensor:
    """Per clone unit (in the order of ``roles.clones``): whether its new rows hold a NaN or inf. The rows of an
    expanded tensor list each clone unit's positions together (:meth:`Roles.expand`)."""
    flat = rows.movedim(_lead(dim), 0).reshape(clone_units, -1)
    return ~torch.isfinite(flat).all(dim=1)


@dataclass(frozen=True, eq=False)
class _Fetch:
    """A copy along a dimension FSDP2 splits across ranks: the sources' run is broadcast at each clone event by
    the ranks holding it (:func:`~egg_optim.core.sharding.fetch`) and this rank writes its own clone positions."""

    shards: tuple[Any, list[Span], int]  # :func:`~egg_optim.core.sharding.row_shards`
    sources: Span  # the sources' run, global positions along the copy's dimension
    dst: torch.Tensor | None  # the clone positions this rank holds (a view of its slice), None where it has none
    r: int  # the source cycle's offset at dst's first position


@dataclass(frozen=True, eq=False)
class _Copy:
    """One tensor a clone event copies on packed roles, with the views it reads and writes, cut once from the
    tensor's storage (``ptr``; this rank's slice when sharded): the sources' run (``block``, what the finiteness
    check reads) and the (clones' view, source) pairs of :func:`~egg_optim.core.axes.tile_pieces`. A copy with
    ``fetch`` gets its block and pieces at each event (:func:`_fetched`)."""

    tensor: torch.Tensor
    dim: int
    roles: Roles  # of the positions it copies along ``dim`` (one expert's, one segment's: _segment_copies)
    is_param: bool  # a parameter's first copy (it carries the optimizer-state update)
    ptr: int
    block: torch.Tensor
    pieces: list[tuple[torch.Tensor, torch.Tensor]]
    axis: Axis  # the tensor's unit axis and the roles of its positions there (``dim`` / ``roles`` but for experts)
    units: Roles
    sharded: bool = False  # ``ptr`` is its local slice's
    fetch: _Fetch | None = None
    ranks: tuple[Any, ...] = ()  # process groups whose blocks differ by rank (own slices): they agree on the check


# (tensor, its whole (gathered) value or, for a copy within each rank's slice, :class:`_Own`, axis, roles of its
# positions, the new clone rows (this rank's only with _Own), is a parameter, and on
# packed roles the tensor's :class:`_Copy`): ``rows`` is ``None`` where the clones take their sources' rows as they
# are on packed roles; they are then written by broadcast from the copy's views and nothing is computed beforehand
_Write = tuple[torch.Tensor, torch.Tensor, Axis, Roles, torch.Tensor | None, bool, _Copy | None]


@dataclass(frozen=True, eq=False)
class _Plan:
    """A layer's copies (:func:`copy_plan`) with what every event needs of them worked out once: the copies as
    writes, whether any fetches its sources from other ranks, and the process groups that agree on the check."""

    copies: list[_Copy]
    writes: list[_Write]
    fetches: bool
    ranks: tuple[Any, ...]


def _write(c: _Copy) -> _Write:
    return c.tensor, c.tensor, c.axis, c.units, None, c.is_param, c


def _peaks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's largest absolute value (a 0-d float32 tensor, float64 where one of them is float64: no value
    narrowed to inf; NaN where it holds one), in order, on the first tensor's device: one foreach max-abs per
    device, and no host read."""
    first = tensors[0].device
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if len({t.device for t in tensors}) == 1:
        return list(torch._foreach_norm(tensors, float("inf"), dtype=dtype))
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out: dict[int, torch.Tensor] = {}
    for idx in by_device.values():
        for i, peak in zip(idx, torch._foreach_norm([tensors[i] for i in idx], float("inf"), dtype=dtype)):
            out[i] = peak.to(first)
    return [out[i] for i in range(len(tensors))]


def _all_finite(tensors: list[torch.Tensor], ranks: list[Any]) -> bool:
    """Whether every tensor (on every rank of the process groups ``ranks``) is free of NaN and inf: :func:`_peaks`
    and ONE host read for them all."""
    if not tensors:
        return True
    return not bool(_agreed((~torch.isfinite(torch.stack(_peaks(tensors)))).sum(), ranks))


def _cut(t: torch.Tensor, dim: int, where: Span, rs: Roles, is_param: bool, axis: Axis, units: Roles) -> _Copy:
    """The copy of positions ``where`` of ``t`` along ``dim``, whose roles (from 0 there) are ``rs``."""
    # views of a detached alias: no autograd view bookkeeping, and readable after the optimizer's in-place updates
    x, split = local(t).detach(), is_sharded(t)
    shards = sharding.row_shards(t, dim)
    ranks = tuple(sharding.shard_groups(t, but=dim if shards is not None else None))
    if shards is None:
        base = axes.narrow(x, dim, where)
        block = axes.narrow(base, dim, rs.source_cycle[:2])
        pieces = axes.tile_pieces(axes.narrow(base, dim, rs.clone_span), dim, block, rs.source_cycle[2])
        return _Copy(t, dim, rs, is_param, x.data_ptr(), block, pieces, axis, units, split, None, ranks)
    (q, m, r), (c0, nc) = rs.source_cycle, rs.clone_span
    first, count = shards[1][shards[2]]
    a, b = max(where[0] + c0, first), min(where[0] + c0 + nc, first + count)  # this rank's clone positions
    dst = axes.narrow(x, dim, (a - first, b - a)) if b > a else None
    fetch = _Fetch(shards, (where[0] + q, m), dst, (r + a - where[0] - c0) % m if b > a else 0)
    return _Copy(t, dim, rs, is_param, x.data_ptr(), None, [], axis, units, split, fetch, ranks)


def _fetched(copy: _Copy, works: list[Any]) -> _Copy:
    """``copy`` with its sources' run fetched from the ranks holding it (pending: ``works``), and its pieces."""
    block, pending = sharding.fetch(copy.tensor, copy.dim, copy.fetch.sources, copy.fetch.shards)
    works += pending
    dst = copy.fetch.dst
    pieces = [] if dst is None else axes.tile_pieces(dst, copy.dim, block, copy.fetch.r)
    return replace(copy, block=block, pieces=pieces)


def _segment_copies(
    t: torch.Tensor, axis: Axis, units: Roles, roles: Roles, index: torch.Tensor | None, is_param: bool
) -> list[_Copy] | None:
    """A clone event's copies of one tensor by views, or ``None`` where it has none: the positions of every unit
    taken in segments (a fused gate/up or qkv weight: each unit's gate rows, then its up rows; else one), each
    segment a range of positions where the clones are one run and their sources cycle over another. On the
    (expert, neuron) pair axis of fused MoE weights this is along the neuron dimension, in every expert at once,
    where every expert has the same roles. Only the first copy of a parameter carries its optimizer-state
    update. Reads host-side role indices: once per role change (:func:`copy_plan` keeps the result)."""
    if isinstance(axis, int) and _packed(units, axis):  # one run in the whole tensor
        return [_cut(t, axis, (0, t.shape[axis]), units, is_param, axis, units)]
    if isinstance(axis, int) and index is None:  # rows: no segments
        return None
    if index is None:
        index = torch.arange(roles.num_units)[:, None]
    dim = axis
    if not isinstance(axis, int):
        parts = roles.split(t.shape[axis[0]])
        first = None if parts is None else parts[0]
        if first is None or not all(r.same_as(first) for r in parts):
            return None
        roles, index, dim = first, index[: first.num_units], axis[1]  # the first expert's: offsets
    k = index.shape[1]
    cuts = [i + 1 for i in range(k - 1) if not bool((index[:, i + 1] == index[:, i] + 1).all())]
    copies = []
    for j, (a, b) in enumerate(zip([0, *cuts], [*cuts, k])):
        pos = index[:, a:b]
        lo, n = int(pos.min()), int(pos.numel())
        if not torch.equal(torch.sort(pos.flatten()).values, torch.arange(lo, lo + n)):
            return None
        rs = roles.expand(pos - lo)
        if not _packed(rs, dim):
            return None
        copies.append(_cut(t, dim, (lo, n), rs, is_param and j == 0, axis, units))
    return copies


def copy_plan(layer: ManagedLayer, roles: Roles) -> list[_Copy] | None:
    """Every tensor a clone event copies in ``layer`` when the clones are one run and their sources cycle over one
    in each (packed roles), with its views, or ``None`` where one is not. Kept on the layer until its roles or its
    tensors (objects or storage) change: in weight mode a clone event runs at every step, on the host of the step,
    which then cuts no view."""
    plan = _plan(layer, roles)
    return None if plan is None else plan.copies


def _plan(layer: ManagedLayer, roles: Roles) -> _Plan | None:
    key = (roles, layer.params, layer.buffers)
    cached = layer._copy_plan
    if (
        cached is not None
        and all(a is b for a, b in zip(cached[0], key))
        and (
            cached[1] is None
            or all((local(c.tensor) if c.sharded else c.tensor).data_ptr() == c.ptr for c in cached[1].copies)
        )
    ):
        return cached[1]
    plan: list[_Copy] | None = []
    tensors = [(n, p, True) for n, p in layer.params if layer.copied_by_clones(n)]
    for name, t, is_param in tensors + [(n, b, False) for n, b in layer.buffers]:
        axis, units = layer.dim_of(name), layer.roles_of(name, roles)
        try:
            copies = _segment_copies(t, axis, units, roles, layer.index.get(name), is_param)
        except sharding.NestedShards:  # gathered whole instead
            copies = None
        if copies is None:
            plan = None
            break
        plan += copies
    entry = None
    if plan is not None:
        ranks = {id(g): g for c in plan for g in c.ranks}
        entry = _Plan(plan, [_write(c) for c in plan], any(c.fetch is not None for c in plan), tuple(ranks.values()))
    layer._copy_plan = (key, entry)
    return entry


def _new_rows(
    layer: ManagedLayer,
    roles: Roles,
    blend: float,
    noise: float,
    generator,
    works: list[Any],
    ranks: dict[int, Any],
    views: bool = True,
) -> list[_Write]:
    """Every tensor's new clone rows of one layer, computed before anything is written (the list is not to be
    changed); plain copies on packed roles compute nothing (see :data:`_Write`), their sources' runs split across
    ranks are being fetched (wait for ``works`` before reading them), and the process groups that must agree on
    the check join ``ranks``. ``views=False``: computed from gathered tensors, as one process would."""
    plan = _plan(layer, roles) if views and blend == 1.0 and noise == 0 else None
    if plan is not None:
        for g in plan.ranks:
            ranks.setdefault(id(g), g)
        if not plan.fetches:
            return plan.writes
        return [_write(c if c.fetch is None else _fetched(c, works)) for c in plan.copies]
    writes: list[_Write] = []
    for pname, p in layer.params:
        if not layer.copied_by_clones(pname):
            continue
        dim, rs = layer.dim_of(pname), layer.roles_of(pname, roles)
        rows = own = None
        if views and blend == 1.0 and is_sharded(p):  # only the rows the copy reads move, or none
            rows = _fetched_sources(p, dim, rs)
            own = _own_rows(p, dim, rs) if rows is None and noise == 0 else None
        if own is not None:  # every clone's source on the clone's rank: copied in place, nothing moves
            for g in sharding.shard_groups(p):
                ranks.setdefault(id(g), g)
            writes.append((p, own[0], dim, rs, own[1], True, None))
            continue
        whole = p if rows is not None else full(p)  # p itself unless sharded
        if rows is None:
            rows = _blended(whole, rs, blend, dim)
        else:  # fetched: this rank's slice of the other dimensions (tensor parallelism) is its own
            for g in sharding.shard_groups(p, but=dim):
                ranks.setdefault(id(g), g)
        if noise > 0:
            rows = _noisy(rows, dim, noise, generator)
        writes.append((p, whole, dim, rs, rows, True, None))
    for bname, b in layer.buffers:
        dim, rs = layer.dim_of(bname), layer.roles_of(bname, roles)
        writes.append((b, b, dim, rs, _blended(b, rs, blend, dim), False, None))
    return writes


def _fetched_sources(p: torch.Tensor, dim: Axis, rs: Roles) -> torch.Tensor | None:
    """The clones' new rows of a plain copy when FSDP2 splits ``p`` along its unit axis: only the distinct sources'
    rows, broadcast by the ranks holding them (identical on every rank); ``None`` otherwise (gathered whole)."""
    return sharding.fetch_rows(p, dim, *rs.distinct_sources)


@dataclass(frozen=True, eq=False)
class _Own:
    """In a write's ``whole`` slot: its rows are this rank's clones' only, at these positions of its slice."""

    where: torch.Tensor


def _own_rows(p: torch.Tensor, dim: Axis, rs: Roles) -> tuple[_Own, torch.Tensor] | None:
    """This rank's clones' new rows of a plain copy of sharded ``p`` when every clone's source lies on the rank that
    holds the clone (units along a dimension FSDP2 does not split; fused experts, whole per rank, whose clones copy
    units of their own expert), with their local positions; ``None`` otherwise."""
    try:
        if isinstance(dim, int):
            if sharding.row_shards(p, dim) is not None:
                return None
        else:
            inner = int(p.shape[dim[1]])
            if sharding.row_shards(p, dim[1]) is not None or not torch.equal(rs.clones // inner, rs.sources // inner):
                return None
    except sharding.NestedShards:
        return None
    which, where = localize(p, dim, rs.clones)
    x = local(p)
    sources = rs.sources[which] - sharding.span(p, dim)[0]
    return _Own(where.to(x.device)), axes.select(x, dim, sources.to(x.device))


def _news(items, blend: float, noise: float, generator, views: bool = True) -> tuple[list[list[_Write]], list[Any]]:
    """:func:`_new_rows` of every layer, once the sources fetched from other ranks have arrived; and the process
    groups whose ranks read different blocks (their own slices), which must agree on the finiteness check."""
    works: list[Any] = []
    ranks: dict[int, Any] = {}
    news = [
        _new_rows(layer, roles, blend, noise, generator, works, ranks, views) if roles.has_clones else []
        for layer, roles in items
    ]
    for w in works:
        w.wait()
    return news, list(ranks.values())


def _agreed(bad: torch.Tensor, ranks: list[Any]) -> torch.Tensor:
    """``bad`` (counts of non-finite values) summed over the process groups ``ranks``: every rank then decides
    alike."""
    if ranks:
        import torch.distributed as dist

        for g in ranks:
            dist.all_reduce(bad, group=g)
    return bad


def _computed(writes: list[_Write]) -> list[_Write]:
    """``writes`` with every new-row tensor computed (to look at units one by one)."""
    return [
        (t, whole, dim, rs, _sources_rows(whole, dim, rs) if rows is None else rows, p, None)
        for t, whole, dim, rs, rows, p, _ in writes
    ]


def _sources_rows(whole: torch.Tensor, dim: Axis, rs: Roles) -> torch.Tensor:
    """The clones' new rows of a plain copy, laid out as :func:`axes.select` gives them."""
    if _packed(rs, dim):
        return axes.tiled(whole, dim, rs.source_cycle, rs.num_clones)
    return axes.select(whole, dim, rs.on(whole.device, "sources"))


def _keep_units(layer: ManagedLayer, writes: list[_Write], n: int) -> torch.Tensor | None:
    """Which of the layer's ``n`` clone units may be written (``None``: all); warns about the others."""
    bad = torch.stack([_bad_units(rows, dim, n).cpu() for _, _, dim, _, rows, *_ in writes]).any(dim=0)
    if not bool(bad.any()):
        return None
    warnings.warn(
        f"egg_optim: clone event in layer {layer.name!r}: {int(bad.sum())} of {n} clone(s) keep their rows because "
        "their source leader's rows hold NaN or inf (a non-finite gradient or update); clone events never "
        "copy non-finite values",
        RuntimeWarning,
        stacklevel=5,
    )
    return ~bad


@torch.no_grad()
def clone_layers_on_device(
    items: list[tuple[ManagedLayer, Roles]],
    *,
    blend: float = 1.0,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[list[int], torch.Tensor] | None:
    """One clone event whose finiteness check stays on the device: no host read, so a GPU step that holds it
    (weight mode clones at every step) never waits for the device and can be captured in a CUDA graph.

    The check is per layer: a layer whose new clone rows would hold a NaN or inf keeps every clone's rows (and
    optimizer state) this time; :func:`clone_layers` checks per clone unit, at the cost of a host read. Returns the
    positions in ``items`` of the layers with clones and, for each, whether it kept its clones (a bool tensor on
    the first layer's device, for the caller to read when a host read is convenient); ``None`` when no layer has
    clones. Optimizer state is left as it is (``state="keep"``); a parameter sharded by FSDP2 is written by each rank
    at the clone positions it holds (:func:`_where_local_`). A few launches whatever the number of layers:
    one foreach max-abs, then the layers' peaks as one ``[layers, most tensors]`` block (a layer with fewer
    tensors repeats its first), reduced per row (and summed over the ranks whose slices differ: one all-reduce);
    each write is a ``where`` on that flag (packed roles), or on scattered roles a scatter whose index the flag
    picks: the clones', or the sources' own (a plain copy's rows are the sources' rows, written back
    unchanged)."""
    news, ranks = _news(items, blend, noise, generator)
    which = [i for i, writes in enumerate(news) if writes]
    if not which:
        return None
    checked, ends = [], []
    for i in which:
        checked += [copy.block if rows is None else rows for *_, rows, _, copy in news[i]]
        ends.append(len(checked))
    peaks = _peaks(checked)
    width = max([len(news[i]) for i in which])
    padded, start = [], 0
    for end in ends:
        padded += peaks[start:end] + peaks[start : start + 1] * (width - end + start)
        start = end
    ok = torch.isfinite(torch.stack(padded).view(len(which), width)).all(1)
    if ranks:
        ok = _agreed((~ok).int(), ranks) == 0
    plain = blend == 1.0 and noise == 0
    for i, when in zip(which, ok.unbind(0)):
        for t, whole, dim, rs, rows, _, copy in news[i]:
            if t.device != when.device:
                when = when.to(t.device)
            if rows is None:
                for d, src in copy.pieces:
                    torch.where(when, src, d, out=d)
                continue
            if is_sharded(t):  # rows identical on every rank (or its own clones' only): each writes what it holds
                _where_local_(t, whole, dim, rs, rows, when)
                continue
            if _packed(rs, dim):
                view = axes.narrow(t, dim, rs.clone_span)
                torch.where(when, rows, view, out=view)
            elif plain:  # rows are the sources' own: a layer that keeps its clones writes them back in place
                axes.copy_(t, dim, torch.where(when, rs.on(t.device), rs.on(t.device, "sources")), rows)
            else:
                clones = rs.on(t.device)
                axes.copy_(t, dim, clones, torch.where(when, rows, axes.select(t, dim, clones)))
    return which, ~ok


def _where_local_(t: torch.Tensor, whole: Any, dim: Axis, rs: Roles, rows: torch.Tensor, when: torch.Tensor) -> None:
    """Sharded ``t``: each rank writes the clone positions it holds, their new ``rows`` where ``when`` (a device
    flag) is true, else what they hold: no host read. ``rows`` are every clone's (fetched sources, or a gathered
    tensor's), or, where ``whole`` is an :class:`_Own`, this rank's clones' at its positions."""
    if not isinstance(whole, _Own):
        sharding.write_positions_(t, dim, rs.clones, rows, when)
        return
    x = local(t)
    axes.copy_(x, dim, whole.where, torch.where(when.to(x.device), rows.to(x), axes.select(x, dim, whole.where)))


@torch.no_grad()
def clone_layers(
    items: list[tuple[ManagedLayer, Roles]],
    *,
    blend: float = 1.0,
    noise: float = 0.0,
    state: str = "keep",
    opt_state: Mapping[torch.Tensor, dict] | None = None,
    groups: Mapping[torch.Tensor, dict] | None = None,
    generator: torch.Generator | None = None,
    fresh: Fresh = zero_fresh,
) -> list[int]:
    """One clone event over several layers: copy source units into clone units in place; returns, per layer,
    the number of clone units written.

    A clone event never writes NaN or inf: a clone whose new rows would hold one (its source leader diverged,
    e.g. after a non-finite gradient) keeps its rows and its optimizer state, and a warning names the layer and
    the count; the other clones are written as usual. The check costs one foreach max-abs over the new rows and ONE
    host read per event, whatever the number of layers (a host read is a device synchronisation on a GPU); only a
    non-finite value looks at the units one by one. On packed roles a plain copy checks and reads the sources'
    run and writes the clones' run by broadcast: no gather, no temporary (a fused gate/up or qkv weight segment by
    segment, fused experts along their neuron dimension: :func:`_segment_copies`)."""
    news, ranks = _news(items, blend, noise, generator)
    checked = [copy.block if rows is None else rows for writes in news for *_, rows, _, copy in writes]
    finite = _all_finite(checked, ranks)  # nothing written yet
    if not finite:
        if any(is_sharded(t) for writes in news for t, *_ in writes):
            news = _news(items, blend, noise, generator, views=False)[0]  # units looked at whole, on every rank
        news = [_computed(writes) for writes in news]
    written = []
    for (layer, roles), writes in zip(items, news):
        n = roles.num_clones if roles.has_clones else 0
        keep_units = None if finite or not writes else _keep_units(layer, writes, n)
        written.append(n if keep_units is None else int(keep_units.sum()))
        for t, whole, dim, rs, rows, is_param, copy in writes:
            clones, sources = rs.clones, rs.sources
            if keep_units is not None:
                keep = keep_units.repeat_interleave(clones.numel() // n)
                clones, sources = clones[keep], sources[keep]
                rows = rows.index_select(_lead(dim), keep.nonzero().flatten().to(rows.device))
                if not clones.numel():
                    continue
            if rows is None:
                for d, src in copy.pieces:
                    d.copy_(src)
            elif isinstance(whole, _Own):  # (all written: a clone whose source is not finite re-runs gathered)
                axes.copy_(local(t), dim, whole.where, rows)
            elif is_param and is_sharded(t):
                sharding.write_positions_(t, dim, clones, rows)
            elif keep_units is None and _packed(rs, dim):
                axes.narrow(t, dim, rs.clone_span).copy_(rows)
            else:
                axes.copy_(t, dim, clones, rows)
            if is_param and opt_state is not None and state != "keep":
                group = (groups or {}).get(t)
                set_row_state(t, opt_state.get(t, {}), dim, clones, sources, state, group=group, fresh=fresh)
    return written
