"""What a role change (an election, a clone event, a norm-coupling decision) may touch, and how.

- :func:`outside_inference_mode`: a role change called inside ``torch.inference_mode()`` (an evaluation block)
  would create its new tensors (optimizer state laid out for the new roles, index tensors of the rewrites) as
  inference tensors, which the next training step cannot update or save for backward. The change runs with
  inference mode off and gradients off (as the caller had them), so it works there exactly as outside.
- :func:`frozen_layers` / :func:`keep_frozen_roles`: a managed layer whose parameters were frozen
  (``requires_grad_(False)``) after the optimizer was built keeps its roles and rows through elections and clone
  events; one warning names it.
- :class:`OutputHeadCheck`: a default plan leaves the output heads alone (:func:`egg_optim.core.plan.output_heads`:
  the last layer registered, and those the model returns on its dummy inputs); the model's first complete eager
  forward pass then shows whether a managed layer's output *is* the model's output (a model that registers its head
  before its body), and refuses it before any step.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from .roles import Roles
from .units import ManagedLayer


@contextmanager
def outside_inference_mode() -> Iterator[None]:
    """Inside ``torch.inference_mode()``: run the block with inference mode off and gradients off, so that the
    tensors it creates are normal ones that training can use later; elsewhere: nothing. Also a decorator
    (``@outside_inference_mode()``)."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def frozen_layers(layers: Mapping[str, ManagedLayer], *, warn: bool = True) -> dict[str, str]:
    """``{layer: its first frozen parameter}`` for the managed layers with a parameter that no longer requires
    gradients (frozen after the optimizer was built: a plan never manages a frozen layer). With ``warn``, one
    warning names them and says that elections and clone events leave them as they are."""
    frozen = {}
    for name, layer in layers.items():
        pname = next((pname for pname, p in layer.params if not p.requires_grad), None)
        if pname is not None:
            frozen[name] = pname
    if frozen and warn:
        warnings.warn(
            "egg_optim: managed layer(s) frozen after the optimizer was built ("
            + ", ".join(f"{n}: {p!r} has requires_grad=False" for n, p in frozen.items())
            + "): elections and clone events leave their roles and rows as they are (build a new optimizer to "
            "leave them out of the plan)",
            stacklevel=3,
        )
    return frozen


def keep_frozen_roles(
    new: Mapping[str, Roles], current: Mapping[str, Roles], frozen: Mapping[str, str]
) -> dict[str, Roles]:
    """``new`` roles with the ``frozen`` layers' ``current`` ones kept; refuses (:class:`PlanError`, nothing
    changed) when the plan asks a frozen layer for other counts at this election (``leader_scales``)."""
    out = dict(new)
    for name in frozen:
        want, have = new[name].counts(), current[name].counts()
        if (want["leaders"], want["independents"]) != (have["leaders"], have["independents"]):
            raise PlanError(
                f"layer {name!r} is frozen ({frozen[name]!r} has requires_grad=False), but the plan gives it "
                f"{want['leaders']} leaders / {want['independents']} independents at this election (it has "
                f"{have['leaders']} / {have['independents']}); unfreeze it, or build a new optimizer without it"
            )
        out[name] = current[name]
    return out


class OutputHeadCheck:
    """Hooks that watch the model's first complete eager forward pass, then remove themselves: a managed layer
    (``layers``) whose output tensor is returned by the model is an output head with roles, and cloning its units
    would make model outputs copies of each other (a classifier's classes, say). Raises :class:`PlanError` naming it
    from that forward pass, before any step. For plans that chose their layers by default (``heads``: the layers that
    plan left alone); a plan naming its layers is taken as meant."""

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module], heads: Sequence[str]) -> None:
        from .coupling import _Hook  # (coupling imports this module)

        self._heads = list(heads)
        self._seen: dict[int, tuple[str, weakref.ref]] = {}
        self._handles = [model.register_forward_hook(_Hook(self._root, model))]
        for name, m in layers.items():
            self._handles.append(m.register_forward_hook(_Hook(self._layer(name), m)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._seen = [], {}

    def _layer(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and not torch.compiler.is_compiling():
                self._seen[id(output)] = (name, weakref.ref(output))

        return hook

    def _root(self, module: nn.Module, args: Any, output: Any) -> None:
        from .coupling import _tensors

        if torch.compiler.is_compiling() or not self._handles:
            return
        heads = []
        for t in _tensors(output):
            hit = self._seen.get(id(t))
            if hit is not None and hit[1]() is t and hit[0] not in heads:
                heads.append(hit[0])
        self.remove()
        if heads:
            raise PlanError(
                f"managed layer(s) {heads} produce the model's output: output heads with roles, whose clones would "
                f"make outputs copies of each other. A default plan leaves alone the last layer registered and "
                f"those the model returned on its dummy inputs ({', '.join(self._heads) or 'none'}), and this "
                f"model's forward pass returned another. Leave the head out: "
                f"RolePlan(..., exclude={heads!r}), or name the layers to manage with RolePlan(layers=[...])"
            )
