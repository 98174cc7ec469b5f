"""Unit scores for leader elections (higher is better)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import PlanError
from .units import ManagedLayer

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
