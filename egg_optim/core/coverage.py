"""What a leader/clone run manages in a model, said once at construction and returned as data.

:func:`build` gathers, for one model, plan and optimizer: the transformer blocks found (attention, MLP, MoE
experts) and whether they were decomposed into units, the kinds and numbers of units with roles, the layers
managed as output rows, the share of the (non-embedding) parameters that have roles, and every Linear/ConvNd layer
or block left alone with the reason. :func:`report` logs it as one line on the ``egg_optim`` logger, warns when a
block was found but not decomposed, and raises :class:`~egg_optim.errors.PlanError` for that in strict mode.
``LeaderCloneOptimizer.coverage()`` returns the same :class:`Coverage`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from ..errors import PlanError
from . import sharding
from .blocks import UNIT_NAMES, Discovery, discover
from .units import ManagedLayer, tied_layers

logger = logging.getLogger("egg_optim")


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Coverage:
    """What one leader/clone run manages in its model.

    Attributes:
        model: the model's class name.
        blocks_found: transformer blocks found (attention, MLP, experts), decomposed or not.
        blocks: ``{block: kind}`` of the blocks decomposed into units (heads, neurons, experts).
        managed_blocks: ``{block: kind}`` of those that have roles.
        units: ``{"attention units": n, "mlp neurons": n, "experts": n, "rows": n}``: units with roles, by kind
            (an attention unit is a key/value head with the query heads that share it).
        row_layers: the layers managed as output rows.
        not_decomposed: ``{block: why}`` for blocks found that could not be decomposed (their layers are left
            alone: neither block units nor rows, unless a plan names them).
        by_structure: the decomposed blocks whose units were not seen computed apart on the model's dummy inputs
            (none to run, a block those inputs do not reach): found by structure alone.
        inexact: ``{block: why}`` for decomposed blocks where a clone does not compute what its source does
            (per-head values outside the unit slices: ALiBi slopes); clones there are approximate.
        left_alone: ``{layer or block: why}`` for everything else that could have roles and has none.
        managed_params, total_params: parameter counts with roles, and of the model without embeddings.
        modes: output mode only: ``{block: "shrink" | "expand" | "unchecked" | "no clones"}`` (only the active
            units computed, or all of them; "unchecked" until the block's first forward pass with clones).
    """

    model: str
    blocks_found: int
    blocks: Mapping[str, str] = field(default_factory=dict)
    managed_blocks: Mapping[str, str] = field(default_factory=dict)
    units: Mapping[str, int] = field(default_factory=dict)
    row_layers: tuple[str, ...] = ()
    not_decomposed: Mapping[str, str] = field(default_factory=dict)
    by_structure: tuple[str, ...] = ()
    inexact: Mapping[str, str] = field(default_factory=dict)
    left_alone: Mapping[str, str] = field(default_factory=dict)
    managed_params: int = 0
    total_params: int = 0
    modes: Mapping[str, str] = field(default_factory=dict)

    @property
    def share(self) -> float:
        """Share of the non-embedding parameters that have roles."""
        return self.managed_params / self.total_params if self.total_params else 0.0

    def line(self) -> str:
        """The one-line summary logged at construction."""
        kinds: dict[str, int] = {}
        for kind in self.blocks.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        found = ", ".join(f"{n} {k}" for k, n in kinds.items())
        units = ", ".join(f"{n} {k}" for k, n in self.units.items() if n)
        parts = [
            f"egg_optim: {self.model}: {self.blocks_found} transformer blocks found, {len(self.blocks)} decomposed"
            + (f" ({found})" if found else ""),
            f"{len(self.managed_blocks)} blocks and {len(self.row_layers)} layers with roles"
            + (f" ({units})" if units else ""),
            f"roles on {self.share:.0%} of the non-embedding parameters",
        ]
        if self.row_layers:
            parts.append(f"managed as rows: {_names(self.row_layers)}")
        if self.not_decomposed:
            parts.append(f"not decomposed: {_names(list(self.not_decomposed))}")
        if self.by_structure:
            parts.append(f"units by structure alone (no dataflow check): {_names(self.by_structure)}")
        if self.left_alone:
            parts.append(f"left alone: {_reasons(self.left_alone)}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (for logs, trackers and the docs table)."""
        return {
            "model": self.model,
            "blocks_found": self.blocks_found,
            "blocks": dict(self.blocks),
            "managed_blocks": dict(self.managed_blocks),
            "units": dict(self.units),
            "row_layers": list(self.row_layers),
            "not_decomposed": dict(self.not_decomposed),
            "by_structure": list(self.by_structure),
            "inexact": dict(self.inexact),
            "left_alone": dict(self.left_alone),
            "managed_params": self.managed_params,
            "total_params": self.total_params,
            "share": self.share,
            "modes": dict(self.modes),
        }


def _names(names: list[str] | tuple[str, ...], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _reasons(left: Mapping[str, str]) -> str:
    by_reason: dict[str, list[str]] = {}
    for name, why in left.items():
        by_reason.setdefault(why.split(";")[0].split(":")[0], []).append(name)
    return "; ".join(f"{_names(names)} ({why})" for why, names in by_reason.items())


READ_DIRECTLY = (
    "the model computes with its weight without calling it, so output mode could not give its clones their "
    "sources' outputs"
)


def _unit_label(kind: str) -> str:
    return f"{kind} {UNIT_NAMES[kind]}" if kind != "experts" else UNIT_NAMES[kind]


def _not_decomposed(model: nn.Module, found: Discovery) -> dict[str, str]:
    """Each block found but not decomposed, with why; one whose weights are tied to other modules' (Zamba2's shared
    attention, called at several depths) is not offered to a plan naming its layers, which would refuse them."""
    tied = tied_layers(model, "layers") if found.skipped else {}
    out = {}
    for name, s in found.skipped.items():
        out[name] = s.reason
        if any(m in tied for m in s.members):
            out[name] = s.reason.split("; its projections are left alone")[0] + (
                "; its weights are tied to other modules' (held by several), so no plan can give them roles"
            )
    return out


def build(
    model: nn.Module,
    plan: Any,
    layers: Mapping[str, ManagedLayer],
    optimizer: Any = None,
    block_output: Any = None,
) -> Coverage:
    """The :class:`Coverage` of ``plan`` (a resolved :class:`~egg_optim.core.plan.RolePlan`) on ``model``, with
    ``layers`` the managed layers, ``optimizer`` the base optimizer (why a selected layer is left alone) and
    ``block_output`` the output-mode rewrite of the blocks, if any."""
    found = discover(model) if plan.units == "auto" else Discovery()
    chosen, why = plan.selection(model)
    in_optimizer = None
    if optimizer is not None:
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    left: dict[str, str] = {}
    for name in chosen:
        if name in layers:
            continue
        reason = "its parameters are frozen or not in the optimizer"
        if in_optimizer is not None:
            module = dict(model.named_modules()).get(name)
            params = list(module.parameters()) if module is not None else []
            if params and all(p.requires_grad for p in params) and all(id(p) in in_optimizer for p in params):
                reason = "left out of the plan"
        if name in found.read_directly:
            reason = READ_DIRECTLY
        left[name] = reason
    for name, reason in why.items():
        left.setdefault(name, reason)
    for s in found.skipped.values():  # reported as not decomposed, not once per member
        for m in s.members:
            left.pop(m, None)
    blocks = {n: g.kind for n, g in found.groups.items()}
    managed_blocks = {n: lay.group.kind for n, lay in layers.items() if lay.group is not None}
    units: dict[str, int] = {}
    for lay in layers.values():
        label = _unit_label(lay.group.kind) if lay.group is not None else "rows"
        units[label] = units.get(label, 0) + lay.num_units
    owned = {id(p): p.numel() for lay in layers.values() for _, p in lay.params}
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    total = {id(p): p.numel() for p in model.parameters() if id(p) not in embedded}
    modes: dict[str, str] = {}
    if block_output is not None and not block_output.removed:
        for n in block_output.groups:
            if not block_output.roles[n].has_clones:
                modes[n] = "no clones"
            else:
                modes[n] = block_output.modes[n] if n in block_output.verified else "unchecked"
    return Coverage(
        model=sharding.class_name(model),
        blocks_found=len(found.groups) + len(found.skipped),
        blocks=_frozen(blocks),
        managed_blocks=_frozen(managed_blocks),
        units=_frozen(units),
        row_layers=tuple(n for n, lay in layers.items() if lay.group is None),
        not_decomposed=_frozen(_not_decomposed(model, found)),
        by_structure=tuple(n for n, g in found.groups.items() if not g.probed),
        inexact=_frozen({n: g.inexact for n, g in found.groups.items() if g.inexact and n in managed_blocks}),
        left_alone=_frozen(left),
        managed_params=sum(v for k, v in owned.items() if k in total),
        total_params=sum(total.values()),
        modes=_frozen(modes),
    )


LOW_SHARE = 1 / 3  # a default plan giving roles to less of a model than this has missed most of it: said


def report(coverage: Coverage, *, strict: bool = False, default_plan: bool = False) -> None:
    """Log ``coverage`` as one line; warn (``strict``: raise :class:`PlanError`) when a block found was not
    decomposed; warn when a ``default_plan`` gives roles to less than :data:`LOW_SHARE` of the model."""
    if coverage.inexact:
        warnings.warn(
            f"egg_optim: in {coverage.model}, clones of {_names(list(coverage.inexact))} do not compute exactly what "
            f"their sources do ({next(iter(coverage.inexact.values()))}): what a unit computes also depends on "
            "values that are no unit's own (per-head constants such as ALiBi slopes, or a layer outside the block "
            "writing into its units, such as an adapter). Clones there are approximate",
            stacklevel=3,
        )
    if default_plan and coverage.total_params and coverage.share < LOW_SHARE:
        warnings.warn(
            f"egg_optim: a default plan gives roles to only {coverage.share:.0%} of {coverage.model}'s non-embedding "
            "parameters: most of its layers are not transformer blocks egg_optim recognises, or are left alone "
            "(opt.coverage() says which and why). Name layers to manage with RolePlan(layers=[...])",
            stacklevel=3,
        )
    unchecked = [n for n in coverage.by_structure if n in coverage.managed_blocks]
    if unchecked:
        warnings.warn(
            f"egg_optim: {len(unchecked)} block(s) of {coverage.model} decomposed into units by their structure alone, "
            f"without the dataflow check that each unit is computed apart ({_names(unchecked)}): the model has no "
            "dummy inputs, or they did not reach these blocks. Pass LeaderCloneOptimizer(..., example_inputs=batch) "
            "to check them",
            stacklevel=3,
        )
    if coverage.not_decomposed:
        message = (
            f"egg_optim: {len(coverage.not_decomposed)} transformer block(s) of {coverage.model} found but not "
            "decomposed into units, their layers left alone: " + "; ".join(coverage.not_decomposed.values())
        )
        if strict:
            raise PlanError(message + " (EggConfig.strict_blocks=True)")
        warnings.warn(message, stacklevel=3)
    logger.info(coverage.line())
