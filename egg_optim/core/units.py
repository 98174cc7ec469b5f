"""Managed layers and the tensors each output unit owns.

A unit of a managed layer owns row ``u`` of the layer's weight (dim 0 is the output dimension for Linear and
ConvNd), entry ``u`` of its bias and entry ``u`` of the affine parameters and running statistics of a directly
following normalisation layer. "Directly following" means the next module registered after the layer in
``model.named_modules()`` order (which is how ``Conv -> BN`` pairs are written in practice), provided it is a
norm layer whose per-channel size equals the layer's unit count; pass explicit ``norms`` to override.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PlanError

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


@dataclass
class ManagedLayer:
    """One layer under role control and the tensors its units own (all with units on dim 0)."""

    name: str
    module: nn.Module
    norm_name: str | None = None
    norm: nn.Module | None = None
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    buffers: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    # unit dimension of each owned tensor by qualified name; 0 (rows) unless listed
    dims: dict[str, int] = field(default_factory=dict)

    def dim_of(self, name: str) -> int:
        return self.dims.get(name, 0)

    @property
    def num_units(self) -> int:
        return num_units(self.module)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


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


def candidate_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MANAGED_TYPES)]


def find_norms(model: nn.Module) -> dict[str, str]:
    """Map each managed-type layer to the norm layer registered right after it, when the sizes agree."""
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    out: dict[str, str] = {}
    for (name, mod), (next_name, next_mod) in zip(leaves, leaves[1:]):
        if isinstance(mod, MANAGED_TYPES) and norm_units(next_mod) == num_units(mod):
            out[name] = next_name
    return out


def build_managed_layers(
    model: nn.Module, names: list[str], norms: dict[str, str | None] | None = None
) -> dict[str, ManagedLayer]:
    """Resolve layer names to :class:`ManagedLayer` with their coupled norm tensors."""
    modules = dict(model.named_modules())
    auto = find_norms(model)
    layers: dict[str, ManagedLayer] = {}
    owner: dict[int, str] = {}
    for name in names:
        module = modules.get(name)
        if not isinstance(module, MANAGED_TYPES):
            raise PlanError(
                f"layer {name!r}: expected one of {[t.__name__ for t in MANAGED_TYPES]}, "
                f"got {type(module).__name__ if module is not None else 'no such module'}"
            )
        if not isinstance(module, nn.Linear) and module.groups != 1:
            raise PlanError(f"layer {name!r}: grouped convolutions (groups={module.groups}) are not supported")
        norm_name = norms[name] if norms is not None and name in norms else auto.get(name)
        norm = None
        if norm_name is not None:
            norm = modules.get(norm_name)
            if norm is None or norm_units(norm) != num_units(module):
                raise PlanError(
                    f"layer {name!r}: norm layer {norm_name!r} has "
                    f"{norm_units(norm) if norm is not None else 'no'} per-unit entries, the layer has "
                    f"{num_units(module)} units"
                )
        params, buffers = _unit_tensors(name, module, norm_name, norm)
        for pname, p in params:
            if id(p) in owner:
                raise PlanError(
                    f"parameter {pname!r} is shared with layer {owner[id(p)]!r}: tied weights cannot have roles"
                )
            owner[id(p)] = name
        layers[name] = ManagedLayer(name, module, norm_name, norm, params, buffers)
    return layers
