"""Norm coupling from evidence: which norm layer normalises which managed layer's output.

A unit owns the per-unit entries of a norm layer only if that norm normalises the unit's own output, and output
cloning may fuse a BatchNorm into the layer before it only if the layer's output goes nowhere else (the fused
layer hands over its active channels only). Module registration order proves neither: BERT registers
``LayerNorm`` after ``output.dense`` but normalises ``dense(x) + x``; ViT's ``layernorm_before`` normalises the
block input; a conv may be called twice, or its BatchNorm applied to another branch too.

Construction has no input, so the evidence comes from the model's first complete forward pass (any mode, with or
without gradients): :class:`ForwardTrace` hooks the root module, every managed layer and every candidate norm,
and while that forward runs a :class:`~torch.overrides.TorchFunctionMode` records every torch operation that
reads a managed layer's output. :func:`decide` turns what was seen into a :class:`Coupling`:

* a norm is coupled to a layer when every call of the norm received that layer's output tensor (the very tensor
  the layer's ``__call__`` returned), the norm's per-unit size equals the layer's unit count, no other layer's
  output reached it and no other candidate norm took the same layer's output;
* a coupled norm is fusable when, in addition, nothing but the norm read any output of the layer (no other op,
  no forward hook) and no forward hook replaced the layer's output.

Explicit couplings (``norms={layer: norm}``) are taken as given (they need not be direct: ``Linear -> transpose
-> BatchNorm1d`` is a valid ownership); they are fused only when proven fusable like the others.

The first complete forward pass of the root module only *records* its evidence (and removes the hooks); nothing
changes inside it. The decision is made, and applied, at one named point: the next optimizer step (the start of
``LeaderCloneOptimizer.step()``) or an explicit ``LeaderCloneOptimizer.couple_norms()``. When no complete forward
pass ran before it (the model was compiled before its first call, only submodules were called, ``DataParallel``
replicas), the decision takes explicit couplings only (logged as a warning). Until then the unit tensors are the
layers' own and nothing is fused, which computes the same. A forward pass under ``torch.compile`` gives no
evidence: call ``couple_norms(example_batch)`` (one eager pass) before compiling (the coupling swaps norm
classes). The optimizer's state dict stores the decision, and a resumed run that has not decided yet adopts it.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import StateDictMismatchError
from .guards import outside_inference_mode
from .units import norm_units, num_units, parameter_holders

logger = logging.getLogger("egg_optim")


@dataclass
class Evidence:
    """What one complete forward pass showed (per layer and per norm name)."""

    layer_calls: dict[str, int] = field(default_factory=dict)
    replaced: set[str] = field(default_factory=set)  # a forward hook returned another tensor
    foreign_uses: dict[str, int] = field(default_factory=dict)  # reads of a layer output outside its norm
    norm_inputs: dict[str, list[str | None]] = field(default_factory=dict)  # producer layer of each call's input
    norm_raw_inputs: dict[str, bool] = field(default_factory=dict)  # every input was an unreplaced output


@dataclass(frozen=True)
class Coupling:
    """The decision: ``coupled`` / ``fused`` map layer names to norm names; ``notes`` say why a candidate was
    left out (layer or norm name -> reason)."""

    coupled: dict[str, str]
    fused: dict[str, str]
    notes: dict[str, str]
    observed: bool  # False: decided without a forward pass (only explicit couplings, nothing fused)

    def describe(self) -> str:
        pairs = ", ".join(f"{k} -> {v}" for k, v in self.coupled.items()) or "none"
        text = f"coupled norms: {pairs}"
        if self.fused:
            text += f"; fused (output cloning): {', '.join(self.fused)}"
        if self.notes:
            text += "; not coupled/fused: " + "; ".join(f"{k}: {v}" for k, v in self.notes.items())
        return text


def candidate_norms(
    model: nn.Module, layers: Mapping[str, nn.Module], exclude: Collection[str] = ()
) -> dict[str, nn.Module]:
    """Norm modules whose per-unit size equals some managed layer's unit count and whose parameters no other
    module holds (a tied norm is never coupled automatically). ``exclude``: norm names already taken."""
    sizes = {num_units(m) for m in layers.values()}
    holders = parameter_holders(model)
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if name in exclude or norm_units(m) not in sizes:
            continue
        if any(len(holders.get(id(p), ())) > 1 for p in m.parameters(recurse=False)):
            continue
        out[name] = m
    return out


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)


def _inert(*args: Any) -> None:
    return None


class _Hook:
    """A hook that acts only on the module it was registered on: copies of the model (``copy.deepcopy``,
    pickling) carry an inert hook and no reference to the trace."""

    __slots__ = ("fn", "module")

    def __init__(self, fn: Callable[..., Any], module: nn.Module) -> None:
        self.fn = fn
        self.module = weakref.ref(module)

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        return self.fn(module, *args) if module is self.module() else None

    def __deepcopy__(self, memo: dict) -> _Hook:
        return self  # inert on the copy (another module), shares nothing

    def __reduce__(self):
        return (_inert_hook, ())


def _inert_hook() -> Callable[..., None]:
    return _inert


class _ReadRecorder(TorchFunctionMode):
    """Reports every torch operation that receives a tracked layer output."""

    def __init__(self, trace: ForwardTrace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracked = self.trace._raw
        if tracked:
            for t in _tensors(args):
                self.trace._read(t)
            for t in _tensors(kwargs):
                self.trace._read(t)
        return func(*args, **kwargs)


class ForwardTrace:
    """Hooks that watch the model's forward passes until :meth:`remove`; calls ``on_complete(evidence)`` at the
    end of every complete root forward pass (not under ``torch.compile``, not on a forward that raised)."""

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        norms: Mapping[str, nn.Module],
        on_complete: Callable[[Evidence], None],
    ) -> None:
        self._on_complete = on_complete
        self._removed = False
        self._depth = 0
        self._mode: _ReadRecorder | None = None
        self._ev = Evidence()
        self._raw: dict[int, tuple[str, weakref.ref]] = {}  # id(output) -> (layer, output), as returned
        self._final: dict[int, tuple[str, weakref.ref]] = {}  # after the layer's other forward hooks
        self._in_norm: list[tuple[str, torch.Tensor | None]] = []
        self._handles = [
            model.register_forward_pre_hook(_Hook(self._begin, model)),
            model.register_forward_hook(_Hook(self._end, model), always_call=True),
        ]
        for name, m in layers.items():
            self._handles.append(m.register_forward_hook(_Hook(self._layer_hook(name, final=False), m), prepend=True))
            self._handles.append(m.register_forward_hook(_Hook(self._layer_hook(name, final=True), m)))
        for name, m in norms.items():
            self._handles.append(m.register_forward_pre_hook(_Hook(self._norm_enter(name), m)))
            self._handles.append(m.register_forward_hook(_Hook(self._norm_exit, m), always_call=True))

    def remove(self) -> None:
        self._removed = True
        self._stop()
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ root
    def _begin(self, module, args) -> None:
        if self._removed:
            return  # a hook left on a deep copy made before the decision
        self._depth += 1
        if self._depth == 1 and not torch.compiler.is_compiling():
            self._ev = Evidence()
            self._raw, self._final, self._in_norm = {}, {}, []
            self._mode = _ReadRecorder(self)
            self._mode.__enter__()

    def _stop(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        self._raw, self._final, self._in_norm = {}, {}, []

    def _end(self, module, args, output) -> None:
        # always called: torch runs it from its exception handler when the forward raised
        failed = sys.exc_info()[0] is not None
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0 and self._mode is not None:
            evidence = self._ev
            self._stop()
            if not failed:
                self._on_complete(evidence)

    # ------------------------------------------------------------------ layers and norms
    def _layer_hook(self, name: str, final: bool):
        def hook(module, args, output):
            if self._mode is None or not isinstance(output, torch.Tensor):
                return None
            if not final:
                self._ev.layer_calls[name] = self._ev.layer_calls.get(name, 0) + 1
                self._raw[id(output)] = (name, weakref.ref(output))
            elif self._lookup(self._raw, output) != name:
                self._ev.replaced.add(name)
                self._final[id(output)] = (name, weakref.ref(output))
            return None

        return hook

    @staticmethod
    def _lookup(table: dict[int, tuple[str, weakref.ref]], t: Any) -> str | None:
        hit = table.get(id(t))
        return hit[0] if hit is not None and hit[1]() is t else None

    def _norm_enter(self, name: str):
        def hook(module, args):
            if self._mode is None:
                return None
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            raw = self._lookup(self._raw, x)
            producer = raw or self._lookup(self._final, x)
            self._ev.norm_inputs.setdefault(name, []).append(producer)
            self._ev.norm_raw_inputs[name] = self._ev.norm_raw_inputs.get(name, True) and raw is not None
            self._in_norm.append((name, x))
            return None

        return hook

    def _norm_exit(self, module, args, output) -> None:
        if self._in_norm:
            self._in_norm.pop()

    def _read(self, t: torch.Tensor) -> None:
        layer = self._lookup(self._raw, t)
        if layer is None:
            return
        if self._in_norm and self._in_norm[-1][1] is t:
            return  # the norm reading its own input
        self._ev.foreign_uses[layer] = self._ev.foreign_uses.get(layer, 0) + 1


def decide(
    layers: Mapping[str, nn.Module],
    norms: Mapping[str, nn.Module],
    explicit: Mapping[str, str | None],
    evidence: Evidence | None,
    fusable: Callable[[nn.Module, nn.Module], bool] | None = None,
) -> Coupling:
    """Couple and fuse from ``evidence`` (see the module docstring). ``norms``: candidate and explicit norm
    modules by name; ``fusable(layer, norm)``: whether output cloning can fuse that pair (``None``: no fusion)."""
    coupled: dict[str, str] = {k: v for k, v in explicit.items() if v is not None and k in layers}
    notes: dict[str, str] = {}
    fused: dict[str, str] = {}
    if evidence is None:
        return Coupling(coupled, fused, notes, observed=False)
    ev = evidence
    taken = set(coupled.values())
    takers: dict[str, list[str]] = {}  # layer -> norms that took its output
    for nname, producers in ev.norm_inputs.items():
        if nname not in norms or nname in taken:
            continue
        seen = set(producers)
        if len(seen) == 1 and None not in seen:
            takers.setdefault(next(iter(seen)), []).append(nname)
        elif any(p is not None for p in producers):
            notes[nname] = "it also normalises tensors that are not one managed layer's output"
    for lname, module in layers.items():
        if lname in explicit:
            continue
        got = [n for n in takers.get(lname, []) if norm_units(norms[n]) == num_units(module)]
        if len(got) == 1:
            coupled[lname] = got[0]
        elif len(got) > 1:
            notes[lname] = f"its output is normalised by several norms ({', '.join(got)})"
    if fusable is not None:
        for lname, nname in coupled.items():
            layer, norm = layers[lname], norms.get(nname)
            if norm is None or not fusable(layer, norm):
                continue
            if ev.layer_calls.get(lname, 0) == 0 or nname not in ev.norm_inputs:
                reason = "no forward pass ran through it"
            elif ev.foreign_uses.get(lname, 0):
                reason = f"its output is also read outside {nname} (a second use, another branch or a hook)"
            elif lname in ev.replaced or not ev.norm_raw_inputs.get(nname, False):
                reason = "a forward hook replaced its output"
            elif any(p != lname for p in ev.norm_inputs[nname]):
                reason = f"{nname} also normalises other tensors"
            else:
                fused[lname] = nname
                continue
            notes[f"{lname} (fusion)"] = reason
    return Coupling(coupled, fused, notes, observed=True)


class NormCoupling:
    """Decides a model's norm coupling once. Its hooks record the evidence of the first complete forward pass and
    are removed; :meth:`decide_now` (the owner calls it at a named point: the next optimizer step, or
    ``couple_norms()``) decides from that evidence and hands the decision to ``apply(coupling)``. Nothing to
    observe (no candidate norm, no fusable explicit pair): decided at construction without hooks.

    Args:
        model: the root module whose forward pass is watched.
        layers: managed layer name -> module.
        explicit: ``norms`` given by the user (``None`` values: never couple that layer).
        fusable: ``fusable(layer, norm)`` when output cloning may fuse norms, else ``None``.
        apply: called with the :class:`Coupling`; it must validate before changing anything.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        explicit: Mapping[str, str | None],
        apply: Callable[[Coupling], None],
        fusable: Callable[[nn.Module, nn.Module], bool] | None = None,
    ) -> None:
        self._layers = dict(layers)
        self._explicit = dict(explicit)
        # the model's hooks must not keep the owner (an optimizer) alive
        self._apply = weakref.WeakMethod(apply) if hasattr(apply, "__self__") else (lambda: apply)
        self._fusable = fusable
        self.coupling: Coupling | None = None
        self._modules = modules = dict(model.named_modules())
        taken = {v for v in self._explicit.values() if v is not None}
        auto = {n: m for n, m in self._layers.items() if n not in self._explicit}
        self._norms = candidate_norms(model, auto, exclude=taken) if auto else {}
        if fusable is not None:
            for lname, nname in self._explicit.items():
                if nname is not None and lname in self._layers and fusable(self._layers[lname], modules[nname]):
                    self._norms[nname] = modules[nname]
        self._trace: ForwardTrace | None = None
        self.evidence: Evidence | None = None  # of the first complete forward pass, until the decision
        if self._norms:
            self._trace = ForwardTrace(model, self._layers, self._norms, self._complete)
        else:
            self._finish(None, quiet=True)

    @property
    def pending(self) -> bool:
        """True until the coupling is decided."""
        return self.coupling is None

    @property
    def explicit(self) -> dict[str, str | None]:
        return dict(self._explicit)

    def from_state(self, saved: Any, fuse: bool) -> Coupling:
        """The :class:`Coupling` in a state dict's ``{"norms": ..., "fused": ...}`` entry, checked against the
        managed layers, the explicit ``norms`` and (``fuse``) what output cloning can fuse; raises
        :class:`StateDictMismatchError`. Changes nothing."""
        ok = isinstance(saved, Mapping) and all(
            isinstance(saved.get(k), Mapping) and all(isinstance(v, str) for v in saved[k].values())
            for k in ("norms", "fused")
        )
        if not ok:
            raise StateDictMismatchError(f"state dict's norm coupling entry is malformed: {saved!r}")
        norms, fused = dict(saved["norms"]), dict(saved["fused"])
        wrong = sorted(set(norms) - set(self._layers))
        wrong += [k for k, v in self._explicit.items() if norms.get(k) != v]
        wrong += [k for k, v in fused.items() if norms.get(k) != v]
        if wrong:
            raise StateDictMismatchError(
                f"state dict's norm coupling {norms} (fused {fused}) does not fit this optimizer at {wrong} "
                f"(managed layers {sorted(self._layers)}, norms={self._explicit})"
            )
        if not fuse or self._fusable is None:
            fused = {}
        bad = [
            k
            for k, v in fused.items()
            if v not in self._modules or not self._fusable(self._layers[k], self._modules[v])
        ]
        if bad:
            raise StateDictMismatchError(f"state dict fuses norms that cannot be fused here: {bad}")
        return Coupling(norms, fused, {}, observed=False)

    def adopt(self, coupling: Coupling) -> None:
        """Take a decision made elsewhere (a resumed run adopts the saved run's coupling); already applied."""
        self.coupling = coupling
        self.evidence = None
        self.remove()
        logger.info("egg_optim: %s (from the state dict)", coupling.describe())

    def decide_now(self) -> None:
        """Decide from the recorded evidence (none: explicit couplings only, no fusion) and apply the decision."""
        if self.pending:
            self._finish(self.evidence)

    def remove(self) -> None:
        """Stop watching without deciding (the owner is going away)."""
        if self._trace is not None:
            self._trace.remove()
            self._trace = None

    def _complete(self, evidence: Evidence) -> None:
        # inside the forward pass: record only (the model and the optimizer change at decide_now)
        self.evidence = evidence
        self.remove()

    def _finish(self, evidence: Evidence | None, quiet: bool = False) -> None:
        apply = self._apply()
        if apply is None:  # the owner is gone
            self.remove()
            return
        coupling = decide(self._layers, self._norms, self._explicit, evidence, self._fusable)
        with outside_inference_mode():  # couple_norms() in an evaluation block: the new state must train
            apply(coupling)  # validates before changing anything; raising leaves it pending
        self.coupling = coupling
        self.evidence = None
        self.remove()
        if not quiet:
            if evidence is None and (set(self._norms) - set(coupling.coupled.values())):
                logger.warning(
                    "egg_optim: no complete eager forward pass of the model ran before the norm coupling was applied "
                    "(the first optimizer step or couple_norms()), so no norm layer was coupled automatically (under "
                    "torch.compile, call opt.couple_norms(example_batch) before compiling; or pass "
                    "norms={layer: norm}); %s",
                    coupling.describe(),
                )
            elif any(k.endswith("(fusion)") for k in coupling.notes):
                logger.warning("egg_optim: some norms cannot be fused (slower, same results); %s", coupling.describe())
            else:
                logger.info("egg_optim: %s", coupling.describe())
