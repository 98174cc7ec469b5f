"""Units that span several modules: the hidden neurons of a transformer MLP, attention heads, MoE experts.

An MLP neuron owns its rows in the up (and gate) projection and its column in the down projection; an attention
head owns its ``head_dim`` rows in the query, key and value projections, its ``head_dim`` columns in the output
projection and its column of a per-head bias table (T5's relative attention bias). With grouped-query attention a
unit is one key/value head with the query heads that share it. In a mixture of experts (the fused 3-D
``gate_up_proj`` / ``down_proj`` of transformers 5) a unit is one hidden neuron of one expert. Each owned tensor is
described by its unit axis (a dimension, or two taken together: :mod:`egg_optim.core.axes`) and an index
``[num_units, k]`` of the positions each unit owns along it (see :meth:`Roles.expand`), so masking, cloning and
compact storage treat these units exactly like rows.

Blocks are found by **structure**, never by child names, so a new architecture needs no table entry:

* the numbers come from the module or its config: ``num_attention_heads`` / ``num_heads`` / ``n_head``,
  ``num_key_value_heads`` (or ``num_key_value_groups``, ``multi_query``), ``head_dim``; the model's hidden size
  (``hidden_size``, ``d_model``, ``n_embd``, ``dim``);
* an attention block is a module whose Linear layers (its children, or its grandchildren through non-list
  children: BERT's ``attention.self.query`` and ``attention.output.dense``) are projections reading the hidden
  states into ``heads x head_dim`` query rows and ``kv_heads x head_dim`` key and value rows (three Linears, or one
  fused Linear of ``(heads + 2 kv_heads) x head_dim`` rows, or a query of ``2 x heads x head_dim`` rows whose second
  half gates each head's output: Qwen3-Next), and one projection reading ``heads x head_dim`` back into the hidden
  states; any other parameter of the module with one entry or column per head goes with its head (T5's and Swin's
  relative position tables, GPT-OSS's attention sinks); or multi-head latent attention (DeepSeek-V2/V3, MiniCPM3),
  whose sizes the config gives (``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``, ``kv_lora_rank``):
  projections down into latents shared by every head (members of the block, no unit's) and up from them into
  per-head rows (:func:`_latent`); or linear attention by the gated delta rule (Qwen3-Next, Qwen3.5), whose sizes
  the module gives (``num_k_heads``, ``num_v_heads``, ``head_k_dim``, ``head_v_dim``): a unit is one key head with
  the value heads that read it, its channels of the depthwise convolution included (:func:`_gated_delta`); or Kimi
  Delta Attention, one head per unit beside the shared down projections of its low-rank gates (:func:`_delta_heads`);
  or a Mamba-2 mixer, one group of heads per unit (:func:`_mamba2`);
* an MLP is a module whose Linears are one or two projections from the hidden states to the same width (up; gate
  and up, whose outputs meet in an elementwise product), or one fused projection to twice that width (Phi3's
  ``gate_up_proj``), and one projection reading that width back into the hidden states;
* routed experts are a module holding two 3-D parameters ``[experts, 2 x inner, hidden]`` and
  ``[experts, hidden, inner]`` (or both transposed), and a ``[experts, 2 x inner]`` gate/up bias if any; a Linear
  beside them with one output per expert is their router: no unit, left alone by a default plan.

Where shapes are ambiguous (a projection as wide as the hidden states), the projection registered last reads the
units. Then one forward pass of the model on its dummy inputs (a transformers model has them) checks the units by
dataflow (:mod:`egg_optim.core.probe`): changing one unit's rows must change only that unit's columns of the
consumer's input. It settles the layout of a fused qkv projection (``[q | k | v]`` blocks, GPT-2 and Phi3, or per
head / key-value group interleaved, GPT-NeoX, BLOOM and Falcon), of a gated query, and of experts' gate and up
(``[gate | up]``, or interleaved: GPT-OSS; experts are checked by ablation, having no consumer module), and it
leaves alone a block whose units are not computed apart (a norm or a mix across heads or neurons that the structure
does not show). Residual-stream projections (the attention output and MLP down projections) are part of their block;
a module that looks like a block but cannot be decomposed is reported (:class:`Skipped`) and its layers are left
alone rather than managed as rows, unless a plan names them.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from .axes import Axis

KINDS = ("mlp", "attention", "experts")
UNIT_NAMES = {"mlp": "neurons", "attention": "units", "experts": "expert neurons"}
logger = logging.getLogger("egg_optim")


@dataclass(frozen=True)
class UnitSlice:
    """The positions of every unit in one parameter: along ``dim``, unit ``u`` owns ``index[u]``."""

    param: str  # qualified parameter name
    dim: Axis  # the unit axis: a dimension, or two taken together (:mod:`egg_optim.core.axes`)
    index: torch.Tensor  # [num_units, k]
    # "producer": the positions compute the unit (a clone takes its source's); "consumer": they read the unit (a
    # clone keeps its own, frozen)
    role: str = "producer"

    @property
    def module(self) -> str:
        return self.param.rpartition(".")[0]

    @property
    def key(self) -> str:
        return self.param.rpartition(".")[2]


@dataclass
class UnitGroup:
    """One MLP, attention or experts block whose units span several modules (or several parameters)."""

    name: str  # the block's qualified name (a module, or ``<layer>.mlp`` where the MLP has no module of its own)
    kind: str  # "mlp" | "attention" | "experts"
    num_units: int
    slices: list[UnitSlice] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)  # modules whose outputs are the units (rows)
    consumer: str | None = None  # the module that reads the units (columns): down / output projection
    heads_per_unit: int = 1  # attention: query heads per unit (GQA group size)
    head_dim: int = 1
    layout: str = ""  # how a fused projection holds its units ("blocked", "interleaved"; "(assumed)" if not probed)
    probed: bool = False  # its units were seen computed apart on the model's dummy inputs (not only by structure)
    inexact: str = ""  # why a clone there does not compute what its source does (per-head values outside its slices)
    # members that compute for every unit (latent attention's down projections): no unit's slices, left as they are,
    # but part of the block, so that they become no rows of a plan
    shared: list[str] = field(default_factory=list)
    # attributes of the block's module that count its units' widths, per unit (the gated delta net's ``key_dim``,
    # ``conv_dim``...; an attention's stored head count or fused split: ``num_heads``, ``split_size``): output mode
    # sets them to the active units' for a forward pass on those only
    sizes: dict[str, int] = field(default_factory=dict)
    # whether setting ``sizes`` is only tried where the block does not compute on its active units without it (an
    # attention's stored counts, which its code may not read); linear attention always needs them
    sizes_optional: bool = False
    # equal runs of units that each take the same share of every role, a clone's source in its own run: the
    # experts of fused MoE weights (one run of neurons per expert), none of which may become a copy of one neuron
    parts: int = 1

    @property
    def sliced(self) -> list[str]:
        """The members holding unit slices: producers, consumer, then any other (a per-head bias table)."""
        out = [*self.producers, *([self.consumer] if self.consumer else [])]
        extra = [s.module for s in self.slices if s.module not in out]
        return out + list(dict.fromkeys(extra))

    @property
    def modules(self) -> list[str]:
        """Every member: the sliced ones, then the shared ones."""
        return self.sliced + [m for m in self.shared if m not in self.sliced]


@dataclass(frozen=True)
class Skipped:
    """A module that looks like a transformer block but could not be decomposed into units: why, and its layers
    (left alone: neither block units nor rows, unless a plan names them)."""

    name: str
    kind: str
    reason: str
    members: tuple[str, ...]
    final: bool = False  # the members are what the module computes with (no module further up may claim them)


@dataclass
class Discovery:
    """What :func:`discover` found: the blocks (by name), the look-alikes it could not decompose and the routers of
    mixtures of experts (``{router layer: experts}``: a Linear scoring the experts, no unit of its own)."""

    groups: dict[str, UnitGroup] = field(default_factory=dict)
    skipped: dict[str, Skipped] = field(default_factory=dict)
    routers: dict[str, str] = field(default_factory=dict)
    # Linear / ConvNd layers whose output the model returned on the probe's forward pass (output heads: CLIP's two
    # projections), in registration order; empty where the probe did not run
    outputs: tuple[str, ...] = ()
    # Linear / ConvNd layers whose weight the model computed with on that pass without calling the layer (Mamba's
    # ``dt_proj``): output mode cannot give their clones their sources' outputs
    read_directly: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- layers
def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D``: a Linear with a transposed ``[in, out]`` weight (GPT-2)."""
    named = any(c.__name__ == "Conv1D" for c in type(m).__mro__)  # also under a rewrite's class swap
    return named and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _out(m: nn.Module) -> int:
    return m.nf if _is_conv1d(m) else m.out_features


def _in(m: nn.Module) -> int:
    return m.weight.shape[0] if _is_conv1d(m) else m.in_features


def _linear(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or (m is not None and _is_conv1d(m))


def _rows(n_units: int, per_unit: int) -> torch.Tensor:
    return torch.arange(n_units * per_unit).reshape(n_units, per_unit)


def _producer_slices(prefix: str, m: nn.Module, index: torch.Tensor) -> list[UnitSlice]:
    """A module whose output positions are the units: rows of a Linear weight, columns of a Conv1D one."""
    out = [UnitSlice(f"{prefix}.weight", 1 if _is_conv1d(m) else 0, index)]
    if getattr(m, "bias", None) is not None:
        out.append(UnitSlice(f"{prefix}.bias", 0, index))
    return out


def _consumer_slice(prefix: str, m: nn.Module, index: torch.Tensor) -> UnitSlice:
    """A module whose input positions are the units: columns of a Linear weight, rows of a Conv1D one."""
    return UnitSlice(f"{prefix}.weight", 0 if _is_conv1d(m) else 1, index, "consumer")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_ACTIVATIONS = ("act", "gelu", "relu", "silu", "swish", "tanh", "sigmoid", "mish", "glu")


def _is_activation(m: nn.Module) -> bool:
    return type(m).__module__ == "torch.nn.modules.activation" or any(
        a in type(m).__name__.lower() for a in _ACTIVATIONS
    )


# ---------------------------------------------------------------------------------------------- numbers
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "attention_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv")
_HEAD_DIM = ("head_dim", "head_size", "attention_head_size", "key_value_proj_dim", "d_kv")
_HIDDEN = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim")


def _int(obj: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(obj, n, None) if obj is not None else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _configs(obj: Any) -> Iterator[Any]:
    """A config and the configs inside it (``text_config``, ``encoder``, ``decoder``...)."""
    if obj is None:
        return
    yield obj
    for key, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
        if key.endswith("config") and hasattr(value, "to_dict") and value is not obj:
            yield from _configs(value)


def _hidden_sizes(model: nn.Module) -> set[int]:
    """Every hidden size any config in ``model`` declares (empty for a model without configs)."""
    sizes: set[int] = set()
    seen: set[int] = set()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is None or id(cfg) in seen or isinstance(cfg, (int, float, str, Mapping)):
            continue
        seen.add(id(cfg))
        for c in _configs(cfg):
            for key in _HIDDEN:
                v = _int(c, (key,))
                if v:
                    sizes.add(v)
            stages = getattr(c, "hidden_sizes", None)  # a hierarchical model's width per stage (ConvNeXt, SegFormer)
            if isinstance(stages, (list, tuple)):
                sizes.update(v for v in stages if isinstance(v, int) and not isinstance(v, bool) and v > 0)
    return sizes


def _sources(module: nn.Module, root_config: Any) -> list[Any]:
    """Where an attention module's numbers are read, first first: the module, its config, its children (BERT's
    ``attention.self``) and theirs, the model's configs."""
    children = [c for c in module.children() if not _linear(c)]
    sources = [module, getattr(module, "config", None), *children]
    sources += [getattr(c, "config", None) for c in children]
    sources += list(_configs(root_config))
    return [s for s in sources if s is not None]


def _nearest_configs(modules: list[tuple[str, nn.Module]], root_config: Any) -> dict[str, Any]:
    """Per module, the config of the nearest module around it (itself included) that holds one: a vision-language
    model's vision tower reads its head counts from the vision config, not from the text config's grouped-query
    key/value heads that ``root_config`` lists first."""
    out: dict[str, Any] = {}
    for name, module in modules:  # parents before children
        own = getattr(module, "config", None)
        out[name] = own if hasattr(own, "to_dict") else out.get(name.rpartition(".")[0], root_config)
    return out


def _heads(module: nn.Module, root_config: Any) -> tuple[int | None, int | None, int | None]:
    """(query heads, key/value heads, head_dim) as the module, its config, its children (BERT's ``attention.self``)
    or ``root_config`` (the nearest config around it: :func:`_nearest_configs`) say."""
    sources = _sources(module, root_config)

    def first(names: tuple[str, ...]) -> int | None:
        return next((v for s in sources if (v := _int(s, names))), None)

    heads, kv, head_dim = first(_HEADS), first(_KV_HEADS), first(_HEAD_DIM)
    if kv is None and heads:
        groups = first(("num_key_value_groups",))
        if groups and heads % groups == 0:
            kv = heads // groups
        elif any(getattr(s, "multi_query", False) is True for s in sources[:2]):
            kv = 1
    return heads, kv or heads, head_dim


# a head count of another name (the gated delta net of Qwen3-Next and Qwen3.5) still marks an attention module
_SIGNAL = _HEADS + _KV_HEADS + _HEAD_DIM + ("num_key_value_groups", "num_v_heads", "num_k_heads")


def _looks_like_attention(prefix: str, module: nn.Module, claimed: Mapping[str, str]) -> bool:
    """Whether the module carries a head count or size, or a child of it that holds unclaimed projections does
    (BERT's ``attention.self``; not a decoder layer whose attention is already a block)."""
    if _int(module, _SIGNAL):
        return True
    return any(
        _int(c, _SIGNAL)
        and any(_linear(g) and _join(_join(prefix, n), gn) not in claimed for gn, g in c.named_children())
        for n, c in module.named_children()
        if not _linear(c)
    )


# ---------------------------------------------------------------------------------------------- discovery
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Discovery]] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    """Names and shapes of every parameter (not module classes: a rewrite swaps them and changes nothing here)."""
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False))


def discover(model: nn.Module, *, probe: bool = True, inputs: Any = None) -> Discovery:
    """Every transformer MLP, attention and experts block of ``model`` (by name), the modules that look like one but
    could not be decomposed, and the routers of experts. ``probe``: check the blocks by dataflow on one forward pass
    of the model's dummy inputs, or of ``inputs`` (:mod:`egg_optim.core.probe`: layouts, blocks that mix their
    units; otherwise the structure alone decides and ``[q | k | v]`` blocks are assumed). Cached per model until its
    structure changes; ``inputs`` discover it anew."""
    key = _fingerprint(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key and inputs is None:
        return hit[1]
    found = Discovery()
    claimed: dict[str, str] = {}
    root_config = getattr(model, "config", None)
    hidden = _hidden_sizes(model)
    modules = list(model.named_modules())
    by_depth = sorted(modules, key=lambda nm: -nm[0].count(".") if nm[0] else 1)
    configs = _nearest_configs(modules, root_config)
    failed: dict[str, Skipped] = {}  # tentative: a module further up, or the MLP pass, may still claim them
    for kind in ("attention", "experts", "mlp"):
        for prefix, module in by_depth:
            for item in _match(kind, prefix, module, claimed, configs[prefix], hidden, bool(found.groups)):
                if isinstance(item, Skipped) and item.final:
                    found.skipped[item.name] = item
                    claimed.update(dict.fromkeys(item.members, item.name))
                    continue
                if isinstance(item, Skipped):
                    failed.setdefault(item.name, item)
                    continue
                found.groups[item.name] = item
                for m in item.modules:
                    claimed[m] = item.name
    named = dict(modules)
    for item in failed.values():  # attention look-alikes first, deepest first: they were tried so
        members = tuple(m for m in item.members if m not in claimed)
        # an attention of its own (a head count) with projections of its own beside a look-alike (Kimi-Linear's
        # gate): both are left alone; a layer around a look-alike whose head count is only the look-alike's is
        # no attention (Gemma 3n's layers around a key/value-sharing one: their other projections are layers)
        own = _int(named[item.name], _SIGNAL) and any(m.rpartition(".")[0] == item.name for m in members)
        if not own and any(n.startswith(f"{item.name}.") for n in found.skipped):
            continue
        if members:
            found.skipped[item.name] = Skipped(item.name, item.kind, item.reason, members)
            for m in members:
                claimed[m] = item.name
    found.routers = _routers(modules, claimed)
    if probe:
        from .probe import probe_blocks  # (the probe reads this module's groups and layouts)

        probe_blocks(model, found, inputs)
    order = {n: i for i, (n, _) in enumerate(modules)}
    first = {g: min(order.get(m, len(order)) for m in g_.modules) for g, g_ in found.groups.items()}
    found.groups = dict(sorted(found.groups.items(), key=lambda kv: first[kv[0]]))
    _CACHE[model] = (key, found)
    return found


def find_unit_groups(model: nn.Module) -> dict[str, UnitGroup]:
    """Every transformer MLP, attention and experts block of ``model`` whose units span several modules, by name.
    Raises :class:`PlanError` for a module that looks like a block but cannot be decomposed (see :func:`discover`
    for the lenient form)."""
    found = discover(model)
    if found.skipped:
        s = next(iter(found.skipped.values()))
        raise PlanError(s.reason)
    return dict(found.groups)


def _linears(prefix: str, module: nn.Module, claimed: Mapping[str, str]) -> list[tuple[str, nn.Module]]:
    """The unclaimed Linear layers of ``module``: its children, and its grandchildren through children that are
    neither layers nor lists of layers, in registration order."""
    out = []
    for n, c in module.named_children():
        name = _join(prefix, n)
        if _linear(c):
            out.append((name, c))
        elif not isinstance(c, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            out += [(_join(name, g), gc) for g, gc in c.named_children() if _linear(gc)]
    return [(n, m) for n, m in out if n not in claimed]


def _has_activation(module: nn.Module) -> bool:
    return any(_is_activation(c) for c in module.children()) or any(
        _is_activation(g) for c in module.children() if not _linear(c) for g in c.children()
    )


def _match(
    kind: str,
    prefix: str,
    module: nn.Module,
    claimed: Mapping[str, str],
    root_config: Any,
    hidden: set[int],
    transformer: bool,
) -> Iterator[UnitGroup | Skipped]:
    if kind == "experts":
        yield from _experts(prefix, module)
        return
    lins = _linears(prefix, module, claimed)
    if len(lins) < 2:
        return
    if kind == "attention":
        yield from _attention(prefix, module, lins, root_config, claimed)
    elif not _looks_like_attention(prefix, module, claimed):
        yield from _mlp(prefix, module, lins, hidden, transformer)


# ---------------------------------------------------------------------------------------------- attention
def _attention(
    prefix: str, module: nn.Module, lins: list[tuple[str, nn.Module]], root_config: Any, claimed: Mapping[str, str]
) -> Iterator[UnitGroup | Skipped]:
    if not _looks_like_attention(prefix, module, claimed):
        return  # no head count or size of its own: not an attention module
    names = [n for n, _ in lins]

    def skip(reason: str, final: bool = False) -> Skipped:
        why = f"attention {prefix!r}: {reason}; its projections are left alone (manage them with units='layers', or "
        return Skipped(prefix, "attention", why + "name them in RolePlan(layers=[...]))", tuple(names), final)

    delta = _gated_delta(prefix, module, lins) or _delta_heads(prefix, module, lins) or _mamba2(prefix, module, lins)
    if delta is not None:
        yield delta if isinstance(delta, UnitGroup) else skip(delta)
        return
    heads, kv, head_dim = _heads(module, root_config)

    if heads is None:
        yield skip("cannot tell its number of heads")
        return
    latent = _latent(prefix, lins, heads, _sources(module, root_config))
    if latent is not None:
        yield latent
        return
    widths = [(n, m, _in(m), _out(m)) for n, m in lins]
    # the output projection reads heads x head_dim and writes what the others read: the last such one
    candidates = []
    for n, m, i, o in widths:
        readers = [x for x in widths if x[0] != n and x[2] == o]
        if head_dim and i != heads * head_dim:
            continue
        if i % heads == 0 and readers:
            candidates.append((n, m, i, o))
    if not candidates:
        yield skip(f"no projection reads its {heads} heads back into the hidden states")
        return
    o_name, o_mod, q_width, hidden = candidates[-1]
    head_dim = head_dim or q_width // heads
    if q_width != heads * head_dim or heads % kv:
        yield skip(f"{heads} heads / {kv} key-value heads of size {head_dim} do not make its output projection's "
                   f"{q_width} inputs")  # fmt: skip
        return
    rep = heads // kv
    producers = [(n, m, o) for n, m, i, o in widths if n != o_name and i == hidden]
    others = [n for n, _, i, _ in widths if n != o_name and i != hidden]
    q_rows, kv_rows = heads * head_dim, kv * head_dim
    q_index, kv_index = _rows(kv, rep * head_dim), _rows(kv, head_dim)
    slices: list[UnitSlice] = []
    layout = ""
    if others:
        yield skip(f"projections {others} read neither the hidden states nor its heads")
        return
    # a norm over a whole projection (OLMo-2's q_norm and k_norm with grouped heads: one statistic over every head)
    # couples the heads: changing one head's rows rescales the others, so no head is a unit of its own. A norm as
    # wide as the hidden states may as well be the block's pre- or post-norm (ESM, ALBERT): the dataflow probe
    # decides those, and norms beside projections that are not its children (a decoder layer's residual norms)
    projections = {id(m) for _, m in lins}
    direct = projections <= {id(c) for c in module.children()}
    spanning = [
        _join(prefix, n)
        for n, c in module.named_children()
        if direct
        and id(c) not in projections
        and isinstance(w := getattr(c, "weight", None), torch.Tensor)
        and w.dim() == 1
        and w.numel() in (q_rows, kv_rows)
        and head_dim < w.numel() != hidden
    ]
    if spanning:
        yield skip(f"norms {spanning} normalise across all of its heads, so no head is a unit of its own", final=True)
        return
    if len(producers) == 3 and sorted(o for *_, o in producers) == sorted([q_rows, kv_rows, kv_rows]):
        q = next(p for p in producers if p[2] == q_rows)  # with as many key/value heads as heads, any order works
        for n, m, _ in producers:
            slices += _producer_slices(n, m, q_index if (n, m, _) == q else kv_index)
    elif len(producers) == 3 and sorted(o for *_, o in producers) == sorted([2 * q_rows, kv_rows, kv_rows]):
        # a gated query (Qwen3-Next, Qwen3.5): each head's query rows and the rows of the gate on its output. The
        # gated projection goes first: the probe settles its layout as it does a fused projection's
        gated = next(p for p in producers if p[2] == 2 * q_rows)
        producers = [gated, *(p for p in producers if p is not gated)]
        for n, m, o in producers:
            slices += _producer_slices(
                n, m, _gated_index("interleaved", kv, rep, head_dim) if o > kv_rows else kv_index
            )
        layout = "gated q, interleaved (assumed)"
    elif len(producers) == 1 and producers[0][2] == q_rows + 2 * kv_rows:
        n, m, _ = producers[0]
        slices += _producer_slices(n, m, _fused_index("blocked", kv, rep, head_dim))
        layout = "blocked (assumed)"
    elif len(producers) == 1 and producers[0][2] == q_rows:
        yield skip(f"it projects only queries ({producers[0][0]!r}): its keys and values are another layer's (a "
                   "shared key/value cache, Gemma 3n's), whose heads are no units of this block")  # fmt: skip
        return
    else:
        yield skip(f"its projections from the hidden states {[(n, o) for n, _, o in producers]} are not q/k/v of "
                   f"{heads} heads / {kv} key-value heads of size {head_dim} (separate, one fused, or with a gated "
                   "query)")  # fmt: skip
        return
    slices.append(_consumer_slice(o_name, o_mod, q_index))
    head_index = torch.arange(heads).reshape(kv, rep)
    # an MLP computing one value per head from no hidden states (Swin V2's continuous position bias, from relative
    # coordinates): its last layer's rows go with their heads, the layers before it compute for every head (shared)
    biases, shared = [], []
    for n, c in module.named_modules():
        chain = [(_join(prefix, f"{n}.{k}"), m) for k, m in c.named_children() if _linear(m)]
        if (
            isinstance(c, nn.Sequential)
            and chain
            and _out(chain[-1][1]) == heads
            and _in(chain[0][1]) != hidden
            and all(_in(b) == _out(a) for (_, a), (_, b) in zip(chain, chain[1:]))
            and not any(x in claimed for x, _ in chain)
        ):
            slices += _producer_slices(*chain[-1], head_index)
            biases.append(chain[-1][0])
            shared += [x for x, _ in chain[:-1]]
    # per-head values go with their head: a table with one column per head (T5's relative attention bias, Swin's
    # relative position bias table), one value per head (GPT-OSS's attention sinks, Swin V2's logit scales)
    members = {*(n for n, _ in lins), *biases, *shared}
    owned = {id(p) for n, m in module.named_modules() if _join(prefix, n) in members for p in m.parameters()}
    for n, p in module.named_parameters():
        if heads > 1 and id(p) not in owned and p.dim() in (1, 2) and p.shape[-1] == heads:
            slices.append(UnitSlice(_join(prefix, n), p.dim() - 1, head_index))
        elif heads > 1 and id(p) not in owned and p.numel() == heads:  # a shape [heads, 1, 1]: one dim of the heads
            slices.append(UnitSlice(_join(prefix, n), list(p.shape).index(heads), head_index))
    sizes = _stored_widths(module, kv, rep, head_dim)
    yield UnitGroup(prefix, "attention", kv, slices, [n for n, _, _ in producers] + biases, o_name, rep, head_dim,
                    layout, sizes=sizes, sizes_optional=True, shared=shared)  # fmt: skip


# an attribute holding a head count: ``num_heads``, ``n_head``, ``num_key_value_heads``, ``num_kv_heads``, ``kv_heads``
_HEAD_COUNT = re.compile(r"(^|_)(n|num)(_\w+)?_heads?$|^(kv|q|query)_heads$")


def _stored_widths(module: nn.Module, units: int, rep: int, head_dim: int) -> dict[str, int]:
    """The integer attributes of an attention module (or of a module inside it that is no projection: DeBERTa's
    ``self``, keyed ``"self.num_attention_heads"``; head counts only, of the config it holds: Phi3's
    ``"config.num_attention_heads"``, which output mode overrides for the module alone) that store its head counts (by
    name: ``num_heads``, ``num_kv_heads``..., ``rep`` or one per unit) or its widths (``*_dim`` / ``*_size``:
    ``embed_dim``, ``split_size``, ``inner_dim``, ``all_head_size``; ``head_dim`` or ``rep x head_dim`` per unit), per
    unit: code that reshapes by them, or splits a fused projection at them (GPT-2, OPT, DeBERTa), computes on the active
    units when they are set to the active units' (which the self-check tries). Names decide, never a value alone: a
    layer index or a window can equal a multiple of the heads."""
    inner = [("", module)] + [
        (f"{n}.", c)
        for n, c in module.named_children()
        if not _linear(c) and not isinstance(c, (nn.ModuleList, nn.ModuleDict, nn.Sequential))
    ]
    out = {}
    for path, m in inner:
        for k, v in vars(m).items():
            if type(v) is not int or v <= 0 or v % units or k in ("head_dim", "head_size"):
                continue
            per = v // units
            if (_HEAD_COUNT.search(k) and per in (1, rep)) or (
                k.endswith(("_dim", "_size")) and per in (head_dim, rep * head_dim)
            ):
                out[path + k] = per
    config = vars(module).get("config")  # head counts its code reads from the model's config (Phi3)
    if config is not None and not isinstance(config, (nn.Module, torch.Tensor)):
        for k, v in vars(config).items():
            if type(v) is int and v > 0 and v % units == 0 and _HEAD_COUNT.search(k) and v // units in (1, rep):
                out[f"config.{k}"] = v // units
    return out


# multi-head latent attention's sizes: per head, the query/key rows without and with rotary embedding and the value
# rows; the width of the key/value latent (its query latent's, q_lora_rank, is read off the structure: none in
# DeepSeek-V2-Lite)
_LATENT = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")


def _latent(prefix: str, lins: list[tuple[str, nn.Module]], heads: int, sources: list[Any]) -> UnitGroup | None:
    """Multi-head latent attention (MLA: DeepSeek-V2/V3, Kimi-K2, MiniCPM3, Mistral 4), where the module or its
    config gives its sizes: the hidden states go down into a key/value latent and one rotary key all heads share
    (``kv_lora_rank + qk_rope_head_dim`` outputs) and, optionally, into a query latent (each latent with a norm);
    up projections read the latents (or the hidden states: a plain query projection) into per-head rows, ``[q_nope
    | q_rope]`` and ``[k_nope | v]`` for each head in turn; the output projection reads ``v_head_dim`` columns per
    head. A unit is one head: its query rows, its key/value rows and its output columns. The down projections (and
    their norms) compute for every head, like a router: members of the block (``shared``), no unit's, left as they
    are. ``None`` where the numbers or the projections are not these (the other attention paths then decide)."""
    nope, rope, v, rank = (next((x for s in sources if (x := _int(s, (n,)))), None) for n in _LATENT)
    if not (nope and rope and v and rank):
        return None
    widths = [(n, m, _in(m), _out(m)) for n, m in lins]
    # the output projection reads every head's values into what the down projections read: the last such one
    outs = [x for x in widths if x[2] == heads * v and any(y[2] == x[3] for y in widths if y is not x)]
    if not outs:
        return None
    o = outs[-1]
    hidden, rest = o[3], [x for x in widths if x is not o]
    kv = next((x for x in reversed(rest) if x[2] == rank and x[3] == heads * (nope + v)), None)
    q = next((x for x in rest if x is not kv and x[3] == heads * (nope + rope)), None)
    if kv is None or q is None:
        return None
    downs = [x for x in rest if x is not kv and x is not q]
    # a gate on each head's output (Bailing's g_proj: one value per head, or per value): rows per head
    gates = [x for x in downs if x[2] == hidden and x[3] in (heads, heads * v) and x[3] not in (rank + rope, q[2])]
    downs = [x for x in downs if x not in gates]
    if (len(downs) == 1) != (q[2] == hidden) or any(x[2] != hidden for x in downs):
        return None
    # the latents: key/value (with the shared rotary key) and, where the query reads no hidden states, the query's
    if sorted(x[3] for x in downs) != sorted([rank + rope, *([q[2]] if len(downs) == 2 else [])]):
        return None
    slices = _producer_slices(q[0], q[1], _rows(heads, nope + rope))
    slices += _producer_slices(kv[0], kv[1], _rows(heads, nope + v))
    slices += [s for n, m, _, out in gates for s in _producer_slices(n, m, _rows(heads, out // heads))]
    slices.append(_consumer_slice(o[0], o[1], _rows(heads, v)))
    producers = [q[0], kv[0], *(x[0] for x in gates)]
    return UnitGroup(prefix, "attention", heads, slices, producers, o[0], 1, v, shared=[x[0] for x in downs])


# linear attention's sizes (the gated delta net): key heads, which the queries share, value heads, and their widths
_DELTA = ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim")


def _gated_delta(prefix: str, module: nn.Module, lins: list[tuple[str, nn.Module]]) -> UnitGroup | str | None:
    """Linear attention by the gated delta rule (Qwen3-Next, Qwen3.5, OLMo hybrid), where the module gives its
    sizes. Each query and key head serves ``num_v_heads // num_k_heads`` value heads with a state of its own, so a
    unit is one key head with the value heads that read it: its query, key and value rows of the input projections
    (``[q | k | v]`` blocks, per key head ``[q | k | v | z]`` fused with the output gate, or each its own
    projection), its channels of the depthwise causal convolution over ``[q | k | v]``, its value heads' gate rows
    (``z``), beta and decay rows and per-head values (``A_log``, ``dt_bias``), and its output columns. The gated
    norm within each head is shared by all. ``None`` where the module gives no such sizes; why not, where it does
    but its projections are not these."""
    hk, hv, dk, dv = (_int(module, (n,)) for n in _DELTA)
    if not (hk and hv and dk and dv) or hv % hk:
        return None
    r, qk, val = hv // hk, hk * dk, hv * dv
    qkv = torch.cat([_rows(hk, dk), _rows(hk, dk) + qk, _rows(hk, r * dv) + 2 * qk], dim=1)  # [q | k | v] blocks
    own = {qk: _rows(hk, dk), val: _rows(hk, r * dv), hv: _rows(hk, r)}  # each its own rows (equal widths: equal)
    layouts = {  # the output widths of the input projections, and each one's rows per unit by its width
        "gated delta net, [q | k | v] blocks": (  # Qwen3.5: qkv, z, b, a
            [2 * qk + val, val, hv, hv],
            {**own, 2 * qk + val: qkv},
        ),
        "gated delta net, per key head [q | k | v | z]": (  # Qwen3-Next: per key head [q | k | v | z], [b | a]
            [2 * qk + 2 * val, 2 * hv],
            {2 * qk + 2 * val: _rows(hk, 2 * dk + 2 * r * dv), 2 * hv: _rows(hk, 2 * r)},
        ),
        "gated delta net, separate q, k, v": ([qk, qk, val, val, hv, hv], own),  # OLMo hybrid: q, k, v, a, b, g
    }
    widths = [(n, m, _in(m), _out(m)) for n, m in lins]
    found = []  # the output projection reads every value head back into what the input projections read
    for o in widths:
        producers = [x for x in widths if x is not o]
        if o[2] == val and all(i == o[3] for _, _, i, _ in producers):
            outs = sorted(x[3] for x in producers)
            found += [(o, producers, layout) for layout, (want, _) in layouts.items() if outs == sorted(want)]
    if len(found) > 1:
        return (f"its output projection cannot be told from its input projections by their shapes ({hv} value heads "
                f"of {dv} make the hidden size)")  # fmt: skip
    if not found:
        return (f"its projections {[(n, i, o) for n, _, i, o in widths]} (name, inputs, outputs) are not those of a "
                f"gated delta net of {hk} key heads of {dk} and {hv} value heads of {dv}")  # fmt: skip
    (o_name, o_mod, _, _), producers, layout = found[0]
    index = layouts[layout][1]
    slices = [s for n, m, _, o in producers for s in _producer_slices(n, m, index[o])]
    for n, c in module.named_children():  # the depthwise causal convolution over [q | k | v]
        if isinstance(c, nn.Conv1d):
            if not c.in_channels == c.out_channels == c.groups == 2 * qk + val:
                return f"its convolution {n!r} is not one filter per query, key and value channel"
            slices += [UnitSlice(_join(prefix, f"{n}.{k}"), 0, qkv) for k, _ in c.named_parameters()]
    for n, p in module.named_parameters(recurse=False):  # one value per value head (A_log, dt_bias)
        if p.dim() == 1 and p.numel() == hv:
            slices.append(UnitSlice(_join(prefix, n), 0, _rows(hk, r)))
    slices.append(_consumer_slice(o_name, o_mod, _rows(hk, r * dv)))
    per_unit = {"num_k_heads": 1, "num_v_heads": r, "key_dim": dk, "value_dim": r * dv, "conv_dim": 2 * dk + r * dv}
    sizes = {k: n for k, n in per_unit.items() if _int(module, (k,)) == n * hk}
    return UnitGroup(prefix, "attention", hk, slices, [n for n, *_ in producers], o_name, r, dv, layout, sizes=sizes)


def _delta_heads(prefix: str, module: nn.Module, lins: list[tuple[str, nn.Module]]) -> UnitGroup | str | None:
    """Linear attention whose queries, keys and values have one head count and a gate per channel (Kimi Delta
    Attention: Kimi-Linear, Bailing hybrid), where the module gives ``num_heads`` and ``head_dim`` and holds a
    depthwise causal convolution over ``[q | k | v]``: a unit is one head, its rows of the q, k and v projections,
    of its gates (or of their up projections, where they are low-rank) and of the beta projection, its channels of
    the convolution, its entries of per-channel or per-head values (``dt_bias``, ``A_log``, also in a gate module),
    and its output columns. The gates' down projections compute for every head (``shared``). ``None`` where the
    module is not such; why not, where it looks like one but its projections do not fit."""
    heads, d = _int(module, ("num_heads",)), _int(module, ("head_dim",))
    convs = [(n, c) for n, c in module.named_children() if isinstance(c, nn.Conv1d)]
    if not (heads and d) or len(convs) != 1 or convs[0][1].groups != convs[0][1].in_channels:
        return None
    width, (cname, conv) = heads * d, convs[0]
    if not conv.in_channels == conv.out_channels == 3 * width:  # (a state-space mixer's: not this kind)
        return None
    widths = [(n, m, _in(m), _out(m)) for n, m in lins]
    found = []  # the output projection reads every head into what q, k and v read
    for o in widths:
        rest = [x for x in widths if x is not o]
        full = [x for x in rest if x[2] == o[3] and x[3] == width]  # q, k, v and any full-rank gates
        if o[2] == width and len(full) >= 3:
            found.append((o, rest))
    if len(found) != 1:
        return f"its output projection cannot be told from its input projections by their shapes ({heads} heads of {d})"
    (o_name, o_mod, _, hidden), rest = found[0]
    downs = [x for x in rest if x[2] == hidden and x[3] not in (width, heads)]
    ups = [x for x in rest if x[3] == width and any(x[2] == y[3] for y in downs)]
    rows = [x for x in rest if x[2] == hidden and x[3] in (width, heads)]
    if len(rows) + len(ups) + len(downs) != len(rest) or not any(x[3] == heads for x in rows):
        return (f"its projections {[(n, i, o) for n, _, i, o in widths]} (name, inputs, outputs) are not q, k, v, "
                f"beta and low-rank gates of {heads} heads of {d}")  # fmt: skip
    slices = [s for n, m, _, o in rows + ups for s in _producer_slices(n, m, _rows(heads, o // heads))]
    qkv = torch.cat([_rows(heads, d), _rows(heads, d) + width, _rows(heads, d) + 2 * width], dim=1)
    slices += [UnitSlice(_join(prefix, f"{cname}.{k}"), 0, qkv) for k, _ in conv.named_parameters()]
    owned = {id(p) for _, m in lins for p in m.parameters()} | {id(p) for p in conv.parameters()}
    for n, p in module.named_parameters():  # per-channel or per-head values, in the module or a gate module
        if id(p) in owned:
            continue
        per_head = [k for k, size in enumerate(p.shape) if size == heads]
        if p.dim() == 1 and p.numel() == width:
            slices.append(UnitSlice(_join(prefix, n), 0, _rows(heads, d)))
        elif len(per_head) == 1 and p.numel() == heads:
            slices.append(UnitSlice(_join(prefix, n), per_head[0], _rows(heads, 1)))
    slices.append(_consumer_slice(o_name, o_mod, _rows(heads, d)))
    per_unit = {"num_heads": 1, "qkv_dim": d, "conv_dim": 3 * d}
    sizes = {k: n for k, n in per_unit.items() if _int(module, (k,)) == n * heads}
    layout = "delta attention, per-channel gates"
    producers = [n for n, *_ in rows + ups]
    return UnitGroup(prefix, "attention", heads, slices, producers, o_name, 1, d, layout, shared=[n for n, *_ in downs],
                     sizes=sizes)  # fmt: skip


# a Mamba-2 mixer's sizes: heads and their width, groups of heads sharing B and C, the state, all heads' width
_MAMBA2 = ("num_heads", "head_dim", "n_groups", "ssm_state_size", "intermediate_size")


def _mamba2(prefix: str, module: nn.Module, lins: list[tuple[str, nn.Module]]) -> UnitGroup | str | None:
    """A Mamba-2 mixer (state space duality: Mamba-2, Nemotron-H, Bamba, Granite 4 hybrids), where the module gives
    its sizes. The heads of a group share their B and C rows and the gated norm normalises each group apart, so a
    unit is one group: its rows of the input projection ``[z | x | B | C | dt]`` (the gate, the heads' inputs, the
    group's B and C, the heads' time steps), its channels of the depthwise convolution over ``[x | B | C]``, its heads'
    ``dt_bias``, ``A_log`` and ``D``, its entries of the norm, its columns of the output projection. ``None`` where
    the module is not such; why not, where it looks like one but does not fit (one group; a buffer scaling the input
    projection's rows, Falcon-H1's ``mup_vector``)."""
    H, D, G, N, inner = (_int(module, (n,)) for n in _MAMBA2)
    convs = [(n, c) for n, c in module.named_children() if isinstance(c, nn.Conv1d)]
    if not (H and D and G and N and inner) or len(convs) != 1 or H % G or inner != H * D:
        return None
    cname, conv = convs[0]
    conv_dim = inner + 2 * G * N
    if not conv.in_channels == conv.out_channels == conv.groups == conv_dim:
        return None
    if G == 1:
        return "its heads form one group (n_groups=1), sharing one B and C and one norm: no unit of its own"
    widths = [(n, m, _in(m), _out(m)) for n, m in lins]
    ins = [x for x in widths if x[3] == inner + conv_dim + H]
    outs = [x for x in widths if x[2] == inner and x[3] == ins[0][2]] if len(ins) == 1 else []
    if len(widths) != 2 or len(outs) != 1:
        return (f"its projections {[(n, i, o) for n, _, i, o in widths]} (name, inputs, outputs) are not the input "
                f"[z | x | B | C | dt] and output projections of a Mamba-2 mixer of {H} heads of {D}, {G} groups and a "
                f"state of {N}")  # fmt: skip
    (in_name, in_mod, _, width), (out_name, out_mod, _, _) = ins[0], outs[0]
    scaled = [n for n, b in module.named_buffers() if b.shape and b.shape[-1] == width]
    if scaled:
        return f"its buffers {scaled} scale its input projection's rows, which no unit owns"
    hpg, P = H // G, H // G * D
    z = _rows(G, P)
    b = _rows(G, N) + 2 * inner
    index = torch.cat([z, z + inner, b, b + G * N, _rows(G, hpg) + inner + conv_dim], dim=1)
    slices = _producer_slices(in_name, in_mod, index)
    channels = torch.cat([_rows(G, P), _rows(G, N) + inner, _rows(G, N) + inner + G * N], dim=1)
    slices += [UnitSlice(_join(prefix, f"{cname}.{k}"), 0, channels) for k, _ in conv.named_parameters()]
    for n, p in module.named_parameters(recurse=False):  # dt_bias, A_log, D
        if p.dim() == 1 and p.numel() == H:
            slices.append(UnitSlice(_join(prefix, n), 0, _rows(G, hpg)))
    for n, c in module.named_children():  # the gated norm, per group
        w = getattr(c, "weight", None)
        if c is conv or _linear(c) or not isinstance(w, torch.Tensor) or w.dim() != 1:
            continue
        if w.numel() != inner or getattr(c, "group_size", P) != P:
            return f"its norm {n!r} does not normalise each group of heads apart"
        slices.append(UnitSlice(_join(prefix, f"{n}.weight"), 0, _rows(G, P)))
    slices.append(_consumer_slice(out_name, out_mod, _rows(G, P)))
    per_unit = {"num_heads": hpg, "n_groups": 1, "intermediate_size": P, "conv_dim": P + 2 * N}
    sizes = {k: n for k, n in per_unit.items() if _int(module, (k,)) == n * G}
    layout = "Mamba-2 mixer, [z | x | B | C | dt], a unit per group of heads"
    return UnitGroup(prefix, "attention", G, slices, [in_name], out_name, hpg, D, layout, sizes=sizes)


def _fused_index(layout: str, kv: int, rep: int, head_dim: int) -> torch.Tensor:
    """Rows of a fused qkv projection each unit (key/value head with its ``rep`` query heads) owns:
    ``"blocked"``: ``[q (heads x head_dim) | k | v]``; ``"interleaved"``: per key/value group ``[q_1 .. q_rep, k, v]``
    (GPT-NeoX and BLOOM with ``rep = 1``: ``[q, k, v]`` per head; Falcon's grouped layout)."""
    if layout == "interleaved":
        return _rows(kv, (rep + 2) * head_dim)
    q = _rows(kv, rep * head_dim)
    k = _rows(kv, head_dim) + kv * rep * head_dim
    v = k + kv * head_dim
    return torch.cat([q, k, v], dim=1)


def _gated_index(layout: str, kv: int, rep: int, head_dim: int) -> torch.Tensor:
    """Rows of a gated query projection (``2 x heads x head_dim``) each unit owns: ``"interleaved"``: per head
    ``[q_h | gate_h]`` (Qwen3-Next, Qwen3.5); ``"blocked"``: ``[q (heads x head_dim) | gate]``."""
    if layout == "interleaved":
        return _rows(kv, rep * 2 * head_dim)
    q = _rows(kv, rep * head_dim)
    return torch.cat([q, q + kv * rep * head_dim], dim=1)


def _layout_index(g: UnitGroup, layout: str) -> torch.Tensor:
    """The first producer's rows per unit under ``layout``: a fused qkv projection, or a gated query."""
    index = _fused_index if len(g.producers) == 1 else _gated_index
    return index(layout, g.num_units, g.heads_per_unit, g.head_dim)


# ---------------------------------------------------------------------------------------------- MLP
def _mlp(
    prefix: str, module: nn.Module, lins: list[tuple[str, nn.Module]], hidden: set[int], transformer: bool
) -> Iterator[UnitGroup | Skipped]:
    widths = [(n, m, _in(m), _out(m)) for n, m in lins]
    # the down projection: reads the hidden units and writes the width the up projection(s) read; the last one
    for n, m, i, o in reversed(widths):  # noqa: B007 - the match is used below
        ups = [x for x in widths if x[0] != n and x[2] == o and x[3] in (i, 2 * i)]
        if ups and len(ups) + 1 == len(widths):
            break
    else:
        return
    d = o
    if not (d in hidden or (transformer and _has_activation(module))):
        return  # a plain network's two layers, not a transformer MLP
    direct = all(x[0].count(".") == prefix.count(".") + (1 if prefix else 0) for x in widths)
    holders = {x[0].rpartition(".")[0] for x in widths}
    # its layers in one child (Mistral 3's projector, whose patch merger beside them kept it from matching there):
    # named by it; in several (BERT's intermediate and output), by the layer holding them
    name = prefix if direct else holders.pop() if len(holders) == 1 else _join(prefix, "mlp")
    index = _rows(i, 1)
    slices: list[UnitSlice] = []
    if len(ups) == 1 and ups[0][3] == 2 * i:  # fused gate and up: [gate | up]
        un, um, _, _ = ups[0]
        slices += _producer_slices(un, um, torch.cat([index, index + i], dim=1))
        layout = "blocked"
    elif all(x[3] == i for x in ups) and len(ups) <= 2:
        for un, um, _, _ in ups:
            slices += _producer_slices(un, um, index)
        layout = ""
    else:
        why = f"MLP {name!r}: its projections {[(x[0], x[3]) for x in ups]} are not one or two up projections of "
        yield Skipped(name, "mlp", why + f"width {i}; its layers are left alone", tuple(x[0] for x in widths))
        return
    slices.append(_consumer_slice(n, m, index))
    sizes: dict[str, int] = {}
    if direct:  # a depthwise convolution over the hidden units (SegFormer's Mix-FFN): a kernel per neuron
        for cn, c in module.named_modules():
            if isinstance(c, _CONVS) and c.groups == c.in_channels == c.out_channels == i:
                slices += _producer_slices(_join(prefix, cn), c, index)
                sizes.update({f"{cn}.{k}": 1 for k in ("groups", "in_channels", "out_channels")})
    yield UnitGroup(name, "mlp", i, slices, [x[0] for x in ups], n, layout=layout, sizes=sizes)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ---------------------------------------------------------------------------------------------- experts
def _experts(prefix: str, module: nn.Module) -> Iterator[UnitGroup]:
    """Routed experts stored as two 3-D parameters (transformers 5): ``[E, 2I, d]`` (gate and up) and ``[E, d, I]``
    (down), or both transposed (``[E, d, 2I]``, ``[E, I, d]``); an ungated expert has ``I`` for ``2I``. A unit is one
    hidden neuron of one expert, unit ``e * I + j``: it owns its gate and up rows of expert ``e``'s slice (``j`` and
    ``I + j`` where they are ``[gate | up]``; ``2j`` and ``2j + 1`` where interleaved, GPT-OSS: the dataflow probe
    decides), its entries of a ``[E, 2I]`` gate/up bias, and column ``j`` of its down slice (positions over the
    expert and neuron dimensions together, :mod:`egg_optim.core.axes`)."""
    params = [(n, p) for n, p in module.named_parameters(recurse=False) if p is not None and p.dim() == 3]
    if len(params) != 2:
        return
    (an, a), (bn, b) = params
    E = a.shape[0]
    if b.shape[0] != E or E < 2:
        return
    if a.shape[2] == b.shape[1] and a.shape[1] in (b.shape[2], 2 * b.shape[2]):  # [E, 2I, d], [E, d, I]
        inner, up_axis, down_axis, width = b.shape[2], (0, 1), (0, 2), a.shape[1]
    elif a.shape[1] == b.shape[2] and a.shape[2] in (b.shape[1], 2 * b.shape[1]):  # [E, d, 2I], [E, I, d]
        inner, up_axis, down_axis, width = b.shape[1], (0, 2), (0, 1), a.shape[2]
    else:
        return
    up = _expert_index(E, inner, width, "blocked")
    slices = [UnitSlice(_join(prefix, an), up_axis, up)]
    # a gate/up bias [E, 2I]: registered before the down weight where a down bias [E, d] has its shape (2I == d)
    order, hidden = [n for n, _ in module.named_parameters(recurse=False)], b.numel() // (E * inner)
    slices += [
        UnitSlice(_join(prefix, n), (0, 1), up)
        for n, p in module.named_parameters(recurse=False)
        if p is not None and tuple(p.shape) == (E, width) and (width != hidden or order.index(n) < order.index(bn))
    ]
    slices.append(UnitSlice(_join(prefix, bn), down_axis, _expert_index(E, inner, inner, ""), "consumer"))
    layout = f"{E} experts x {inner} neurons"
    yield UnitGroup(prefix, "experts", E * inner, slices, [prefix], None, layout=layout, parts=E)


def _expert_index(experts: int, inner: int, width: int, layout: str) -> torch.Tensor:
    """Each expert neuron's positions in a ``[experts, width]`` pair axis: ``width == inner`` one position;
    ``width == 2 inner`` gate and up, ``"blocked"`` (``[gate | up]``) or ``"interleaved"``."""
    e = torch.arange(experts).repeat_interleave(inner)
    j = torch.arange(inner).repeat(experts)
    if width == inner:
        return (e * width + j)[:, None]
    if layout == "interleaved":
        return torch.stack([e * width + 2 * j, e * width + 2 * j + 1], dim=1)
    return torch.stack([e * width + j, e * width + inner + j], dim=1)


def _routers(modules: list[tuple[str, nn.Module]], claimed: Mapping[str, str]) -> dict[str, str]:
    """``{router: experts}``: in a module holding experts (a child with 3-D expert weights, or with at least two
    experts modules of one class), each unclaimed Linear outside them, reading what the experts read, with one
    output per expert (Switch's ``router.classifier``, Llama 4's ``router``, Hunyuan's ``gate.wg``)."""
    out: dict[str, str] = {}
    for prefix, module in modules:
        for cname, child in module.named_children():
            where = _join(prefix, cname)
            weights = [p for p in child.parameters(recurse=False) if p.dim() == 3]
            if weights:
                count, width = weights[0].shape[0], {weights[0].shape[1], weights[0].shape[2]}
            else:  # experts modules side by side (a list, or NLLB-MoE's own container), each with its Linears
                experts = [e for e in child.children() if not _linear(e) and any(_linear(m) for m in e.modules())]
                if len(experts) < 2 or len({type(e) for e in experts}) != 1:
                    continue
                count, width = len(experts), {_in(next(m for m in experts[0].modules() if _linear(m)))}
            for n, m in _linears(prefix, module, claimed):
                if not n.startswith(where + ".") and _out(m) == count and _in(m) in width and count >= 2:
                    out[n] = where
    return out
