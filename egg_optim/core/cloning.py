"""Weight cloning: each clone takes its source leader's unit (weight row, bias, norm entries; a block unit's
producer rows, not the consumer columns that read it: :meth:`ManagedLayer.copied_by_clones`).

``blend`` mixes (``1.0`` copies), ``noise`` adds Gaussian noise relative to each source row's RMS to break
the symmetry between a leader and its clones, and ``state`` says what happens to the clone's rows of the
optimizer state: ``"keep"`` them, ``"reset"`` them to a fresh value, or ``"copy"`` the leader's. (With compact
storage, :mod:`egg_optim.core.compact`, clone rows are not in the optimizer state; the policy then applies when a
clone becomes active.)

A parameter sharded by FSDP2 (:mod:`egg_optim.core.sharding`) may hold a clone on one rank and its source on
another: the new rows are computed from the gathered tensor, exactly as one process computes them (noise
included), and each rank writes its own slice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import ConfigError
from . import axes
from .axes import Axis
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


def _blended(t: torch.Tensor, roles: Roles, blend: float, dim: Axis) -> torch.Tensor:
    src = axes.select(t, dim, roles.sources)
    if blend == 1.0:
        return src
    return torch.lerp(axes.select(t, dim, roles.clones), src, blend)


@torch.no_grad()
def clone_layer(
    layer: ManagedLayer,
    roles: Roles,
    *,
    blend: float = 1.0,
    noise: float = 0.0,
    state: str = "keep",
    opt_state: Mapping[torch.Tensor, dict] | None = None,
    groups: Mapping[torch.Tensor, dict] | None = None,
    generator: torch.Generator | None = None,
    fresh: Fresh = zero_fresh,
) -> int:
    """Copy source units into clone units in place; returns the number of clone units written."""
    if not roles.has_clones:
        return 0
    unit_roles = roles
    for pname, p in layer.params:
        if not layer.copied_by_clones(pname):
            continue
        dim, roles = layer.dim_of(pname), layer.roles_of(pname, unit_roles)
        whole = full(p)  # p itself unless sharded
        idx = roles.clones.to(whole.device)
        rows = _blended(whole, roles, blend, dim)
        if noise > 0:
            lead = dim if isinstance(dim, int) else 0  # selected slices of a pair axis lead with their positions
            moved = rows.movedim(lead, 0)
            flat = moved.reshape(moved.shape[0], -1)
            rms = flat.float().pow(2).mean(dim=1).sqrt().to(rows.dtype)
            eps = torch.randn(flat.shape, generator=generator, dtype=torch.float32).to(rows)
            rows = (flat + noise * rms[:, None] * eps).reshape(moved.shape).movedim(0, lead)
        if is_sharded(p):
            write_full_(p, whole.index_copy(dim, idx, rows))
        else:
            axes.copy_(p, dim, idx, rows)
        if opt_state is not None and state != "keep":
            st = opt_state.get(p, {})
            for key in row_state_keys(p, st):
                if state == "copy":
                    copy_positions_(st[key], dim, roles.clones, roles.sources)
                else:
                    where = localize(st[key], dim, roles.clones)[1]
                    axes.fill_(local(st[key]), dim, where, fresh(key, (groups or {}).get(p, {})))
    for bname, b in layer.buffers:
        dim, roles = layer.dim_of(bname), layer.roles_of(bname, unit_roles)
        axes.copy_(b, dim, roles.clones, _blended(b, roles, blend, dim))
    return unit_roles.num_clones
