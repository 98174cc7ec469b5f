"""Output cloning for units that span modules: transformer MLP neurons, attention heads, MoE experts.

A clone neuron (head) carries its source's activation (attention output). Each block computes in one of two ways:

``"shrink"``: the producers (up/gate, or q/k/v projections) compute only the active units' rows, and the
consumer (down or output projection) folds each clone's input columns into its source's::

    h_active = act(x @ W_up[active].T)                      # the producers: active rows only
    y = h_active @ (W_down[:, active] + fold(W_down[:, clones] -> their sources)).T

which equals the full computation with every clone's activation set to its source's, so both matmuls shrink
with the number of clones. This needs the code between producers and consumer to work on fewer units: an MLP's
elementwise activation does; attention that reshapes with ``view(..., -1, head_dim)`` (Llama, Mistral, Qwen, BERT,
ViT, GPT-NeoX) does too; so does attention that reshapes with a head count or width it stores (OPT, GPT-Neo,
StableLM, XGLM, Falcon, DeBERTa) or splits a fused qkv at a stored width (GPT-2, GPTBigCode; Phi3 at its config's
head count), once those attributes of the block's module (of a module inside it; of a view of its config, its own
for the forward pass: :class:`_ConfigView`) are set to the active units' for the forward pass
(:attr:`UnitGroup.sizes`, found by name: ``num_heads``, ``embed_dim``, ``split_size``...; tried where the block does
not shrink without them). Per-head values outside the projections (Swin's relative position table, GPT-OSS's
attention sinks) are sliced to the active units. Where widths are set or per-head values sliced, every tensor the
block returns must match the plain block's too, attention weights (rows summing to at most 1) excepted: T5 hands
its position bias on to the next blocks, so its attention expands.

``"expand"``: the producers compute the active rows and give every clone its source's output back (a gather), so the
code between them runs at full width (all heads) and the consumer reads every unit through its own columns (clone
columns frozen). Exact for any code in between: attention that adds a per-head bias it is given (ALiBi in BLOOM) or
hands one on (T5). Other parameters (T5's relative attention bias, the 3-D weights of MoE experts) compute this way too:
clone positions take their source's values, except MoE experts whose experts each keep the same number of active
neurons, their clones' sources in their own expert (the default roles), which shrink: each expert's producer slices are
taken at its active neurons and its down projection's clone columns folded into their sources' (``[experts, 2 x active,
hidden]`` and ``[experts, hidden, active]``; by views and sums where every expert's active neurons sit at the same
offsets, as packed roles put them, else by gathers); in linear attention (the gated delta net, Kimi Delta Attention),
whose code reads its widths from attributes of the block's module, ``"shrink"`` always sets those to the active units'
for the forward pass and slices its convolution and per-head values to their active positions.

Every block starts in ``"shrink"`` where its producers are Linear layers (or it is one of the above).
**Self-check**: at the first forward pass through each block with clones, the block is run (on that batch, in eval
semantics, without gradients) as the plain module with every clone's producer slices filled from its source (what a
saved model computes), then rewritten, and compared within the tolerance of the output's dtype; once more with random
weights in its slices, so that a coincidence of the current weights (zero-initialised projections) cannot hide a wrong
reshape. A block whose ``"shrink"`` result differs tries it again with its width attributes set (where it has any), then
switches to ``"expand"`` (logged once); one whose ``"expand"`` result differs raises
:class:`~egg_optim.errors.RewriteCheckError` naming it, before anything trains. The cost is five to ten extra forward
passes of each block, once.

The rewrite swaps the classes of the member modules in place (parameters, names and ``state_dict`` keys stay)
and is undone by :meth:`BlockOutputCloning.remove`. Clones' own weights are not used and get no gradient. Saving
(``state_dict()`` of any module above them) writes each clone's producer slices as its source's, so a plain model
loaded from it computes what the rewritten one did.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core import axes
from ..core.blocks import UnitGroup, UnitSlice
from ..core.probe import first_tensor, fresh_inputs
from ..core.roles import Roles
from ..core.sharding import copied_positions, copy_positions_
from ..errors import PlanError, RewriteCheckError
from . import base
from .base import check_eval_mode

OWNER = "block output cloning"
_ATTRS = (
    "_egg_has_clones", "_egg_dim", "_egg_produces", "_egg_own_weights", "_egg_expand", "_egg_slices", "_egg_reference",
    "_egg_inside", "_egg_span", "_egg_clone_span", "_egg_fold", "_egg_tied_inside", "_egg_sizes", "_egg_active_units",
    "_egg_parts", "_egg_views", "_egg_copies", "_egg_runs", "_egg_resize",
)  # fmt: skip
_BUFFERS = ("_egg_active", "_egg_fold_pos", "_egg_fold_src", "_egg_sources", "_egg_gather")
MODES = ("shrink", "expand")
logger = logging.getLogger("egg_optim")


class _Check:
    """Module-wide state of the self-check: set while a check runs (rewritten modules then ignore
    ``eval_mode="own_weights"``, and the hooks of other blocks stay quiet)."""

    running = False


class _ShapeGuard(TorchFunctionMode):
    """Active while a check runs a rewritten block: turns an attention call whose shapes a wrong head count made
    impossible into a Python error (the finding), before a kernel sees it. Some torch releases (2.11 on CPU) do
    not validate them and die of a division by zero: Phi-3's fused qkv, split at fixed offsets, leaves a
    shrunken block no key/value heads."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            _check_attention(*args[:3], enable_gqa=bool(kwargs.get("enable_gqa", False)))
        return func(*args, **kwargs)


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> None:
    shapes = f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}"
    if any(0 in t.shape[:-2] or t.shape[-1] == 0 for t in (q, k, v)):
        raise ValueError(f"attention with an empty head or batch dimension: {shapes}")
    if enable_gqa and min(q.dim(), k.dim(), v.dim()) >= 4:  # grouped heads: torch divides by the key heads
        hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
        if hk != hv or hq % hk:
            raise ValueError(f"grouped-query attention with {hq} query heads, {hk} key and {hv} value heads: {shapes}")


def _plain_eval(m: nn.Module) -> bool:
    return bool(m._egg_own_weights) and not m.training and not _Check.running


class _Member:
    """What every rewritten member shares: saving clone slices as their sources', the self-check's flag."""

    _egg_own_weights: bool  # eval_mode="own_weights": evaluation runs the plain module
    _egg_reference = False  # set by the self-check: compute as the plain module

    def _egg_keys(self) -> tuple[str, ...]:
        return ("weight", "bias")

    def _clone_positions(self, key: str) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A producer's clone slices are saved as their source's: what output mode computed, for a plain model.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if keep_vars or (self._egg_own_weights and not self.training):
            return
        for key in self._egg_keys():
            found = self._clone_positions(key)
            if found is not None and prefix + key in destination:
                dim, clones, sources = found
                destination[prefix + key] = copied_positions(destination[prefix + key], dim, clones, sources)


class _BlockMember(_Member):
    """Mixin before a Linear's (or transformers Conv1D's) class: a producer computes active units' outputs, a
    consumer folds clones (``"shrink"``) or reads all units with clone columns frozen (``"expand"``)."""

    _egg_has_clones: bool
    _egg_dim: int  # the unit dimension of the weight
    _egg_produces: bool
    _egg_expand: bool  # the block computes all units ("expand")
    _egg_active: torch.Tensor  # active positions along the unit dimension
    _egg_fold_pos: torch.Tensor  # for each clone position, where its source sits among the active ones
    _egg_fold_src: torch.Tensor  # clone positions
    _egg_sources: torch.Tensor  # each clone position's source position
    _egg_gather: torch.Tensor  # for every position, where its source (itself if active) sits among the active ones
    # when the active and the clone positions are each one run (packed roles): the weight is used through views
    _egg_span: axes.Span | None
    _egg_clone_span: axes.Span | None
    _egg_fold: axes.Cycle | None  # (q, m, r): clone k folds into active position q + (k + r) % m (axes.cycle)
    _egg_runs: list[axes.Span] | None = None  # else the active positions as a few runs (axes.part_runs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._egg_has_clones or self._egg_reference or _plain_eval(self):
            return super().forward(input)
        w, dim = self.weight, self._egg_dim
        spans = self._egg_span is not None and self._egg_clone_span is not None
        if self._egg_produces and self._egg_runs is not None:  # a few runs (a fused qkv or gate/up): no index op
            weight = axes.cut(w, dim, self._egg_runs)
            bias = None if self.bias is None else axes.cut(self.bias, 0, self._egg_runs)
        elif self._egg_produces:
            weight = axes.pick(w, dim, self._egg_active, self._egg_span)
            bias = None if self.bias is None else axes.pick(self.bias, 0, self._egg_active, self._egg_span)
        elif self._egg_expand:  # every unit read through its own column; clone columns frozen
            if spans:  # the two runs tile the positions: active first, or clones first
                active = axes.narrow(w, dim, self._egg_span)
                frozen = axes.narrow(w, dim, self._egg_clone_span).detach()
                weight = torch.cat([active, frozen] if self._egg_span[0] == 0 else [frozen, active], dim)
            else:
                weight = w.index_copy(dim, self._egg_fold_src, w.index_select(dim, self._egg_fold_src).detach())
            bias = self.bias
        elif spans and self._egg_fold is not None:  # clones summed into a run of active columns: no index op
            active = axes.narrow(w, dim, self._egg_span)
            weight = _folded(active, w, dim, self._egg_clone_span, self._egg_fold)
            bias = self.bias
        else:
            clones = w.index_select(dim, self._egg_fold_src).detach()  # clones are not trained
            weight = w.index_select(dim, self._egg_active).index_add(dim, self._egg_fold_pos, clones)
            bias = self.bias
        if (dim == 1) == self._egg_produces:  # a transformers Conv1D: weight [in, out], y = x @ W + b
            y = input.reshape(-1, input.shape[-1]) @ weight
            if bias is not None:
                y = y + bias
            y = y.reshape(*input.shape[:-1], weight.shape[1])
        else:
            y = F.linear(input, weight, bias)
        if self._egg_produces and self._egg_expand:
            y = y.index_select(-1, self._egg_gather)  # clones carry their source's output
        return y

    def _clone_positions(self, key: str) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """(dim, clone positions, their sources) of a producer's ``weight`` / ``bias``, or ``None``."""
        if not (self._egg_produces and self._egg_has_clones) or getattr(self, key, None) is None:
            return None
        return (self._egg_dim if key == "weight" else 0), self._egg_fold_src, self._egg_sources


class _TiedMember(_Member):
    """Mixin for any other module holding unit slices (T5's relative attention bias, MoE experts' 3-D weights):
    its forward runs with every clone position of a producer slice taken from its source (gradients reach the
    source) and every clone position of a consumer slice frozen, at full width (``"expand"``); or, in a block that
    can shrink, with its producer slices' active positions only and its consumer slices' clone positions folded
    into their sources': the gated delta net (its tied slices all producers, the block module's width attributes,
    :attr:`UnitGroup.sizes`, set to the active units' for the forward pass), and MoE experts with as many active
    neurons in every expert (each slice back in its tensor's layout, ``[experts, active positions, ...]``)."""

    _egg_has_clones: bool
    _egg_expand: bool
    _egg_slices: dict[str, tuple[int, bool]]  # parameter key -> (unit dim, produces)
    _egg_inside = False
    _egg_sizes: dict[str, int] = {}  # its width attributes, per unit (:attr:`UnitGroup.sizes`)
    _egg_resize = False  # "shrink" sets them to the active units' (always, or where the self-check found it needed)
    _egg_active_units = 0
    _egg_parts = 1  # the experts of fused MoE weights: a shrunk slice is laid out [parts, positions of each, ...]
    # per parameter key, where its active positions are a few runs (packed roles; with parts, at the same offsets in
    # every part): those runs along the tensor's own dimension, and for a consumer its clones' run and the cycle
    # their sources follow among the active positions (:func:`_part_view`): the slice is then cut by views, no index
    # op (the delta net's convolution and per-head vectors, experts)
    _egg_views: dict[str, tuple[axes.Axis, list[axes.Span], tuple[axes.Span, axes.Cycle] | None]] = {}
    # at full width ("expand"), per parameter key along an ``int`` dimension whose clones are one run: that run and,
    # for a producer, the cycle their sources follow (a consumer's clones are frozen): copied by views, no index op
    _egg_copies: dict[str, tuple[axes.Span, axes.Cycle | None]] = {}
    # tied members of the same block inside this one, whose parameters its code may read without calling them (the
    # gated delta net reads its depthwise convolution's weight): substituted with its own
    _egg_tied_inside: tuple[_TiedMember, ...] = ()

    def _egg_keys(self) -> tuple[str, ...]:
        return tuple(self._egg_slices)

    def _clone_positions(self, key: str) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        entry = self._egg_slices.get(key)
        if entry is None or not entry[1] or not self._egg_has_clones:
            return None
        return entry[0], getattr(self, f"_egg_clones_{key}"), getattr(self, f"_egg_sources_{key}")

    def _egg_values(self) -> dict[str, torch.Tensor]:
        """Its parameters as the block computes with them: clone positions of a producer slice taken from their
        sources, of a consumer slice frozen."""
        values = {}
        for key, (dim, produces) in self._egg_slices.items():
            p = getattr(self, key)
            clones = getattr(self, f"_egg_clones_{key}")
            if not self._egg_expand and key in self._egg_views:
                values[key] = _cut(p, *self._egg_views[key])
            elif self._egg_expand and key in self._egg_copies:
                (start, n), cyc = self._egg_copies[key]
                block = axes.narrow(p, dim, (start, n)).detach() if cyc is None else axes.tiled(p, dim, cyc, n)
                values[key] = axes.replaced(p, dim, (start, n), block)
            elif not self._egg_expand:
                v = axes.select(p, dim, getattr(self, f"_egg_active_{key}"))
                if not produces:  # clones are not trained; each adds its column to its source's
                    at = dim if isinstance(dim, int) else 0
                    v = v.index_add(at, getattr(self, f"_egg_fold_{key}"), axes.select(p, dim, clones).detach())
                if not isinstance(dim, int):  # [parts x positions, rest] back to the tensor's layout
                    v = v.unflatten(0, (self._egg_parts, -1)).movedim((0, 1), dim).contiguous()
                values[key] = v
            elif produces:
                values[key] = axes.copied(p, dim, clones, axes.select(p, dim, getattr(self, f"_egg_sources_{key}")))
            else:
                values[key] = axes.copied(p, dim, clones, axes.select(p, dim, clones).detach())
        return values

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self._egg_slices or self._egg_tied_inside or self._egg_resize):
            return super().forward(*args, **kwargs)  # a block's module whose widths need not be set: as it is
        if self._egg_inside or not self._egg_has_clones or self._egg_reference or _plain_eval(self):
            return super().forward(*args, **kwargs)
        tied = (self, *self._egg_tied_inside)
        with ExitStack() as stack:
            for m in tied:
                if m._egg_resize and not m._egg_expand:
                    stack.enter_context(_widths(m, {k: n * m._egg_active_units for k, n in m._egg_sizes.items()}))
                stack.enter_context(_substituted(m, m._egg_values()))
                m._egg_inside = True
            try:
                return super().forward(*args, **kwargs)
            finally:
                for m in tied:
                    m._egg_inside = False


def _sizes_by_module(g: UnitGroup) -> dict[str, dict[str, int]]:
    """``g.sizes`` by the module holding each attribute (``"attr"``: the block's own; ``"child.attr"``: one inside;
    ``"config.attr"``: the block module's config, which :func:`_widths` overrides for it alone)."""
    out: dict[str, dict[str, int]] = {}
    for key, n in g.sizes.items():
        path, _, attr = key.rpartition(".")
        if path == "config":
            path, attr = "", key
        out.setdefault(f"{g.name}.{path}" if path else g.name, {})[attr] = n
    return out


class _ConfigView:
    """A module's config with some attributes overridden, for its forward pass only: the config the model's other
    modules share stays as it is (it may be read meanwhile, by another replica's thread too)."""

    def __init__(self, config: Any, overrides: Mapping[str, int]) -> None:
        object.__setattr__(self, "_egg_config", config)
        object.__setattr__(self, "_egg_overrides", dict(overrides))

    def __getattr__(self, name: str) -> Any:
        overrides = object.__getattribute__(self, "_egg_overrides")
        return overrides[name] if name in overrides else getattr(object.__getattribute__(self, "_egg_config"), name)

    def __setattr__(self, name: str, value: Any) -> None:  # what the forward pass writes is the config's
        setattr(object.__getattribute__(self, "_egg_config"), name, value)


@contextmanager
def _widths(module: nn.Module, values: Mapping[str, int]) -> Iterator[None]:
    """Run with ``module``'s width attributes set to ``values`` (restored after); ``"config.attr"`` entries on a
    view of its config (:class:`_ConfigView`)."""
    config = {k.removeprefix("config."): v for k, v in values.items() if k.startswith("config.")}
    own = {k: v for k, v in values.items() if not k.startswith("config.")}
    if config:
        own["config"] = _ConfigView(module.config, config)
    saved = {k: module.__dict__[k] if k in module.__dict__ else getattr(module, k) for k in own}
    try:
        for k, v in own.items():
            setattr(module, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


@contextmanager
def _substituted(module: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run with ``module``'s parameters ``values`` replaced by plain tensors (restored after)."""
    saved = {k: module._parameters[k] for k in values}
    try:
        for k, v in values.items():
            module._parameters[k] = v
        yield
    finally:
        module._parameters.update(saved)


_CLASSES: dict[type, type] = {}


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def _rewritten_class(cls: type, linear: bool) -> type:
    if cls not in _CLASSES:
        mixin = _BlockMember if linear else _TiedMember
        _CLASSES[cls] = type(f"_BlockOutput{cls.__name__}", (mixin, cls), {})
        base.register(OWNER, {cls: _CLASSES[cls]})
    return _CLASSES[cls]


def _weight_slice(group: UnitGroup, module: str) -> UnitSlice:
    return next(s for s in group.slices if s.param == f"{module}.weight")


def _even_parts(group: UnitGroup, roles: Roles) -> bool:
    """Whether ``group``'s parts (its experts, the first dimension of every tensor it slices on a pair axis) each
    have as many active units, every clone's source in its own part: then they shrink to ``[parts, active, ...]``."""
    if group.parts == 1 or any(not isinstance(s.dim, tuple) or s.dim[0] != 0 for s in group.slices):
        return False
    split = roles.split(group.parts)
    return split is not None and len({r.num_units - r.num_clones for r in split}) == 1


def _part_view(s: UnitSlice, er: Roles, shape: torch.Size) -> tuple | None:
    """:attr:`_TiedMember._egg_views` of slice ``s`` (roles ``er`` of its positions), or ``None`` where it has
    none. Host reads: when roles change."""
    active = axes.part_runs(er.active, shape, s.dim)
    if active is None or s.role != "consumer":
        return None if active is None else (s.dim, active, None)
    # a consumer: the clones one run in every part, their sources a cycle among its active positions
    clones = axes.part_runs(er.clones, shape, s.dim)
    parts = 1 if isinstance(s.dim, int) else shape[s.dim[0]]
    local = _fold_positions(er).view(parts, -1) - (torch.arange(parts) * (er.active.numel() // parts))[:, None]
    cyc = axes.cycle(local[0]) if bool((local == local[0]).all()) else None
    if clones is None or len(clones) != 1 or cyc is None:
        return None
    return s.dim, active, (clones[0], cyc)


def _cut(
    p: torch.Tensor, dim: axes.Axis, runs: list[axes.Span], fold: tuple[axes.Span, axes.Cycle] | None
) -> torch.Tensor:
    """``p``'s active positions (of every part: ``runs``, the same in each), a consumer's clone run folded into
    its sources (``fold``), in ``p``'s layout: what the gather path of :meth:`_TiedMember._egg_values` computes,
    by views and sums."""
    v = axes.cut(p, dim, runs, layout="tensor")
    return v if fold is None else _folded(v, p, dim if isinstance(dim, int) else dim[1], *fold)


def _folded(active: torch.Tensor, w: torch.Tensor, dim: int, clones: axes.Span, cyc: axes.Cycle) -> torch.Tensor:
    """``active`` (the active positions of ``w`` along ``dim``) with ``w``'s clone run ``clones`` added into its
    positions ``q .. q + m`` (clone ``k`` into ``q + (k + r) % m``: ``cyc``), clones detached: no index op."""
    q, m, r = cyc
    folded = axes.fold(axes.narrow(w, dim, clones).detach(), dim, m, r)
    rest = active.shape[dim] - q - m
    return torch.cat(
        [active.narrow(dim, 0, q), active.narrow(dim, q, m) + folded, active.narrow(dim, q + m, rest)], dim
    )


def _fold_positions(er: Roles) -> torch.Tensor:
    """Where each clone position's source sits among the active positions (a consumer's fold)."""
    pos = torch.full((er.num_units,), -1, dtype=torch.long)
    pos[er.active] = torch.arange(er.active.numel())
    return pos[er.sources]


_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _difference(ref: torch.Tensor | None, out: torch.Tensor | None) -> str | None:
    """Why ``out`` is not ``ref`` within the dtype's tolerance (relative to ``ref``'s largest entry), or ``None``."""
    if ref is None or out is None:
        return "the block returned no floating-point tensor" if (ref is None) != (out is None) else None
    if out.shape != ref.shape:
        return f"its output has shape {tuple(out.shape)}, the plain block's {tuple(ref.shape)}"
    tol = _TOLERANCE.get(ref.dtype, 1e-4)
    scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
    err = float((out.detach().float() - ref.detach().float()).abs().max()) if ref.numel() else 0.0
    if not err <= tol * max(scale, 1e-3):  # also catches NaN
        return f"its output differs from the plain block's by {err:.3g} (largest entry {scale:.3g}, tolerance {tol:g})"
    return None


def _floating(out: Any) -> list[torch.Tensor]:
    """Every floating-point tensor of a module's output, in order."""
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    return [t for item in out for t in _floating(item)] if isinstance(out, (list, tuple)) else []


def _other_outputs(ref: Any, out: Any) -> str | None:
    """Why the outputs after the first differ (a block whose width attributes were set may return a per-head tensor
    that the next blocks read: T5's position bias), or ``None``. Attention weights (rows that are distributions
    over the keys) are the active heads', as in every block that computes those only: transformers returns them
    where asked (``output_attentions``), no later block reads them."""
    refs, outs = _floating(ref)[1:], _floating(out)[1:]
    if len(refs) != len(outs):
        return f"it returned {len(outs) + 1} floating-point tensors, the plain block {len(refs) + 1}"
    for i, (r, o) in enumerate(zip(refs, outs), start=2):
        if _distributions(r) and _distributions(o):
            continue
        problem = _difference(r, o)
        if problem is not None:
            return f"its output {i}: {problem.removeprefix('its output ')}"
    return None


def _distributions(t: torch.Tensor) -> bool:
    """Whether ``t`` holds attention weights (``[batch, heads, q, k]``): rows of non-negative weights summing to at
    most 1 and more than 0 (less than 1 where attention sinks take their share: GPT-OSS)."""
    if t.dim() < 3 or not t.numel():
        return False
    t = t.detach().float()
    sums = t.sum(-1)
    return bool(t.min() >= 0) and bool(sums.min() > 0) and bool(sums.max() <= 1 + 1e-3)


class BlockOutputCloning(base.LayerRewrite):
    """Output cloning for the :class:`~egg_optim.core.blocks.UnitGroup` s of ``model`` named in ``roles``.

    Args:
        model: the model; its member modules are rewritten in place.
        groups: ``{name: UnitGroup}`` (:func:`~egg_optim.core.blocks.find_unit_groups`).
        roles: ``{group name: Roles}`` over each group's units.
        eval_mode: ``"as_trained"`` or ``"own_weights"`` (evaluation runs the plain modules).
        verify: run the self-check at each block's first forward pass with clones (see the module docs).
    """

    owner = OWNER
    option = "clone_mode='output'"
    clones_follow_sources = True

    def __init__(
        self,
        model: nn.Module,
        groups: Mapping[str, UnitGroup],
        roles: Mapping[str, Roles],
        *,
        eval_mode: str = "as_trained",
        verify: bool = True,
    ) -> None:
        check_eval_mode(eval_mode)
        modules = dict(model.named_modules())
        for name, r in roles.items():
            g = groups.get(name)
            if g is None:
                raise PlanError(f"{OWNER}: {name!r} is not a transformer MLP, attention or experts block")
            if not isinstance(r, Roles) or r.num_units != g.num_units:
                raise PlanError(f"{OWNER}: roles for {name!r} must be Roles over its {g.num_units} units")
            for m in g.sliced:
                problem = base.owner_of(modules[m])
                if problem is not None:
                    raise PlanError(f"{OWNER}: module {m!r} is already under {problem}")
        self.model = model
        self.groups = {n: groups[n] for n in roles}
        self._layers = {n: modules[self.groups[n].consumer or self.groups[n].modules[0]] for n in roles}
        self._roles = dict(roles)
        self._removed = False
        self._members: dict[str, list[tuple[str, nn.Module, bool]]] = {}
        self.modes: dict[str, str] = {}
        for name, g in self.groups.items():
            members = []
            # the shared members (latent attention's down projections) run as they are; the block's own module (or
            # one inside it) is a member, holding no slice, where it has width attributes (linear attention: it also
            # substitutes the members inside it, whose parameters it may read without calling them)
            sizes = _sizes_by_module(g)
            outer = [n for n in sizes if n in modules and n not in g.sliced]
            for mname in [*g.sliced, *outer]:
                m = modules[mname]
                slices = [s for s in g.slices if s.module == mname]
                linear = _is_linear(m) and {s.key for s in slices} <= {"weight", "bias"}
                produces = all(s.role == "producer" for s in slices)
                members.append((mname, m, produces))
                m.__class__ = _rewritten_class(type(m), linear)
                m._egg_produces = produces
                m._egg_own_weights = eval_mode == "own_weights"
                if linear:
                    m._egg_dim = _weight_slice(g, mname).dim
                else:
                    m._egg_slices = {s.key: (s.dim, s.role == "producer") for s in slices}
                    m._egg_sizes = sizes.get(mname, {})
                    m._egg_parts = g.parts
            self._members[name] = members
            for parent, m, _ in members:
                if isinstance(m, _TiedMember):
                    m._egg_tied_inside = tuple(
                        d for dn, d, _ in members if isinstance(d, _TiedMember) and dn.startswith(f"{parent}.")
                    )
            tied = [m for _, m, _ in members if isinstance(m, _TiedMember) and m._egg_slices]
            shrinks = (
                # tied members with producer slices only (per-head tables, sinks) are sliced to the active units
                all(p for m in tied for _, p in m._egg_slices.values())
                or _even_parts(g, roles[name])  # or expert by expert
            )
            self._set_mode(name, "shrink" if shrinks else "expand", resize=bool(g.sizes) and not g.sizes_optional)
            self._apply_roles(name, roles[name])
        self._verified: set[str] = set()
        self._warned: set[str] = set()
        self._hooks: dict[str, Any] = {}
        self.verify = verify
        self._scopes = {n: _scope(model, g, modules) for n, g in self.groups.items()}
        self._arm()

    # ------------------------------------------------------------------ modes
    def _set_mode(self, name: str, mode: str, resize: bool = False) -> None:
        """``resize``: "shrink" sets the block module's width attributes (:attr:`UnitGroup.sizes`) to the active
        units'."""
        self.modes[name] = mode
        for _, m, _ in self._members[name]:
            m._egg_expand = mode == "expand"
            m._egg_resize = resize and mode == "shrink"

    def resized(self, name: str) -> bool:
        """Whether block ``name`` computes on its active units with its width attributes set to theirs."""
        return any(getattr(m, "_egg_resize", False) for _, m, _ in self._members[name])

    def _attempts(self, name: str) -> list[tuple[str, bool]]:
        """The ways the self-check tries, in order, from the current one: shrink (with the block module's width
        attributes set to the active units' where it needs them, or as a second try where it may), expand."""
        g = self.groups[name]
        resizes = [False, True] if g.sizes and g.sizes_optional else [bool(g.sizes)]
        attempts = [(m, r) for m, r in [*(("shrink", r) for r in resizes), ("expand", False)] if m in MODES]
        return attempts[attempts.index((self.modes[name], self.resized(name))) :]

    def _check_roles(self, name: str, roles: Roles) -> None:
        if roles.num_units != self.groups[name].num_units:
            raise PlanError(f"roles for {name!r} have {roles.num_units} units, it has {self.groups[name].num_units}")

    def update_roles(self, new_roles: Mapping[str, Roles]) -> None:
        self._check_live()
        for name, r in new_roles.items():
            if name not in self.groups:
                raise PlanError(f"{name!r} is not managed by this {type(self).__name__}")
            self._check_roles(name, r)
        for name, r in new_roles.items():
            if not r.same_as(self._roles[name]):
                self._roles[name] = r
                g = self.groups[name]
                if g.parts > 1 and self.modes[name] == "shrink" and not _even_parts(g, r):
                    self._set_mode(name, "expand")  # experts with uneven roles compute at full width; checked again
                    self._verified.discard(name)
                self._apply_roles(name, r)
        self._arm()

    def _apply_roles(self, name: str, roles: Roles) -> None:
        g = self.groups[name]
        for mname, m, _ in self._members[name]:
            m._egg_has_clones = roles.has_clones
            if isinstance(m, _TiedMember):
                device = next(iter(m.parameters())).device
                views, copies = {}, {}
                for s in g.slices:
                    if s.module == mname:
                        er = roles.expand(s.index)
                        if s.role == "consumer":
                            base.set_buffer(m, f"_egg_fold_{s.key}", _fold_positions(er).to(device))
                        base.set_buffer(m, f"_egg_clones_{s.key}", er.clones.to(device, copy=True))
                        base.set_buffer(m, f"_egg_sources_{s.key}", er.sources.to(device, copy=True))
                        base.set_buffer(m, f"_egg_active_{s.key}", er.active.to(device, copy=True))
                        view = _part_view(s, er, getattr(m, s.key).shape)
                        if view is not None:
                            views[s.key] = view
                        cyc = None if s.role == "consumer" else er.source_cycle
                        if isinstance(s.dim, int) and er.clone_span is not None and (s.role == "consumer" or cyc):
                            copies[s.key] = (er.clone_span, cyc)
                m._egg_active_units = int(roles.active.numel())
                m._egg_views, m._egg_copies = views, copies
                continue
            er = roles.expand(_weight_slice(g, mname).index)
            device = m.weight.device
            base.set_buffer(m, "_egg_active", er.active.to(device, copy=True))
            base.set_buffer(m, "_egg_fold_src", er.clones.to(device, copy=True))
            base.set_buffer(m, "_egg_sources", er.sources.to(device, copy=True))
            base.set_buffer(m, "_egg_fold_pos", _fold_positions(er).to(device))
            base.set_buffer(m, "_egg_gather", er.gather_index.to(device, copy=True))
            m._egg_span, m._egg_clone_span = er.active_span, er.clone_span
            m._egg_runs = None if er.active_span is not None else axes.part_runs(er.active, m.weight.shape, m._egg_dim)
            cyc = er.source_cycle  # in positions; the fold is in positions among the active ones
            m._egg_fold = None if cyc is None or er.active_span is None else (cyc[0] - er.active_span[0], *cyc[1:])

    @torch.no_grad()
    def fill_clones(self, skip: Collection[str] = ()) -> None:
        """Copy each clone's producer slices from its source in place (before an election: a promoted clone
        then computes what it computed as a clone); blocks named in ``skip`` (frozen ones) are left as they are."""
        self._check_live()
        for name, members in self._members.items():
            if name in skip:
                continue
            for _, m, _ in members:
                _fill(m)

    @property
    def eval_mode(self) -> str:
        m = next(iter(self._members.values()))[0][1]
        return "own_weights" if m._egg_own_weights else "as_trained"

    def module_names(self) -> list[str]:
        return [m for g in self.groups.values() for m in g.sliced]

    def export(self, model: nn.Module) -> nn.Module:
        return restore_plain_blocks(model)

    def _restore_all(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        for members in self._members.values():
            for _, m, _ in members:
                _restore(m)

    # ------------------------------------------------------------------ self-check
    @property
    def verified(self) -> frozenset[str]:
        """The blocks whose rewritten computation was checked against the plain one (with clones)."""
        return frozenset(self._verified)

    def _pending(self, scope: str) -> list[str]:
        return [
            n for n, s in self._scopes.items()
            if s == scope and n not in self._verified and self._roles[n].has_clones
        ]  # fmt: skip

    def _arm(self) -> None:
        """A forward pre-hook on the module of every block with clones not yet checked."""
        if not self.verify or self._removed:
            return
        modules = dict(self.model.named_modules())
        for scope in set(self._scopes.values()):
            if scope not in self._hooks and self._pending(scope):
                self._hooks[scope] = modules[scope].register_forward_pre_hook(
                    lambda mod, args, kwargs, scope=scope: self._on_forward(scope, mod, args, kwargs),
                    with_kwargs=True,
                )

    def _on_forward(self, scope: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _Check.running or torch._C._current_graph_task_id() != -1:  # a check's own run; a recomputation
            return
        pending = self._pending(scope)
        if pending and torch.compiler.is_compiling():
            for name in pending:
                if name not in self._warned:
                    self._warned.add(name)
                    warnings.warn(
                        f"egg_optim: output mode of block {name!r} is not verified: its first forward pass is "
                        "compiled; run one eager forward pass before torch.compile",
                        stacklevel=2,
                    )
            return
        for name in pending:
            self._verify(name, module, args, kwargs)
        if not self._pending(scope) and scope in self._hooks:
            self._hooks.pop(scope).remove()

    def _members_in(self, scope_module: nn.Module) -> list[nn.Module]:
        inside = {id(m) for m in scope_module.modules()}
        return [m for members in self._members.values() for _, m, _ in members if id(m) in inside]

    def _verify(self, name: str, scope_module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Check block ``name`` on this batch: its rewritten computation against the plain one with clones filled,
        switching from "shrink" to "expand" when only the latter matches; raise when neither does."""
        members = [m for _, m, _ in self._members[name]]
        everyone = self._members_in(scope_module)
        others = [m for m in everyone if all(m is not x for x in members)]
        training = {m: m.training for m in scope_module.modules()}

        def run(reference: bool, weights: Mapping[nn.Module, dict[str, torch.Tensor]]) -> Any:
            # the plain model with clones filled: every member in the scope plain, its producer slices filled
            # (other blocks always: only this one is tested)
            plain = everyone if reference else others
            values = {m: dict(weights.get(m, {})) for m in everyone}
            for m in plain:
                m._egg_reference = True
                for key in m._egg_keys():
                    found = m._clone_positions(key)
                    current = values[m].get(key, m._parameters.get(key))
                    if found is not None and current is not None:
                        values[m][key] = copied_positions(current, *found)
            for m in members if not reference else ():
                m._egg_reference = False
            with _random_weights(values):
                return scope_module.forward(*fresh_inputs(args), **fresh_inputs(kwargs))

        problem = None
        _Check.running = True
        try:
            scope_module.train(False)
            with torch.no_grad(), _ShapeGuard():
                probes = [{}, _random_for(self.groups[name], members)]
                # a block whose own per-head values are sliced (a position bias table) may hand them on: T5's
                tied = any(isinstance(m, _TiedMember) and m._egg_slices for m in members)
                try:
                    refs = [run(True, w) for w in probes]
                except Exception as exc:  # noqa: BLE001 - the plain computation itself failed: nothing to check
                    if name not in self._warned:
                        self._warned.add(name)
                        warnings.warn(
                            f"egg_optim: could not check output mode of block {name!r} on this batch (the plain "
                            f"block raised {type(exc).__name__}: {exc}); checking again at the next forward pass",
                            stacklevel=3,
                        )
                    return
                attempts = self._attempts(name)
                for i, (mode, resize) in enumerate(attempts):
                    self._set_mode(name, mode, resize)
                    problem = None
                    for ref, w in zip(refs, probes):
                        try:
                            out = run(False, w)
                            problem = _difference(first_tensor(ref), first_tensor(out))
                            if problem is None and (resize or tied):
                                problem = _other_outputs(ref, out)
                        except Exception as exc:  # noqa: BLE001 - a wrong reshape raises; that is the finding
                            problem = f"it raised {type(exc).__name__}: {exc}"
                        if problem is not None:
                            problem = ("with random weights, " if w else "") + problem
                            break
                    if problem is None:
                        break
                    if mode == "shrink" and attempts[i + 1 :] and attempts[i + 1][0] == "expand":
                        logger.info(
                            "egg_optim: block %r cannot compute with only its active units (%s); it computes all "
                            "of them in output mode, its producers still only the active ones",
                            name,
                            problem,
                        )
        finally:
            _Check.running = False
            for m in everyone:
                m._egg_reference = False
            for m, flag in training.items():
                m.training = flag
        if problem is not None:
            raise RewriteCheckError(
                name,
                f"output mode computes block {name!r} ({self.groups[name].kind}) differently from the plain "
                f"model with clones filled, which is what its state_dict() saves: {problem}. Use "
                f"clone_mode='weight', or leave the block out of the plan: RolePlan(exclude=[{name!r}])",
            )
        self._verified.add(name)


def _random_for(group: UnitGroup, members: list[nn.Module]) -> dict[nn.Module, dict[str, torch.Tensor]]:
    """Random values for every unit slice of ``group`` (fixed seed, unit-scale outputs): the check then does not
    depend on the current weights (a zero-initialised projection would hide a wrong reshape)."""
    gen = torch.Generator().manual_seed(0)
    out: dict[nn.Module, dict[str, torch.Tensor]] = {}
    by_name = dict(zip(group.sliced, members))
    for s in group.slices:
        m = by_name[s.module]
        p = m._parameters[s.key]
        fan_in = p.shape[0] if type(m).__name__ == "Conv1D" and p.dim() == 2 else p.shape[-1]
        std = 1.0 / max(fan_in, 1) ** 0.5 if p.dim() > 1 else 0.1
        if isinstance(m, nn.Embedding):
            std = 1.0
        value = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
        out.setdefault(m, {})[s.key] = value.to(device=p.device, dtype=p.dtype)
    return out


@contextmanager
def _random_weights(values: Mapping[nn.Module, Mapping[str, torch.Tensor]]) -> Iterator[None]:
    """Run with the parameters named in ``values`` (``{module: {key: tensor}}``) replaced by those tensors."""
    saved = {m: {k: m._parameters[k] for k in v} for m, v in values.items()}
    try:
        for m, v in values.items():
            for k, t in v.items():
                m._parameters[k] = t
        yield
    finally:
        for m, v in saved.items():
            m._parameters.update(v)


def _scope(model: nn.Module, group: UnitGroup, modules: Mapping[str, nn.Module]) -> str:
    """The module whose forward pass the self-check reruns: the block's own module, or (a block named after no
    module, BERT's ``<layer>.mlp``) the innermost module holding all its members."""
    if group.name in modules:
        return group.name
    parts = [m.split(".") for m in group.modules]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _restore(m: nn.Module) -> None:
    extra = tuple(b for b in m._buffers if b.startswith("_egg_"))
    base.restore(m, _ATTRS, _BUFFERS + extra)


@torch.no_grad()
def restore_plain_blocks(model: nn.Module) -> nn.Module:
    """Give every block member in ``model`` (typically a copy) its original class, with each clone's producer
    slices filled from its source, so the plain modules compute what output mode computed. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, _Member):
            _fill(m)
            _restore(m)
    return model


def _fill(m: _Member) -> None:
    for key in m._egg_keys():
        found = m._clone_positions(key)
        if found is not None:
            dim, clones, sources = found
            copy_positions_(getattr(m, key), dim, clones, sources)  # FSDP2: rows on any rank
