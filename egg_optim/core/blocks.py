"""Units that span several modules: the hidden neurons of a transformer MLP and the attention heads.

An MLP neuron owns its rows in the up (and gate) projection and its column in the down projection; an attention
head owns its ``head_dim`` rows in the query, key and value projections and its ``head_dim`` columns in the output
projection. With grouped-query attention a unit is one key/value head with the query heads that share it. Each
owned tensor is described by its unit dimension and an index ``[num_units, k]`` of the positions each unit owns
along it (see :meth:`Roles.expand`), so masking, cloning and compact storage treat these units exactly like rows.

Detection is structural (child names, ``Linear`` shapes, head counts from the module or its ``config``), so it
needs no ``transformers`` import and covers Llama / Mistral / Qwen (SwiGLU), GPT-2 (``Conv1D``, transposed
weights, fused qkv), BERT and ViT, in the layouts of transformers 4.x and 5.x. A module that looks like one of
these blocks but whose shapes do not add up raises :class:`PlanError` naming it, rather than managing nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PlanError

KINDS = ("mlp", "attention")


@dataclass(frozen=True)
class UnitSlice:
    """The positions of every unit in one parameter: along ``dim``, unit ``u`` owns ``index[u]``."""

    param: str  # qualified parameter name
    dim: int
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
    """One MLP or attention block whose units span several modules."""

    name: str  # the block's qualified name (a module, or ``<layer>.mlp`` where the MLP has no module of its own)
    kind: str  # "mlp" | "attention"
    num_units: int
    slices: list[UnitSlice] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)  # modules whose outputs are the units (rows)
    consumer: str | None = None  # the module that reads the units (columns): down / output projection
    heads_per_unit: int = 1  # attention: query heads per unit (GQA group size)
    head_dim: int = 1

    @property
    def modules(self) -> list[str]:
        return [*self.producers, *([self.consumer] if self.consumer else [])]


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D``: a Linear with a transposed ``[in, out]`` weight (GPT-2)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


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


def _mlp(name: str, producers: dict[str, nn.Module], consumer: tuple[str, nn.Module]) -> UnitGroup:
    widths = {p: _out(m) for p, m in producers.items()}
    cname, cmod = consumer
    if len(set(widths.values())) != 1 or _in(cmod) != next(iter(widths.values())):
        raise PlanError(
            f"MLP {name!r}: hidden widths do not add up (outputs {widths}, {cname!r} takes {_in(cmod)}); "
            "manage its layers one by one with units='layers'"
        )
    n = _in(cmod)
    index = _rows(n, 1)
    slices = [s for p, m in producers.items() for s in _producer_slices(p, m, index)]
    slices.append(_consumer_slice(cname, cmod, index))
    return UnitGroup(name, "mlp", n, slices, list(producers), cname)


def _heads(module: nn.Module) -> tuple[int | None, int | None, int | None]:
    """(query heads, key/value heads, head_dim) as the module or its config says."""
    cfg = getattr(module, "config", None)

    def first(*names: str) -> int | None:
        for obj in (module, cfg):
            for n in names:
                v = getattr(obj, n, None) if obj is not None else None
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
        return None

    heads = first("num_heads", "num_attention_heads", "n_head")
    kv = first("num_key_value_heads", "num_kv_heads")
    groups = getattr(module, "num_key_value_groups", None)
    if kv is None and isinstance(groups, int) and heads:
        kv = heads // groups
    head_dim = first("head_dim", "attention_head_size")
    return heads, kv or heads, head_dim


def _attention(
    name: str, module: nn.Module, q: tuple[str, nn.Module], k: tuple[str, nn.Module], v: tuple[str, nn.Module],
    o: tuple[str, nn.Module],
) -> UnitGroup:  # fmt: skip
    heads, kv, head_dim = _heads(module)
    q_out, k_out, v_out = _out(q[1]), _out(k[1]), _out(v[1])
    if heads is None:
        raise PlanError(f"attention {name!r}: cannot tell its number of heads; manage it with units='layers'")
    head_dim = head_dim or q_out // heads
    ok = heads % kv == 0 and q_out == heads * head_dim and k_out == v_out == kv * head_dim and _in(o[1]) == q_out
    if not ok:
        raise PlanError(
            f"attention {name!r}: {heads} heads / {kv} key-value heads of size {head_dim} do not match its "
            f"projections (q {q_out}, k {k_out}, v {v_out}, output takes {_in(o[1])}); use units='layers'"
        )
    rep = heads // kv
    q_index, kv_index = _rows(kv, rep * head_dim), _rows(kv, head_dim)
    slices = [
        *_producer_slices(q[0], q[1], q_index),
        *_producer_slices(k[0], k[1], kv_index),
        *_producer_slices(v[0], v[1], kv_index),
        _consumer_slice(o[0], o[1], q_index),
    ]
    return UnitGroup(name, "attention", kv, slices, [q[0], k[0], v[0]], o[0], rep, head_dim)


def _fused_attention(name: str, module: nn.Module, qkv: tuple[str, nn.Module], o: tuple[str, nn.Module]) -> UnitGroup:
    """GPT-2: one Conv1D makes q, k and v side by side (``[h, 3h]``); a head owns one slice of each."""
    heads, _, head_dim = _heads(module)
    width = _in(o[1])
    if heads is None or width % heads or _out(qkv[1]) != 3 * width:
        raise PlanError(
            f"attention {name!r}: cannot split its fused qkv projection ({_out(qkv[1])} outputs) into "
            f"{heads} heads of a {width}-wide output; use units='layers'"
        )
    head_dim = head_dim or width // heads
    per_head = _rows(heads, head_dim)
    fused = torch.cat([per_head + j * width for j in range(3)], dim=1)
    slices = [*_producer_slices(qkv[0], qkv[1], fused), _consumer_slice(o[0], o[1], per_head)]
    return UnitGroup(name, "attention", heads, slices, [qkv[0]], o[0], 1, head_dim)


def _mlp_like(children: dict[str, nn.Module], *projections: str) -> bool:
    """A block of exactly these projections around an activation (``act``, ``act_fn``, ``activation_fn``): a
    plain network that merely names two of its layers ``fc1`` and ``fc2`` is not taken for a transformer MLP."""
    others = [n for n, m in children.items() if n not in projections and (_linear(m) or isinstance(m, nn.Conv2d))]
    has_act = any("act" in n.lower() and not _linear(m) for n, m in children.items())
    return not others and has_act


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_children()}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_unit_groups(model: nn.Module) -> dict[str, UnitGroup]:
    """Every transformer MLP and attention block of ``model`` whose units span several modules, by name."""
    groups: dict[str, UnitGroup] = {}
    for prefix, module in model.named_modules():
        for group in _match(prefix, module):
            groups[group.name] = group
    claimed: dict[str, str] = {}
    for g in groups.values():
        for m in g.modules:
            if m in claimed:
                raise PlanError(f"module {m!r} belongs to both {claimed[m]!r} and {g.name!r}")
            claimed[m] = g.name
    return groups


def _match(prefix: str, module: nn.Module) -> Iterator[UnitGroup]:
    c = _children(module)

    def lin(*names: str) -> bool:
        return all(_linear(c.get(n)) for n in names)

    def at(n: str) -> tuple[str, nn.Module]:
        return _join(prefix, n), c[n]

    if lin("gate_proj", "up_proj", "down_proj"):  # Llama, Mistral, Qwen (SwiGLU)
        yield _mlp(prefix, {_join(prefix, "gate_proj"): c["gate_proj"], _join(prefix, "up_proj"): c["up_proj"]},
                   at("down_proj"))  # fmt: skip
    elif lin("fc1", "fc2") and _mlp_like(c, "fc1", "fc2"):  # ViT (transformers 5), CLIP, OPT-style MLPs
        yield _mlp(prefix, {_join(prefix, "fc1"): c["fc1"]}, at("fc2"))
    elif lin("c_fc", "c_proj") and _is_conv1d(c["c_fc"]):  # GPT-2
        yield _mlp(prefix, {_join(prefix, "c_fc"): c["c_fc"]}, at("c_proj"))
    if lin("q_proj", "k_proj", "v_proj") and (lin("o_proj") or lin("out_proj")):
        o = "o_proj" if lin("o_proj") else "out_proj"
        yield _attention(prefix, module, at("q_proj"), at("k_proj"), at("v_proj"), at(o))
    elif lin("c_attn", "c_proj") and _is_conv1d(c["c_attn"]):  # GPT-2
        yield _fused_attention(prefix, module, at("c_attn"), at("c_proj"))
    # BERT / ViT (transformers 4): <layer>.attention.{self|attention}.{query,key,value} and
    # <layer>.attention.output.dense; <layer>.intermediate.dense and <layer>.output.dense
    att, inter, out = c.get("attention"), c.get("intermediate"), c.get("output")
    if att is not None:
        ac = _children(att)
        inner_name = next((n for n in ("self", "attention") if n in ac), None)
        inner = ac.get(inner_name) if inner_name else None
        if inner is not None and all(_linear(getattr(inner, n, None)) for n in ("query", "key", "value")):
            dense = getattr(ac.get("output"), "dense", None)
            if not _linear(dense):
                raise PlanError(f"attention {_join(prefix, 'attention')!r}: no output.dense projection found")
            base = _join(_join(prefix, "attention"), inner_name)
            yield _attention(
                _join(prefix, "attention"),
                inner,
                (f"{base}.query", inner.query),
                (f"{base}.key", inner.key),
                (f"{base}.value", inner.value),
                (_join(prefix, "attention.output.dense"), dense),
            )
    if _linear(getattr(inter, "dense", None)) and _linear(getattr(out, "dense", None)):
        yield _mlp(
            _join(prefix, "mlp"),
            {_join(prefix, "intermediate.dense"): inter.dense},
            (_join(prefix, "output.dense"), out.dense),
        )
