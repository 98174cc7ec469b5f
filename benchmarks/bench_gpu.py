"""GPU training-step benchmark and correctness checks (issue 19): is a leader/clone step faster than the bare one?

ONE script for a GPU session (imports only torch, transformers and egg_optim; the seed CNNs are defined here):

1. **Correctness checks on the device** (TF32 off, deterministic algorithms): a plan without clones is bit-exact
   to the bare optimizer (Adam foreach and fused, AdamW fused with weight decay, SGD Nesterov); in weight mode
   every clone's rows equal its source's; in output mode clone weight-gradient rows are zero and the exported
   plain model computes what the live one does; bf16 autocast (and fp16 with ``GradScaler`` on CUDA) trains;
   output mode's whole step replayed from a CUDA graph trains as the eager step does (CUDA only).
2. **Step time** of each case relative to the bare model + bare optimizer *in the same run*: the cases of a group
   share inputs and step round-robin (interleaved, after warm-up); each step is timed with CUDA events (CPU:
   ``perf_counter``); ratios are medians of the per-round ratios. Cases: ``bare``, output mode mild /
   aggressive, weight mode mild, the dense net at the output plans' active widths (the floor output mode aims
   for), eager and ``torch.compile``d, and on the seed CIFAR CNN at batch 128 whole steps (forward, backward,
   ``opt.step()``) replayed from one CUDA graph each (:func:`capture_step`, capturable Adam); on the Llama h2048
   config also the seed's unaligned counts (``align=None``: the 1,971-neuron cliff) and ``RolePlan(0.25, 0.125)``.
3. Per case: counted FLOPs (forward + backward, ``egg_optim.utils.flop_counter``) relative to bare, peak memory
   of one step (CUDA: the step's peak allocation plus what the case keeps resident, with the other cases' memory
   taken out), bytes saved for backward and optimizer state, kernels per step, index kernels, the kernels' summed
   device time against the step's wall time (launch-bound or not) and the most expensive kernels (``torch.profiler``,
   CUDA: :func:`kernel_table`), aten ops and index ops over parameter-sized tensors per step
   (:class:`egg_optim.utils.DispatchCounter`, eager), host time inside ``opt.step()``, and each plan's active
   widths and alignment.

Groups (the issue's table): the seed CIFAR CNN at batch 128 and 1024, fp32 and bf16 autocast channels-last;
the seed MNIST CNN at 256 fp32; Llama h1024 (8 layers, GQA 16/4, intermediate 2816, seq 1024, batch 8, bf16
autocast on fp32 weights, fused AdamW) eager and compiled; Llama h2048 (16 layers, intermediate 5632, GQA 32/8,
seq 2048, batch 4, bf16 weights, fused AdamW). CNNs use Adam and the seed's per-layer tables. Last (the budget may
skip it; ``--groups Mixtral`` runs it alone): a Mixtral-style h1024 (the same attention, 8 experts of 1408 neurons
routed top 2, bf16 autocast), bare against output mode mild / aggressive, weight mode and drawn roles (gathers).
Before it, GPT-2 small (124M, seq 1024, batch 8, bf16 autocast, no dropout): bare, output and weight mode (its
attention computes the active heads with its stored widths set to theirs; no dense control).

The most important groups run first and a time budget (``--budget-s``) skips what would not fit, so the
results (``--out``: ``bench_gpu.md`` and ``bench_gpu.json``, rewritten after every group) always exist::

    PYTHONPATH=. python benchmarks/bench_gpu.py --quick --out docs/results  # H200, uninstalled checkout: 6-8 min
    python benchmarks/bench_gpu.py --out docs/results             # every group and case
    python benchmarks/bench_gpu.py --smoke --out /tmp/bench_gpu   # CPU, tiny sizes, 2 rounds: what the tests run
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the checks (before CUDA)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterable, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from egg_optim import LeaderCloneOptimizer, RolePlan  # noqa: E402
from egg_optim.rewrites import grad_skip  # noqa: E402
from egg_optim.utils.profiling import (  # noqa: E402
    INDEX_OPS,
    DispatchCounter,
    flop_counter,
    peak_bytes_above,
    saved_tensor_bytes,
)


# ---------------------------------------------------------------------------------------------- seed CNNs
class Bottleneck(nn.Module):
    """The seed's block (as ``egg_recipes.models.Bottleneck``): conv1 1x1-BN-ReLU, conv2 3x3-BN-ReLU,
    conv3 1x1-BN, plus a 1x1 conv + BN shortcut when the width changes, then ReLU."""

    def __init__(self, cin: int, c1: int, c2: int, c3: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c1, 1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 1)
        self.bn3 = nn.BatchNorm2d(c3)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, c3, 1), nn.BatchNorm2d(c3)) if cin != c3 else nn.Sequential()
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


class SeedNet(nn.Module):
    """The seed's CNNs (as ``egg_recipes.models.SeedCIFARNet`` / ``SeedMNISTNet``, same names and shapes):
    three bottleneck blocks, each followed by 2x2 max pooling, then FC -> FC. ``widths`` narrows named layers
    (``layer{b}.conv{c}``, ``fc1``); downstream widths follow."""

    def __init__(
        self,
        blocks: Sequence[tuple[int, int, int]],
        hidden: int,
        classes: int,
        image: int,
        dropout: float,
        widths: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        w = dict(widths or {})
        cin = blocks[0][0]
        for b, (_, mid, out) in enumerate(blocks, start=1):
            c1, c2, c3 = (w.get(f"layer{b}.conv{c}", d) for c, d in ((1, mid), (2, mid), (3, out)))
            setattr(self, f"layer{b}", Bottleneck(cin, c1, c2, c3))
            setattr(self, f"pool{b}", nn.MaxPool2d(2, 2))
            cin = c3
        self.dropout = nn.Dropout(dropout)
        side = image // 8
        self.fc1 = nn.Linear(cin * side * side, w.get("fc1", hidden))
        self.fc2 = nn.Linear(w.get("fc1", hidden), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.layer1(x))
        x = self.pool2(self.layer2(x))
        x = torch.flatten(self.pool3(self.layer3(x)), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


def seed_cifar(widths: Mapping[str, int] | None = None) -> SeedNet:
    return SeedNet([(3, 128, 256), (256, 128, 128), (128, 32, 64)], 1024, 100, 32, 0.5, widths)


def seed_mnist(widths: Mapping[str, int] | None = None) -> SeedNet:
    return SeedNet([(1, 32, 64), (64, 32, 64), (64, 16, 32)], 128, 10, 28, 0.3, widths)


def tiny_cnn(widths: Mapping[str, int] | None = None) -> SeedNet:
    """Smoke mode: the seed's layer names at a fraction of the widths."""
    return SeedNet([(3, 16, 32), (32, 16, 24), (24, 8, 16)], 64, 10, 16, 0.5, widths)


CNNS: dict[str, tuple[Callable[..., nn.Module], tuple[int, int, int], str]] = {
    "seed_cifar": (seed_cifar, (3, 32, 32), "cifar"),
    "seed_mnist": (seed_mnist, (1, 28, 28), "mnist"),
    "tiny_cnn": (tiny_cnn, (3, 16, 16), "cifar"),
}


# ---------------------------------------------------------------------------------------------- Llama
LLAMAS = {
    "h1024": {"hidden": 1024, "layers": 8, "heads": 16, "kv": 4, "inter": 2816, "seq": 1024, "batch": 8},
    "h2048": {"hidden": 2048, "layers": 16, "heads": 32, "kv": 8, "inter": 5632, "seq": 2048, "batch": 4},
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv": 2, "inter": 176, "seq": 24, "batch": 2, "vocab": 128},
    # Mixtral-style: the MLP a mixture of ``experts`` of ``inter`` neurons each, every token routed to ``top``
    "moe_h1024": {"hidden": 1024, "layers": 8, "heads": 16, "kv": 4, "inter": 1408, "experts": 8, "top": 2,
                  "seq": 1024, "batch": 8},
    "tiny_moe": {"hidden": 64, "layers": 2, "heads": 4, "kv": 2, "inter": 88, "experts": 4, "top": 2, "seq": 24,
                 "batch": 2, "vocab": 128},
    # GPT-2 small (124M, what users try first; its attention splits a fused qkv at a stored width), no dropout
    "gpt2": {"family": "gpt2", "hidden": 768, "layers": 12, "heads": 12, "kv": 12, "inter": 3072, "seq": 1024,
             "batch": 8, "vocab": 50257},
    "tiny_gpt2": {"family": "gpt2", "hidden": 64, "layers": 2, "heads": 4, "kv": 4, "inter": 128, "seq": 24,
                  "batch": 2, "vocab": 128},
}  # fmt: skip


def llama(spec: Mapping[str, int], inter: int | None = None, kv: int | None = None) -> nn.Module:
    """A LlamaForCausalLM of ``spec`` (a MixtralForCausalLM where it names ``experts``); ``inter`` / ``kv`` narrow
    the MLP / the key-value groups (the query heads follow, ``head_dim`` stays): the dense net at an output plan's
    active widths."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
    )

    if spec.get("family") == "gpt2":  # (no dense control: its heads cannot narrow at a fixed hidden size)
        cfg = GPT2Config(vocab_size=spec["vocab"], n_embd=spec["hidden"], n_layer=spec["layers"], n_head=spec["heads"],
                         n_inner=spec["inter"], n_positions=max(spec["seq"], 64), resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0)  # fmt: skip
        cfg._attn_implementation = "sdpa"
        return GPT2LMHeadModel(cfg)
    heads, kv_heads = spec["heads"], spec["kv"]
    rep, head_dim = heads // kv_heads, spec["hidden"] // heads
    kv = kv_heads if kv is None else kv
    common = dict(
        vocab_size=spec.get("vocab", 32000),
        hidden_size=spec["hidden"],
        intermediate_size=spec["inter"] if inter is None else inter,
        num_hidden_layers=spec["layers"],
        num_attention_heads=kv * rep,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=max(spec["seq"], 64),
    )
    if spec.get("experts"):
        cfg = MixtralConfig(
            **common, num_local_experts=spec["experts"], num_experts_per_tok=spec["top"], router_aux_loss_coef=0.0
        )
    else:
        cfg = LlamaConfig(**common)
    cfg._attn_implementation = "sdpa"
    return (MixtralForCausalLM if spec.get("experts") else LlamaForCausalLM)(cfg)


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    step: Callable[[], None]  # forward + backward + optimizer step + zero_grad
    fwd_bwd: Callable[[], None]  # forward + backward only (FLOPs, saved bytes)
    compiled: bool  # compiled or captured: not an eager step (the eager-only measurements are skipped)
    widths: str = ""
    times: list[float] = field(default_factory=list)
    host_step: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    name: str
    kind: str  # "cnn" | "llama"
    model: str  # a CNNS key or a LLAMAS key
    batch: int
    precision: str  # "fp32" | "bf16cl" (autocast, channels-last) | "autocast" (bf16 on fp32 weights) | "bf16"
    scenarios: list[str]
    compiled: bool = False
    rounds: int = 20
    cost_s: float = 0.0  # a rough estimate of the group's wall time on an H200 (0: 60 s, compiled 40 s per case)
    captured: bool = False  # every case's whole step (forward, backward, opt.step()) replayed from one CUDA graph

    def estimate(self) -> float:
        return self.cost_s or (40.0 * len(self.scenarios) if self.compiled else 60.0)


def _plan(group: Group, scenario: str) -> RolePlan:
    """``output/mild`` -> the mild plan of the group's model (the seed's tables for CNNs, uniform for Llama);
    ``output/mild-drawn``: the same plan on the seed's drawn (scattered) first roles, the gather path;
    ``output/mild-repacked``: those roles with ``repack=True`` (transformer blocks reordered into runs: views again);
    ``weight/mild-noskip``: weight mode computing every weight-gradient row (``skip_clone_grads=False``);
    ``weight/mild-skipall``: skipping the clones' rows in every layer, however little work a call has (the default
    skips on a GPU only from ``grad_skip.MIN_WORK``);
    ``output/mild-unfused`` / ``-fused``: coupled BatchNorms run plain on every channel after the expansion
    (``fuse_norms=False``) / fused on the active channels (``True``); the default fuses where the C kernels run
    (CPU), so on CUDA ``output/mild`` is the unfused path and ``-fused`` the control;
    ``output/mild-indexadd``: the expansion's backward by the gather's ``index_add`` (an atomic scatter on CUDA),
    the control of the default fold by sums (:func:`gather_backward`)."""
    preset = scenario.split("/")[1]
    for suffix in ("-drawn", "-repacked", "-noskip", "-skipall", "-unfused", "-fused", "-indexadd"):
        preset = preset.removesuffix(suffix)
    table = CNNS[group.model][2] if group.kind == "cnn" else "uniform"
    if preset == "aggressive-align1":
        return RolePlan.preset("aggressive", table, align=None)
    if preset == "0.25-0.125":
        return RolePlan(0.25, 0.125)
    return RolePlan.preset(preset, table)


def _dtype(group: Group) -> torch.dtype:
    return torch.bfloat16 if group.precision == "bf16" else torch.float32


def _build(group: Group, device: torch.device, widths: Mapping[str, int] | None = None, dense_of=None):
    """(model, inputs, loss(model_fn) -> tensor): the group's model on ``device`` in its precision."""
    torch.manual_seed(0)
    with torch.device(device):
        if group.kind == "cnn":
            make, shape, _ = CNNS[group.model]
            model = make(widths)
        else:
            spec = LLAMAS[group.model]
            model = llama(spec, *(dense_of or (None, None)))
    model = model.to(device=device, dtype=_dtype(group))
    gen = torch.Generator().manual_seed(1)
    if group.kind == "cnn":
        x = torch.randn(group.batch, *shape, generator=gen).to(device)
        y = torch.randint(0, model.fc2.out_features, (group.batch,), generator=gen).to(device)
        if group.precision == "bf16cl":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def loss(fn):
            return F.cross_entropy(fn(x), y)
    else:
        spec = LLAMAS[group.model]
        ids = torch.randint(0, spec.get("vocab", 32000), (group.batch, spec["seq"]), generator=gen).to(device)

        def loss(fn):
            return fn(input_ids=ids, labels=ids).loss

    return model.train(), loss


def _base_opt(group: Group, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    capturable = group.captured  # the step count lives on the device, so a replayed step advances it
    if group.kind == "cnn":
        return torch.optim.Adam(model.parameters(), lr=1e-4, capturable=capturable)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True, capturable=capturable)


def gather_backward(model: nn.Module) -> None:
    """Make output mode's managed layers expand packed clones as they did before the fold: the gather and its
    ``index_add`` backward (a control case; roles are fixed here, so nothing sets the tiles again)."""
    for m in model.modules():
        if getattr(m, "_egg_tile", None) is not None:
            m._egg_tile = None


def capture_step(
    fwd_bwd: Callable[[], None],
    opt: torch.optim.Optimizer,
    device: torch.device,
    load: Callable[[int], None] | None = None,
) -> Callable[[], None]:
    """A whole training step (forward, backward, ``opt.step()``) captured in one CUDA graph; returns its replay.

    torch's whole-network recipe: three eager steps on a side stream (``load(i)`` first puts warm-up batch ``i``
    into the static inputs; optimizer state, norm coupling and cuDNN's choices settle), gradients set to None,
    then one captured step (recorded, not run), whose gradients live in the graph's memory pool and are
    overwritten by every replay. A host read inside the step would make the capture fail (refused, not wrong);
    weight mode's clone event checks finiteness on the device, so its step captures too. The optimizer's
    Python-side counters see the captured step only: whatever the schedules do at that step (weight mode: a clone
    event) is replayed at every step, and nothing else they schedule by steps happens."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(3):
            if load is not None:
                load(i)
            fwd_bwd()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        fwd_bwd()
        opt.step()
    return graph.replay


def _autocast(group: Group, device: torch.device):
    if group.precision in ("bf16cl", "autocast"):  # a captured graph must not hold autocast's cast cache
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not group.captured)
    return contextlib.nullcontext()


def _active_widths(opt: LeaderCloneOptimizer) -> str:
    """``mlp 1984/5632 (x64), attn 3/8`` for the first layer of each kind: what the plan computes."""
    seen: dict[str, str] = {}
    for name, lp in opt.layer_plans.items():
        layer = opt.layers[name]
        kind = layer.group.kind if layer.group is not None else name.rsplit(".", 1)[-1]
        if kind not in seen:
            seen[kind] = f"{kind} {lp.active}/{lp.units}" + (f" (x{lp.align})" if lp.align > 1 else "")
    return ", ".join(seen.values())


def _dense_widths(group: Group, device: torch.device, preset: str) -> tuple[dict[str, int] | None, Any]:
    """The active widths of the output plan ``preset`` as resolved on the group's model on ``device`` in its
    dtype (alignment included): CNN layer widths, or (intermediate, key-value groups) for Llama (resolved on a
    one-layer model: the uniform plans give every layer the same counts)."""
    plan = _plan(group, f"output/{preset}")
    if group.kind == "cnn":
        with torch.device(device):
            model = CNNS[group.model][0]().to(dtype=_dtype(group))
        return {n: lp.active for n, lp in plan.resolve(model).items()}, None
    spec = dict(LLAMAS[group.model], layers=1, vocab=256)
    with torch.device(device):
        model = llama(spec).to(dtype=_dtype(group))
    plans = plan.resolve(model)
    mlp = next(lp.active for n, lp in plans.items() if n.endswith(".mlp"))
    attn = next(lp.active for n, lp in plans.items() if n.endswith(".self_attn"))
    return None, (mlp, attn)


def make_case(group: Group, scenario: str, device: torch.device, args: argparse.Namespace) -> Case:
    dense_widths = dense_of = None
    if scenario.startswith("dense@"):
        dense_widths, dense_of = _dense_widths(group, device, scenario.split("@")[1])
    model, loss = _build(group, device, dense_widths, dense_of)
    base = _base_opt(group, model, device)
    opt: torch.optim.Optimizer = base
    widths = ""
    if scenario.startswith(("output/", "weight/")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mode, first = scenario.split("/")[0], "drawn" if scenario.endswith(("-drawn", "-repacked")) else "packed"
            options = {"skip_clone_grads": False} if scenario.endswith("-noskip") else {}
            if scenario.endswith("-repacked"):
                options["repack"] = True
            if scenario.endswith("fused"):
                options["fuse_norms"] = not scenario.endswith("-unfused")
            opt = LeaderCloneOptimizer(
                model, base, _plan(group, scenario), clone_mode=mode, seed=0, first_roles=first, **options
            )
        widths = _active_widths(opt)
    elif dense_widths is not None:
        widths = ", ".join(f"{k.rsplit('.', 1)[-1]} {v}" for k, v in list(dense_widths.items())[:3]) + ", ..."
    elif dense_of is not None:
        widths = f"intermediate {dense_of[0]}, kv groups {dense_of[1]}"
    with torch.no_grad(), _autocast(group, device):
        loss(model)  # one eager forward: norm coupling is decided from it (before any compilation)
    if scenario.endswith("-indexadd"):
        gather_backward(model)
    fn = torch.compile(model, mode=args.compile_mode, backend=args.compile_backend) if group.compiled else model
    if group.captured and device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")

    def fwd_bwd() -> None:
        with _autocast(group, device), _floor(scenario, device):
            out = loss(fn)
        out.backward()

    def step() -> None:
        fwd_bwd()
        t0 = time.perf_counter()
        opt.step()
        case.host_step.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)

    name = scenario + ("/compiled" if group.compiled else "/captured" if group.captured else "")
    case = Case(name, model, opt, step, fwd_bwd, group.compiled or group.captured, widths)
    if group.captured:
        case.step = capture_step(fwd_bwd, opt, device)
    return case


@contextlib.contextmanager
def _floor(scenario: str, device: torch.device):
    """``-skipall``: no work floor for the split backward while the forward pass runs (the layers decide per call)."""
    if not scenario.endswith("-skipall"):
        yield
        return
    saved = grad_skip.MIN_WORK.pop(device.type, None)
    try:
        yield
    finally:
        if saved is not None:
            grad_skip.MIN_WORK[device.type] = saved


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_round(cases: Sequence[Case], device: torch.device) -> None:
    if device.type == "cuda":
        pending = []
        for case in cases:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            case.step()
            end.record()
            pending.append((case, start, end))
        torch.cuda.synchronize(device)
        for case, start, end in pending:
            case.times.append(start.elapsed_time(end) / 1e3)
    else:
        for case in cases:
            t0 = time.perf_counter()
            case.step()
            case.times.append(time.perf_counter() - t0)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    if isinstance(opt, LeaderCloneOptimizer):
        return opt.state_bytes()
    return _tensor_bytes(v for st in opt.state.values() for v in st.values())


def _flops(case: Case) -> float:
    counter = flop_counter()
    with counter:
        case.fwd_bwd()
    case.opt.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _peak_bytes(case: Case, device: torch.device) -> int:
    """Peak memory of one step of this case alone: its resident parameters, buffers and optimizer state, plus the
    most the step allocates on top of everything resident (CUDA: the allocator's peak; CPU: a lower bound from
    the profiler's memory events, :func:`egg_optim.utils.peak_bytes_above`)."""
    above, _ = peak_bytes_above(case.step, device)
    resident = _tensor_bytes(case.model.parameters()) + _tensor_bytes(case.model.buffers()) + _state_bytes(case.opt)
    return above + resident


TOP_KERNELS = 4  # the most expensive kernels listed per case


def kernel_table(events: Iterable[Any], top: int = TOP_KERNELS) -> dict[str, Any]:
    """What one profiled step ran on the device, from ``torch.profiler`` events: ``kernels`` (device kernels),
    ``index_kernels`` (aten gather/index_select/index_add/... calls), ``busy_ms`` (the kernels' summed device
    time: against the step's wall time it says whether the step waited for the host, i.e. was launch-bound) and
    ``top`` (the ``top`` kernels by device time, ``(name, ms, launches)``)."""
    kernels = index = 0
    by_name: dict[str, list[float]] = {}
    for ev in events:
        if getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels += 1
            slot = by_name.setdefault(ev.name, [0.0, 0])
            slot[0] += ev.time_range.elapsed_us() / 1e3
            slot[1] += 1
        elif ev.name.startswith("aten::") and ev.name[6:].rstrip("_") in INDEX_OPS:
            index += 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "kernels": kernels,
        "index_kernels": index,
        "busy_ms": sum(ms for ms, _ in by_name.values()),
        "top": [(name, ms, int(n)) for name, (ms, n) in ranked],
    }


def _kernels(case: Case, device: torch.device) -> dict[str, Any]:
    """:func:`kernel_table` of one step of ``case``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        case.step()
        _sync(device)
    return kernel_table(prof.events())


def measure_group(group: Group, device: torch.device, args: argparse.Namespace, log) -> list[dict[str, Any]]:
    t_start = time.perf_counter()
    cases = []
    for scenario in group.scenarios:
        t0 = time.perf_counter()
        case = make_case(group, scenario, device, args)
        for _ in range(args.warmup + (2 if group.compiled else 0)):
            case.step()
        _sync(device)
        case.info["setup_s"] = time.perf_counter() - t0
        case.host_step.clear()
        cases.append(case)
    log(f"  {group.name}: {len(cases)} cases built and warmed up in {time.perf_counter() - t_start:.0f} s")
    for _ in range(group.rounds):
        _timed_round(cases, device)
    timed = {c.name: (list(c.times), list(c.host_step)) for c in cases}  # before the measuring steps below
    for case in cases:
        case.times, case.host_step = timed[case.name]
    for case in cases:
        if not case.compiled:
            case.info["flops"] = _flops(case)
            with DispatchCounter(case.model, case.opt) as count:
                case.step()
            case.info["aten_ops"] = count.launches
            case.info["param_index_ops"] = count.param_index_total
            case.info["param_index_mb"] = count.param_index_bytes / 2**20
            params = list(case.model.parameters())
            saved, _ = saved_tensor_bytes(case.fwd_bwd, exclude=params)
            case.opt.zero_grad(set_to_none=True)
            case.info["saved_mb"] = saved / 2**20
        case.info["state_mb"] = _state_bytes(case.opt) / 2**20
        if not group.captured:  # a replay allocates nothing: its memory is the graph's pool, not measured here
            case.info["peak_gb"] = _peak_bytes(case, device) / 2**30
        if device.type == "cuda":
            try:
                case.info.update(_kernels(case, device))
            except Exception as exc:  # the profiler is a nice-to-have: its failure must not lose the timings
                log(f"  {case.name}: kernel count failed ({type(exc).__name__}: {exc})")
    rows = []
    for case in cases:
        case.times, case.host_step = timed[case.name]
    bare = {c.compiled: c for c in cases if c.name.split("/")[0] == "bare"}
    for case in cases:
        ref = bare.get(case.compiled) or bare.get(False)
        ratio = statistics.median(a / b for a, b in zip(case.times, ref.times)) if ref else float("nan")
        row = {
            "group": group.name,
            "case": case.name,
            "step_ms": statistics.median(case.times) * 1e3,
            "vs_bare": ratio,
            "host_step_ms": statistics.median(case.host_step) * 1e3 if case.host_step else float("nan"),
            "widths": case.widths,
            **case.info,
        }
        eager_ref = bare.get(False)
        if eager_ref is not None and "flops" in eager_ref.info and "flops" in case.info:
            row["flop_ratio"] = case.info["flops"] / eager_ref.info["flops"]
        for key in ("peak_gb", "saved_mb", "state_mb"):
            if ref is not None and key in case.info and ref.info.get(key):
                row[f"{key}_vs_bare"] = case.info[key] / ref.info[key]
        rows.append(row)
    del cases, bare
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    log(f"  {group.name}: done in {time.perf_counter() - t_start:.0f} s")
    return rows


# ---------------------------------------------------------------------------------------------- checks
def _mlp(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def _train(model, opt, batches, autocast=None, scaler=None) -> list[float]:
    losses = []
    for x, y in batches:
        with autocast or contextlib.nullcontext():
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _batches(device: torch.device, shape: tuple[int, ...], classes: int, n: int = 3, batch: int = 8):
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(batch, *shape, generator=gen).to(device),
            torch.randint(0, classes, (batch,), generator=gen).to(device),
        )
        for _ in range(n)
    ]


def check_no_clone_bit_exact(device: torch.device) -> tuple[bool, str]:
    makers = {
        "Adam foreach": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
        "Adam fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
        "AdamW fused wd": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, fused=True),
        "SGD Nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    }
    bad = []
    for label, make in makers.items():
        for net, shape in (("mlp", (24,)), ("cnn", (3, 16, 16))):
            states = []
            for wrapped in (False, True):
                torch.manual_seed(0)
                model = (_mlp(device) if net == "mlp" else tiny_cnn().to(device)).train()
                opt = make(model.parameters())
                if wrapped:
                    opt = LeaderCloneOptimizer(model, opt, RolePlan(1.0, 0.0))
                _train(model, opt, _batches(device, shape, 10))
                states.append(model.state_dict())
            if not all(torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values())):
                bad.append(f"{label}/{net}")
    if bad:
        return False, f"differs: {bad}"
    return True, "bit-exact: " + ", ".join(makers) + " on an MLP and a seed-style CNN (3 steps)"


def _copied_slices_equal(opt: LeaderCloneOptimizer) -> list[str]:
    bad = []
    for name, layer in opt.layers.items():
        roles = opt.roles[name]
        if not roles.has_clones:
            continue
        for pname, p in layer.params:
            if not layer.copied_by_clones(pname):
                continue
            er = layer.roles_of(pname, roles)
            dim = layer.dim_of(pname)
            a = p.detach().index_select(dim, er.clones.to(p.device))
            b = p.detach().index_select(dim, er.sources.to(p.device))
            if not torch.equal(a, b):
                bad.append(pname)
    return bad


def check_weight_mode_clones(device: torch.device) -> tuple[bool, str]:
    bad = []
    torch.manual_seed(0)
    cnn = tiny_cnn().to(device)
    opt = LeaderCloneOptimizer(cnn, torch.optim.Adam(cnn.parameters(), lr=1e-3), RolePlan.preset("mild", "cifar"))
    _train(cnn.train(), opt, _batches(device, (3, 16, 16), 10))
    bad += _copied_slices_equal(opt)
    model, loss = _build(Group("tiny", "llama", "tiny", 2, "fp32", []), device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lopt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), RolePlan.preset("mild"))
    for _ in range(3):
        loss(model).backward()
        lopt.step()
        lopt.zero_grad()
    bad += _copied_slices_equal(lopt)
    return not bad, "every clone's copied rows equal its source's (CNN, Llama)" if not bad else f"differ: {bad}"


def check_output_mode(device: torch.device) -> tuple[bool, str]:
    problems, diffs = [], []
    torch.manual_seed(0)
    cnn = tiny_cnn().to(device)
    opt = LeaderCloneOptimizer(
        cnn, torch.optim.Adam(cnn.parameters(), lr=1e-3), RolePlan.preset("mild", "cifar"), clone_mode="output"
    )
    batches = _batches(device, (3, 16, 16), 10, n=4)
    _train(cnn.train(), opt, batches[:3])
    x, y = batches[3]
    F.cross_entropy(cnn(x), y).backward()
    for name, layer in opt.layers.items():
        roles = opt.roles[name]
        g = layer.module.weight.grad
        if roles.has_clones and g is not None and bool(g.index_select(0, roles.clones.to(device)).abs().sum() != 0):
            problems.append(f"{name}: clone weight-gradient rows not zero")
    opt.zero_grad()
    model, loss = _build(Group("tiny", "llama", "tiny", 2, "fp32", []), device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lopt = LeaderCloneOptimizer(
            model, torch.optim.AdamW(model.parameters(), lr=1e-3), RolePlan.preset("mild"), clone_mode="output"
        )
    for _ in range(3):
        loss(model).backward()
        lopt.step()
        lopt.zero_grad()
    spec = LLAMAS["tiny"]
    ids = torch.randint(0, spec["vocab"], (2, spec["seq"]), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        for live, o, inp in ((cnn, opt, (x,)), (model, lopt, (ids,))):
            live.eval()
            plain = o.export_model().eval()
            a, b = live(*inp), plain(*inp)
            a, b = (a.logits, b.logits) if hasattr(a, "logits") else (a, b)
            diff = float((a - b).abs().max())
            diffs.append(diff)
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                problems.append(f"{type(live).__name__}: exported model differs by {diff:.2e}")
    ok = not problems
    detail = (
        f"clone weight-grad rows zero; exported == live (max |diff| {max(diffs):.1e})" if ok else "; ".join(problems)
    )
    return ok, detail


def check_mixed_precision(device: torch.device) -> tuple[bool, str]:
    done = []
    for mode in ("output", "weight"):
        torch.manual_seed(0)
        cnn = tiny_cnn().to(device).to(memory_format=torch.channels_last)
        opt = LeaderCloneOptimizer(
            cnn, torch.optim.Adam(cnn.parameters(), lr=1e-3), RolePlan.preset("mild", "cifar"), clone_mode=mode
        )
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in _batches(device, (3, 16, 16), 10)]
        losses = _train(cnn.train(), opt, batches, autocast=torch.autocast(device.type, dtype=torch.bfloat16))
        if not all(math.isfinite(v) for v in losses):
            return False, f"bf16 autocast {mode}: losses {losses}"
        switched = _layout_switches(cnn, batches[0][0])
        if switched:
            return False, f"bf16 channels_last {mode}: contiguous outputs from {switched}"
        done.append(f"bf16 autocast {mode} (channels_last kept)")
        if device.type == "cuda":
            torch.manual_seed(0)
            cnn = tiny_cnn().to(device)
            opt = LeaderCloneOptimizer(
                cnn, torch.optim.Adam(cnn.parameters(), lr=1e-3), RolePlan.preset("mild", "cifar"), clone_mode=mode
            )
            scaler = torch.amp.GradScaler("cuda")
            losses = _train(cnn.train(), opt, _batches(device, (3, 16, 16), 10),
                            autocast=torch.autocast("cuda", dtype=torch.float16), scaler=scaler)  # fmt: skip
            if not all(math.isfinite(v) for v in losses):
                return False, f"fp16 GradScaler {mode}: losses {losses}"
            done.append(f"fp16 GradScaler {mode}")
    return True, "train with finite losses: " + ", ".join(done)


def _layout_switches(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The modules whose 4-D output is not channels_last when the input is (output mode's expansions kept it)."""
    bad: list[str] = []
    hooks = [
        m.register_forward_hook(
            lambda m, i, o, n=n: bad.append(n)
            if torch.is_tensor(o) and o.dim() == 4 and o.shape[1] > 1
            and not o.is_contiguous(memory_format=torch.channels_last) else None
        )
        for n, m in model.named_modules() if n
    ]  # fmt: skip
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return bad


def check_alignment(device: torch.device) -> tuple[bool, str]:
    """The default plan on this device: CUDA bf16 Llama h2048 MLP counts are multiples of 64 (no cliff)."""
    spec = LLAMAS["h2048"]
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=spec["hidden"], intermediate_size=spec["inter"], num_hidden_layers=1,
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv"],
    )  # fmt: skip
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    plans = RolePlan.preset("aggressive").resolve(model)
    mlp = next(lp for n, lp in plans.items() if n.endswith(".mlp"))
    text = (
        f"{device.type} bf16 h2048 MLP at the aggressive preset: {mlp.active} of {mlp.units} active (align {mlp.align})"
    )
    if device.type == "cuda":
        return mlp.active % 64 == 0, text
    return mlp.active == 1971, text + " (CPU: the seed's counts)"


def check_graph_capture(device: torch.device) -> tuple[bool | None, str]:
    """Output mode's and weight mode's whole steps replayed from a CUDA graph train as eager steps do: twin
    seed-style CNNs on the same 8 batches, one stepped eagerly, one by :func:`capture_step` (3 warm-up steps,
    then replays)."""
    if device.type != "cuda":
        return None, "CUDA graphs need a CUDA device"
    results = [_captured_twins(device, mode) for mode in ("output", "weight")]
    return all(ok for ok, _ in results), "; ".join(text for _, text in results)


def _captured_twins(device: torch.device, mode: str) -> tuple[bool, str]:
    batches = _batches(device, (3, 16, 16), 10, n=8)
    twins = []
    for captured in (False, True):
        torch.manual_seed(0)
        cnn = tiny_cnn().to(device).train()
        base = torch.optim.Adam(cnn.parameters(), lr=1e-3, capturable=True, foreach=True)
        opt = LeaderCloneOptimizer(cnn, base, RolePlan.preset("mild", "cifar"), clone_mode=mode)
        if captured:
            x, y = (t.clone() for t in batches[0])

            def load(i, x=x, y=y):
                x.copy_(batches[i][0]), y.copy_(batches[i][1])

            replay = capture_step(lambda cnn=cnn, x=x, y=y: F.cross_entropy(cnn(x), y).backward(), opt, device, load)
            for i in range(3, len(batches)):
                load(i)
                replay()
        else:
            _train(cnn, opt, batches)
        twins.append(dict(cnn.named_parameters()))
    torch.cuda.synchronize(device)
    a, b = twins
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    exact = all(torch.equal(a[k], b[k]) for k in a)
    followed = True  # weight mode: the replayed clone event kept every clone equal to its source
    if mode == "weight":
        for name, layer in opt.layers.items():
            roles = opt.roles[name]
            w = layer.weight.detach()
            followed &= torch.equal(w[roles.clones.to(device)], w[roles.sources.to(device)])
    return (
        (exact or diff < 1e-5) and followed,
        f"{mode} mode, 8 steps (5 replayed): parameters {'bit-exact' if exact else f'max |diff| {diff:.1e}'}"
        + ("" if mode == "output" else f", clones {'equal' if followed else 'DIFFER from'} their sources"),
    )


CHECKS = {
    "no-clone plan bit-exact to the bare optimizer": check_no_clone_bit_exact,
    "weight mode: clone rows equal their sources": check_weight_mode_clones,
    "output mode: zero clone grads, export == live": check_output_mode,
    "mixed precision trains": check_mixed_precision,
    "default plan aligned on this device": check_alignment,
    "a CUDA-graph replayed step == an eager one": check_graph_capture,
}


def run_checks(device: torch.device, log) -> list[dict[str, Any]]:
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = []
    try:
        for name, fn in CHECKS.items():
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ok, detail = fn(device)
            except Exception as exc:  # a crash is a failed check, reported with the rest
                ok, detail = False, f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            skipped = ok is None  # not applicable on this device: said, not counted as passed or failed
            out.append({"check": name, "ok": skipped or bool(ok), "skipped": skipped, "detail": detail,
                        "s": time.perf_counter() - t0})  # fmt: skip
            log(f"  check {'SKIP' if skipped else 'PASS' if ok else 'FAIL'}: {name}: {detail}")
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


# ---------------------------------------------------------------------------------------------- plan of runs
_CNN_SCENARIOS = ["bare", "output/mild", "output/aggressive", "weight/mild", "dense@mild", "dense@aggressive"]
_LLAMA_SCENARIOS = ["bare", "output/mild", "output/aggressive", "weight/mild", "dense@mild", "dense@aggressive"]
_DRAWN = "output/mild-drawn"  # the control of packed roles (views) against drawn ones (gathers): issue 19 item 2
_REPACKED = "output/mild-repacked"  # drawn roles (as elections leave them) reordered into runs by repack=True
_GPT2_SCENARIOS = ["bare", "output/mild", "output/aggressive", "weight/mild"]  # no dense control (see llama())
# a mixture of experts: each expert at its active neurons (views on packed roles, gathers on drawn ones)
_MOE_SCENARIOS = ["bare", "output/mild", "output/aggressive", "weight/mild", _DRAWN, _REPACKED]
# weight mode computing every weight-gradient row: fewer launches and no Python autograd function per layer or
# block projection (bench_host.md: 1.22x of the bare host time against 1.45x on the CNN, 1.10x against 1.16-1.18x on
# a Llama), more weight-gradient FLOPs (a Llama's q/k/v, gate, up rows and o, down columns): the GPU decides; and
# skipping in every layer, however little work a call has, the control of the default's floor (grad_skip.MIN_WORK)
_NOSKIP = "weight/mild-noskip"
_SKIPALL = "weight/mild-skipall"
# the fused norm's torch path (active channels, then a gather and the affine) against the plain norm on every channel
# after the expansion: fewer passes, more activation memory (bench_norms.md: torch ops on CPU, 0.74x vs 0.96x of bare)
_UNFUSED = "output/mild-unfused"
_FUSED = "output/mild-fused"
# the expansion's backward by index_add (every clone of a layer adding atomically into its one source) against the
# default fold by sums (bench_norms.md: on CPU the fold is faster too)
_INDEXADD = "output/mild-indexadd"


def groups_for(args: argparse.Namespace) -> list[Group]:
    """The groups to run, most important first (the budget skips the tail)."""
    r = args.rounds
    if args.smoke:
        return [
            Group(
                "tiny CNN b4 fp32",
                "cnn",
                "tiny_cnn",
                4,
                "fp32",
                _CNN_SCENARIOS + [_DRAWN, _NOSKIP, _SKIPALL, _UNFUSED, _FUSED, _INDEXADD],
                rounds=r,
            ),
            Group("tiny CNN b4 bf16 channels-last", "cnn", "tiny_cnn", 4, "bf16cl", _CNN_SCENARIOS[:3], rounds=r),
            Group(
                "tiny Llama autocast", "llama", "tiny", 2, "autocast", _LLAMA_SCENARIOS + [_NOSKIP, _SKIPALL], rounds=r
            ),  # fmt: skip
            Group(
                "tiny Llama bf16",
                "llama",
                "tiny",
                2,
                "bf16",
                ["bare", "output/aggressive", "output/aggressive-align1"],
                rounds=r,
            ),  # fmt: skip
            Group("tiny CNN b4 fp32 compiled", "cnn", "tiny_cnn", 4, "fp32", ["bare", "output/mild"], True, r),
            Group("tiny MoE fp32", "llama", "tiny_moe", 2, "fp32", _MOE_SCENARIOS, rounds=r),
            Group("tiny GPT-2 autocast", "llama", "tiny_gpt2", 2, "autocast", _GPT2_SCENARIOS, rounds=r),
        ]
    quick = args.quick
    h2048 = ["bare", "output/mild", "output/aggressive", "output/aggressive-align1", "output/0.25-0.125"]
    groups = [
        Group(
            "Llama h2048 bf16",
            "llama",
            "h2048",
            LLAMAS["h2048"]["batch"],
            "bf16",
            h2048 + ([] if quick else ["dense@mild", "dense@aggressive"]),
            rounds=min(r, 8),
            cost_s=90,
        ),  # fmt: skip
        Group(
            "Llama h1024 bf16 autocast",
            "llama",
            "h1024",
            LLAMAS["h1024"]["batch"],
            "autocast",
            _LLAMA_SCENARIOS + [_NOSKIP, _SKIPALL, _DRAWN, _REPACKED],
            rounds=r,
        ),  # fmt: skip
        Group(
            "seed CIFAR CNN b128 fp32",
            "cnn",
            "seed_cifar",
            128,
            "fp32",
            _CNN_SCENARIOS + [_DRAWN, _NOSKIP, _SKIPALL, _UNFUSED, _FUSED, _INDEXADD],
            rounds=r,
        ),
        Group(
            "seed CIFAR CNN b128 fp32, captured",
            "cnn",
            "seed_cifar",
            128,
            "fp32",
            ["bare", "output/mild", "output/aggressive", "weight/mild", "dense@mild"],
            rounds=r,
            cost_s=45,
            captured=True,
        ),  # fmt: skip
        Group(
            "seed CIFAR CNN b1024 bf16 channels-last",
            "cnn",
            "seed_cifar",
            1024,
            "bf16cl",
            _CNN_SCENARIOS + [_UNFUSED, _FUSED, _INDEXADD],
            rounds=r,
        ),
        Group(
            "Llama h1024 bf16 autocast, compiled",
            "llama",
            "h1024",
            LLAMAS["h1024"]["batch"],
            "autocast",
            ["bare", "output/mild", "output/aggressive"] + ([] if quick else ["dense@aggressive"]),
            True,
            r,
            cost_s=200 if quick else 260,
        ),  # fmt: skip
        Group(
            "seed CIFAR CNN b128 fp32, compiled",
            "cnn",
            "seed_cifar",
            128,
            "fp32",
            ["bare", "output/mild"] + ([] if quick else ["output/aggressive", "dense@mild"]),
            True,
            r,
        ),  # fmt: skip
        Group(
            "GPT-2 small (124M) bf16 autocast",
            "llama",
            "gpt2",
            LLAMAS["gpt2"]["batch"],
            "autocast",
            _GPT2_SCENARIOS,
            rounds=r,
            cost_s=60,
        ),  # fmt: skip
        Group(
            "Mixtral-style h1024, 8 experts top 2, bf16 autocast",
            "llama",
            "moe_h1024",
            LLAMAS["moe_h1024"]["batch"],
            "autocast",
            _MOE_SCENARIOS,
            rounds=r,
            cost_s=120,
        ),  # fmt: skip
    ]
    if not quick:
        groups += [
            Group(
                "seed CIFAR CNN b128 bf16 channels-last", "cnn", "seed_cifar", 128, "bf16cl", _CNN_SCENARIOS, rounds=r
            ),
            Group("seed CIFAR CNN b1024 fp32", "cnn", "seed_cifar", 1024, "fp32", _CNN_SCENARIOS, rounds=r),
            Group("seed MNIST CNN b256 fp32", "cnn", "seed_mnist", 256, "fp32", _CNN_SCENARIOS[:4], rounds=r),
            Group(
                "seed CIFAR CNN b1024 bf16 channels-last, compiled",
                "cnn",
                "seed_cifar",
                1024,
                "bf16cl",
                ["bare", "output/mild", "output/aggressive", "dense@mild"],
                True,
                r,
            ),  # fmt: skip
        ]
    return groups


# ---------------------------------------------------------------------------------------------- report
TARGETS = [  # (group prefix, case, bound, what): the issue's targets, checked against the measured ratios
    ("Llama h1024 bf16 autocast", "output/mild", 0.95, "step"),
    ("Llama h1024 bf16 autocast", "output/aggressive", 0.90, "step"),
    ("Llama h1024 bf16 autocast, compiled", "output/mild/compiled", 0.95, "step"),
    ("Llama h1024 bf16 autocast, compiled", "output/aggressive/compiled", 0.90, "step"),
    ("Llama h2048 bf16", "output/mild", 0.80, "step"),
    ("Llama h2048 bf16", "output/aggressive", 0.68, "step"),
    ("seed CIFAR CNN", "output/mild", 1.10, "step"),
    ("seed CIFAR CNN", "output/aggressive", 1.10, "step"),
    ("seed CIFAR CNN", "output/mild/compiled", 1.0, "step"),
    ("seed CIFAR CNN", "output/aggressive/compiled", 1.0, "step"),
    ("seed CIFAR CNN", "output/mild/captured", 1.0, "step"),
    ("seed CIFAR CNN", "output/aggressive/captured", 1.0, "step"),
    ("Llama h", "output/mild", 0.90, "peak"),
    ("Llama h", "output/aggressive", 0.90, "peak"),
    ("seed CIFAR CNN", "output/mild", 1.0, "peak"),
]


def _fmt(v: Any, spec: str = ".3f") -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else format(v, spec)
    return "-" if v is None else str(v)


def report(meta: dict[str, Any], checks: list[dict], rows: list[dict], skipped: list[str]) -> str:
    lines = [
        "# GPU training-step benchmark (`benchmarks/bench_gpu.py`)",
        "",
        f"{meta['device_name']}; torch {meta['torch']}, CUDA {meta['cuda']}, transformers {meta['transformers']}, "
        f"python {meta['python']}; {meta['mode']} run, {meta['elapsed_s']:.0f} s. Timing: TF32 as torch's defaults "
        f"(matmul {meta['tf32_matmul']}, cuDNN {meta['tf32_cudnn']}); checks: TF32 off, deterministic algorithms.",
        "",
        "Step ratios are medians of per-round ratios to the bare model + bare optimizer of the same group (compiled "
        "cases to the compiled bare step), cases interleaved round-robin after warm-up, CUDA events (CPU: "
        "perf_counter). FLOPs: forward + backward counted by `FlopCounterMode`. Peak: one step of the case "
        "alone (its resident parameters, "
        "buffers and optimizer state plus what the step allocates; on CPU a lower bound from the profiler's memory "
        "events). Kernels: CUDA kernels of one step "
        "(`torch.profiler`); index kernels: aten gather/index_select/index_add/index_copy/... calls. aten ops and "
        "parameter-sized index ops: `egg_optim.utils.DispatchCounter` (eager). Host ms: time inside `opt.step()` "
        "on the host (no synchronisation).",
        "",
        "## Correctness on the device",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    lines += [
        f"| {c['check']} | {'skipped' if c.get('skipped') else 'PASS' if c['ok'] else '**FAIL**'} | {c['detail']} |"
        for c in checks
    ]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for name, rs in groups.items():
        lines += [
            "",
            f"## {name}",
            "",
            "| case | step ms | vs bare | FLOP ratio | peak GB | peak vs bare | saved MB | state MB | kernels "
            "| index kernels | aten ops | param-sized index ops (MB) | host ms in step() | active widths |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rs:
            pidx = r.get("param_index_ops")
            pidx_text = "-" if pidx is None else f"{pidx} ({r['param_index_mb']:.1f})"
            lines.append(
                f"| {r['case']} | {_fmt(r['step_ms'], '.2f')} | {_fmt(r['vs_bare'])} | {_fmt(r.get('flop_ratio'))} | "
                f"{_fmt(r.get('peak_gb'), '.3g')} | {_fmt(r.get('peak_gb_vs_bare'))} | "
                f"{_fmt(r.get('saved_mb'), '.1f')} | "
                f"{_fmt(r.get('state_mb'), '.1f')} | {_fmt(r.get('kernels'))} | {_fmt(r.get('index_kernels'))} | "
                f"{_fmt(r.get('aten_ops'))} | "
                f"{pidx_text} | "
                f"{_fmt(r['host_step_ms'], '.2f')} | {r['widths'] or '-'} |"
            )
    lines += ["", "## The issue's targets", "", "| group | case | target | measured | met |", "|---|---|---|---|---|"]
    for prefix, case, bound, what in TARGETS:
        for r in rows:
            if (
                r["group"].startswith(prefix)
                and r["case"] == case
                and all((v in r["group"]) == (v in case) for v in ("compiled", "captured"))
            ):
                v = r["vs_bare"] if what == "step" else r.get("peak_gb_vs_bare")
                if v is None:
                    continue
                label = "step" if what == "step" else "peak memory"
                lines.append(
                    f"| {r['group']} | {case} | {label} <= {bound:.2f}x | {v:.3f} | {'yes' if v <= bound else 'no'} |"
                )
    # every case: within 1.05x of the dense net at the same active widths, or no slower than bare where that
    # dense net is itself no faster than bare
    for r in rows:
        parts = r["case"].split("/")
        if parts[0] != "output":
            continue
        # the same variant (eager, compiled, captured); the fused-or-not norm is output mode's own choice
        dense_name = "dense@" + "/".join(parts[1:]).replace("-unfused", "").replace("-fused", "").replace(
            "-indexadd", ""
        )
        dense = next((d for d in rows if d["group"] == r["group"] and d["case"] == dense_name), None)
        if dense is None or not (dense["vs_bare"] > 0):
            continue
        if dense["vs_bare"] >= 1.0:
            ok, text = r["vs_bare"] <= 1.0, f"<= bare (dense {dense['vs_bare']:.3f})"
            value = r["vs_bare"]
        else:
            value = r["vs_bare"] / dense["vs_bare"]
            ok, text = value <= 1.05, f"<= 1.05x of {dense_name}"
        lines.append(f"| {r['group']} | {r['case']} | {text} | {value:.3f} | {'yes' if ok else 'no'} |")
    profiled = [r for r in rows if r.get("top")]
    if profiled:
        lines += [
            "",
            "## Where the device time goes (one profiled step per case)",
            "",
            "Busy: the step's kernels' summed device time; busy / step well below 1 means the device waited for the "
            f"host (a launch-bound step). The {TOP_KERNELS} most expensive kernels, ms (launches).",
            "",
            "| group | case | busy ms | busy / step | top kernels |",
            "|---|---|---|---|---|",
        ]
        for r in profiled:
            top = "; ".join(f"`{name[:70]}` {ms:.2f} ({n})" for name, ms, n in r["top"])
            share = r["busy_ms"] / r["step_ms"] if r["step_ms"] else float("nan")
            lines.append(f"| {r['group']} | {r['case']} | {r['busy_ms']:.2f} | {share:.2f} | {top} |")
    if skipped:
        lines += ["", "Skipped (time budget or failure): " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def _meta(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    try:
        import transformers

        tv = transformers.__version__
    except ImportError:
        tv = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    return {
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": tv,
        "python": platform.python_version(),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "elapsed_s": 0.0,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results", help="folder for bench_gpu.md and bench_gpu.json")
    parser.add_argument("--quick", action="store_true", help="the headline groups and cases only (~6-8 min, H200)")
    parser.add_argument("--smoke", action="store_true", help="CPU (or any device), tiny sizes, 2 rounds: for tests")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per group (default 20, quick 12)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default 3, smoke 1)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip groups that start after this (480)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. reduce-overhead)")
    parser.add_argument("--compile-backend", default=None, help="default inductor (smoke: eager)")
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--groups", nargs="*", default=None, help="run only groups whose name contains one of these")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.smoke else 12 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.budget_s = args.budget_s if args.budget_s is not None else 480.0
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    meta = _meta(device, args)
    checks = [] if args.no_checks else run_checks(device, log)
    rows: list[dict] = []
    skipped: list[str] = []

    def write() -> None:
        meta["elapsed_s"] = time.perf_counter() - t0
        (out / "bench_gpu.md").write_text(report(meta, checks, rows, skipped))
        (out / "bench_gpu.json").write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows}, indent=1))

    write()
    for group in groups_for(args):
        if args.groups and not any(s in group.name for s in args.groups):
            continue
        if not args.smoke and time.perf_counter() - t0 + group.estimate() > args.budget_s:
            skipped.append(f"{group.name} (budget: about {group.estimate():.0f} s more than the {args.budget_s:.0f} s)")
            log(f"skip {group.name}: would pass the {args.budget_s:.0f} s budget")
            continue
        log(f"group {group.name}")
        try:
            rows += measure_group(group, device, args, log)
        except Exception as exc:  # one failing group must not lose the others' results
            traceback.print_exc()
            skipped.append(f"{group.name} ({type(exc).__name__}: {str(exc)[:200]})")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write()
    log(f"wrote {out / 'bench_gpu.md'}")
    print((out / "bench_gpu.md").read_text())
    return {"checks": checks, "rows": rows, "skipped": skipped}


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(c["ok"] for c in result["checks"]) else 1)
