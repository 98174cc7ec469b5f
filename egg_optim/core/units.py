"""Managed layers and the tensors each output unit owns.

A unit of a managed layer owns row ``u`` of the layer's weight (dim 0 is the output dimension for Linear and
ConvNd), entry ``u`` of its bias and entry ``u`` of the affine parameters and running statistics of the norm
layer *coupled* to it. A norm is coupled only when it provably normalises the layer's own output: explicitly
(``norms={layer: norm}``), or when a forward pass shows it (:mod:`egg_optim.core.coupling`). Registration order
proves nothing: BERT's ``LayerNorm`` registered after ``output.dense`` normalises a residual sum, ViT's
``layernorm_before`` the next block's input.

Units may also span several modules: the hidden neurons of a transformer MLP and its attention heads
(:mod:`egg_optim.core.blocks`). Such a managed "layer" is the block; each tensor it owns has a unit dimension
and an index of the positions each unit owns along it, and per-tensor roles come from :meth:`Roles.expand`.

A unit-owned tensor must belong to the managed layer (or its norm) alone: a parameter that another module also
holds (tied embeddings, a weight assigned to two modules) is refused, since freezing or cloning its rows would
change that module too.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PlanError
from . import axes
from .axes import Axis
from .blocks import UnitGroup, discover
from .roles import Roles
from .sharding import full

MANAGED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def num_units(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def norm_units(norm: nn.Module) -> int | None:
    """Per-unit size of a norm layer, or None if its parameters are not per unit."""
    if isinstance(norm, _BATCH_NORMS + _INSTANCE_NORMS):
        return norm.num_features
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        return norm.normalized_shape[0]
    return None


def name_matches(name: str, pattern: str) -> bool:
    """``fnmatch`` on the qualified name, also accepting a match on a dotted suffix (``layer1.conv1``
    matches ``backbone.layer1.conv1``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


UNIT_KINDS = ("auto", "layers")


@dataclass
class ManagedLayer:
    """One layer (or transformer block, ``group``) under role control and the tensors its units own."""

    name: str
    module: nn.Module  # the layer; for a block, the module that reads its units (down / output projection)
    norm_name: str | None = None
    norm: nn.Module | None = None
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    buffers: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    # unit axis of each owned tensor by qualified name (:mod:`egg_optim.core.axes`); 0 (rows) unless listed
    dims: dict[str, Axis] = field(default_factory=dict)
    # positions [num_units, k] each unit owns along the unit dimension, for units of several positions
    index: dict[str, torch.Tensor] = field(default_factory=dict)
    group: UnitGroup | None = None
    # the last expansion per tensor name: (the unit roles, their positions' roles); roles change only at role
    # changes, so steps between them reuse it instead of rebuilding and re-validating it every step
    _expanded: dict[str, tuple[Roles, torch.Tensor, Roles]] = field(default_factory=dict, repr=False, compare=False)
    # what a clone event copies on packed roles, kept until the roles or the owned tensors change
    # (:func:`egg_optim.core.cloning.copy_plan`): weight mode holds a clone event at every step
    _copy_plan: tuple[tuple, object] | None = field(default=None, repr=False, compare=False)

    def dim_of(self, name: str) -> Axis:
        return self.dims.get(name, 0)

    def roles_of(self, name: str, roles: Roles) -> Roles:
        """The roles of the positions of owned tensor ``name`` (the unit roles themselves for rows)."""
        index = self.index.get(name)
        if index is None:
            return roles
        cached = self._expanded.get(name)
        if cached is None or cached[0] is not roles or cached[1] is not index:  # Roles are immutable
            cached = self._expanded[name] = (roles, index, roles.expand(index))
        return cached[2]

    def copied_by_clones(self, name: str) -> bool:
        """Whether a weight clone takes owned tensor ``name`` from its source: what computes a unit (weight rows,
        bias, norm entries; a block's producer rows), not the columns through which a block's consumer reads it.
        With its source's producer rows a clone neuron or head computes its source's activation and passes it on
        through its own frozen column, as in output mode; copying the column too would double the source's share."""
        if self.group is None:
            return True
        return all(s.role != "consumer" for s in self.group.slices if s.param == name)

    @property
    def num_units(self) -> int:
        return self.group.num_units if self.group is not None else num_units(self.module)

    @property
    def parts(self) -> int:
        """Equal runs of units that each take the same share of every role (:attr:`UnitGroup.parts`)."""
        return self.group.parts if self.group is not None else 1

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def device(self) -> torch.device:
        """Where its units live: its first owned tensor's device (fused experts have no ``weight``)."""
        return self.params[0][1].device if self.params else self.weight.device

    def unit_rows(self, grad: bool = False) -> torch.Tensor | None:
        """``[num_units, D]``: each unit's weights (or their gradients, ``None`` before any backward), all
        its weight tensors concatenated. For a plain layer, its weight rows. Parameters sharded by FSDP2 are
        gathered first (every rank gets every unit's rows, as one process would)."""
        if self.group is None:
            weight = dict(self.params).get(f"{self.name}.weight", self.module.weight)
            t = weight.grad if grad else weight
            if t is None:
                return None
            t = full(t.detach())
            return t.flatten(1) if t.dim() > 1 else t.unsqueeze(1)
        parts = []
        for pname, p in self.params:
            dim = self.dim_of(pname)
            if p.dim() <= (1 if isinstance(dim, int) else 2):  # weights only (of Linears, a per-head table, 3-D
                continue  # expert tensors), not biases (fused experts' are [experts, neurons])
            t = p.grad if grad else p
            if t is None:
                return None
            moved = axes.as_rows(full(t.detach()), self.dim_of(pname))  # [positions, rest]
            parts.append(moved[self.index[pname]].reshape(self.num_units, -1))
        return torch.cat(parts, dim=1)


def _unit_tensors(name: str, module: nn.Module, norm_name: str | None, norm: nn.Module | None):
    params = [(f"{name}.{k}", p) for k, p in module.named_parameters(recurse=False) if p is not None]
    buffers: list[tuple[str, torch.Tensor]] = []
    if norm is not None:
        params += [(f"{norm_name}.{k}", p) for k, p in norm.named_parameters(recurse=False)]
        buffers += [
            (f"{norm_name}.{k}", b)
            for k, b in norm.named_buffers(recurse=False)
            if b is not None and b.dim() == 1 and b.shape[0] == num_units(module)
        ]
    return params, buffers


def candidate_layers(model: nn.Module, units: str = "layers") -> list[tuple[str, nn.Module | UnitGroup]]:
    """What can have roles, in registration order: every Linear/ConvNd (``units="layers"``); with
    ``units="auto"``, transformer MLP, attention and experts blocks replace the projections they are made of (the
    layers of a block found but not decomposed stay listed: :func:`left_alone` says which)."""
    if units not in UNIT_KINDS:
        raise PlanError(f"unknown unit kind {units!r}; choose one of {UNIT_KINDS}")
    groups = discover(model).groups if units == "auto" else {}
    first = {g.modules[0]: g for g in groups.values()}
    members = {m for g in groups.values() for m in g.modules}
    out: list[tuple[str, nn.Module | UnitGroup]] = []
    for n, m in model.named_modules():
        if n in first:
            out.append((first[n].name, first[n]))
        if isinstance(m, MANAGED_TYPES) and n not in members:
            out.append((n, m))
    return out


def left_alone(model: nn.Module, units: str = "layers") -> dict[str, str]:
    """``{layer: why}`` for the layers a default plan leaves alone; a plan naming them manages them (or says why it
    cannot). Grouped convolutions (their units are not supported), layers and blocks whose parameters other modules
    hold too (tied weights cannot have roles: a block of shared weights called at several depths, each call its own
    module), and with ``units="auto"`` the layers of blocks found but not decomposed (residual-stream projections
    must not become rows by accident) and the routers of mixtures of experts (routing scores are no units: a clone
    expert would be picked with its source)."""
    out = {
        n: f"a grouped convolution (groups={m.groups}), whose units are not supported"
        for n, m in model.named_modules()
        if isinstance(m, MANAGED_TYPES) and not isinstance(m, nn.Linear) and m.groups != 1
    }
    out.update(tied_layers(model, units))
    if units != "auto":
        return out
    found = discover(model)
    out.update({m: s.reason for s in found.skipped.values() for m in s.members})
    out.update(
        {
            n: f"the router of {e!r}: routing scores are no units (name it in RolePlan(layers=[...]) to manage it)"
            for n, e in found.routers.items()
        }
    )
    return out


def candidate_units(candidate: nn.Module | UnitGroup) -> int:
    return candidate.num_units if isinstance(candidate, UnitGroup) else num_units(candidate)


def parameter_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``id(parameter)`` -> every ``(qualified name, module)`` that registers it, duplicates included (a tied
    parameter is listed under each module that holds it)."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((f"{mname}.{pname}" if mname else pname, m))
    return holders


def shared_with(
    params: list[tuple[str, nn.Parameter]],
    owners: tuple[nn.Module, ...],
    holders: dict[int, list[tuple[str, nn.Module]]],
) -> str | None:
    """How one of ``params`` is also held by a module other than ``owners`` (``None`` where none is)."""
    for pname, p in params:
        others = [(q, m) for q, m in holders.get(id(p), ()) if not any(m is o for o in owners)]
        if others:
            qname, m = others[0]
            return f"its parameter {pname!r} is also {qname!r} ({type(m).__name__} {qname.rpartition('.')[0]!r})"
    return None


def check_not_shared(
    name: str,
    params: list[tuple[str, nn.Parameter]],
    owners: tuple[nn.Module, ...],
    holders: dict[int, list[tuple[str, nn.Module]]],
) -> None:
    """Refuse unit-owned ``params`` of layer ``name`` that a module other than ``owners`` also holds."""
    shared = shared_with(params, owners, holders)
    if shared:
        raise PlanError(
            f"layer {name!r}: {shared}: tied or shared weights cannot have roles, since freezing or cloning its rows "
            f"would change that module too; leave {name!r} out of the plan (RolePlan(exclude=[{name!r}]))"
        )


def _group_params(model: nn.Module, group: UnitGroup) -> list[tuple[str, nn.Parameter]]:
    """The parameters of ``group``'s slices, by the names the slices give them (a tied parameter under each of
    its names: a block of shared weights names them by its own path)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return [(s.param, params[s.param]) for s in group.slices]


def tied_layers(model: nn.Module, units: str) -> dict[str, str]:
    """``{candidate: why}`` for the candidates (layers and blocks) whose unit-owned parameters other modules hold
    too: no plan can give them roles, so a default plan leaves them alone."""
    holders = parameter_holders(model)
    if not any(len(h) > 1 for h in holders.values()):
        return {}
    modules = dict(model.named_modules())
    out: dict[str, str] = {}
    for name, c in candidate_layers(model, units):
        if isinstance(c, UnitGroup):
            shared = shared_with(_group_params(model, c), tuple(modules[m] for m in c.modules), holders)
        else:
            shared = shared_with(_unit_tensors(name, c, None, None)[0], (c,), holders)
        if shared:
            out[name] = f"{shared}: tied or shared weights cannot have roles"
    return out


def claim_params(owner: dict[int, str], name: str, params: list[tuple[str, nn.Parameter]]) -> None:
    """Record layer ``name`` as the owner of ``params`` in ``owner`` (``id(parameter) -> layer``); refuses a
    parameter another managed layer owns (tied weights cannot have roles). The one owner check of the package."""
    for pname, p in params:
        if owner.setdefault(id(p), name) != name:
            raise PlanError(
                f"parameter {pname!r} of layer {name!r} is shared with layer {owner[id(p)]!r}: tied weights "
                "cannot have roles"
            )


def check_single_owners(layers: Mapping[str, ManagedLayer]) -> None:
    """Refuse managed layers that share a parameter (:func:`claim_params` over all of them)."""
    owner: dict[int, str] = {}
    for name, layer in layers.items():
        claim_params(owner, name, layer.params)


def norm_problem(layer_name: str, module: nn.Module, norm_name: str, norm: nn.Module | None) -> str | None:
    """Why ``norm`` cannot be coupled to the layer (or ``None``)."""
    if norm is None or norm_units(norm) != num_units(module):
        return (
            f"layer {layer_name!r}: norm layer {norm_name!r} has "
            f"{norm_units(norm) if norm is not None else 'no'} per-unit entries, the layer has "
            f"{num_units(module)} units"
        )
    return None


def couple_norm(
    model: nn.Module, layer: ManagedLayer, norm_name: str | None, holders: dict | None = None
) -> ManagedLayer:
    """``layer`` with ``norm_name`` coupled (a new :class:`ManagedLayer`; ``layer`` is unchanged). Raises
    :class:`PlanError` for a norm of the wrong size or whose parameters other modules hold."""
    norm = None
    if norm_name is not None:
        norm = dict(model.named_modules()).get(norm_name)
        problem = norm_problem(layer.name, layer.module, norm_name, norm)
        if problem:
            raise PlanError(problem)
    params, buffers = _unit_tensors(layer.name, layer.module, norm_name, norm)
    holders = parameter_holders(model) if holders is None else holders
    check_not_shared(layer.name, params, (layer.module, norm) if norm is not None else (layer.module,), holders)
    return ManagedLayer(
        layer.name, layer.module, norm_name, norm, params, buffers, dict(layer.dims)
    )  # plain layers only


def _group_layer(model: nn.Module, group: UnitGroup, holders: dict) -> ManagedLayer:
    modules = dict(model.named_modules())
    owned = _group_params(model, group)
    check_not_shared(group.name, owned, tuple(modules[m] for m in group.modules), holders)
    return ManagedLayer(
        group.name,
        modules[group.consumer or group.modules[0]],
        params=owned,
        dims={s.param: s.dim for s in group.slices},
        index={s.param: s.index for s in group.slices},
        group=group,
    )


def build_managed_layers(
    model: nn.Module,
    names: list[str],
    norms: dict[str, str | None] | None = None,
    groups: dict[str, UnitGroup] | None = None,
) -> dict[str, ManagedLayer]:
    """Resolve layer names (and ``groups``, transformer blocks by name) to :class:`ManagedLayer`, with the
    norms given in ``norms`` coupled (no others: automatic coupling needs a forward pass,
    :mod:`egg_optim.core.coupling`)."""
    modules = dict(model.named_modules())
    holders = parameter_holders(model)
    layers: dict[str, ManagedLayer] = {}
    owner: dict[int, str] = {}
    for name in names:
        if groups and name in groups:
            layer = layers[name] = _group_layer(model, groups[name], holders)
            claim_params(owner, name, layer.params)
            continue
        module = modules.get(name)
        if not isinstance(module, MANAGED_TYPES):
            raise PlanError(
                f"layer {name!r}: expected one of {[t.__name__ for t in MANAGED_TYPES]}, "
                f"got {type(module).__name__ if module is not None else 'no such module'}"
            )
        if not isinstance(module, nn.Linear) and module.groups != 1:
            raise PlanError(f"layer {name!r}: grouped convolutions (groups={module.groups}) are not supported")
        norm_name = norms.get(name) if norms is not None else None
        norm = None
        if norm_name is not None:
            norm = modules.get(norm_name)
            problem = norm_problem(name, module, norm_name, norm)
            if problem:
                raise PlanError(problem)
        params, buffers = _unit_tensors(name, module, norm_name, norm)
        check_not_shared(name, params, (module, norm) if norm is not None else (module,), holders)
        claim_params(owner, name, params)
        layers[name] = ManagedLayer(name, module, norm_name, norm, params, buffers)
    return layers
