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

When roles change, a unit that stays active keeps its state rows. What a unit that becomes active starts from
follows the clone-state policy, as with full storage: ``"keep"``: its own rows from when it was last active
(parked when it became a clone: they take memory, but no step time), ``"copy"``: its former source's rows (it
carried that unit's weights or outputs), ``"reset"``: a fresh value. With ``"copy"`` and ``"reset"`` clones hold
no state at all.

State dicts hold full-size state (clone rows as the policy gives them), so they load into either storage and
into a bare optimizer.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .roles import Roles

STORAGES = ("compact", "full")
# State whose fresh value is not zero: key -> param-group option holding the initial value.
FRESH_FROM_GROUP = {"sum": "initial_accumulator_value", "step_size": "lr"}


@dataclass(frozen=True)
class CompactEntry:
    param: torch.Tensor
    group: dict[str, Any]
    position: int  # index of ``param`` in ``group["params"]``
    active: torch.Tensor  # active rows, on the parameter's device


def fresh_value(key: str, group: dict[str, Any]) -> float:
    """The value a state entry has before any step (what a zero gradient leaves it at)."""
    return float(group.get(FRESH_FROM_GROUP[key], 0.0)) if key in FRESH_FROM_GROUP else 0.0


def _rows_of(param: torch.Tensor, value: Any) -> int | None:
    """Number of rows of a per-row state tensor of ``param`` (``None`` for scalar or foreign state)."""
    if not torch.is_tensor(value) or value.dim() == 0 or value.dim() != param.dim():
        return None
    if value.shape[1:] != param.shape[1:]:
        return None
    return int(value.shape[0])


def layout_error(param: torch.Tensor, state: dict[str, Any], roles: Roles) -> str | None:
    """Why ``state`` fits neither the full nor the compact layout of ``param`` under ``roles`` (or ``None``)."""
    allowed = {roles.num_units, int(roles.active.numel())}
    for key, value in state.items():
        rows = _rows_of(param, value)
        if torch.is_tensor(value) and value.dim() > 0 and rows not in allowed:
            return (
                f"state {key!r} has shape {tuple(value.shape)}; expected {roles.num_units} rows (full) or "
                f"{int(roles.active.numel())} rows (active units only) of shape {tuple(param.shape[1:])}"
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
) -> None:
    """Rewrite compact per-row state of ``param`` (active rows under ``roles``) to full size, in place.

    Clone rows take their ``parked`` rows (see :func:`park`) where there are some, else their source's rows
    (``from_sources``) or the fresh value. Full-size state is left alone.
    """
    n_active = int(roles.active.numel())
    if n_active == roles.num_units:
        return
    for key, value in list(state.items()):
        if _rows_of(param, value) != n_active:
            continue
        full = value.new_full((roles.num_units, *value.shape[1:]), fresh_value(key, group))
        full.index_copy_(0, roles.active.to(value.device), value)
        clones = roles.clones.to(value.device)
        if parked is not None and key in parked:
            full.index_copy_(0, clones, parked[key])
        elif from_sources and roles.has_clones:
            full.index_copy_(0, clones, full.index_select(0, roles.sources.to(value.device)))
        state[key] = full


@torch.no_grad()
def park(param: torch.Tensor, state: dict[str, Any], roles: Roles) -> dict[str, torch.Tensor]:
    """The clone rows of full-size per-row state of ``param``, to give back when a clone becomes active."""
    if not roles.has_clones:
        return {}
    return {
        key: value.index_select(0, roles.clones.to(value.device))
        for key, value in state.items()
        if _rows_of(param, value) == roles.num_units
    }


@torch.no_grad()
def compact(param: torch.Tensor, state: dict[str, Any], roles: Roles) -> None:
    """Keep only the active rows of full-size per-row state of ``param``, in place."""
    if not roles.has_clones:
        return
    for key, value in list(state.items()):
        if _rows_of(param, value) == roles.num_units:
            state[key] = value.index_select(0, roles.active.to(value.device))


@contextmanager
def stand_ins(entries: list[CompactEntry], opt_state: MutableMapping[torch.Tensor, dict]) -> Iterator[None]:
    """Within the block, each entry's parameter is replaced in its param group and in the optimizer state by a
    tensor holding its active rows (and their gradient); on exit the rows are written back and the real
    parameters put back, even if the block raised."""
    swapped: list[tuple[CompactEntry, int, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for e in entries:
                p = e.param
                pos = e.position
                if e.group["params"][pos] is not p:  # the group was edited since the entry was built
                    pos = next(i for i, q in enumerate(e.group["params"]) if q is p)
                stand_in = p.index_select(0, e.active)
                if p.grad is not None:
                    stand_in.grad = p.grad.index_select(0, e.active)
                e.group["params"][pos] = stand_in
                swapped.append((e, pos, stand_in))
                if p in opt_state:
                    opt_state[stand_in] = opt_state.pop(p)
        yield
    finally:
        with torch.no_grad():
            for e, pos, stand_in in swapped:
                e.group["params"][pos] = e.param
                if stand_in in opt_state:
                    opt_state[e.param] = opt_state.pop(stand_in)
                e.param.index_copy_(0, e.active, stand_in)
