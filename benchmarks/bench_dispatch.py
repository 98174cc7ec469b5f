"""CPU proxies of what a training step costs on a GPU (issue 19), and the memory a step holds.

For each case (bare model + bare optimizer; weight and output mode without clones; weight mode mild; output mode
mild and aggressive; with the default packed first roles, and mild again with the seed's drawn, scattered roles,
as elections leave them, without and with ``repack=True``, which reorders a transformer block's units into runs)
on the seed CIFAR CNN (the seed's ``cifar`` tables) and a small Llama (uniform presets; ``--models mixtral``: its
sizes with 4 experts of half its MLP width routed top 2):

- **aten ops per step** (forward + backward + optimizer step; views not counted): on a GPU each is about one
  kernel launch, and small models are launch-bound;
- **index ops over parameter-sized tensors** (gather / index_select / index_add / index_copy / ... on weights,
  gradients, optimizer state and what is built from them) and the bytes they write: traffic the bare step does
  not have (see :class:`egg_optim.utils.DispatchCounter` for the exact rule);
- **the optimizer step alone**: its aten ops (and how many are parameter-sized index ops), a measure of its
  Python and dispatch work that machine load does not blur, and its host time (median of timed steps, no
  counter attached), with the whole step's;
- **memory**: bytes autograd saves for backward (:func:`egg_optim.utils.saved_tensor_bytes`, parameters not
  counted), optimizer state (clones' parked rows included), gradients, their sum with the parameters and
  buffers ("held"), and the peak of one step (:func:`egg_optim.utils.peak_bytes_above`, from the profiler's
  memory events, plus the resident parameters, buffers and state) which includes every temporary: weight
  slices, the optimizer's stand-in copies, gradients.

Fused BatchNorms run their torch-ops path (what CUDA runs), except the ``native norms`` row (egg_optim's CPU
kernels). The ``bf16 autocast`` rows run the forward pass under ``torch.autocast("cpu", torch.bfloat16)`` (fp32
weights, as the issue's Llama h1024 case) and are compared with the bare step under autocast; the CNN's
``channels_last`` rows run model and input in ``torch.channels_last`` (the issue's bf16 channels-last cases), where a
layout conversion shows as extra aten ops, and its ``unfused norms`` rows run ``EggConfig(fuse_norms=False)`` (clones
expanded before a plain BatchNorm on every channel: the alternative to the fused norm's torch path on CUDA). Run::

    python benchmarks/bench_dispatch.py            # both models, 10 timed steps per case
    python benchmarks/bench_dispatch.py --quick    # 4 timed steps
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from egg_optim import LeaderCloneOptimizer, RolePlan  # noqa: E402
from egg_optim.utils import DispatchCounter, peak_bytes_above, saved_tensor_bytes  # noqa: E402


def _bench_gpu():
    """The model builders of bench_gpu.py (this folder), loaded by path."""
    path = Path(__file__).with_name("bench_gpu.py")
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_gpu", module)
    spec.loader.exec_module(module)
    return module


SMALL_LLAMA = {"hidden": 256, "layers": 4, "heads": 8, "kv": 2, "inter": 688, "seq": 128, "batch": 4, "vocab": 1000}
CASES = [
    ("bare", None, None),
    ("weight/no clones", "weight", "baseline"),
    ("output/no clones", "output", "baseline"),
    ("weight/mild", "weight", "mild"),
    ("output/mild", "output", "mild"),
    ("output/aggressive", "output", "aggressive"),
    ("output/mild, native norms", "output", "mild"),
    ("weight/mild, drawn roles", "weight", "mild"),
    ("output/mild, drawn roles", "output", "mild"),
    ("weight/mild, drawn roles, repacked", "weight", "mild"),
    ("output/mild, drawn roles, repacked", "output", "mild"),
    ("bare, bf16 autocast", None, None),
    ("output/mild, bf16 autocast", "output", "mild"),
    ("output/aggressive, bf16 autocast", "output", "aggressive"),
    ("output/mild, unfused norms", "output", "mild"),
    ("output/aggressive, unfused norms", "output", "aggressive"),
    ("bare, channels_last", None, None),
    ("weight/mild, channels_last", "weight", "mild"),
    ("output/mild, channels_last", "output", "mild"),
]
AUTOCAST = "bf16 autocast"  # cases named so run forward under torch.autocast("cpu", torch.bfloat16)
CHANNELS_LAST = "channels_last"  # CNN cases named so run model and input in torch.channels_last
UNFUSED = "unfused norms"  # CNN cases named so run with EggConfig(fuse_norms=False)
CNN_ONLY = (CHANNELS_LAST, UNFUSED)


def _bare_of(name: str) -> str:
    """The bare case a case is compared with: the same model, with autocast / channels_last if the case has it."""
    kind = name.split("/")[0]
    for variant in (AUTOCAST, CHANNELS_LAST):
        if variant in name:
            return f"{kind}/bare, {variant}"
    return f"{kind}/bare"


@dataclass
class Case:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    fwd_bwd: Callable[[], None]
    layers: int
    times: list[float] = field(default_factory=list)
    host: list[float] = field(default_factory=list)

    def step(self) -> None:
        t0 = time.perf_counter()
        self.fwd_bwd()
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)
        self.host.append(t2 - t1)


def _small_mixtral() -> nn.Module:
    """The small Llama's sizes with a Mixtral-style MLP: 4 experts of half its width, routed top 2."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = SMALL_LLAMA
    cfg = MixtralConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"] // 2,
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv"],
        max_position_embeddings=c["seq"], num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.0,
    )  # fmt: skip
    return MixtralForCausalLM(cfg)


def _build(kind: str, name: str, mode: str | None, preset: str | None, batch: int) -> Case:
    bg = _bench_gpu()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if AUTOCAST in name else contextlib.nullcontext()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "cnn":
        model = bg.seed_cifar()
        x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 100, (batch,), generator=gen)
        if CHANNELS_LAST in name:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        base = torch.optim.Adam(model.parameters(), lr=1e-4)

        def fwd_bwd() -> None:
            with cast:
                loss = F.cross_entropy(model(x), y)
            loss.backward()

        table = "cifar"
    else:
        model = bg.llama(SMALL_LLAMA) if kind == "llama" else _small_mixtral()
        ids = torch.randint(0, SMALL_LLAMA["vocab"], (SMALL_LLAMA["batch"], SMALL_LLAMA["seq"]), generator=gen)
        base = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def fwd_bwd() -> None:
            with cast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()

        table = "uniform"
    model.train()
    opt: torch.optim.Optimizer = base
    layers = 0
    if mode is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first_roles = "drawn" if "drawn" in name else "packed"
            plan = RolePlan.preset(preset, table)
            opt = LeaderCloneOptimizer(
                model,
                base,
                plan,
                clone_mode=mode,
                seed=0,
                first_roles=first_roles,
                fuse_norms=UNFUSED not in name,
                repack="repacked" in name,  # scattered roles (as elections leave them) reordered into runs
                example_inputs=x[:2] if kind == "cnn" else None,  # (which plain layers may move: checked on it)
            )
        layers = len(opt.layers)
    case = Case(f"{kind}/{name}", model, opt, fwd_bwd, layers)
    case.step()  # norm coupling is decided (and norms fused) in the first step
    if "native" not in name:
        for m in model.modules():
            if hasattr(m, "_egg_kernel"):
                m._egg_kernel = False  # the torch-ops path, as on CUDA
    return case


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    if isinstance(opt, LeaderCloneOptimizer):
        return opt.state_bytes()
    return _bytes(v for st in opt.state.values() for v in st.values())


def measure(case: Case) -> dict[str, float]:
    with DispatchCounter(case.model, case.opt) as count:
        case.step()
    case.fwd_bwd()
    with DispatchCounter(case.model, case.opt) as in_step:  # the optimizer step alone
        case.opt.step()
    case.opt.zero_grad(set_to_none=True)
    saved, _ = saved_tensor_bytes(case.fwd_bwd, exclude=case.model.parameters())
    grads = _bytes(p.grad for p in case.model.parameters())
    case.opt.zero_grad(set_to_none=True)
    params = _bytes(case.model.parameters()) + _bytes(case.model.buffers())
    state = _state_bytes(case.opt)
    transient, _ = peak_bytes_above(case.step)
    return {
        "layers": case.layers,
        "launches": count.launches,
        "step_launches": in_step.launches,
        "step_param_index_ops": in_step.param_index_total,
        "index_ops": sum(count.index_ops.values()),
        "param_index_ops": count.param_index_total,
        "param_index_mb": count.param_index_bytes / 2**20,
        "by_op": dict(count.param_index_ops),
        "saved_mb": saved / 2**20,
        "state_mb": state / 2**20,
        "grad_mb": grads / 2**20,
        "held_mb": (params + grads + state + saved) / 2**20,
        "peak_mb": (params + state + transient) / 2**20,
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 10, quick 4)")
    parser.add_argument("--cnn-batch", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=["cnn", "llama"], choices=["cnn", "llama", "mixtral"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (4 if args.quick else 10)
    results: dict[str, dict[str, float]] = {}
    for kind in args.models:
        cases = [
            _build(kind, name, mode, preset, args.cnn_batch)
            for name, mode, preset in CASES
            if kind == "cnn" or not any(v in name for v in CNN_ONLY)
        ]
        for case in cases:
            case.step()
        for case in cases:
            case.times.clear()
            case.host.clear()
        for _ in range(steps):  # round-robin: machine noise hits every case alike
            for case in cases:
                case.step()
        by_name = {case.name: case for case in cases}
        for case in cases:
            bare = by_name[_bare_of(case.name)]
            row = measure(case)
            row["step_ms"] = statistics.median(case.times) * 1e3
            row["host_step_ms"] = statistics.median(case.host) * 1e3
            row["vs_bare"] = statistics.median(a / b for a, b in zip(case.times, bare.times))
            results[case.name] = row
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {steps} timed rounds, medians")
    print(
        "| case | managed layers | aten ops / step | extra per layer | index ops | parameter-sized index ops "
        "| their MB | aten ops in step() (index) | step() host ms | step ms | vs bare | saved for backward MB "
        "| optimizer state MB | grads MB | held MB (vs bare) | step peak MB (vs bare) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        bare = results[_bare_of(name)]
        extra = (r["launches"] - bare["launches"]) / r["layers"] if r["layers"] else 0.0
        print(
            f"| {name} | {r['layers']} | {r['launches']} | {extra:.1f} | {r['index_ops']} | {r['param_index_ops']} | "
            f"{r['param_index_mb']:.2f} | {r['step_launches']} ({r['step_param_index_ops']}) | "
            f"{r['host_step_ms']:.2f} | {r['step_ms']:.1f} | {r['vs_bare']:.3f} | "
            f"{r['saved_mb']:.1f} ({r['saved_mb'] / bare['saved_mb']:.3f}) | "
            f"{r['state_mb']:.2f} ({r['state_mb'] / bare['state_mb']:.3f}) | {r['grad_mb']:.2f} | "
            f"{r['held_mb']:.1f} ({r['held_mb'] / bare['held_mb']:.3f}) | "
            f"{r['peak_mb']:.1f} ({r['peak_mb'] / bare['peak_mb']:.3f}) |"
        )
    print()
    for name, r in results.items():
        if r["by_op"]:
            print(f"{name}: parameter-sized index ops by op: {r['by_op']}")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "by_op"} for k, v in results.items()}))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
