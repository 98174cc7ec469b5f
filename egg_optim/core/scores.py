"""Unit scores for leader elections: callable objects, like torch-pruning's ``Importance``.

One protocol, which the role controller (:class:`~egg_optim.optim.controller.RoleController`) calls and never
looks behind (no ``isinstance`` on score classes outside this module):

* ``score.needs``: what the score reads, from :data:`NEEDS`. ``"weights"`` and ``"grads"`` it reads itself
  from the layer (``"grads"`` keeps weight-mode gradient skipping off, which would leave clone rows of
  ``weight.grad`` zero); ``"clone_grads"``: every unit's weight gradient *as if each unit were computed*,
  clones included, which the controller provides in :attr:`StepData.clone_grads` (``weight.grad`` in weight
  mode; in output mode, where clones have no weight gradient, a probe through the layer rewrite one training
  step in ``probe_every``); ``"local_losses"``: per-unit values pushed from outside
  (:meth:`LeaderCloneOptimizer.observe_scores`, the LFNN local-loss callback).
* ``score.observe_step(layer, data)`` after every optimizer step's gradients are complete: this step's
  per-unit values, or ``None``. The controller averages them until the next election.
* ``score.unit_scores(layer, generator, average)`` at an election: the per-unit scores (higher leads).
  ``average``: the mean of the observed values (and pushed ones) since the last election, or ``None``.
* ``score.initial()``: the score that draws the first roles, before anything was observed.

The base classes implement it for the usual shapes, so a new score subclasses one of them and never touches
the optimizer or the config: a :class:`Score` is called at an election, ``score(layer, generator)``; a
:class:`RunningScore` is observed after every step (``observe(layer)``) and averaged; an :class:`ObservedScore`
receives its observations from outside; a :class:`UnitGradScore` observes every unit's gradient with the
layer's roles (:meth:`UnitGradScore.observe_grads`). :class:`CloneConflictScore` is the one that lets
elections free clones in output mode. ``Score.policies`` names the election policies that can read a score
(checked by :meth:`EggConfig.validate <egg_optim.config.EggConfig.validate>`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, ElectionError
from .roles import Roles
from .units import ManagedLayer

ScoreFn = Callable[[ManagedLayer], torch.Tensor]
NEEDS = ("weights", "grads", "clone_grads", "local_losses")


@dataclass(frozen=True)
class StepData:
    """What the controller hands :meth:`Score.observe_step` for one layer: its roles, and every unit's weight
    gradient as if each unit were computed (``clone_grads``; ``None`` unless the score needs it, or on a step
    that was not probed)."""

    roles: Roles
    clone_grads: torch.Tensor | None = None


class Score:
    """Scores every unit of a layer at an election. Subclass and implement :meth:`__call__` (or, for another
    shape, the protocol methods :meth:`observe_step` / :meth:`unit_scores`; see the module docstring)."""

    name: str = "custom"
    needs: frozenset[str] = frozenset({"weights"})
    #: the election policies that can read this score (``None``: any), with the reason for messages
    policies: tuple[str, ...] | None = None
    policies_reason: str = ""
    #: output mode, scores that need ``"clone_grads"``: one training step in this many is probed
    probe_every: int = 10
    #: whether the score reads values fed from outside (:meth:`LeaderCloneOptimizer.observe_scores`)
    observed: bool = False
    #: old spelling of ``"grads" in needs`` (kept: subclasses may set it)
    reads_grad: bool = False

    def __call__(self, layer: ManagedLayer, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ the protocol the controller calls
    def requires(self, what: str) -> bool:
        """Whether the score reads ``what`` (one of :data:`NEEDS`; whoever reads ``"clone_grads"`` reads
        ``"grads"`` too: in weight mode they are ``weight.grad``)."""
        if what == "grads" and (self.reads_grad or "clone_grads" in self.needs):
            return True
        return what in self.needs

    def initial(self) -> Score:
        """The score that draws the first roles (nothing has been observed yet)."""
        return self

    @property
    def observes_steps(self) -> bool:
        """Whether :meth:`observe_step` can record anything (the controller skips the call per layer when not)."""
        return type(self).observe_step is not Score.observe_step

    def observe_step(self, layer: ManagedLayer, data: StepData) -> torch.Tensor | None:
        """This step's per-unit values (averaged until the next election), or ``None``: nothing to record."""
        return None

    def unit_scores(self, layer: ManagedLayer, generator: torch.Generator, average: Tensor | None) -> Tensor:
        """Per-unit scores at an election (``average``: the mean observation since the last one, or ``None``)."""
        return self(layer, generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class RunningScore(Score):
    """Observed after every optimizer step and averaged until the next election. Implement :meth:`observe`."""

    def initial(self) -> Score:
        return RandomScore()  # nothing observed yet: the seed's draw

    def observe_step(self, layer: ManagedLayer, data: StepData) -> torch.Tensor | None:
        return self.observe(layer)

    def unit_scores(self, layer: ManagedLayer, generator: torch.Generator, average: Tensor | None) -> Tensor:
        return average if average is not None else torch.zeros(layer.num_units)

    def observe(self, layer: ManagedLayer) -> torch.Tensor | None:
        """This step's per-unit values, or ``None`` to skip the step (e.g. no gradient yet)."""
        raise NotImplementedError

    def __call__(self, layer: ManagedLayer, generator: torch.Generator) -> torch.Tensor:
        raise TypeError(f"{self!r} is averaged over steps by the optimizer, not called at the election")


class ObservedScore(RunningScore):
    """Fed from outside with :meth:`LeaderCloneOptimizer.observe_scores`; nothing is read per step."""

    needs = frozenset()
    observed = True

    def observe(self, layer: ManagedLayer) -> torch.Tensor | None:
        return None


class RandomScore(Score):
    """A fresh seeded draw: the seed's roles."""

    name = "random"
    needs = frozenset()

    def __call__(self, layer: ManagedLayer, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(layer.num_units, generator=generator)


class PackedScore(Score):
    """Units in order, the lowest index best: the first ``A`` units are the active ones (leaders first) and the
    rest clones. Not an election score: what the first draw uses instead of a random one with
    ``EggConfig(first_roles="packed")`` (see :data:`FIRST_ROLES`)."""

    name = "packed"
    needs = frozenset()

    def __call__(self, layer: ManagedLayer, generator: torch.Generator) -> torch.Tensor:
        return -torch.arange(layer.num_units, dtype=torch.float32)


# How the first roles are drawn when the election score has nothing to go on (a random score, or a running one
# that has observed nothing yet). "packed": active units are each layer's first units, one contiguous block, so
# the step takes their rows as views with no index traffic (units are exchangeable at random initialisation, so
# the choice does not matter statistically); "drawn": the seed's seeded random draw.
FIRST_ROLES = ("packed", "drawn")


def first_draw(score: Score, first_roles: str) -> Score:
    """The score that draws the first roles under ``first_roles`` (:data:`FIRST_ROLES`)."""
    initial = score.initial()
    return PackedScore() if first_roles == "packed" and isinstance(initial, RandomScore) else initial


class WeightNormScore(Score):
    """L2 norm of each unit's weights (its row; for a transformer block, all its slices)."""

    name = "weight_norm"

    def __call__(self, layer: ManagedLayer, generator: torch.Generator) -> torch.Tensor:
        return layer.unit_rows().float().norm(dim=1).cpu()


class GradNormScore(RunningScore):
    """L2 norm of each unit's weight-gradient row, averaged over the steps since the last election."""

    name = "grad_norm"
    needs = frozenset({"grads"})
    reads_grad = True

    def observe(self, layer: ManagedLayer) -> torch.Tensor | None:
        g = layer.unit_rows(grad=True)
        return None if g is None else g.float().norm(dim=1)


class TaylorScore(RunningScore):
    """First-order Taylor importance ``sum |w * dL/dw|`` of each unit, averaged over steps."""

    name = "taylor"
    needs = frozenset({"weights", "grads"})
    reads_grad = True

    def observe(self, layer: ManagedLayer) -> torch.Tensor | None:
        g = layer.unit_rows(grad=True)
        return None if g is None else (layer.unit_rows() * g).float().abs().sum(dim=1)


class UnitGradScore(RunningScore):
    """Observes every unit's weight-gradient rows with the layer's roles; implement :meth:`observe_grads`.

    ``probe_every``: in output mode, the optimizer probes one training step in this many (the probed step
    runs the layer at full width: slower, same function). In weight mode every step is observed."""

    needs = frozenset({"clone_grads"})
    reads_grad = True
    probe_every: int = 10

    def observe(self, layer: ManagedLayer) -> torch.Tensor | None:
        raise TypeError(f"{self!r} observes gradients with roles: the optimizer calls observe_grads")

    def observe_step(self, layer: ManagedLayer, data: StepData) -> torch.Tensor | None:
        return None if data.clone_grads is None else self.observe_grads(data.clone_grads, data.roles)

    def observe_grads(self, grad: torch.Tensor, roles: Roles) -> torch.Tensor | None:
        """This step's per-unit values from ``grad`` (every unit's weight-gradient rows, shaped like the weight)."""
        raise NotImplementedError


class CloneConflictScore(UnitGradScore):
    """Which clones to free and which leaders are redundant, from the first-order effect of tying units.

    Tied units share one update: a leader steps with the sum ``G`` of its group's gradients (its own and its
    clones'). For plain gradient descent with learning rate ``lr``, freeing clone ``c`` (gradient ``g_c``) from a
    group whose other members sum to ``r = G - g_c`` changes the first-order loss decrease by
    ``-2 lr <g_c, r>``: it helps when the clone's gradient disagrees with the rest of its group. So a clone
    scores ``-<g_c, G_source - g_c>``, and a leader ``d`` scores ``-max_m <G_d, G_m>`` over the other leaders
    ``m`` (merging it into the leader its group's gradient agrees with most costs least). Both are on one
    scale, so hysteresis compares them. Independents score ``|g|^2`` (the stable policy never swaps them).
    Meant for ``election_policy="stable"``."""

    name = "clone_conflict"
    policies = ("stable",)
    policies_reason = "scores clones against their sources and leaders against each other"

    def __init__(self, probe_every: int = 10) -> None:
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 1:
            raise ConfigError(f"CloneConflictScore.probe_every must be a positive int, got {probe_every!r}")
        self.probe_every = probe_every

    def observe_grads(self, grad: torch.Tensor, roles: Roles) -> torch.Tensor | None:
        g = (grad.flatten(1) if grad.dim() > 1 else grad.unsqueeze(1)).float().cpu()
        out = (g * g).sum(dim=1)
        if not roles.has_clones:
            return out
        clones, sources = roles.clones, roles.sources
        total = g.clone().index_add_(0, sources, g[clones])  # leader rows: their group's summed gradient
        out[clones] = -(g[clones] * (total[sources] - g[clones])).sum(dim=1)
        leaders = roles.leaders
        if leaders.numel() > 1:
            gram = total[leaders] @ total[leaders].T
            gram.fill_diagonal_(-float("inf"))
            out[leaders] = -gram.max(dim=1).values
        return out


class LocalLossScore(ObservedScore):
    """Minus each unit's LFNN worker loss, pushed by :class:`~egg_optim.callbacks.LocalLossCallback`."""

    name = "local_loss"
    needs = frozenset({"local_losses"})


class CallableScore(Score):
    """Wraps ``fn(layer) -> scores``; assumed to read gradients (so gradient skipping stays off)."""

    needs = frozenset({"weights", "grads"})
    reads_grad = True

    def __init__(self, fn: ScoreFn, name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def __call__(self, layer: ManagedLayer, generator: torch.Generator) -> torch.Tensor:
        return self.fn(layer)


SCORES: dict[str, Score] = {
    s.name: s
    for s in (RandomScore(), WeightNormScore(), GradNormScore(), TaylorScore(), LocalLossScore(), CloneConflictScore())
}


def register_score(score: Score, *, overwrite: bool = False) -> Score:
    """Make ``score`` available by its ``name`` to every config and optimizer."""
    if not isinstance(score, Score):
        raise ConfigError(f"register_score expects a Score instance, got {score!r}")
    if score.name in SCORES and not overwrite:
        raise ConfigError(f"a score named {score.name!r} is already registered (pass overwrite=True)")
    SCORES[score.name] = score
    return score


def is_election(value: Any) -> bool:
    """Whether ``value`` can name an election score: a registered name, a :class:`Score` or a callable."""
    return isinstance(value, (str, Score)) or callable(value)


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


def unit_scores(
    score: Score, layer: ManagedLayer, generator: torch.Generator, average: Tensor | None = None
) -> torch.Tensor:
    """``score.unit_scores(layer, generator, average)`` (the protocol's election call) as a flat float CPU tensor
    of one value per unit; anything else (a list, a tensor of another size) is an
    :class:`~egg_optim.errors.ElectionError` naming the score and the layer."""
    value = score.unit_scores(layer, generator, average)
    if not torch.is_tensor(value):
        raise ElectionError(
            f"score {score.name!r} returned a {type(value).__name__} for layer {layer.name!r}; a score returns a "
            f"tensor of {layer.num_units} values (torch.tensor(...) of yours)"
        )
    value = value.detach().float().cpu().reshape(-1)
    if value.numel() != layer.num_units:
        raise ElectionError(
            f"score {score.name!r} returned {value.numel()} values for layer {layer.name!r} "
            f"with {layer.num_units} units"
        )
    return value


def check_observed_scores(score: Score, scores: Any, units: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Validate scores fed from outside (:meth:`LeaderCloneOptimizer.observe_scores`) before any is added: the
    election must read them (an :class:`ObservedScore`), ``scores`` must map managed layers (``units``: layer ->
    number of units) to finite tensors of one value per unit. Returns them as a dict."""
    if not score.observed:
        raise ConfigError(
            f"observe_scores: election {score.name!r} does not read observed scores (they would be averaged into "
            "its own running values, or ignored); use an ObservedScore election such as 'local_loss'"
        )
    if not isinstance(scores, Mapping):
        raise ConfigError(
            f"observe_scores expects a {{layer name: tensor of per-unit scores}} mapping, got "
            f"{type(scores).__name__} {scores!r:.60}"
        )
    for name, value in scores.items():
        if name not in units:
            raise ConfigError(f"observe_scores: {name!r} is not a managed layer; managed: {list(units)}")
        if not torch.is_tensor(value) or value.shape != (units[name],):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ConfigError(f"observe_scores: layer {name!r} has {units[name]} units, got scores of shape {shape}")
        if not bool(torch.isfinite(value).all()):
            raise ElectionError(f"observe_scores: layer {name!r} got non-finite scores")
    return dict(scores)
