"""Compact optimizer storage: clones take no part in the base step and hold no optimizer state.

For each parameter with clone rows the base optimizer keeps its row-shaped state (Adam's moments, SGD's
momentum buffer, ...) for the *active* rows only. At each step the active rows of the parameter and of its
gradient are gathered into a temporary tensor that stands in for the parameter, inside the base optimizer's own
``param_groups`` and ``state``, for the duration of ``optimizer.step()``; the result is written back into the
active rows. Clone rows are never read or written by the optimizer, so they stay bit-identical, and for an
elementwise optimizer every active row gets exactly the update the bare optimizer would give it.

Compared with full storage (:mod:`egg_optim.core.masking`) this skips the optimizer arithmetic on clone rows and the
snapshot/restore copies, and drops the clones' share of the optimizer state. Outside ``step()`` the base
optimizer's ``param_groups`` hold the real parameters (GradScaler, gradient clipping and Accelerate see them).

When a parameter's active units are one run of positions along an ``int`` axis (the default packed first roles,
:data:`~egg_optim.core.scores.FIRST_ROLES`) the stand-in is a ``narrow`` view of the parameter and its gradient
where both are dense and laid out alike (rows, in any memory format): the base optimizer updates the active rows
in place and nothing is gathered or written back. A strided run (a block of columns) is stepped on a contiguous
copy (a fused optimizer reads dense memory) in a buffer kept until roles change, written back with a plain copy.
Either way no index op runs, and the base optimizer sees the same tensors every step (a compiled ``base.step`` is
not retraced). Where the active units are a few runs (packed roles over a fused gate/up or qkv weight; on the
(expert, neuron) pair axis of fused MoE weights, every expert's active neurons at the same offsets:
:func:`~egg_optim.core.axes.part_runs`), the active slices are cut from those runs into the gathered layout and
written back by strided copies: no index op either.

When roles change, a unit that stays active keeps its state rows. What a unit that becomes active starts from
follows the clone-state policy, as with full storage: ``"keep"``: its own rows from when it was last active
(parked when it became a clone: they take memory, but no step time), ``"copy"``: its former source's rows (it
carried that unit's weights or outputs), ``"reset"``: a fresh value. With ``"copy"`` and ``"reset"`` clones hold
no state at all.

State dicts hold full-size state (clone rows as the policy gives them), so they load into either storage and
into a bare optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from . import axes, sharding
from .axes import Axis, Span
from .roles import Roles

STORAGES = ("compact", "full")
CLONE_STATES = ("keep", "reset", "copy")
# fresh(key, param_group) -> the value a state entry holds before any step (OptimizerInfo.fresh_value)
Fresh = Callable[[str, dict[str, Any]], float]
Parked = dict[torch.Tensor, dict[str, torch.Tensor]]


def zero_fresh(key: str, group: dict[str, Any]) -> float:
    return 0.0


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` fills one gap-free range of memory in some order of its dims: a block of contiguous rows, or
    of the rows of a ``channels_last`` weight (whose bare optimizer steps it in that layout, too)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape) step alike: equal strides wherever a dim has more than one entry."""
    return a.stride() == b.stride() or all(n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride()))


@dataclass(eq=False)
class CompactEntry:
    """One parameter with clone units, as the step sees it."""

    param: torch.Tensor
    group: dict[str, Any]
    position: int  # index of ``param`` in ``group["params"]``
    active: torch.Tensor  # active units, on the parameter's device
    dim: Axis = 0  # the parameter's unit axis (:mod:`egg_optim.core.axes`)
    span: Span | None = None  # ``active`` as one run of positions (``int`` axes only): views, no index ops
    runs: list[Span] | None = None  # else a few runs (alike in every expert on a pair axis): strided copies
    _view: torch.Tensor | None = None  # a span's stand-in, kept from step to step (see :meth:`stand_in`): a view
    _buffer: torch.Tensor | None = None  # ... or a buffer for a strided span
    _ptr: int = 0  # the parameter's data_ptr() when ``_view`` was cut
    _contiguous: bool = True  # whether the stand-in is contiguous (a channels_last view is dense, not contiguous)

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s active slices: a view for a span, else a copy (cut from runs, or gathered)."""
        if self.runs is not None:
            return axes.cut(t, self.dim, self.runs)
        return axes.pick(t, self.dim, self.active, self.span)

    def stand_in(self) -> tuple[torch.Tensor, bool]:
        """The tensor the base optimizer steps for this parameter, and whether it is a copy to write back.

        For a span it is the same tensor object every step until the parameter's storage changes
        (``model.to(...)``), so a compiled base optimizer step sees the same parameters and does not recompile:
        a view of dense rows (contiguous or ``channels_last``), or for a strided block (columns) a buffer the block
        is copied into (it stays allocated between steps: the active block's size). Scattered units: a fresh
        gathered copy."""
        p = self.param
        if self.span is None:
            return self.select(p).contiguous(), True
        view = self._view
        # the kept view holds the storage it was cut from, so an equal address means the same storage
        if view is not None and self._ptr == p.data_ptr() and view.dtype == p.dtype and view.device == p.device:
            return view, False
        block = axes.narrow(p.detach(), self.dim, self.span)
        buf = self._buffer
        if buf is not None and self._ptr == p.data_ptr() and buf.dtype == p.dtype and buf.device == p.device:
            return buf.copy_(block), True  # a strided block (found so when the storage was first seen)
        self._ptr = p.data_ptr()
        if _dense(block):
            # of the detached parameter: a view of a tensor that needs no grad may be read after in-place updates
            # in any grad mode (a view made in no_grad mode of the parameter itself may not)
            self._view, self._contiguous = block, block.is_contiguous()
            return block, False
        self._view = None  # (cut from an earlier storage, if any)
        if buf is None or buf.shape != block.shape or buf.dtype != block.dtype or buf.device != block.device:
            buf = self._buffer = torch.empty_like(block, memory_format=torch.contiguous_format)
        return buf.copy_(block), True

    def write_back(self, stand_in: torch.Tensor) -> None:
        if self.span is not None:
            axes.narrow(self.param, self.dim, self.span).copy_(stand_in)
        elif self.runs is not None:
            axes.write_runs_(self.param, self.dim, self.runs, stand_in)
        else:
            axes.copy_(self.param, self.dim, self.active, stand_in)


def compact_entry(param: torch.Tensor, group: dict[str, Any], position: int, roles: Roles, dim: Axis) -> CompactEntry:
    """The step's entry for ``param`` under ``roles`` (of its positions along ``dim``)."""
    where = roles.active_span if isinstance(dim, int) else None
    runs = None if where is not None or sharding.is_sharded(param) else axes.part_runs(roles.active, param.shape, dim)
    return CompactEntry(param, group, position, roles.on(param.device, "active"), dim, where, runs)


@dataclass(frozen=True)
class UnitParam:
    """A parameter a unit owns a slice of, with the roles of its layer: what relayout works on."""

    param: torch.Tensor
    group: dict[str, Any]
    roles: Roles
    dim: Axis = 0


def units_of(param: torch.Tensor, value: Any, dim: Axis = 0) -> int | None:
    """Number of units of a per-unit state tensor of ``param`` (``None`` for scalar or foreign state): its
    shape equals the parameter's except along the unit axis ``dim``."""
    return axes.units_of(param.shape, value, dim)


def layout_error(param: torch.Tensor, state: dict[str, Any], roles: Roles, dim: Axis = 0) -> str | None:
    """Why ``state`` fits neither the full nor the compact layout of ``param`` under ``roles`` (or ``None``)."""
    allowed = {roles.num_units, int(roles.active.numel())}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0 and units_of(param, value, dim) not in allowed:
            full = list(param.shape)
            return (
                f"state {key!r} has shape {tuple(value.shape)}; expected {tuple(full)} (full) or "
                f"{int(roles.active.numel())} units along dim {dim} (active units only)"
            )
    return None


@torch.no_grad()
def expand(
    param: torch.Tensor,
    state: dict[str, Any],
    roles: Roles,
    group: dict[str, Any],
    *,
    from_sources: bool,
    parked: dict[str, torch.Tensor] | None = None,
    fresh: Fresh = zero_fresh,
    dim: Axis = 0,
) -> None:
    """Rewrite compact per-unit state of ``param`` (active units under ``roles``) to full size, in place.

    Clone units take their ``parked`` slices (see :func:`park`) where there are some, else their source's
    (``from_sources``) or the fresh value. Full-size state is left alone.
    """
    n_active = int(roles.active.numel())
    if n_active == roles.num_units:
        return
    for key, value in list(state.items()):
        if units_of(param, value, dim) != n_active:
            continue
        full = value.new_full(param.shape, fresh(key, group))
        axes.copy_(full, dim, roles.active, value)
        if parked is not None and key in parked:
            axes.copy_(full, dim, roles.clones, parked[key])
        elif from_sources and roles.has_clones:
            axes.copy_(full, dim, roles.clones, axes.select(full, dim, roles.sources))
        state[key] = full


@torch.no_grad()
def park(param: torch.Tensor, state: dict[str, Any], roles: Roles, dim: Axis = 0) -> dict[str, torch.Tensor]:
    """The clone slices of full-size per-unit state of ``param``, to give back when a clone becomes active."""
    if not roles.has_clones:
        return {}
    return {
        key: axes.select(value, dim, roles.clones)
        for key, value in state.items()
        if units_of(param, value, dim) == roles.num_units
    }


@torch.no_grad()
def compact(param: torch.Tensor, state: dict[str, Any], roles: Roles, dim: Axis = 0) -> None:
    """Keep only the active units of full-size per-unit state of ``param``, in place."""
    if not roles.has_clones:
        return
    for key, value in list(state.items()):
        if units_of(param, value, dim) == roles.num_units:
            state[key] = axes.select(value, dim, roles.active)


def relayout(
    params: Iterable[tuple[UnitParam | None, UnitParam]],
    opt_state: MutableMapping[torch.Tensor, dict],
    parked: Parked,
    *,
    clone_state: str,
    fresh: Fresh = zero_fresh,
) -> None:
    """Move compact optimizer state from the active units of the old roles to those of the new ones.

    ``params`` pairs each parameter's old entry (``None``: its state is full size) with its new one. A unit that
    stays active keeps its slices; a unit that becomes active gets its parked slices (``clone_state="keep"``,
    which parks new clones' slices in ``parked``), its former source's (``"copy"``) or fresh ones
    (``"reset"``). Parameters without state are skipped (the optimizer creates it on its first step).
    """
    for old, new in params:
        p = new.param
        st = opt_state.get(p)
        if not st:
            continue
        if old is not None:
            if old.roles.same_as(new.roles):
                continue
            expand(
                p,
                st,
                old.roles,
                new.group,
                from_sources=clone_state == "copy",
                parked=parked.get(p) if clone_state == "keep" else None,
                fresh=fresh,
                dim=new.dim,
            )
        parked.pop(p, None)
        if clone_state == "keep" and new.roles.has_clones:
            parked[p] = park(p, st, new.roles, new.dim)
        compact(p, st, new.roles, new.dim)


@contextmanager
def stand_ins(entries: list[CompactEntry], opt_state: MutableMapping[torch.Tensor, dict]) -> Iterator[None]:
    """Within the block, each entry's parameter is replaced in its param group and in the optimizer state by a
    tensor holding its active units (and their gradient): a view where it can be (the same one every step), else
    a copy that is written back on exit; the real parameters are put back, even if the block raised. This runs
    at every step, on the host: it is kept to a few attribute reads and dict writes per parameter."""
    swapped: list[tuple[CompactEntry, list, int, torch.Tensor, bool]] = []
    try:
        with torch.no_grad():
            for e in entries:
                p = e.param
                params = e.group["params"]
                pos = e.position
                if params[pos] is not p:  # the group was edited since the entry was built
                    pos = next(i for i, q in enumerate(params) if q is p)
                grad = p.grad
                if grad is not None:
                    grad = grad.narrow(e.dim, *e.span) if e.span is not None else e.select(grad)
                stand_in, copied = e.stand_in()
                # a copy is contiguous; a view of dense rows steps as it is when its gradient is laid out alike
                if (
                    grad is not None
                    and not (e._contiguous and grad.is_contiguous())
                    and (copied or not _same_layout(grad, stand_in))
                ):
                    grad = grad.contiguous()
                    if not copied:  # a view with a gradient laid out otherwise: step copies of both
                        stand_in, copied = e.select(p).contiguous(), True
                stand_in.grad = grad
                params[pos] = stand_in
                swapped.append((e, params, pos, stand_in, copied))
                state = opt_state.pop(p, None)
                if state is not None:
                    opt_state[stand_in] = state
        yield
    finally:
        with torch.no_grad():
            for e, params, pos, stand_in, copied in swapped:
                params[pos] = e.param
                state = opt_state.pop(stand_in, None)
                if state is not None:
                    opt_state[e.param] = state
                if copied:
                    e.write_back(stand_in)
                stand_in.grad = None  # a kept view must not keep the gradient alive
