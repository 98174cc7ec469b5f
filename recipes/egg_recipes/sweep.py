#!/usr/bin/env python
"""Run the seed's scenario table (baseline / mild / aggressive, optionally both clone modes, and the narrow-mild /
narrow-aggressive dense controls with the plans' active widths) on one dataset,
sequentially in this one process, and write a markdown table and a PNG plot.

Example (the committed Fashion-MNIST table, docs/results/fashion_mnist_scenarios.md)::

    python recipes/sweep.py --dataset fashion_mnist --model seed_mnist --epochs 3 \\
        --output-dir docs/results --name fashion_mnist_scenarios --runs-dir runs/sweep_fashion_mnist

Flags this script does not know are passed to every run of ``recipes/train_image.py`` (e.g. ``--augment``,
``--lr-schedule cosine``, ``--report-to wandb``); role flags (``--elect-every``, ``--election``, ...) go to the
runs with clones only (the baseline and the narrow-* controls train none; the sweep says which it left out).
Every run's flags are checked before the first run starts. Each run's own output (metrics.json, weights) goes
to ``<runs-dir>/<scenario>-<clone mode>``; ``<output-dir>/<name>.{md,png,json}`` hold the summary.

Columns: test accuracy after the last epoch; updates/epoch = active output channels per batch summed over an
epoch (the seed's "updates"); time/epoch = mean training wall-clock of the full epochs (evaluation excluded);
time to accuracy = training wall-clock until the first evaluation at or above the target (default: 97 % of
the baseline's final accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from egg_optim.config import CLONE_MODES
from egg_optim.errors import EggOptimError
from egg_recipes import train_image
from egg_recipes.common import reset_flags, role_dests
from egg_recipes.storage import write_text_atomic


def build_parser() -> argparse.ArgumentParser:
    p = train_image._Parser(
        prog="sweep.py",
        description="Run baseline/mild/aggressive (and optionally both clone modes) on one dataset in one "
        "process; write a markdown table and a PNG plot. Unknown flags go to every train_image.py run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="digits", help="as in train_image.py")
    p.add_argument("--model", default="seed_mnist", choices=train_image.MODELS, help="as in train_image.py")
    p.add_argument(
        "--scenarios",
        nargs="+",
        default=list(train_image.SCENARIOS),
        choices=train_image.SCENARIOS,
        help="scenarios to run, in order",
    )
    p.add_argument(
        "--clone-modes",
        nargs="+",
        default=["weight"],
        choices=CLONE_MODES,
        help="clone modes to run for each non-baseline scenario (the baseline has no clones: run once)",
    )
    p.add_argument("--epochs", type=train_image._positive_int, default=3, help="epochs per run")
    p.add_argument("--batch-size", type=train_image._positive_int, default=256, help="batch size per process")
    p.add_argument("--lr", type=train_image._positive_float, default=3e-4, help="learning rate")
    p.add_argument("--seed", type=train_image._seed, default=0, help="seed of every run")
    p.add_argument(
        "--target-accuracy",
        type=train_image._fraction,
        default=None,
        help="accuracy for the time-to-accuracy column (default: 0.97 x the first baseline's final accuracy, "
        "else of the first run)",
    )
    p.add_argument("--output-dir", default="runs/sweep", help="where <name>.md, <name>.png, <name>.json go")
    p.add_argument("--name", default="scenarios", help="base name of the summary files")
    p.add_argument("--runs-dir", default=None, help="per-run output folders (default: <output-dir>/runs)")
    return p


def has_roles(scenario: str) -> bool:
    """Whether ``scenario`` trains with clones (the baseline and the narrow dense controls do not)."""
    return scenario != "baseline" and not scenario.startswith(train_image.NARROW)


def run_matrix(scenarios: Sequence[str], clone_modes: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for scenario in scenarios:
        modes = clone_modes if has_roles(scenario) else clone_modes[:1]
        out += [(scenario, mode) for mode in modes]
    return out


def time_to_accuracy(history: Sequence[dict[str, Any]], target: float) -> float | None:
    for entry in history:
        if entry["accuracy"] >= target:
            return float(entry["train_time"])
    return None


def _fmt_time(t: float | None) -> str:
    return "not reached" if t is None else f"{t:.1f}"


def write_table(path: Path, rows: list[dict[str, Any]], target: float, command: str, header: dict[str, str]) -> str:
    lines = [
        f"# Scenario sweep: {header['dataset']} / {header['model']}",
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {header['machine']}. Epochs: {header['epochs']}, batch size {header['batch_size']}, "
        f"lr {header['lr']}, seed {header['seed']}. Finished {header['finished']}.",
        "",
        "| scenario | clone mode | test acc | updates/epoch | fwd GFLOPs/epoch | time/epoch (s) | "
        f"time to acc >= {target:.4f} (s) | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['clone_mode'] if has_roles(r['scenario']) else '-'} | "
            f"{r['test_accuracy']:.4f} | {r['updates_per_epoch']:,.0f} | {r.get('flops_per_epoch', 0) / 1e9:,.1f} | "
            f"{r['time_per_epoch']:.1f} | {_fmt_time(r['time_to_accuracy'])} | {r['steps']} |"
        )
    lines += [
        "",
        "updates/epoch: active output channels (leaders + independents) per batch summed over an epoch, as in the "
        "seed's tables. fwd GFLOPs/epoch: counted forward Conv/Linear FLOPs over the epoch's training samples "
        "(output cloning computes only leaders and independents; the narrow-* rows are dense nets with the plan's "
        "active widths, no roles). time/epoch: mean training wall-clock of the full epochs, evaluation excluded. "
        "Time to accuracy: training wall-clock until the first evaluation (end of each epoch unless "
        "`--eval-every` is passed) at or above the target.",
        "",
    ]
    text = "\n".join(lines)
    write_text_atomic(path, text)
    return text


def write_plot(path: Path, rows: list[dict[str, Any]], target: float, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_acc, ax_upd = fig.subplots(1, 2)
    for r in rows:
        label = f"{r['scenario']} ({r['clone_mode']})" if has_roles(r["scenario"]) else r["scenario"]
        hist = r["history"]
        ax_acc.plot([h["train_time"] for h in hist], [h["accuracy"] for h in hist], marker="o", label=label)
    ax_acc.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
    ax_acc.set_xlabel("training wall-clock (s)")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_title("accuracy vs time")
    ax_acc.legend(fontsize=8)
    labels = [f"{r['scenario']}\n{r['clone_mode']}" if has_roles(r["scenario"]) else r["scenario"] for r in rows]
    bars = ax_upd.bar(range(len(rows)), [r["updates_per_epoch"] for r in rows], color="tab:blue")
    ax_upd.set_xticks(range(len(rows)), labels, fontsize=8)
    ax_upd.set_ylabel("updates / epoch (active channels x batches)")
    ax_upd.set_title("updates and time per epoch")
    for bar, r in zip(bars, rows):
        ax_upd.annotate(
            f"{r['time_per_epoch']:.1f}s/ep",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def run_args(
    scenario: str, mode: str, args: argparse.Namespace, passthrough: Sequence[str], run_dir: Path
) -> tuple[list[str], argparse.Namespace, list[str]]:
    """The train_image.py command line of one run, its checked flags (a contradiction exits 2 in one line), and
    the role flags left out because the scenario trains no clones."""
    argv = [
        "--dataset",
        str(args.dataset),
        "--model",
        args.model,
        "--scenario",
        scenario,
        "--clone-mode",
        mode,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--output-dir",
        str(run_dir),
    ]
    if "--report-to" not in passthrough:
        argv += ["--report-to", "none"]
    argv += list(passthrough)
    parser = train_image.build_parser()
    parsed = parser.parse_args(argv)
    dropped = [] if has_roles(scenario) else reset_flags(parser, parsed, role_dests(parser))
    train_image.check_flags(parser, parsed)
    return argv, parsed, dropped


def sweep(args: argparse.Namespace, passthrough: Sequence[str], command: str) -> list[dict[str, Any]]:
    from egg_recipes.storage import prepare_output_dir

    out_dir = prepare_output_dir(args.output_dir)  # a folder that cannot be written fails before any run
    runs_dir = prepare_output_dir(Path(args.runs_dir) if args.runs_dir else out_dir / "runs")
    runs = [
        (scenario, mode, run_dir, *run_args(scenario, mode, args, passthrough, run_dir))
        for scenario, mode in run_matrix(args.scenarios, args.clone_modes)
        for run_dir in [runs_dir / f"{scenario}-{mode}"]
    ]  # every run's flags checked before the first one starts
    rows: list[dict[str, Any]] = []
    for scenario, mode, run_dir, argv, parsed, dropped in runs:
        if dropped:
            print(f"[sweep] {scenario}: trains no clones, so {', '.join(dropped)} left out", flush=True)
        print(f"[sweep] {scenario} / {mode}: train_image.py {shlex.join(argv)}", flush=True)
        started = time.perf_counter()
        metrics = train_image.train(parsed)
        print(
            f"[sweep] {scenario} / {mode}: test acc {metrics['test_accuracy']:.4f}, "
            f"{metrics['time_per_epoch']:.1f} s/epoch, {time.perf_counter() - started:.0f} s in all",
            flush=True,
        )
        rows.append(
            {
                "scenario": scenario,
                "clone_mode": mode,
                "test_accuracy": metrics["test_accuracy"],
                "updates_per_epoch": metrics["updates_per_epoch"],
                "updates_per_batch": metrics["updates_per_batch"],
                "flops_per_epoch": metrics["flops_per_epoch"],
                "time_per_epoch": metrics["time_per_epoch"],
                "steps": metrics["steps"],
                "history": metrics["history"],
                "epochs": metrics["epochs"],
                "run_dir": str(run_dir),
            }
        )
        write_summary(args, rows, command, final=False)
    if rows:
        write_summary(args, rows, command, final=True)
    return rows


def write_summary(args: argparse.Namespace, rows: list[dict[str, Any]], command: str, *, final: bool) -> None:
    """(Re)write <name>.md/.png/.json from the runs so far (after every run, so a long sweep that is stopped
    still leaves its finished rows)."""
    out_dir = Path(args.output_dir)
    target = args.target_accuracy
    if target is None:
        ref = next((r for r in rows if r["scenario"] == "baseline"), rows[0])
        target = 0.97 * ref["test_accuracy"]
    for r in rows:
        r["time_to_accuracy"] = time_to_accuracy(r["history"], target)
    header = {
        "dataset": str(args.dataset),
        "model": args.model,
        "epochs": str(args.epochs),
        "batch_size": str(args.batch_size),
        "lr": f"{args.lr:g}",
        "seed": str(args.seed),
        "machine": f"{platform.machine()} CPU x{_cpu_count()}, torch {_torch_version()}, one process",
        "finished": time.strftime("%Y-%m-%d %H:%M") if final else "(in progress)",
    }
    write_table(out_dir / f"{args.name}.md", rows, target, command, header)
    write_plot(out_dir / f"{args.name}.png", rows, target, f"{args.dataset} / {args.model}, {args.epochs} epochs")
    write_text_atomic(
        out_dir / f"{args.name}.json",
        json.dumps({"target_accuracy": target, "command": command, "header": header, "runs": rows}, indent=1),
    )
    if final:
        print(f"[sweep] wrote {out_dir / (args.name + '.md')} and .png", flush=True)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv: Sequence[str] | None = None) -> int:
    from egg_recipes.data import DatasetUnavailableError

    argv = list(sys.argv[1:] if argv is None else argv)
    args, passthrough = build_parser().parse_known_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python recipes/sweep.py " + shlex.join(argv)
    try:
        train_image.build_parser().parse_args(list(passthrough))  # reject unknown flags before any run
        sweep(args, passthrough, command)
    except (EggOptimError, DatasetUnavailableError) as exc:
        print(f"error: {train_image._one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
