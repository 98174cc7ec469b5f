"""Host overhead of one training step: the CPU proxy of a launch-bound GPU step (issue 19).

On a GPU a small model (the seed CNNs at batch 128) is dispatch-bound: the step takes as long as Python and the
dispatcher take to issue its kernels, whatever the kernels do. This script measures that cost on the CPU by running
the same architectures at tiny widths and batch 2, where the arithmetic is negligible, so step time is the host's
work: Python in the rewritten modules, autograd nodes, aten dispatch, the optimizer's Python. Optimizers use their
foreach implementations (what they pick on CUDA), fused norms their torch-ops path (what CUDA runs with
``fuse_norms=True``), 1 thread.

Per case and phase (forward, backward, optimizer step): median host ms over interleaved rounds, and the whole
step relative to the bare model + bare optimizer (median of per-round ratios); and the Python calls of one step
(:class:`egg_optim.utils.PythonCallCounter`: exact, where times are noisy). Cases: bare; weight and output mode
without clones; weight mode mild, also without gradient skipping (``skip_clone_grads=False``); output mode mild
and aggressive (default packed first roles), with coupled norms fused (their torch-ops path) and, on the CNN,
unfused (``fuse_norms=False``: the default where egg_optim's C kernels do not run, CUDA included), and there
once more folding clone gradients by sums at every size (the host cost that ``FOLD_MIN_NUMEL`` keeps off small
layers, whose expansion backward is the gather's ``index_add``)::

    python benchmarks/bench_host.py             # 200 rounds, both models
    python benchmarks/bench_host.py --rounds 5  # smoke
"""

from __future__ import annotations

import argparse
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

from egg_optim import LeaderCloneOptimizer, RolePlan
from egg_optim.rewrites.output_cloning import _gather
from egg_optim.utils import PythonCallCounter


def _sibling(name: str):
    """A benchmark module of this folder, loaded by path."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


_DISPATCH = _sibling("bench_dispatch")
NOSKIP = "weight/mild, no grad skip"  # skip_clone_grads=False: every weight-gradient row, no autograd function
# bare; both modes without clones; weight mild (and without gradient skipping); output mild and aggressive
UNFUSED = [c for c in _DISPATCH.CASES if c[0].endswith(_DISPATCH.UNFUSED)]  # the CUDA default for coupled norms
FOLDED = f"output/mild, {_DISPATCH.UNFUSED}, fold at any size"  # the fold's autograd function on every layer
CASES = [*_DISPATCH.CASES[:6], *UNFUSED, (FOLDED, "output", "mild"), (NOSKIP, "weight", "mild")]
PHASES = ("forward", "backward", "optimizer")
FOLD_MIN_NUMEL = _gather.FOLD_MIN_NUMEL
TINY_LLAMA = {"hidden": 64, "layers": 4, "heads": 4, "kv": 2, "inter": 176, "seq": 8, "batch": 2, "vocab": 128}


@dataclass
class Case:
    name: str
    step: Callable[[list[float]], None]
    times: list[tuple[float, ...]] = field(default_factory=list)


def build(kind: str, name: str, mode: str | None, preset: str | None) -> Callable[[list], None]:
    """One step of ``kind`` (``"cnn"``: the seed CIFAR net's layers at tiny widths; ``"llama"``) under ``mode``."""
    bg = _DISPATCH._bench_gpu()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "cnn":
        model = bg.tiny_cnn()
        x, y = torch.randn(2, 3, 16, 16, generator=gen), torch.randint(0, 10, (2,), generator=gen)
        base = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
        table = "cifar"

        def loss():
            return F.cross_entropy(model(x), y)
    else:
        model = bg.llama(TINY_LLAMA)
        ids = torch.randint(0, TINY_LLAMA["vocab"], (TINY_LLAMA["batch"], TINY_LLAMA["seq"]), generator=gen)
        base = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        table = "uniform"

        def loss():
            return model(input_ids=ids, labels=ids).loss

    model.train()
    opt: torch.optim.Optimizer = base
    if mode is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options = {"skip_clone_grads": False} if name == NOSKIP else {}
            if mode == "output":
                options["fuse_norms"] = _DISPATCH.UNFUSED not in name
            plan = RolePlan.preset(preset, table)
            opt = LeaderCloneOptimizer(model, base, plan, clone_mode=mode, seed=0, **options)

    def step(out: list | None = None) -> None:
        _gather.FOLD_MIN_NUMEL = 0 if name == FOLDED else FOLD_MIN_NUMEL  # the fold at any size, for this case only
        t0 = time.perf_counter()
        value = loss()
        t1 = time.perf_counter()
        value.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _gather.FOLD_MIN_NUMEL = FOLD_MIN_NUMEL
        if out is not None:
            out.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    step()  # norm coupling is decided (and norms fused) in the first step
    for m in model.modules():
        if hasattr(m, "_egg_kernel"):
            m._egg_kernel = False  # the torch-ops path, as on CUDA
    return step


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--models", nargs="+", default=["cnn", "llama"], choices=["cnn", "llama"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {}
    for kind in args.models:
        cases = [
            Case(f"{kind}/{name}", build(kind, name, mode, preset))
            for name, mode, preset in CASES
            if kind == "cnn" or _DISPATCH.UNFUSED not in name  # the Llama has no norm to fuse
        ]
        for _ in range(3):
            for case in cases:
                case.step(None)
        for _ in range(args.rounds):  # round-robin: machine noise hits every case alike
            for case in cases:
                case.step(case.times)
        bare = cases[0]
        for case in cases:
            with PythonCallCounter() as calls:
                case.step(None)
            row = {p: statistics.median(t[i] for t in case.times) * 1e3 for i, p in enumerate(PHASES)}
            row["python_calls"] = calls.count
            row["step"] = statistics.median(sum(t) for t in case.times) * 1e3
            row["vs_bare"] = statistics.median(sum(a) / sum(b) for a, b in zip(case.times, bare.times))
            results[case.name] = row
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds, medians (ms)")
    print("| case | forward | backward | opt.step() + zero_grad | step | vs bare | Python calls / step (vs bare) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = " | ".join(f"{r[p]:.2f}" for p in PHASES)
        calls = r["python_calls"] / results[name.split("/")[0] + "/bare"]["python_calls"]
        print(f"| {name} | {cells} | {r['step']:.2f} | {r['vs_bare']:.2f}x | {r['python_calls']} ({calls:.2f}x) |")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
