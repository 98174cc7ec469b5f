"""Eager vs ``torch.compile`` training step on the seed MNIST CNN: baseline, output mode, weight mode.

Runs in ONE process and interleaves the cases round-robin (so machine noise hits all of them alike). The model
is compiled (``torch.compile(model)``, inductor by default); loss, backward and the optimizer step run as usual.
Reports, per case: graph breaks in the model's forward (``torch._dynamo.explain``), compile time (the first two
steps, which compile forward and backward, minus two steady steps), the median step time, and ratios inside the
run: against the eager bare baseline, and compiled over eager of the same case (median of per-round ratios).

Cases: ``baseline`` is the bare Adam step on the plain model; ``output``/``weight`` are
``LeaderCloneOptimizer(clone_mode=...)`` with the seed's ``mild`` plan (``mnist`` table). ``output-torchnorm``
is output mode with the fused BatchNorm run as torch ops (``native_kernels`` off) instead of the C kernels:
under compile inductor can then fuse the norm with its neighbours, while the kernels are opaque custom ops.
``output-unfused`` is output mode with coupled norms left unfused (``fuse_norms=False``: the clones are expanded
first and the plain BatchNorm runs on every channel), the default where the C kernels do not run, CUDA included.
``output-unfused-gather`` is the same with the clones expanded by ``index_select`` when compiled too (what
compiled output mode did before it expanded packed roles by a ``cat`` of broadcast views): the control.

    python benchmarks/bench_compile.py               # 20 timed rounds
    python benchmarks/bench_compile.py --steps 6     # quick look
    python benchmarks/bench_compile.py --steps 8 --kernel-profile 8 --variants output-unfused output-unfused-gather

Compilation uses a fresh, temporary inductor cache folder (``--cache-dir`` to use another): so the compile times
are cold ones, and no graph cached by an earlier version of the custom ops is replayed (inductor's FX-graph cache
key does not cover a custom op's layout tags).

The last line printed is one JSON object with the headline ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch._dynamo
from egg_recipes.models import SeedMNISTNet
from torch import nn

from egg_optim import LeaderCloneOptimizer, RolePlan

VARIANTS = ("baseline", "output", "output-torchnorm", "output-unfused", "output-unfused-gather", "weight")


@dataclass
class Case:
    name: str
    variant: str
    compiled: bool
    step: Callable[[], None]
    breaks: int = -1
    compile_s: float = 0.0
    times: list[float] = field(default_factory=list)


def _model(variant: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = SeedMNISTNet(in_channels=1, num_classes=10)
    base = torch.optim.Adam(model.parameters(), lr=1e-4)
    opt: torch.optim.Optimizer = base
    if variant != "baseline":
        clone_mode = variant.split("-")[0]
        fuse = {"fuse_norms": False} if variant.startswith("output-unfused") else {}
        opt = LeaderCloneOptimizer(model, base, RolePlan.preset("mild"), clone_mode=clone_mode, seed=0, **fuse)
        with torch.no_grad():  # one eager forward gives the norm coupling's evidence (a compiled one gives none)
            model(torch.zeros(2, 1, 28, 28))
        opt.couple_norms()  # applied before compiling: it swaps norm classes
        if variant == "output-torchnorm":  # after the coupling, which fuses the norms (and would enable kernels)
            fused = [m for m in model.modules() if hasattr(m, "_egg_kernel")]
            assert fused, "no fused norm to switch to torch ops"
            for m in fused:
                m._egg_kernel = False
        if variant == "output-unfused-gather":
            for m in model.modules():
                if getattr(m, "_egg_tile", None) is not None:
                    m._egg_tile = None  # compiled, expand by index_select as in eager
    return model.train(), opt


def _graph_breaks(variant: str) -> int:
    """Graph breaks in the training-mode forward (counted on a model of its own; Dynamo's caches reset after)."""
    model, _ = _model(variant)
    torch._dynamo.reset()
    n = torch._dynamo.explain(model)(torch.randn(4, 1, 28, 28)).graph_break_count
    torch._dynamo.reset()
    return n


def _make(variant: str, compiled: bool, batch: int, backend: str, mode: str | None) -> Case:
    model, opt = _model(variant)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    fwd = torch.compile(model, backend=backend, mode=mode) if compiled else model
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        loss_fn(fwd(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    case = Case(f"{variant}/{'compiled' if compiled else 'eager'}", variant, compiled, step)
    if compiled:
        t0 = time.perf_counter()
        step()
        step()
        first_two = time.perf_counter() - t0
        t0 = time.perf_counter()
        step()
        step()
        case.compile_s = first_two - (time.perf_counter() - t0)
    return case


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (every case steps once per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: torch's default)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--cache-dir", default=None, help="inductor cache folder (default: a fresh temporary one)")
    parser.add_argument(
        "--kernel-profile",
        type=int,
        default=0,
        metavar="K",
        help="instead of timing: profile the compiled step of each variant (inductor's C++ kernels named) and print "
        "its K most expensive entries, ms per step",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # torch sets it to its default on first use
    with tempfile.TemporaryDirectory(prefix="egg_bench_inductor_") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or cache
        try:
            return _run(args)
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def _kernel_profile(args: argparse.Namespace) -> dict[str, float]:
    """Where each compiled step spends its time, by generated kernel (``cpp.enable_kernel_profile``: each kernel
    records itself, which costs a little, hence not in the timed runs)."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    result: dict[str, float] = {}
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        for v in dict.fromkeys(["baseline", *args.variants]):
            case = _make(v, True, args.batch, args.backend, args.mode)
            for _ in range(max(args.warmup, 1)):
                case.step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    case.step()
            top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.kernel_profile]
            print(f"{case.name}: self ms per step")
            for e in top:
                ms = e.self_cpu_time_total / 1e3 / args.steps
                print(f"  {ms:8.1f}  {e.key}")
                result[f"{v}: {e.key}"] = ms
    return result


def _run(args: argparse.Namespace) -> dict[str, float]:
    if args.kernel_profile:
        return _kernel_profile(args)
    # recompiles: one per compiled model object (the cases share code objects)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(args.variants))
    variants = list(dict.fromkeys(["baseline", *args.variants]))
    breaks = {v: _graph_breaks(v) for v in variants}
    cases = [_make(v, c, args.batch, args.backend, args.mode) for v in variants for c in (False, True)]
    for c in cases:
        c.breaks = breaks[c.variant]
    for _ in range(args.warmup):
        for case in cases:
            case.step()
    for _ in range(args.steps):
        for case in cases:
            t0 = time.perf_counter()
            case.step()
            case.times.append(time.perf_counter() - t0)

    by_name = {c.name: c for c in cases}
    med = {c.name: statistics.median(c.times) for c in cases}
    base = by_name["baseline/eager"]

    def ratio(a: Case, b: Case) -> float:  # median of per-round ratios: robust to slow rounds
        return statistics.median(x / y for x, y in zip(a.times, b.times))

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, backend {args.backend}"
        f"{'' if args.mode is None else f' mode {args.mode}'}, {args.steps} timed rounds, medians"
    )
    print("| case | graph breaks | compile s | step ms | vs baseline eager | compiled / eager |")
    print("|---|---|---|---|---|---|")
    for c in cases:
        eager = by_name[f"{c.variant}/eager"]
        print(
            f"| {c.name} | {c.breaks if c.compiled else '-'} | {f'{c.compile_s:.1f}' if c.compiled else '-'} | "
            f"{med[c.name] * 1e3:.1f} | {ratio(c, base):.3f} | {f'{ratio(c, eager):.3f}' if c.compiled else '-'} |"
        )
    result: dict[str, float] = {"baseline_eager_ms": med["baseline/eager"] * 1e3}
    for v in variants:
        key = v.replace("-", "_")
        result[f"{key}_compiled_over_eager"] = ratio(by_name[f"{v}/compiled"], by_name[f"{v}/eager"])
        result[f"{key}_eager_vs_baseline_eager"] = ratio(by_name[f"{v}/eager"], base)
        result[f"{key}_compiled_vs_baseline_compiled"] = ratio(by_name[f"{v}/compiled"], by_name["baseline/compiled"])
        result[f"{key}_graph_breaks"] = by_name[f"{v}/compiled"].breaks
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
