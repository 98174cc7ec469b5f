"""The three ways output mode runs a BatchNorm coupled to a managed conv, timed against the bare step (issue 19).

On the seed MNIST CNN (11 managed convs, each with its BatchNorm), ``LeaderCloneOptimizer(clone_mode="output")``:

- ``fused, C kernels``: the norm on the active channels, one pass expanding to every channel (egg_optim's C
  kernels: the CPU default);
- ``fused, torch ops``: the same with torch ops (``batch_norm`` on the active channels, a gather, the affine as an
  eval-mode ``batch_norm``; backward normalises again): what CUDA runs by default;
- ``unfused`` (``EggConfig(fuse_norms=False)``): clones expanded first, the plain ``batch_norm`` on every channel
  (fewer passes, the expanded activations saved for backward);
- ``unfused, index_add``: the same, with the expansion's backward as the gather's ``index_add`` instead of the
  default fold by sums (the control of that fold).

One process, every case stepped once per round, round-robin; medians of per-round ratios to the bare step. On CPU the
torch-op rows are a proxy for the GPU, where the same passes are memory-bound. Prints a markdown table and, last, one
JSON object::

    python benchmarks/bench_norms.py                 # batch 256, 12 rounds (2 warm-up)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
from egg_recipes.models import SeedMNISTNet
from torch import nn

from egg_optim import LeaderCloneOptimizer, RolePlan

CASES = ("bare", "fused, C kernels", "fused, torch ops", "unfused", "unfused, index_add")


def _make(case: str, preset: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = SeedMNISTNet(in_channels=1, num_classes=10)
    base = torch.optim.Adam(model.parameters(), lr=1e-4)
    if case == "bare":
        return model.train(), base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = LeaderCloneOptimizer(
            model, base, RolePlan.preset(preset), clone_mode="output", seed=0, fuse_norms=case.startswith("fused")
        )
    with torch.no_grad():  # the coupling's evidence
        model(torch.zeros(2, 1, 28, 28))
    opt.couple_norms()
    for m in model.modules():
        if hasattr(m, "_egg_kernel"):
            m._egg_kernel = case == "fused, C kernels"
        if case.endswith("index_add") and hasattr(m, "_egg_tile"):
            m._egg_tile = None  # the gather path's backward (roles are fixed: nothing sets it again)
    return model.train(), opt


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["mild", "aggressive"])
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(args.batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    names = ["bare"] + [f"{p}/{c}" for p in args.presets for c in CASES[1:]]
    built = {n: _make(n.split("/")[-1], n.split("/")[0] if "/" in n else "mild") for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup + args.rounds):
        for name, (model, opt) in built.items():
            t0 = time.perf_counter()
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    out: dict[str, float] = {}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, {args.rounds} rounds")
    print("| case | step ms | vs bare |\n|---|---|---|")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, times["bare"]))
        out[name] = ratio
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {ratio:.3f}x |")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
