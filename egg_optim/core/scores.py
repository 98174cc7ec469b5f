"""Unit scores for leader elections: callable objects, like torch-pruning's ``Importance``.

A :class:`Score` is called at an election, ``score(layer, generator) -> Tensor[num_units]`` (higher leads).
A :class:`RunningScore` is instead observed after every optimizer step (``observe(layer)``) and the optimizer
averages the observations since the last election; an :class:`ObservedScore` receives its observations from
outside, through :meth:`LeaderCloneOptimizer.observe_scores` (the LFNN local-loss score).

Scores that read ``weight.grad`` set ``reads_grad = True``: weight-mode gradient skipping
(:mod:`egg_optim.rewrites.grad_skip`, which leaves clone rows of the gradient zero) then stays off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from .units import ManagedLayer

ScoreFn = Callable[[ManagedLayer], torch.Tensor]


class Score:
    """Scores every unit of a layer at an election. Subclass and implement :meth:`__call__`."""

    name: str = "custom"
    reads_grad: bool = False

    def __call__(self, layer: ManagedLayer, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class RunningScore(Score):
    """Observed after every optimizer step and averaged until the next election. Implement :meth:`observe`."""

    def observe(self, layer: ManagedLayer) -> torch.Tensor | None:
        """This step's per-unit values, or ``None`` to skip the step (e.g. no gradient yet)."""
        raise NotImplementedError

    def __call__(self, layer: ManagedLayer, generator: torch.Generator) -> torch.Tensor:
        raise TypeError(f"{self!r} is averaged over steps by the optimizer, not called at the election")


class ObservedScore(RunningScore):
    """Fed from outside with :meth:`LeaderCloneOptimizer.observe_scores`; nothing is read per step."""

    def observe(self, layer: ManagedLayer) -> torch.Tensor | None:
        return None


class RandomScore(Score):
    """A fresh seeded draw: the seed's roles."""

    name = "random"

    def __call__(self, layer: ManagedLayer, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(layer.num_units, generator=generator)


class WeightNormScore(Score):
    """L2 norm of each unit's weights (its row; for a transformer block, all its slices)."""

    name = "weight_norm"

    def __call__(self, layer: ManagedLayer, generator: torch.Generator) -> torch.Tensor:
        return layer.unit_rows().float().norm(dim=1).cpu()


class GradNormScore(RunningScore):
    """L2 norm of each unit's weight-gradient row, averaged over the steps since the last election."""

    name = "grad_norm"
    reads_grad = True

    def observe(self, layer: ManagedLayer) -> torch.Tensor | None:
        g = layer.unit_rows(grad=True)
        return None if g is None else g.float().norm(dim=1)


class TaylorScore(RunningScore):
    """First-order Taylor importance ``sum |w * dL/dw|`` of each unit, averaged over steps."""

    name = "taylor"
    reads_grad = True

    def observe(self, layer: ManagedLayer) -> torch.Tensor | None:
        g = layer.unit_rows(grad=True)
        return None if g is None else (layer.unit_rows() * g).float().abs().sum(dim=1)


class LocalLossScore(ObservedScore):
    """Minus each unit's LFNN worker loss, pushed by :class:`~egg_optim.callbacks.LocalLossCallback`."""

    name = "local_loss"


class CallableScore(Score):
    """Wraps ``fn(layer) -> scores``; assumed to read gradients (so gradient skipping stays off)."""

    reads_grad = True

    def __init__(self, fn: ScoreFn, name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def __call__(self, layer: ManagedLayer, generator: torch.Generator) -> torch.Tensor:
        return self.fn(layer)


SCORES: dict[str, Score] = {
    s.name: s for s in (RandomScore(), WeightNormScore(), GradNormScore(), TaylorScore(), LocalLossScore())
}


def register_score(score: Score, *, overwrite: bool = False) -> Score:
    """Make ``score`` available by its ``name`` to every config and optimizer."""
    if not isinstance(score, Score):
        raise ConfigError(f"register_score expects a Score instance, got {score!r}")
    if score.name in SCORES and not overwrite:
        raise ConfigError(f"a score named {score.name!r} is already registered (pass overwrite=True)")
    SCORES[score.name] = score
    return score


def resolve_score(election: str | Score | ScoreFn) -> Score:
    """The :class:`Score` for a registered name, a Score, or a plain callable ``fn(layer) -> scores``."""
    if isinstance(election, Score):
        return election
    if isinstance(election, str):
        if election not in SCORES:
            raise ConfigError(f"unknown election score {election!r}; choose one of {sorted(SCORES)} or pass a callable")
        return SCORES[election]
    if callable(election):
        return CallableScore(election)
    raise ConfigError(f"election must be a score name, a Score or a callable, got {type(election).__name__}")
