"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensors whose units live on several ranks.

FSDP2 shards every parameter along dim 0, the output-unit dimension (``torch.chunk`` sizes, the last shard possibly
shorter or empty), so a leader's row and its clones' rows may sit on different ranks; for fused 3-D experts
(units along ``(experts, neurons)``) that is whole experts per rank, one run of unit positions. Outside forward and
backward, the module, the optimizer and its state hold DTensors whose ``to_local()`` is this rank's slice, a view:
writing it writes the parameter. This module holds what the core needs to work on them exactly:

* :func:`local` and :func:`localize`: a tensor's own slice, and which unit positions lie in it (masking writes only
  local rows and needs no communication);
* :func:`full` and :func:`write_full_`: the whole tensor, identical on every rank (one all-gather), and the write
  of a full-size value back into each rank's slice. Cloning, scores and saved clone rows read a unit's source or
  all of a unit's weights wherever they live; computing on the gathered tensor gives, bit for bit, what a
  single process computes;
* :func:`like`: a full-size value laid out as a DTensor like a given one (state loaded from a plain checkpoint);
* :func:`row_shards`, :func:`fetch` (:func:`fetch_rows`) and :func:`write_positions_`: which rank holds which
  positions along a dimension, positions (weight mode's sources: a run on packed roles) broadcast by the ranks
  holding them, and rows written where each rank holds them, so that a clone event moves the sources' rows (and
  :func:`copy_positions_` their optimizer state's), not the whole tensor.

Every function is the identity (or the plain tensor operation) for ordinary tensors. Supported placements are
``Shard(d)`` and ``Replicate()`` on any mesh dimensions (FSDP2, HSDP); partial (pending-reduction) and strided
placements are refused by :func:`check_placements`.
"""

from __future__ import annotations

import bisect
import functools
import io
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from ..errors import PlanError, StateDictMismatchError
from . import axes
from .axes import Axis

_TENSOR = "torch.distributed.tensor"
_FSDP = "torch.distributed.fsdp"


def _dtensor() -> type | None:
    """The DTensor class if ``torch.distributed.tensor`` is loaded (a DTensor cannot exist before it is). Looked up,
    never imported: importing it takes seconds, and egg_optim is imported by runs that never shard."""
    mod = sys.modules.get(_TENSOR)
    return getattr(mod, "DTensor", None) if mod is not None else None


def _fsdp_module_class() -> type | None:
    mod = sys.modules.get(_FSDP)
    return getattr(mod, "FSDPModule", None) if mod is not None else None


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a DTensor (a parameter, gradient or optimizer state that FSDP2 shards)."""
    cls = _dtensor()
    return cls is not None and isinstance(t, cls)


def check_placements(name: str, t: torch.Tensor, dim: Axis = 0) -> None:
    """Refuse a DTensor whose layout the core cannot translate into a contiguous local slice of the unit positions
    along ``dim``."""
    if not is_sharded(t):
        return
    from torch.distributed.tensor import Replicate, Shard

    for p in t.placements:
        if type(p) is not Shard and type(p) is not Replicate:
            raise PlanError(
                f"parameter {name!r} is a DTensor with placements {tuple(t.placements)}: egg_optim supports "
                "Shard(dim) and Replicate() placements (FSDP2's fully_shard, HSDP), not partial or strided ones"
            )
    if not isinstance(dim, int) and any(type(p) is Shard and p.dim == dim[1] for p in t.placements):
        raise PlanError(
            f"parameter {name!r} of fused experts is sharded along dimension {dim[1]}, which splits each expert's "
            f"neurons across ranks: shard it along dimension {dim[0]} (whole experts per rank: FSDP2's default) or "
            "leave the experts out of the plan (RolePlan(exclude=['*.experts']))"
        )


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``t`` (a view: writing it writes ``t``); ``t`` itself for an ordinary tensor."""
    return t.to_local() if is_sharded(t) else t


def _box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's slice of DTensor ``t``."""
    return _box_of(tuple(t.shape), t.device_mesh, tuple(t.placements))


@functools.lru_cache(maxsize=4096)
def _box_of(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # kept: torch works it out on the host at every call (with a scalar read of a host tensor), and a clone event
    # asks for every sharded parameter's at every step
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape_, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(shape_), tuple(offset)


def span(t: torch.Tensor, dim: Axis) -> tuple[int, int]:
    """``(first, count)``: the global positions ``[first, first + count)`` along ``dim`` this rank holds."""
    if not is_sharded(t):
        return 0, axes.positions(t.shape, dim)
    shape, offset = _box(t)
    if isinstance(dim, int):
        return int(offset[dim]), int(shape[dim])
    outer, inner = dim  # fused experts: position e * n + j is neuron j of expert e, n = t.shape[inner]
    if shape[inner] != t.shape[inner]:
        raise PlanError(f"a {tuple(t.shape)} tensor of fused experts is sharded along their neurons")
    return int(offset[outer]) * int(t.shape[inner]), int(shape[outer]) * int(t.shape[inner])


def splits(t: torch.Tensor, dim: Axis) -> bool:
    """Whether ranks hold different positions of ``t`` along ``dim`` (``False`` for ordinary tensors)."""
    return span(t, dim)[1] != axes.positions(t.shape, dim)


def localize(t: torch.Tensor, dim: Axis, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the global ``positions`` along ``dim`` lie in this rank's slice of ``t``: ``(which, where)``, their
    indices into ``positions`` and their local positions (every one of them, unchanged, for ordinary tensors)."""
    positions = positions.cpu()
    first, count = span(t, dim)
    if not is_sharded(t) or count == axes.positions(t.shape, dim):
        return torch.arange(positions.numel()), positions
    which = ((positions >= first) & (positions < first + count)).nonzero().flatten()
    return which, positions[which] - first


@torch.no_grad()
def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` as an ordinary tensor, identical on every rank (a collective: every rank must call it)."""
    return t.detach().full_tensor() if is_sharded(t) else t


def _own_slice(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    shape, offset = _box(t)
    return value[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


@torch.no_grad()
def write_full_(t: torch.Tensor, value: torch.Tensor) -> None:
    """Set ``t`` to the full-size ``value`` (identical on every rank): each rank writes its own slice."""
    if is_sharded(t):
        t.to_local().copy_(_own_slice(t, value.to(t.device)))
    else:
        t.copy_(value)


@torch.no_grad()
def like(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The full-size ``value`` (identical on every rank) laid out like DTensor ``t``; ``value`` when ``t`` is an
    ordinary tensor. No communication: each rank keeps its own slice."""
    if not is_sharded(t) or is_sharded(value):
        return value
    mine = _own_slice(t, value.to(t.device)).clone()
    return _dtensor().from_local(mine, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())


@torch.no_grad()
def copy_positions_(t: torch.Tensor, dim: Axis, clones: torch.Tensor, sources: torch.Tensor) -> None:
    """``t[clones] = t[sources]`` along ``dim``, in place, wherever the positions live: where ranks split ``dim``,
    the distinct sources' rows broadcast by the ranks holding them (:func:`fetch`; one all-gather where a pair axis
    or several mesh dimensions split it), nothing moved otherwise. A collective there: every rank calls it."""
    if not splits(t, dim):
        x = local(t)
        axes.copy_(x, dim, clones, axes.select(x, dim, sources))
        return
    if not sources.numel():  # (the same on every rank)
        return
    which, where = localize(t, dim, clones)
    distinct, back = torch.unique(sources.cpu(), return_inverse=True)  # sorted
    rows = fetch_rows(t, dim, distinct, back[which])
    if rows is None:
        rows = axes.select(full(t), dim, sources[which])
    x = local(t)
    axes.copy_(x, dim, where, rows.to(x))


@torch.no_grad()
def copied_positions(t: torch.Tensor, dim: Axis, clones: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (same kind: a DTensor stays one) with ``[clones]`` along ``dim`` taken from ``[sources]``."""
    if not is_sharded(t):
        return axes.copied(t, dim, clones, axes.select(t, dim, sources))
    whole = full(t).clone()
    axes.copy_(whole, dim, clones, axes.select(whole, dim, sources))
    return like(t, whole)


class NestedShards(ValueError):
    """A tensor dimension sharded over several mesh dimensions: :func:`row_shards` does not lay it out."""


def row_shards(t: torch.Tensor, dim: int) -> tuple[Any, list[tuple[int, int]], int] | None:
    """How ranks split ``t`` along tensor dimension ``dim``: ``(group, spans, me)``, the process group of the mesh
    dimension that shards it, each of its ranks' ``(first, count)`` positions (``torch.chunk`` sizes, as
    ``Shard`` lays them out) and this rank's index in it; ``None`` when every rank holds all of ``dim``. Read from
    the placements, so every rank gets the same answer. Raises :class:`NestedShards` when several mesh
    dimensions shard ``dim``."""
    if not is_sharded(t):
        return None
    from torch.distributed.tensor import Shard

    mesh_dims = [i for i, p in enumerate(t.placements) if type(p) is Shard and p.dim % t.dim() == dim]
    if len(mesh_dims) > 1:
        raise NestedShards(f"dimension {dim} of a {tuple(t.shape)} tensor is sharded over mesh dimensions {mesh_dims}")
    if not mesh_dims or t.device_mesh.size(mesh_dims[0]) == 1:
        return None
    mesh_dim = mesh_dims[0]
    n, k = int(t.shape[dim]), t.device_mesh.size(mesh_dim)
    c = -(-n // k)
    spans = [(min(i * c, n), max(0, min(c, n - i * c))) for i in range(k)]
    me = t.device_mesh.get_local_rank(mesh_dim)
    if spans[me] != span(t, dim):
        raise RuntimeError(
            f"egg_optim: a {tuple(t.shape)} DTensor's shard along dimension {dim} is {span(t, dim)} on this rank, "
            f"not the torch.chunk layout {spans[me]}; please report it with your torch version"
        )
    return t.device_mesh.get_group(mesh_dim), spans, me


def shard_groups(t: torch.Tensor, but: int | None = None) -> list[Any]:
    """The process groups of the mesh dimensions that shard ``t`` (except the one sharding tensor dimension
    ``but``): the ranks whose slices of ``t`` differ, which must agree on a decision read from their slices."""
    if not is_sharded(t):
        return []
    from torch.distributed.tensor import Shard

    return [
        t.device_mesh.get_group(i)
        for i, p in enumerate(t.placements)
        if type(p) is Shard and t.device_mesh.size(i) > 1 and (but is None or p.dim % t.dim() != but)
    ]


@torch.no_grad()
def fetch(
    t: torch.Tensor,
    dim: int,
    where: tuple[int, int] | torch.Tensor,
    shards: tuple[Any, list[tuple[int, int]], int],
) -> tuple[torch.Tensor, list[Any]]:
    """Positions of ``t`` along ``dim`` (split as :func:`row_shards` says): ``where = (first, count)``, a run, or a
    sorted tensor of distinct positions; as an ordinary tensor identical on every rank of the group: each rank
    holding some of them broadcasts its part. Returns the tensor and the pending works (wait for them before
    reading it): a clone event issues every fetch, then waits. Other dimensions are this rank's slice of them."""
    import torch.distributed as dist

    group, spans, me = shards
    x = local(t)
    run = not torch.is_tensor(where)
    wanted = None if run else where.tolist()  # (host values: no device read)
    n = where[1] if run else len(wanted)

    def cut(p: int) -> int:  # how many of the wanted positions lie below position p
        return min(max(p - where[0], 0), n) if run else bisect.bisect_left(wanted, p)

    buf = x.new_empty((n, *(s for i, s in enumerate(x.shape) if i != dim)))  # positions first
    works = []
    for i, (f, c) in enumerate(spans):
        lo, hi = cut(f), cut(f + c)  # rank i holds wanted positions lo..hi-1
        if hi <= lo:
            continue
        part = buf.narrow(0, lo, hi - lo)  # contiguous: the positions are sorted, so each rank's are a run of them
        if i == me:
            if run:
                mine = x.narrow(dim, where[0] + lo - f, hi - lo)
            else:
                mine = x.index_select(dim, torch.tensor(wanted[lo:hi], device=x.device) - f)
            part.copy_(mine.movedim(dim, 0))
        works.append(dist.broadcast(part, group=group, group_src=i, async_op=True))
    return buf.movedim(0, dim), works


@torch.no_grad()
def fetch_rows(t: torch.Tensor, dim: Axis, distinct: torch.Tensor, back: torch.Tensor) -> torch.Tensor | None:
    """``t``'s rows ``distinct[back]`` along ``dim`` (``distinct``: sorted positions) as an ordinary tensor identical on
    every rank, where ranks split ``dim`` by rows: only the ``distinct`` rows move, broadcast by the ranks holding
    them (a collective: every rank calls it); ``None`` where they do not (a pair axis, several mesh dimensions)."""
    try:
        shards = row_shards(t, dim) if isinstance(dim, int) else None
    except NestedShards:
        return None
    if shards is None:
        return None
    block, works = fetch(t, dim, distinct, shards)
    for w in works:
        w.wait()
    return block.index_select(dim, back.to(block.device))


def write_positions_(
    t: torch.Tensor, dim: Axis, positions: torch.Tensor, rows: torch.Tensor, when: torch.Tensor | None = None
) -> None:
    """``t[positions] = rows`` along ``dim`` (``rows`` as :func:`axes.select` lays them out, identical on every rank),
    each rank writing the positions it holds: no communication. ``when`` (a device flag): where it is false, the
    positions keep what they hold (no host read)."""
    which, where = localize(t, dim, positions)
    if where.numel():
        x = local(t)
        where = where.to(x.device)
        new = rows.index_select(dim if isinstance(dim, int) else 0, which.to(rows.device)).to(x)
        if when is not None:
            new = torch.where(when.to(x.device), new, axes.select(x, dim, where))
        axes.copy_(x, dim, where, new)


def replacement_problem(layer: str, qname: str, new: torch.Tensor | None) -> str:
    """Why an optimizer cannot follow parameter ``qname`` of managed ``layer`` that the model replaced by ``new``
    (a tensor the optimizer does not hold, or ``None``): named by what replaced it."""
    where = f"layer {layer!r}: parameter {qname!r}"
    if new is None:
        return f"{where} is no longer registered in the model (removed or renamed after the optimizer was built)"
    if new.is_meta:
        return (
            f"{where} is now a new tensor on the meta device (model.to('meta')?), which holds no values and which "
            "the optimizer does not hold; build the optimizer over the model once it has its real parameters"
        )
    if not is_sharded(new):
        return (
            f"{where} was replaced by a new tensor the optimizer does not hold (a parameter assigned or converted "
            "after the optimizer was built); build the optimizer over the model as it will be trained"
        )
    return (
        f"{where} was replaced by one the optimizer does not hold; when the model is wrapped (fully_shard) after "
        "the optimizer is built, update the optimizer's param_groups to the new parameters (Accelerate's prepare "
        "does)"
    )


def fsdp_modules(model: nn.Module) -> Iterator[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to."""
    cls = _fsdp_module_class()
    return iter(()) if cls is None else (m for m in model.modules() if isinstance(m, cls))


def is_fsdp_module(module: nn.Module) -> bool:
    cls = _fsdp_module_class()
    return cls is not None and isinstance(module, cls)


def is_fsdp_class(cls: type) -> bool:
    """Whether ``cls`` is one of the classes ``fully_shard`` gives a module (its original class follows it in the
    MRO)."""
    fsdp = _fsdp_module_class()
    return fsdp is not None and issubclass(cls, fsdp)


def class_name(module: nn.Module) -> str:
    """The name of ``module``'s own class, not the ``FSDP<name>`` class ``fully_shard`` gives it."""
    cls = type(module)
    if is_fsdp_class(cls):
        cls = next((b for b in cls.__bases__ if not is_fsdp_class(b)), cls)
    return cls.__name__


def reshard(model: nn.Module) -> None:
    """Put FSDP2's sharded parameters back on every module (a forward pass without backward, e.g. evaluation, can
    leave the root's gathered, unsharded copies registered; writes into those would be lost)."""
    for m in fsdp_modules(model):
        m.reshard()


# ---------------------------------------------------------------------------------------------- state dicts
def pack_entry(entry: Mapping[str, Any]) -> bytes:
    """The ``egg_optim`` entry of a state dict as one opaque value: ``get_optimizer_state_dict`` keeps only
    ``state`` and ``param_groups``, and checkpoint loaders that fill a template (DCP, ``broadcast_from_rank0``)
    need every rank's template to have the saved structure, which a nested entry (roles-dependent contents)
    would not. Loadable with ``torch.load(weights_only=True)``, like the entry itself."""
    buf = io.BytesIO()
    torch.save(dict(entry), buf)
    return buf.getvalue()


def take_entry(sd: MutableMapping[str, Any], key: str) -> Any:
    """Remove the packed entry (:func:`pack_entry`) from ``sd["param_groups"][0]`` (``sd`` gets a new list and
    group dict; the caller's are unchanged) and return it unpacked, or ``None`` when there is none."""
    groups = sd.get("param_groups")
    if not isinstance(groups, list) or not groups or not isinstance(groups[0], Mapping) or key not in groups[0]:
        return None
    first = dict(groups[0])
    blob = first.pop(key)
    sd["param_groups"] = [first, *groups[1:]]
    try:
        return torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the value is not what state_dict() wrote
        raise StateDictMismatchError(
            f"param_groups[0][{key!r}] is not an entry written by LeaderCloneOptimizer.state_dict() ({exc})"
        ) from exc


def distribute_state(sd: Mapping[str, Any], param_groups: list[dict[str, Any]]) -> dict[Any, Any]:
    """``sd["state"]`` with every plain, full-size tensor of a sharded parameter laid out like it (:func:`like`):
    a checkpoint of an unsharded run, or a full state dict, loads into sharded parameters. ``sd`` was checked
    (:func:`~egg_optim.core.state_dict.check_base_state`): its groups list as many parameters as ``param_groups``."""
    params = {sid: p for sg, g in zip(sd["param_groups"], param_groups) for sid, p in zip(sg["params"], g["params"])}
    out: dict[Any, Any] = {}
    for sid, st in sd["state"].items():
        p = params[sid]
        if is_sharded(p):
            st = {
                k: like(p, v) if torch.is_tensor(v) and not is_sharded(v) and v.dim() > 0 and v.shape == p.shape else v
                for k, v in st.items()
            }
        out[sid] = st
    return out
