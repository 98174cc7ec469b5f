"""Weight cloning: each clone takes its source leader's unit (weight row, bias, norm entries).

``blend`` mixes (``1.0`` copies), ``noise`` adds Gaussian noise relative to each source row's RMS to break
the symmetry between a leader and its clones, and ``state`` says what happens to the clone's rows of the
optimizer state: ``"keep"`` them, ``"reset"`` them to a fresh value, or ``"copy"`` the leader's. (With compact
storage, :mod:`egg_optim.core.compact`, clone rows are not in the optimizer state; the policy then applies when a
clone becomes active.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import ConfigError
from .compact import CLONE_STATES, Fresh, zero_fresh
from .masking import row_state_keys
from .roles import Roles
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


def _blended(t: torch.Tensor, roles: Roles, blend: float, dim: int) -> torch.Tensor:
    src = t.index_select(dim, roles.sources.to(t.device))
    if blend == 1.0:
        return src
    return torch.lerp(t.index_select(dim, roles.clones.to(t.device)), src, blend)


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
        dim, roles = layer.dim_of(pname), layer.roles_of(pname, unit_roles)
        idx = roles.clones.to(p.device)
        rows = _blended(p, roles, blend, dim)
        if noise > 0:
            moved = rows.movedim(dim, 0)
            flat = moved.reshape(moved.shape[0], -1)
            rms = flat.float().pow(2).mean(dim=1).sqrt().to(rows.dtype)
            eps = torch.randn(flat.shape, generator=generator, dtype=torch.float32).to(rows)
            rows = (flat + noise * rms[:, None] * eps).reshape(moved.shape).movedim(0, dim)
        p.index_copy_(dim, idx, rows)
        if opt_state is not None and state != "keep":
            st = opt_state.get(p, {})
            for key in row_state_keys(p, st):
                if state == "copy":
                    st[key].index_copy_(dim, idx, st[key].index_select(dim, roles.sources.to(p.device)))
                else:
                    st[key].index_fill_(dim, idx, fresh(key, (groups or {}).get(p, {})))
    for bname, b in layer.buffers:
        dim, roles = layer.dim_of(bname), layer.roles_of(bname, unit_roles)
        b.index_copy_(dim, roles.clones.to(b.device), _blended(b, roles, blend, dim))
    return unit_roles.num_clones
