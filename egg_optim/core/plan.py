"""Role plans: how many leaders, independents and clones each layer gets.

A plan is data: global ``(leaders, independents)`` fractions, per-layer overrides by name pattern, and which
layers are managed. Resolving a plan against a model validates everything before anything is changed.
Counts follow the seed: ``leaders = round(pL * units)``, ``independents = round(pI * units)``, clones are
the rest (Python's ``round``, i.e. half to even); a positive leader fraction that rounds to no leader while
clones remain gives one leader (small blocks: two attention heads at ``pL = 0.25``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..errors import PlanError
from .blocks import UnitGroup
from .units import MANAGED_TYPES, UNIT_KINDS, candidate_layers, candidate_units, left_alone, name_matches

Fractions = tuple[float, float]

# The seed's per-layer (leaders, independents) tables (FACTS.md section 1).
_MNIST = {
    "mild": {
        "layer1.conv1": (0.40, 0.10), "layer1.conv2": (0.40, 0.10), "layer1.conv3": (0.35, 0.10),
        "layer2.conv1": (0.40, 0.10), "layer2.conv2": (0.40, 0.10), "layer2.conv3": (0.35, 0.10),
        "layer3.conv1": (0.50, 0.10), "layer3.conv2": (0.50, 0.10), "layer3.conv3": (0.45, 0.10),
    },
    "aggressive": {
        "layer1.conv1": (0.30, 0.10), "layer1.conv2": (0.30, 0.10), "layer1.conv3": (0.25, 0.10),
        "layer2.conv1": (0.30, 0.10), "layer2.conv2": (0.30, 0.10), "layer2.conv3": (0.25, 0.10),
        "layer3.conv1": (0.40, 0.10), "layer3.conv2": (0.40, 0.10), "layer3.conv3": (0.35, 0.10),
    },
}  # fmt: skip
_CIFAR = {
    "mild": {
        "layer1.conv1": (0.40, 0.10), "layer1.conv2": (0.40, 0.10), "layer1.conv3": (0.45, 0.20),
        "layer2.conv1": (0.40, 0.10), "layer2.conv2": (0.40, 0.10), "layer2.conv3": (0.40, 0.10),
        "layer3.conv1": (0.35, 0.10), "layer3.conv2": (0.35, 0.10), "layer3.conv3": (0.30, 0.10),
    },
    "aggressive": {
        "layer1.conv1": (0.20, 0.10), "layer1.conv2": (0.20, 0.10), "layer1.conv3": (0.18, 0.10),
        "layer2.conv1": (0.20, 0.10), "layer2.conv2": (0.20, 0.10), "layer2.conv3": (0.20, 0.10),
        "layer3.conv1": (0.25, 0.10), "layer3.conv2": (0.25, 0.10), "layer3.conv3": (0.22, 0.10),
    },
}  # fmt: skip
# For models without the seed's layer names: one pair for every managed layer.
_UNIFORM = {"mild": (0.40, 0.10), "aggressive": (0.25, 0.10)}
PRESETS = ("baseline", "mild", "aggressive")
PRESET_TABLES = ("mnist", "cifar", "uniform")


def _short_list(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def _unsupported_note(model: nn.Module) -> str:
    """``"; found 48 transformers Conv1D layers (...), which are not supported as layers"`` for layer types that
    compute per-unit outputs but cannot have roles (empty when there are none)."""
    found: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        t = type(m)
        if t.__name__ == "Conv1D" and t.__module__.startswith("transformers"):
            kind = "transformers Conv1D"  # GPT-2's weight is (in, out): units on dim 1
        elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            kind = f"nn.{t.__name__}"
        elif isinstance(m, MANAGED_TYPES) and not isinstance(m, nn.Linear) and m.groups != 1:
            kind = "grouped convolution"
        elif isinstance(m, (nn.Bilinear, nn.MultiheadAttention)):
            kind = f"nn.{t.__name__}"
        else:
            continue
        found.setdefault(kind, []).append(name)
    parts = [f"{len(v)} {k} layers (e.g. {v[0]!r})" for k, v in found.items()]
    note = f"; found {', '.join(parts)}, which are not supported as layers" if parts else ""
    return note + (" (units='auto' manages GPT-2's MLP and attention blocks)" if "transformers Conv1D" in found else "")


def _check_fractions(where: str, pair: Sequence[float]) -> Fractions:
    if not (isinstance(pair, Sequence) and len(pair) == 2):
        raise PlanError(f"{where}: expected a (leaders, independents) pair, got {pair!r}")
    for label, v in zip(("leaders", "independents"), pair):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise PlanError(f"{where}: {label} fraction must be a number, got {v!r}")
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise PlanError(f"{where}: {label} fraction {v} is outside [0, 1]")
    lead, ind = float(pair[0]), float(pair[1])
    if lead + ind > 1.0 + 1e-9:
        raise PlanError(f"{where}: leaders {lead} + independents {ind} = {lead + ind:.4g} > 1")
    return lead, ind


@dataclass(frozen=True)
class LayerPlan:
    """Resolved counts for one layer."""

    name: str
    units: int
    leaders: int
    independents: int

    @property
    def clones(self) -> int:
        return self.units - self.leaders - self.independents


@dataclass(frozen=True)
class RolePlan:
    """Which layers get roles and in what proportions.

    Args:
        leaders, independents: fractions for every managed layer without an override.
        per_layer: ``{pattern: (leaders, independents)}``; the first matching pattern wins. Patterns are
            ``fnmatch`` patterns on qualified module names and also match a dotted suffix.
        layers: patterns selecting the managed layers. ``None`` means every Linear/ConvNd except the last
            one registered (the classifier).
        exclude: patterns removed from the managed set.
        only_listed: manage only layers matched by ``per_layer`` (used by the seed presets, whose shortcut
            convolutions and FC layers get no roles).
        units: ``"auto"`` (default): in transformer MLP and attention blocks a unit is a hidden neuron or an
            attention head spanning the block's projections (:mod:`egg_optim.core.blocks`), named by the block
            (``model.layers.0.mlp``, ``model.layers.0.self_attn``); elsewhere a Linear/ConvNd output row.
            ``"layers"``: every Linear/ConvNd output row is a unit, blocks included.
    """

    leaders: float = 1.0
    independents: float = 0.0
    per_layer: Mapping[str, Fractions] = field(default_factory=dict)
    layers: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    only_listed: bool = False
    units: str = "auto"

    def __post_init__(self) -> None:
        _check_fractions("RolePlan", (self.leaders, self.independents))
        checked = {str(k): _check_fractions(f"RolePlan.per_layer[{k!r}]", v) for k, v in self.per_layer.items()}
        object.__setattr__(self, "per_layer", checked)
        if isinstance(self.layers, str) or isinstance(self.exclude, str):
            raise PlanError("RolePlan.layers and RolePlan.exclude take a list of patterns, not a string")
        if self.units not in UNIT_KINDS:
            raise PlanError(f"RolePlan.units must be one of {UNIT_KINDS}, got {self.units!r}")

    @classmethod
    def preset(cls, name: str, table: str = "uniform") -> RolePlan:
        """The seed's scenarios: ``"baseline"`` (no roles), ``"mild"``, ``"aggressive"``.

        ``table="uniform"`` (default, works on any model) applies one pair to every managed layer (mild 0.40 /
        0.10, aggressive 0.25 / 0.10); ``"mnist"`` / ``"cifar"`` are the seed's per-layer tables for its
        Bottleneck CNNs (layers ``layer{1,2,3}.conv{1,2,3}`` only).
        """
        if name not in PRESETS:
            raise PlanError(f"unknown preset {name!r}; choose one of {PRESETS}")
        if table not in PRESET_TABLES:
            raise PlanError(f"unknown preset table {table!r}; choose one of {PRESET_TABLES}")
        if name == "baseline":
            return cls()
        if table == "uniform":
            return cls(*_UNIFORM[name])
        return cls(per_layer=dict((_MNIST if table == "mnist" else _CIFAR)[name]), only_listed=True)

    def signature(self) -> str:
        """A stable string stored in checkpoints to detect a different plan."""
        per = ",".join(f"{k}={v[0]:g}/{v[1]:g}" for k, v in self.per_layer.items())
        return (
            f"L={self.leaders:g};I={self.independents:g};per=[{per}];layers={list(self.layers or [])};"
            f"exclude={list(self.exclude)};only={self.only_listed}"
            + (f";units={self.units}" if self.units != "auto" else "")
        )

    def fractions_for(self, name: str) -> Fractions:
        for pattern, pair in self.per_layer.items():
            if name_matches(name, pattern):
                return pair
        return self.leaders, self.independents

    def candidates(self, model: nn.Module) -> dict[str, nn.Module | UnitGroup]:
        """What in ``model`` can have roles under this plan's ``units``: Linear/ConvNd layers and blocks."""
        return dict(candidate_layers(model, self.units))

    def selection(self, model: nn.Module) -> tuple[list[str], dict[str, str]]:
        """The candidates this plan gives roles (validated, in registration order) and ``{candidate: why not}``
        for the others."""
        candidates = list(self.candidates(model).items())
        if not candidates:
            raise PlanError(
                f"{type(model).__name__} has no nn.Linear / nn.ConvNd layer to manage{_unsupported_note(model)}"
            )
        names = [n for n, _ in candidates]
        for pattern in list(self.per_layer) + list(self.layers or []) + list(self.exclude):
            if not any(name_matches(n, pattern) for n in names):
                raise PlanError(f"pattern {pattern!r} matches no Linear/ConvNd layer; layers are {names}")
        why: dict[str, str] = {}
        if self.only_listed:
            chosen = [n for n in names if any(name_matches(n, p) for p in self.per_layer)]
            why.update({n: "not listed in the plan's per_layer table" for n in names if n not in chosen})
        elif self.layers is not None:
            chosen = [n for n in names if any(name_matches(n, p) for p in self.layers)]
            why.update({n: "not selected by the plan's layers patterns" for n in names if n not in chosen})
        else:
            chosen = names[:-1]
            why[names[-1]] = "the last layer, kept as the output head (name it in RolePlan(layers=[...]) to manage it)"
            # layers of a block found but not decomposed: never rows by default (they read or write the residual
            # stream); a plan naming them manages them
            undecomposed = left_alone(model, self.units)
            why.update({n: undecomposed[n] for n in chosen if n in undecomposed})
            chosen = [n for n in chosen if n not in undecomposed]
        excluded = [n for n in chosen if any(name_matches(n, p) for p in self.exclude)]
        why.update({n: "excluded by the plan" for n in excluded})
        return [n for n in chosen if n not in excluded], why

    def resolve(self, model: nn.Module) -> dict[str, LayerPlan]:
        """Validate the plan against ``model`` and return per-layer counts (layers with no clones included)."""
        chosen, _ = self.selection(model)
        modules = self.candidates(model)
        names = list(modules)
        if not chosen:
            if self.only_listed or self.layers is not None:
                why = "every layer the plan selects is excluded"
            elif any(left_alone(model, self.units).get(n) for n in names[:-1]):
                why = "the others belong to transformer blocks that could not be decomposed; name them in layers=[...]"
            else:
                why = (
                    "by default every Linear/ConvNd except the last one registered (the classifier) is managed, "
                    f"and {names[-1]!r} is the only one"
                )
            raise PlanError(
                f"the plan manages no layer of {type(model).__name__} ({why}); its Linear/ConvNd layers are "
                f"{_short_list(names)}{_unsupported_note(model)}"
            )
        out: dict[str, LayerPlan] = {}
        for name in chosen:
            units = candidate_units(modules[name])
            p_lead, p_ind = self.fractions_for(name)
            k_lead, k_ind = round(p_lead * units), round(p_ind * units)
            if k_lead + k_ind > units:
                raise PlanError(
                    f"layer {name!r} has too few units ({units}) for leaders {p_lead:g} -> {k_lead} plus "
                    f"independents {p_ind:g} -> {k_ind}"
                )
            if k_lead == 0 and p_lead > 0 and units - k_ind > 0:
                k_lead = 1  # a small block (few attention heads): the nearest plan that gives clones a source
            if k_lead == 0 and units - k_ind > 0:
                raise PlanError(
                    f"layer {name!r}: leaders {p_lead:g} x {units} units rounds to 0 leaders but "
                    f"{units - k_ind} clones need a source; raise the leader fraction"
                )
            out[name] = LayerPlan(name, units, k_lead, k_ind)
        return out
