"""Graduation: clones become trained units over training, each promotion keeping what the model computes.

A clone is a function-preserving copy of its leader (Net2Net's widening operator). Leader/clone training trains
the small network inside the big one; graduation finishes the story: at scheduled points a share of every
layer's clones become independents (trained, never cloned), starting from what they computed, until the model
trains at full width.

* :class:`Graduation` is the schedule: points ``(at, active fraction)`` by optimizer steps or by epochs, with a
  text form (``"600:0.75,1200:1"``, ``"epoch2:0.75,epoch4:1"``). At each point every layer computes and trains
  at least that fraction of its units (a layer already above keeps its count; ``1``: dense).
* :func:`graduated_counts` turns a fraction into per-layer counts; :func:`graduate_roles` picks the clones to
  promote (spread over their sources, then at random by a generator every rank draws alike).

Symmetry: a promoted clone starts equal to its source (output mode: the source's rows; weight mode: its own
rows, which it computed with). The consumer's columns that read the two were trained apart, so their gradients
differ from the first step, but late in a decaying schedule the pair hardly drifts apart (docs/results/
graduation.md); ``graduate_noise`` adds Gaussian noise relative to each row's RMS (and then the promotion changes
the function by that much).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .plan import LayerPlan
from .roles import Roles

_UNITS = ("steps", "epochs")


@dataclass(frozen=True)
class Graduation:
    """Points ``(at, fraction)``: from optimizer step (or the start of epoch) ``at`` on, every managed layer
    computes and trains at least ``fraction`` of its units. ``at`` strictly increases, fractions do not fall."""

    points: tuple[tuple[int, float], ...] = ()
    unit: str = "steps"

    def __post_init__(self) -> None:
        if self.unit not in _UNITS:
            raise ConfigError(f"Graduation.unit must be one of {_UNITS}, got {self.unit!r}")
        points = tuple((p[0], float(p[1])) if isinstance(p, (tuple, list)) and len(p) == 2 else p for p in self.points)
        last_at, last_frac = 0, 0.0
        for p in points:
            if not (isinstance(p, tuple) and len(p) == 2):
                raise ConfigError(f"graduation point {p!r} must be a pair (at, active fraction)")
            at, frac = p
            if isinstance(at, bool) or not isinstance(at, int) or at < 1:
                raise ConfigError(f"graduation point {p!r}: 'at' must be an int >= 1 ({self.unit})")
            if not (math.isfinite(frac) and 0.0 < frac <= 1.0):
                raise ConfigError(f"graduation point {p!r}: the active fraction must be in (0, 1]")
            if at <= last_at or frac < last_frac:
                raise ConfigError(
                    f"graduation points must have increasing 'at' and non-decreasing fractions, got {self.points!r}"
                )
            last_at, last_frac = at, frac
        object.__setattr__(self, "points", points)

    @classmethod
    def parse(cls, spec: Graduation | str | Sequence | None, *, what: str = "graduate") -> Graduation:
        """From ``None`` / ``""`` / ``"never"`` (no graduation), a list of ``(step, fraction)`` pairs, or text:
        ``"600:0.75,1200:1"`` (steps) or ``"epoch2:0.75,epoch4:1"`` (epoch starts)."""
        if isinstance(spec, Graduation):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, (list, tuple)):
            return cls(tuple(spec))
        if not isinstance(spec, str):
            raise ConfigError(f"{what}: expected a string, a list of (step, fraction) pairs or None, got {spec!r}")
        text = spec.strip().lower()
        if text in ("", "never", "none"):
            return cls()
        points, units = [], set()
        try:
            for part in text.split(","):
                at, frac = part.strip().split(":")
                units.add("epochs" if at.startswith("epoch") else "steps")
                points.append((int(at.removeprefix("epoch")), float(frac)))
            if len(units) > 1:
                raise ValueError
            return cls(tuple(points), units.pop())
        except (ValueError, ConfigError) as exc:
            detail = f" ({exc})" if isinstance(exc, ConfigError) else ""
            raise ConfigError(
                f"{what}: cannot read {spec!r}{detail}; use 'STEP:FRACTION,...' (e.g. '600:0.75,1200:1') or "
                "'epochN:FRACTION,...' (e.g. 'epoch2:0.75,epoch4:1'), one unit throughout"
            ) from None

    def __str__(self) -> str:
        prefix = "epoch" if self.unit == "epochs" else ""
        return ",".join(f"{prefix}{at}:{frac:g}" for at, frac in self.points) or "never"

    @property
    def never(self) -> bool:
        return not self.points

    def target(self, position: int) -> float:
        """The active fraction due at ``position`` (steps taken, or the epoch starting); 0: none yet."""
        return max((frac for at, frac in self.points if at <= position), default=0.0)


def graduated_counts(
    layer_plans: Mapping[str, LayerPlan], fraction: float, multiples: Mapping[str, int] | None = None
) -> dict[str, LayerPlan]:
    """Per-layer counts with at least ``fraction`` of the units active: ``ceil(fraction * units)`` rounded up to
    the layer's multiple (the plan's alignment), at most every unit; the extra active units are independents and
    the leaders stay. A layer already at or above that keeps its counts."""
    out = {}
    for name, lp in layer_plans.items():
        m = (multiples or {}).get(name, 1)
        want = min(lp.units, -(-math.ceil(fraction * lp.units - 1e-9) // m) * m)
        if want <= lp.active:
            out[name] = lp
        else:
            out[name] = LayerPlan(name, lp.units, lp.leaders, want - lp.leaders, lp.align)
    return out


def graduate_roles(roles: Roles, promote: int, generator: torch.Generator | None = None) -> Roles:
    """``roles`` with ``promote`` clones made independents. The clones are spread over their sources (each round
    takes one clone from every source that has the most left), then drawn at random within a round, so each
    leader keeps as many copies as the others. Packed roles (clones one run, their sources cycling over a run of
    leaders) promote their first clones instead: in cycle order that is as balanced, and the active units stay
    one run, so the step keeps taking them as views (:mod:`egg_optim.core.compact`)."""
    if promote <= 0:
        return roles
    if promote > roles.num_clones:
        raise ConfigError(f"cannot graduate {promote} clones of {roles.num_clones}")
    if roles.clone_span is not None and roles.source_cycle is not None:
        return Roles(
            roles.num_units,
            roles.leaders,
            torch.cat([roles.independents, roles.clones[:promote]]),
            roles.clones[promote:],
            roles.sources[promote:],
        )
    n = roles.num_clones
    shuffled = torch.randperm(n, generator=generator)
    sources = roles.sources[shuffled].tolist()
    total: dict[int, int] = {}
    for s in sources:
        total[s] = total.get(s, 0) + 1
    # greedy "take from the source with the most clones left": the k-th clone taken from source s leaves it
    # total[s] - k, so taking in increasing k - total[s] (ties in the shuffled order) is that greedy order
    taken: dict[int, int] = {}
    key = []
    for s in sources:
        k = taken.get(s, 0)
        taken[s] = k + 1
        key.append(k - total[s])
    pick = shuffled[torch.argsort(torch.tensor(key), stable=True)[:promote]]
    chosen = roles.clones[pick]
    keep = torch.ones(n, dtype=torch.bool)
    keep[pick] = False
    return Roles(
        roles.num_units,
        roles.leaders,
        torch.cat([roles.independents, chosen]),
        roles.clones[keep],
        roles.sources[keep],
    )
