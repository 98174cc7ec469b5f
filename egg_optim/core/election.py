"""Leader election: unit scores, the bully rule, and clone-to-leader assignment.

The functional core is :func:`elect`: given per-unit scores it returns new :class:`Roles`. The highest
scores lead; ties go to the higher unit index (the bully rule). Independents are the runners-up: the next
``k_independent`` units in the same ranking (so with the ``"random"`` score they are random, as in the seed).
Everything else is a clone, and ``assign`` picks each clone's source leader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import PlanError
from .roles import Roles

ASSIGN_STRATEGIES = ("first", "random", "round_robin", "nearest")


def bully_ranking(scores: torch.Tensor) -> torch.Tensor:
    """Unit indices from best to worst; equal scores rank the higher index first."""
    n = scores.numel()
    flipped = torch.argsort(scores.detach().float().cpu().flip(0), descending=True, stable=True)
    return n - 1 - flipped


def assign_sources(
    clones: torch.Tensor,
    ranked_leaders: torch.Tensor,
    strategy: str,
    *,
    weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick a source leader for each clone (``clones`` sorted ascending; leaders best first)."""
    k = clones.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if strategy == "first":
        return ranked_leaders[:1].expand(k).clone()
    if strategy == "random":
        return ranked_leaders[torch.randint(ranked_leaders.numel(), (k,), generator=generator)]
    if strategy == "round_robin":
        return ranked_leaders[torch.arange(k) % ranked_leaders.numel()]
    if strategy == "nearest":
        if weight is None:
            raise PlanError("assign='nearest' needs the layer's weight")
        w = weight.detach().float().cpu().flatten(1)
        sim = F.normalize(w[clones], dim=1) @ F.normalize(w[ranked_leaders], dim=1).T
        return ranked_leaders[sim.argmax(dim=1)]
    raise PlanError(f"unknown assign strategy {strategy!r}; choose one of {ASSIGN_STRATEGIES}")


def with_hysteresis(scores: torch.Tensor, current: Roles | None, hysteresis: float) -> torch.Tensor:
    """``scores`` (a float32 CPU copy) with each sitting leader's ``s`` counted as ``s + hysteresis * |s|``."""
    eff = scores.detach().float().cpu().clone()
    if current is not None and hysteresis > 0 and current.leaders.numel():
        eff[current.leaders] += hysteresis * eff[current.leaders].abs()
    return eff


def elect(
    scores: torch.Tensor,
    n_leaders: int,
    n_independents: int,
    *,
    current: Roles | None = None,
    hysteresis: float = 0.0,
    assign: str = "first",
    weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Roles:
    """New roles for one layer from per-unit ``scores`` (higher is better).

    With ``hysteresis=h`` a sitting leader's score counts as ``s + h * |s|``: a challenger must beat it by
    that margin to take the seat.
    """
    n = scores.numel()
    ranking = bully_ranking(with_hysteresis(scores, current, hysteresis))
    leaders = ranking[:n_leaders]
    independents = ranking[n_leaders : n_leaders + n_independents]
    clones = torch.sort(ranking[n_leaders + n_independents :]).values
    sources = assign_sources(clones, leaders, assign, weight=weight, generator=generator)
    return Roles(n, leaders, independents, clones, sources)
