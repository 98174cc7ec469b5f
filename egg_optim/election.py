"""Leader election: unit scores, the bully rule, and clone-to-leader assignment.

The functional core is :func:`elect`: given per-unit scores it returns new :class:`Roles`. The highest
scores lead; ties go to the higher unit index (the bully rule). Independents are the runners-up: the next
``k_independent`` units in the same ranking (so with the ``"random"`` score they are random, as in the seed).
Everything else is a clone, and ``assign`` picks each clone's source leader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import PlanError
from .layers import ManagedLayer
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
    eff = scores.detach().float().cpu().clone()
    if current is not None and hysteresis > 0 and current.leaders.numel():
        eff[current.leaders] += hysteresis * eff[current.leaders].abs()
    ranking = bully_ranking(eff)
    leaders = ranking[:n_leaders]
    independents = ranking[n_leaders : n_leaders + n_independents]
    clones = torch.sort(ranking[n_leaders + n_independents :]).values
    sources = assign_sources(clones, leaders, assign, weight=weight, generator=generator)
    return Roles(n, leaders, independents, clones, sources)


# ---------------------------------------------------------------------------- scores
ScoreFn = Callable[[ManagedLayer], torch.Tensor]


@dataclass(frozen=True)
class Score:
    """How a unit score is made.

    ``per_step(layer)`` is called after backward on every optimizer step and averaged until the next
    election; ``at_election(layer, generator)`` is called at the election (and receives that running mean
    through ``layer`` state kept by the optimizer when ``per_step`` is set). Set ``observed=True`` for scores
    pushed from outside with :meth:`LeaderCloneOptimizer.observe_scores` (the LFNN local-loss score).
    ``reads_grad``: the score reads clone rows of ``weight.grad``, so weight-mode gradient skipping
    (:mod:`egg_optim.grad_skip`, which leaves them zero) is not turned on automatically.
    """

    name: str
    per_step: ScoreFn | None = None
    at_election: Callable[[ManagedLayer, torch.Generator], torch.Tensor] | None = None
    observed: bool = False
    reads_grad: bool = True

    @property
    def accumulates(self) -> bool:
        return self.per_step is not None or self.observed


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().flatten(1) if t.dim() > 1 else t.detach().unsqueeze(1)


def _grad_norm(layer: ManagedLayer) -> torch.Tensor | None:
    g = layer.weight.grad
    return None if g is None else _rows(g).float().norm(dim=1)


def _taylor(layer: ManagedLayer) -> torch.Tensor | None:
    g = layer.weight.grad
    return None if g is None else (_rows(layer.weight) * _rows(g)).float().abs().sum(dim=1)


SCORES: dict[str, Score] = {
    "random": Score(
        "random",
        at_election=lambda layer, gen: torch.rand(layer.num_units, generator=gen),
        reads_grad=False,
    ),
    "weight_norm": Score(
        "weight_norm", at_election=lambda layer, gen: _rows(layer.weight).float().norm(dim=1).cpu(), reads_grad=False
    ),
    "grad_norm": Score("grad_norm", per_step=_grad_norm),
    "taylor": Score("taylor", per_step=_taylor),
    "local_loss": Score("local_loss", observed=True, reads_grad=False),
}


def register_score(score: Score, *, overwrite: bool = False) -> None:
    """Make a score available by name to every :class:`LeaderCloneOptimizer`."""
    if score.name in SCORES and not overwrite:
        raise PlanError(f"a score named {score.name!r} is already registered (pass overwrite=True)")
    SCORES[score.name] = score


def resolve_score(election: str | Score | ScoreFn) -> Score:
    if isinstance(election, Score):
        return election
    if isinstance(election, str):
        if election not in SCORES:
            raise PlanError(f"unknown election score {election!r}; choose one of {sorted(SCORES)} or pass a callable")
        return SCORES[election]
    if callable(election):
        name = getattr(election, "__name__", "custom")
        return Score(name, at_election=lambda layer, gen: election(layer))
    raise PlanError(f"election must be a score name, a Score or a callable, got {type(election).__name__}")
