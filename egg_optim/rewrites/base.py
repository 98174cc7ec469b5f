"""In-place layer rewriting by class swap, shared by output cloning and gradient skipping.

A rewrite replaces ``module.__class__`` with a subclass whose ``forward`` differs, so module objects, parameter
and buffer objects, qualified names, ``state_dict`` keys and hooks stay the same, and swapping the class back
undoes it. Per-role index tensors live on the module as non-persistent buffers (moved by ``.to()``, never
saved) and are rebuilt only when roles change. This module holds what every rewrite needs: validation before
anything changes, the registry that tells which rewrite owns a module, and the life cycle the role controller
drives through :class:`LayerRewrite` without knowing which rewrite it holds: ``update_roles``, ``fill_clones``,
``module_names``, ``export``, ``remove`` (and, for rewrites that can, ``probe`` / ``take_clone_grads`` and
``fuse_norms``). :func:`egg_optim.rewrites.factory.build_rewrites` builds the list a run asks for.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from ..core.roles import Roles
from ..core.sharding import is_fsdp_module
from ..core.units import num_units
from ..errors import ConfigError, PlanError

# what a rewritten model computes in eval(): clones follow their leaders, or every unit its own weights
EVAL_MODES = ("as_trained", "own_weights")

# rewritten class -> (owner name, original class)
_REWRITTEN: dict[type, tuple[str, type]] = {}


def direct_apply(fn: type[torch.autograd.Function]) -> Callable[..., Any]:
    """``fn.apply`` without the Python wrapper ``Function.apply`` runs on every call (binding default arguments,
    unwrapping dead ``torch.func`` wrappers: about a dozen Python calls per layer and step, the host time a
    launch-bound GPU step waits for). The C entry point is what that wrapper itself calls when no ``torch.func``
    transform is active; under a transform or while Dynamo traces (``torch.compile``), ``fn.apply`` is called as usual.
    Arguments are passed positionally and in full (the wrapper's defaults binding is skipped) and are a layer's
    own tensors (no tensor left over from a finished ``torch.func`` transform, which the wrapper unwraps)."""
    c_apply = super(torch.autograd.Function, fn).apply
    transforms_active, is_compiling, apply = (
        torch._C._are_functorch_transforms_active,
        torch.compiler.is_dynamo_compiling,
        fn.apply,
    )

    def direct(*args: Any) -> Any:
        if is_compiling() or transforms_active():
            return apply(*args)
        return c_apply(*args)

    return direct


def register(owner: str, classes: Mapping[type, type]) -> dict[type, type]:
    """Record ``{original class: rewritten class}`` for ``owner``; returns the reverse map."""
    for original, rewritten in classes.items():
        _REWRITTEN[rewritten] = (owner, original)
    return {v: k for k, v in classes.items()}


def owner_of(module: nn.Module) -> str | None:
    """The rewrite currently applied to ``module`` (``"output cloning"``, ``"GradSkip"``) or ``None``."""
    entry = _REWRITTEN.get(type(module))
    return entry[0] if entry else None


def check_eval_mode(mode: str) -> None:
    if mode not in EVAL_MODES:
        raise ConfigError(f"eval_mode must be one of {EVAL_MODES}, got {mode!r}")


def set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set or register a non-persistent buffer (moved by ``.to()``, not saved)."""
    if name in module._buffers:
        module._buffers[name] = value
    else:
        module.register_buffer(name, value, persistent=False)


def known_names(names: list[str], limit: int = 12) -> str:
    """A short, quoted list of names for error messages."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def layer_problem(module: nn.Module, supported: Mapping[type, type], owner: str) -> str | None:
    """Why ``owner`` cannot rewrite ``module`` (a phrase following "layer 'name' ..."), or ``None``."""
    current = owner_of(module)
    if current is not None:
        return f"is already under {current}"
    if is_fsdp_module(module):
        return (
            "is itself wrapped by fully_shard (FSDP2 swapped its class too): apply fully_shard to a module that "
            "contains it (a block, the model)"
        )
    if isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
        return "has uninitialised (lazy) parameters; run a forward pass first"
    if type(module) not in supported:
        names = ", ".join("nn." + c.__name__ for c in supported)
        return f"is a {type(module).__name__}; {owner} supports exactly {names}"
    if not isinstance(module, nn.Linear) and module.groups != 1:
        return f"is a grouped conv (groups={module.groups}); only groups=1 is supported"
    return None


def check_roles(name: str, layer: nn.Module, roles: Any) -> None:
    if not isinstance(roles, Roles):
        raise PlanError(f"roles[{name!r}] must be a Roles, got {type(roles).__name__}")
    n = num_units(layer)
    if roles.num_units != n:
        raise PlanError(f"roles for layer {name!r} have {roles.num_units} units but the layer has {n} outputs")


def validate_layers(
    model: nn.Module, roles: Mapping[str, Any], supported: Mapping[type, type], owner: str
) -> dict[str, nn.Module]:
    """The modules named in ``roles``, checked for ``owner``; raises :class:`PlanError` naming the first bad one."""
    if not isinstance(model, nn.Module):
        raise PlanError(f"{owner} needs an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules(remove_duplicate=False))
    layers: dict[str, nn.Module] = {}
    seen: dict[int, str] = {}
    for name, r in roles.items():
        if name not in modules:
            known = [n for n, m in modules.items() if type(m) in supported]
            raise PlanError(f"unknown layer {name!r}; supported layers in the model: {known_names(known)}")
        m = modules[name]
        if not isinstance(r, Roles):
            raise PlanError(f"roles[{name!r}] must be a Roles, got {type(r).__name__}")
        problem = layer_problem(m, supported, owner)
        if problem is not None:
            raise PlanError(f"layer {name!r} {problem}")
        check_roles(name, m, r)
        if id(m) in seen:
            raise PlanError(f"layers {seen[id(m)]!r} and {name!r} are the same module")
        seen[id(m)] = name
        layers[name] = m
    return layers


def restore(module: nn.Module, attrs: tuple[str, ...], buffers: tuple[str, ...]) -> None:
    """Give a rewritten ``module`` its original class back, dropping the rewrite's attributes and buffers."""
    entry = _REWRITTEN.get(type(module))
    if entry is None:
        return
    for name in buffers:
        module._buffers.pop(name, None)
    for name in attrs:
        module.__dict__.pop(name, None)
    module.__class__ = entry[1]


class LayerRewrite:
    """Life cycle of a rewrite: current roles, validated role updates, ``remove()``, use as a context manager.

    Subclasses set ``model``, ``_layers`` (keyed by the managed layer or block names whose roles they take),
    ``_roles`` and ``_removed`` and implement :meth:`_apply_roles`, :meth:`_restore_all` and :meth:`export`;
    the class attributes below tell the role controller what the rewrite does, so it needs no branch per rewrite.
    """

    owner = "layer rewrite"
    #: the option that asks for the rewrite, for messages
    option = ""
    #: clones compute with their source's rows: their own rows are unused, and saved as their source's
    clones_follow_sources = False
    #: clones get no weight gradient, but a probed step gives every unit's (:meth:`probe`, :meth:`take_clone_grads`)
    probes_clone_grads = False
    #: ``can_fuse(layer, norm)``: whether the rewrite can fuse that norm into that layer (``None``: it fuses none)
    can_fuse = None
    model: nn.Module
    _layers: dict[str, nn.Module]
    _roles: dict[str, Roles]
    _removed: bool

    @property
    def roles(self) -> dict[str, Roles]:
        """Current roles per managed layer (a copy of the mapping; ``Roles`` are immutable)."""
        return dict(self._roles)

    @property
    def layers(self) -> dict[str, nn.Module]:
        return dict(self._layers)

    @property
    def removed(self) -> bool:
        return self._removed

    def check_called(self) -> bool:
        """At a step's start: refuse what the forward passes so far showed the rewrite cannot handle; whether
        nothing is left to check (the controller then stops asking)."""
        return True

    def update_roles(self, new_roles: Mapping[str, Roles]) -> None:
        """Replace the roles of some or all managed layers; indices are rebuilt (once, here) only if changed.
        Validates everything before changing anything."""
        self._check_live()
        for name, r in new_roles.items():
            if name not in self._layers:
                raise PlanError(
                    f"layer {name!r} is not managed by this {type(self).__name__} ({known_names(list(self._layers))})"
                )
            check_roles(name, self._layers[name], r)
        for name, r in new_roles.items():
            old = self._roles[name]
            self._roles[name] = r
            if r is not old and not r.same_as(old):
                self._apply_roles(name, r)

    def _apply_roles(self, name: str, roles: Roles) -> None:
        raise NotImplementedError

    def _restore_all(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ what the controller drives
    def module_names(self) -> list[str]:
        """Qualified names of every module the rewrite changed."""
        return list(self._layers)

    def fill_clones(self, skip: Collection[str] = ()) -> None:
        """Give each clone its source's rows where the clone computed with them (before an election, so that a
        promoted clone computes what it computed as a clone), except in the layers named in ``skip`` (frozen
        ones). Nothing for rewrites whose clones compute alone."""

    def export(self, model: nn.Module) -> nn.Module:
        """Make ``model`` (a copy of the rewritten model) plain in place: original classes, clone rows as the
        rewritten model computes with them. Returns ``model``."""
        raise NotImplementedError

    @property
    def fused_norms(self) -> dict[str, str]:
        """Layer name -> the norm fused into it."""
        return {}

    def fuse_norms(self, norms: Mapping[str, str]) -> None:
        """Fuse more norms (only rewrites with :attr:`can_fuse`)."""
        if norms:
            raise PlanError(f"{type(self).__name__} fuses no norms, got {dict(norms)}")

    def probe(self) -> None:
        """Probe the next training forward (only rewrites with :attr:`probes_clone_grads`)."""

    def take_clone_grads(self, name: str) -> torch.Tensor | None:
        """Every unit's weight gradient of layer ``name`` from the last probed step, or ``None``."""
        return None

    def remove(self) -> nn.Module:
        """Restore the original module classes (same objects and parameters). Idempotent. Returns the model."""
        if not self._removed:
            self._restore_all()
            self._removed = True
        return self.model

    def _check_live(self) -> None:
        if self._removed:
            raise PlanError(f"this {type(self).__name__} was removed; create a new one")

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
