"""Role plans: how many leaders, independents and clones each layer gets.

A plan is data: global ``(leaders, independents)`` fractions, per-layer overrides by name pattern, and which
layers are managed. Resolving a plan against a model validates everything before anything is changed.
Counts follow the seed: ``leaders = round(pL * units)``, ``independents = round(pI * units)``, clones are
the rest (Python's ``round``, i.e. half to even); a positive leader fraction that rounds to no leader while
clones remain gives one leader (small blocks: two attention heads at ``pL = 0.25``).

Hardware alignment (``RolePlan(align=...)``, :func:`align_counts`): a GPU computes a layer of 1,971 active
neurons much slower than one of 1,984 (odd widths miss the tensor cores' aligned kernels), so the counts can be
rounded so that each layer's active width (leaders + independents) and its leader count are multiples of a
hardware-friendly number. ``"auto"`` (the default) picks it per layer from the device and dtype of the layer's
weight when the plan is resolved (:func:`hardware_alignment`): on CPU it is 1, i.e. the seed's counts unchanged,
except for MoE experts, whose counts are per expert, equal in every expert, on any device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PlanError
from . import sharding
from .blocks import UnitGroup, discover
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
AUTO = "auto"


# ---------------------------------------------------------------------------------------------- alignment
def check_align(value: object, what: str = "RolePlan.align", error: type[Exception] = PlanError) -> str | int:
    """``value`` as ``"auto"`` or an int multiple >= 1; ``None``, ``"none"``, ``"off"`` and ``1`` mean off (1).
    Anything else raises ``error`` naming ``what`` and the value."""
    if value is None:
        return 1
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text in ("none", "off"):
            return 1
        if text.isdigit() and int(text) >= 1:
            return int(text)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1:
        return int(value)
    raise error(f"{what} must be 'auto', None (off) or an int multiple >= 1, got {value!r}")


def hardware_alignment(kind: str, device: torch.device, dtype: torch.dtype) -> int:
    """The multiple ``align="auto"`` rounds a layer's active and leader counts to, by what a unit is (``kind``:
    ``"linear"`` rows, transformer ``"mlp"`` neurons, ``"conv"`` channels, ``"attention"`` heads) and where the
    layer's weight lives.

    - not CUDA (CPU, MPS, meta, ...): 1, the plan's counts unchanged;
    - CUDA, Linear rows and MLP neurons: 64 for 16-bit (and narrower) float weights, the tensor-core tile;
      8 for float32 (TF32 tensor cores; under autocast, float32 weights multiply in bf16/fp16, where 8 elements
      are the 16-byte row alignment the fast kernels need: pass ``align=64`` to get the 16-bit tile there);
    - CUDA, conv channels: 8 (cuDNN's tensor-core channel multiple, bf16/fp16 and TF32);
    - attention heads: 1, a unit is already a whole key/value group of ``head_dim``-row heads;
    - MoE expert neurons, on any device: 16 bytes of neurons per expert (4 in float32, 8 in 16-bit floats), the
      stride ``torch._grouped_mm`` needs to run the experts at their active widths (output mode);
      :meth:`RolePlan.multiple_for` multiplies it by the number of experts;
    - float64 and integer weights: 1 (MoE experts: 2 in float64).
    """
    if kind == "experts":
        return max(1, 16 // dtype.itemsize) if dtype.is_floating_point else 1
    if device.type != "cuda" or kind == "attention" or not dtype.is_floating_point or dtype == torch.float64:
        return 1
    if kind == "conv":
        return 8
    return 64 if dtype.itemsize <= 2 else 8


def align_counts(units: int, leaders: int, independents: int, multiple: int) -> tuple[int, int, int]:
    """``(leaders, independents, align)``: the counts rounded to ``multiple`` and the multiple they now follow
    (1 when unchanged).

    - the active count ``a = leaders + independents`` goes to the nearest of ``multiple, 2 * multiple, ...``
      (at most ``units``) and ``units`` itself (ties go up); it never exceeds ``units`` and, when clones remain,
      is a multiple of ``multiple``;
    - when clones remain, the leader count goes to the nearest multiple (halves up) within ``[multiple, a]``, so
      it is never 0; with no independents in the plan all of ``a`` are leaders; independents are the rest (a
      multiple too, possibly 0);
    - when ``a`` reaches ``units`` (no clones left), the leaders stay and independents fill the layer;
    - unchanged: ``multiple <= 1``, a layer without clones, or one with fewer units than ``multiple`` (a single
      tile either way).
    """
    m = int(multiple)
    active = leaders + independents
    if m <= 1 or active >= units or units < m:
        return leaders, independents, 1
    top = (units // m) * m
    lo = min(top, max(m, (active // m) * m))
    hi = min(top, lo + m)
    a = min({lo, hi, units}, key=lambda c: (abs(c - active), -c))
    if a == units:
        return leaders, units - leaders, m
    if independents == 0:
        return a, 0, m
    lead = min(a, max(m, ((2 * leaders + m) // (2 * m)) * m))
    return lead, a - lead, m


def _kind(candidate: nn.Module | UnitGroup) -> str:
    if isinstance(candidate, UnitGroup):
        return candidate.kind
    return "linear" if isinstance(candidate, nn.Linear) else "conv"


def _placement(model: nn.Module, candidate: nn.Module | UnitGroup) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the weight that computes ``candidate``'s units (a block's first producer)."""
    # a block: its first slice's tensor (MoE experts hold no `weight`)
    grouped = isinstance(candidate, UnitGroup)
    weight = model.get_parameter(candidate.slices[0].param) if grouped else candidate.weight
    return weight.device, weight.dtype


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
    align: int = 1  # the multiple the counts were rounded to (1: not rounded)
    unaligned: tuple[int, int] | None = None  # (leaders, independents) before rounding, when it changed them

    @property
    def clones(self) -> int:
        return self.units - self.leaders - self.independents

    @property
    def active(self) -> int:
        return self.leaders + self.independents


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
        align: round each managed layer's active count (leaders + independents) and leader count to a multiple
            (:func:`align_counts`). ``"auto"`` (default): by device and dtype of the layer's weight when the plan
            is resolved (:func:`hardware_alignment`: 1, i.e. unchanged, on CPU; 64 neurons / rows for 16-bit
            weights on CUDA, 8 for float32, 8 conv channels); an int: that multiple for every layer; ``None``
            or 1: off.
    """

    leaders: float = 1.0
    independents: float = 0.0
    per_layer: Mapping[str, Fractions] = field(default_factory=dict)
    layers: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    only_listed: bool = False
    units: str = "auto"
    align: str | int | None = AUTO

    def __post_init__(self) -> None:
        object.__setattr__(self, "align", check_align(self.align))
        _check_fractions("RolePlan", (self.leaders, self.independents))
        checked = {str(k): _check_fractions(f"RolePlan.per_layer[{k!r}]", v) for k, v in self.per_layer.items()}
        object.__setattr__(self, "per_layer", checked)
        if isinstance(self.layers, str) or isinstance(self.exclude, str):
            raise PlanError("RolePlan.layers and RolePlan.exclude take a list of patterns, not a string")
        if self.units not in UNIT_KINDS:
            raise PlanError(f"RolePlan.units must be one of {UNIT_KINDS}, got {self.units!r}")

    @classmethod
    def preset(cls, name: str, table: str = "uniform", *, align: str | int | None = AUTO) -> RolePlan:
        """The seed's scenarios: ``"baseline"`` (no roles), ``"mild"``, ``"aggressive"``.

        ``table="uniform"`` (default, works on any model) applies one pair to every managed layer (mild 0.40 /
        0.10, aggressive 0.25 / 0.10); ``"mnist"`` / ``"cifar"`` are the seed's per-layer tables for its
        Bottleneck CNNs (layers ``layer{1,2,3}.conv{1,2,3}`` only). ``align``: as :class:`RolePlan`'s.
        """
        if name not in PRESETS:
            raise PlanError(f"unknown preset {name!r}; choose one of {PRESETS}")
        if table not in PRESET_TABLES:
            raise PlanError(f"unknown preset table {table!r}; choose one of {PRESET_TABLES}")
        if name == "baseline":
            return cls(align=align)
        if table == "uniform":
            return cls(*_UNIFORM[name], align=align)
        return cls(per_layer=dict((_MNIST if table == "mnist" else _CIFAR)[name]), only_listed=True, align=align)

    def signature(self) -> str:
        """A stable string stored in checkpoints to detect a different plan."""
        per = ",".join(f"{k}={v[0]:g}/{v[1]:g}" for k, v in self.per_layer.items())
        return (
            f"L={self.leaders:g};I={self.independents:g};per=[{per}];layers={list(self.layers or [])};"
            f"exclude={list(self.exclude)};only={self.only_listed}"
            + (f";units={self.units}" if self.units != "auto" else "")
            + (f";align={self.align}" if self.align != AUTO else "")
        )

    def fractions_for(self, name: str) -> Fractions:
        for pattern, pair in self.per_layer.items():
            if name_matches(name, pattern):
                return pair
        return self.leaders, self.independents

    def multiple_for(self, model: nn.Module, candidate: nn.Module | UnitGroup) -> int:
        """The multiple this plan rounds ``candidate``'s counts to (``align``, resolved for ``"auto"``); for MoE
        experts that multiple per expert, times their number, so that every expert takes the same share of each
        role (:attr:`UnitGroup.parts`)."""
        parts = candidate.parts if isinstance(candidate, UnitGroup) else 1
        if self.align != AUTO:
            return int(self.align) * parts
        return hardware_alignment(_kind(candidate), *_placement(model, candidate)) * parts

    def multiples(self, model: nn.Module, names: Sequence[str] | None = None) -> dict[str, int]:
        """:meth:`multiple_for` of every candidate named in ``names`` (default: every candidate)."""
        candidates = self.candidates(model)
        return {n: self.multiple_for(model, candidates[n]) for n in (candidates if names is None else names)}

    def candidates(self, model: nn.Module) -> dict[str, nn.Module | UnitGroup]:
        """What in ``model`` can have roles under this plan's ``units``: Linear/ConvNd layers and blocks."""
        return dict(candidate_layers(model, self.units))

    def selection(self, model: nn.Module) -> tuple[list[str], dict[str, str]]:
        """The candidates this plan gives roles (validated, in registration order) and ``{candidate: why not}``
        for the others."""
        candidates = list(self.candidates(model).items())
        if not candidates:
            raise PlanError(
                f"{sharding.class_name(model)} has no nn.Linear / nn.ConvNd layer to manage{_unsupported_note(model)}"
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
            heads = output_heads(model, dict(candidates), self.units)
            chosen = [n for n in names if n not in heads]
            for head in heads:
                why[head] = "the output head, kept as it is (name it in RolePlan(layers=[...]) to manage it)"
            # layers of a block found but not decomposed (they read or write the residual stream), routers, grouped
            # convolutions: never managed by default; a plan naming them manages them or says why it cannot
            alone = left_alone(model, self.units)
            why.update({n: alone[n] for n in chosen if n in alone})
            chosen = [n for n in chosen if n not in alone]
        excluded = [n for n in chosen if any(name_matches(n, p) for p in self.exclude)]
        why.update({n: "excluded by the plan" for n in excluded})
        return [n for n in chosen if n not in excluded], why

    def resolve(self, model: nn.Module) -> dict[str, LayerPlan]:
        """Validate the plan against ``model`` and return per-layer counts (layers with no clones included),
        rounded as ``align`` says (see :func:`align_counts`; on CPU ``"auto"`` leaves them as they are)."""
        chosen, _ = self.selection(model)
        modules = self.candidates(model)
        names = list(modules)
        if not chosen:
            if self.only_listed or self.layers is not None:
                why = "every layer the plan selects is excluded"
            elif alone := {n: r for n, r in left_alone(model, self.units).items() if n in names}:
                # (grouped convolutions, tied weights: no plan manages them)
                nameable = [n for n, r in alone.items() if "not supported" not in r and "cannot have roles" not in r]
                first = (nameable or list(alone))[0]
                why = f"the others are left alone by default, e.g. {first!r}: {alone[first]}" + (
                    "; name them in layers=[...]" if nameable else "; none of them can be managed"
                )
            else:
                why = (
                    "by default every Linear/ConvNd except the output head (the last one registered) is managed, "
                    f"and {names[-1]!r} is the only one"
                )
            raise PlanError(
                f"the plan manages no layer of {sharding.class_name(model)} ({why}); its Linear/ConvNd layers are "
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
            out[name] = aligned_plan(name, units, k_lead, k_ind, self.multiple_for(model, modules[name]))
        return out


def output_head(model: nn.Module, candidates: Mapping[str, nn.Module | UnitGroup]) -> str | None:
    """The candidate a default plan leaves alone as the model's output head: the last one registered, except in a
    transformers model with a task head (``model.base_model`` is a submodule), where it is the last one registered
    outside the base model: XLM-RoBERTa's classification model registers its classifier before the encoder, and a
    plan by registration order alone cloned the classifier's classes and left the encoder's last MLP alone. A
    transformers model whose ``base_model`` is no transformers model is its own base model (DINOv3-ViT's encoder is
    named ``model``, its base model prefix: the layer outside it is the patch embedding, the input). ``None`` where
    that candidate is a transformer block (a model without a head: ``LlamaModel``, ``CLIPTextModel``), whose units
    feed the residual stream, not the output."""
    names = list(candidates)
    head = names[-1]
    base = getattr(model, "base_model", None)
    if hasattr(model, "base_model_prefix") and not hasattr(base, "base_model_prefix"):
        base = model
    if isinstance(base, nn.Module) and base is not model:
        prefix = next((n for n, m in model.named_modules() if m is base), None)
        if prefix:
            outside = [n for n in names if n != prefix and not n.startswith(prefix + ".")]
            head = outside[-1] if outside else head
    return None if isinstance(candidates[head], UnitGroup) else head


def output_heads(model: nn.Module, candidates: Mapping[str, nn.Module | UnitGroup], units: str = "layers") -> list[str]:
    """The candidates a default plan leaves alone as output heads: :func:`output_head`, and with ``units="auto"``
    every layer whose output the model returned on the dataflow probe's forward pass (a model of two towers, CLIP's
    image and text projections; :attr:`~egg_optim.core.blocks.Discovery.outputs`)."""
    head = output_head(model, candidates)
    found = discover(model).outputs if units == "auto" else ()
    returned = [n for n in found if isinstance(candidates.get(n), nn.Module)]
    return [n for n in candidates if n == head or n in returned]


def aligned_plan(name: str, units: int, leaders: int, independents: int, multiple: int) -> LayerPlan:
    """The :class:`LayerPlan` of these counts rounded to ``multiple`` (:func:`align_counts`)."""
    lead, ind, align = align_counts(units, leaders, independents, multiple)
    changed = (lead, ind) != (leaders, independents)
    return LayerPlan(name, units, lead, ind, align, (leaders, independents) if changed else None)


def describe_alignment(plans: Mapping[str, LayerPlan], setting: str | int) -> str:
    """One line on what alignment did to ``plans`` (for the log)."""
    rounded = [lp for lp in plans.values() if lp.align > 1]
    if not rounded:
        why = "align=1 (off)" if setting == 1 else f"align={setting!r}: multiple 1 on this device"
        return f"plan counts not rounded ({why})"
    multiples = sorted({lp.align for lp in rounded})
    before = sum(sum(lp.unaligned) if lp.unaligned else lp.active for lp in plans.values())
    after = sum(lp.active for lp in plans.values())
    units = sum(lp.units for lp in plans.values())
    changed = [lp for lp in rounded if lp.unaligned]
    example = ""
    if changed:
        lp = max(changed, key=lambda p: p.units)
        example = f", e.g. {lp.name!r} {sum(lp.unaligned)} -> {lp.active} of {lp.units}"
    return (
        f"plan counts rounded (align={setting!r}) to multiples of {'/'.join(map(str, multiples))} in "
        f"{len(rounded)} of {len(plans)} layers ({len(changed)} changed{example}); active units {before} -> "
        f"{after} of {units}"
    )
