"""Training-step benchmark: does skipping clone units save wall-clock time?

Runs in ONE process, interleaving scenarios round-robin so machine noise hits all of them alike, and reports
medians and ratios against the baseline measured in the same run:

- step time (forward + backward + optimizer step) for baseline / mild / aggressive on the seed's MNIST
  Bottleneck CNN (batch 256, 1x28x28) and on an MLP, in both clone modes (weight mode with its defaults:
  compact optimizer state and skipped clone weight gradients; and as ``weight-full``, without them);
- counted FLOPs per step (the physical limit of the saving);
- the wrapper's overhead with no clones against the bare base optimizer;
- optimizer-state bytes.

The last line printed is one JSON object with the headline ratios.

    python benchmarks/bench_step.py            # full: 40 timed steps per case
    python benchmarks/bench_step.py --quick    # < 1 minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from egg_recipes.models import MLP, SeedMNISTNet, count_conv_linear_flops
from torch import nn

from egg_optim import LeaderCloneOptimizer, RolePlan

SCENARIOS = ("baseline", "mild", "aggressive")


@dataclass
class Case:
    name: str
    step: Callable[[], None]
    opt: torch.optim.Optimizer
    model: nn.Module
    plan: RolePlan | None
    times: list[float]


def _plan(model_kind: str, scenario: str) -> RolePlan:
    return RolePlan.preset(scenario, table="mnist" if model_kind == "cnn" else "uniform")


def _make_model(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "cnn":
        model = SeedMNISTNet(in_channels=1, num_classes=10)
        x = torch.randn(256, 1, 28, 28)
    else:
        model = MLP(784, hidden=(1024, 1024), num_classes=10)
        x = torch.randn(256, 1, 28, 28)
    return model, x, torch.randint(0, 10, (256,))


# clone-mode variants: wrapper keyword arguments. "weight-full" is weight cloning without the savings (whole
# tensors stepped and clone rows restored, clone weight gradients computed): what weight mode cost before.
# "output-drawn": output mode on the seed's drawn (scattered) first roles, which gather and scatter every step,
# against the default packed roles, which take views (issue 19 item 2).
VARIANTS = {
    "output": {"clone_mode": "output"},
    "output-drawn": {"clone_mode": "output", "first_roles": "drawn"},
    "weight": {"clone_mode": "weight"},
    "weight-full": {"clone_mode": "weight", "state_storage": "full", "skip_clone_grads": False},
}


def _make_case(kind: str, scenario: str | None, variant: str) -> Case:
    """``scenario=None``: the bare optimizer, no wrapper."""
    model, x, y = _make_model(kind)
    base = torch.optim.Adam(model.parameters(), lr=1e-4)
    plan = None
    if scenario is None:
        opt: torch.optim.Optimizer = base
        name = f"{kind}/bare"
    else:
        plan = _plan(kind, scenario)
        opt = LeaderCloneOptimizer(model, base, plan, seed=0, **VARIANTS[variant])
        name = f"{kind}/{variant}/{scenario}"
    model.train()
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Case(name, step, opt, model, plan, [])


def _flops_per_step(kind: str, scenario: str) -> float:
    """Forward FLOPs of Conv/Linear layers x 3 (forward, input gradient, weight gradient), counting only
    computed (leader + independent) units of managed layers."""
    model, x, _ = _make_model(kind)
    per_layer = count_conv_linear_flops(model, (1, *x.shape[1:]))
    if scenario == "baseline":
        return 3.0 * sum(per_layer.values())
    resolved = _plan(kind, scenario).resolve(model)
    total = 0.0
    for name, flops in per_layer.items():
        lp = resolved.get(name)
        frac = 1.0 if lp is None else (lp.leaders + lp.independents) / lp.units
        total += 3.0 * flops * frac
    return total


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    if isinstance(opt, LeaderCloneOptimizer):
        return opt.state_bytes()
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CNN output mode only, 1 warm-up step, wrapper overhead measured on the MLP (< 1 minute on 2 cores)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 40, quick 30)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case first (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (30 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    kinds = ("cnn",) if args.quick else ("cnn", "mlp")
    # The wrapper's overhead (no clones vs the bare optimizer) is measured on the CNN; --quick measures it on the
    # MLP, whose steps are ~30x cheaper, to stay under a minute.
    overhead_kind = "mlp" if args.quick else "cnn"
    if args.quick:
        specs = [("cnn", sc, "output") for sc in SCENARIOS] + [("cnn", sc, "output-drawn") for sc in SCENARIOS[1:]]
        specs += [("mlp", None, "weight"), ("mlp", "baseline", "output")]
    else:
        specs = [
            (kind, scenario, variant)
            for kind in kinds
            for variant in (None, *VARIANTS)
            for scenario in ((None,) if variant is None else SCENARIOS[variant in ("weight-full", "output-drawn") :])
        ]
    cases = [_make_case(kind, scenario, variant or "weight") for kind, scenario, variant in specs]
    for case in cases:
        for _ in range(warmup):
            case.step()
    for _ in range(steps):  # round-robin: every case sees the same machine conditions
        for case in cases:
            t0 = time.perf_counter()
            case.step()
            case.times.append(time.perf_counter() - t0)

    med = {c.name: statistics.median(c.times) for c in cases}
    state = {c.name: _state_bytes(c.opt) for c in cases}
    flop_ratio = {
        f"{kind}/{sc}": _flops_per_step(kind, sc) / _flops_per_step(kind, "baseline")
        for kind in kinds
        for sc in SCENARIOS
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {steps} timed steps per case, medians")
    print("| case | step ms | vs its mode's baseline | vs bare | FLOP ratio | optimizer state KiB |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        kind, *_, scenario = case.name.split("/")
        variant = case.name.split("/")[1] if scenario != "bare" else None
        own_base = {"weight-full": "weight", "output-drawn": "output"}.get(variant, variant)
        ratio = med[case.name] / med[f"{kind}/{own_base}/baseline"] if variant else None
        bare = med.get(f"{kind}/bare")
        print(
            f"| {case.name} | {med[case.name] * 1e3:.1f} | {'-' if ratio is None else f'{ratio:.3f}'} | "
            f"{'-' if bare is None else f'{med[case.name] / bare:.3f}'} | "
            f"{flop_ratio.get(f'{kind}/{scenario}', 1.0):.3f} | {state[case.name] / 1024:.0f} |"
        )
    result = {
        "step_time_ratio_mild": med["cnn/output/mild"] / med["cnn/output/baseline"],
        "step_time_ratio_aggressive": med["cnn/output/aggressive"] / med["cnn/output/baseline"],
        "flop_ratio_mild": flop_ratio["cnn/mild"],
        "flop_ratio_aggressive": flop_ratio["cnn/aggressive"],
        "wrapper_overhead": med[f"{overhead_kind}/output/baseline"] / med[f"{overhead_kind}/bare"],
        "baseline_step_ms": med["cnn/output/baseline"] * 1e3,
        "state_bytes_ratio_mild": state["cnn/output/mild"] / state["cnn/output/baseline"],
        "state_bytes_ratio_aggressive": state["cnn/output/aggressive"] / state["cnn/output/baseline"],
        "step_time_ratio_mild_drawn": med["cnn/output-drawn/mild"] / med["cnn/output/baseline"],
        "step_time_ratio_aggressive_drawn": med["cnn/output-drawn/aggressive"] / med["cnn/output/baseline"],
    }
    if not args.quick:
        for kind in kinds:
            prefix = "" if kind == "cnn" else f"{kind}_"
            for variant in ("weight", "weight-full"):
                for sc in SCENARIOS[1:]:
                    key = f"{prefix}step_time_ratio_{sc}_{variant.replace('-', '_')}"
                    result[key] = med[f"{kind}/{variant}/{sc}"] / med[f"{kind}/weight/baseline"]
            result[f"{prefix}step_time_ratio_aggressive_output"] = (
                med[f"{kind}/output/aggressive"] / med[f"{kind}/output/baseline"]
            )
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
