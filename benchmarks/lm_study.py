#!/usr/bin/env python
"""Graduation on a causal LM: quality against wall-clock for the bare model, fixed roles, graduation and a dense
model half as wide, several seeds, on one text corpus.

Every run is ``recipes/train_lm.py`` in this process with the same data, seeds, steps, optimizer and schedule;
runs differ only in the policy flags below. Each run writes ``<runs-dir>/<policy>-s<seed>/metrics.json``; a run
whose metrics exist with the same flags is not run again (several processes may share a runs dir, one policy list
each). ``--report-only`` rewrites the summary from the runs on disk.

    python recipes/prepare_fortunes.py --out data/fortunes
    python benchmarks/lm_study.py --dataset data/fortunes --max-steps 600 --eval-every 100 --seeds 0 1 2 \\
        --out-dir docs/results --name graduation_lm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from egg_recipes import train_lm

#: policy name -> (what it is, train_lm flags; "{S}" is --max-steps)
POLICIES: dict[str, tuple[str, str]] = {
    "baseline": ("dense model, every unit trained", "--scenario baseline"),
    "fixed": ("mild plan, output cloning, roles drawn once and kept", "--elect-every never"),
    "graduate": (
        "as fixed, then graduation: every layer 0.75 active from a third of the steps, dense from two thirds",
        "--elect-every never --graduate {GRAD}",
    ),
    "graduate-late": (
        "as fixed for two thirds of the steps, then every clone graduates (dense for the last third)",
        "--elect-every never --graduate {GRADLATE}",
    ),
    "half-width": (
        "dense model with half the hidden and MLP width (the mild plan's active units, width-matched control)",
        "--scenario baseline --hidden-size {H2} --intermediate-size {I2}",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lm_study.py", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", required=True, help="train_lm --dataset (e.g. the prepare_fortunes.py folder)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-eval-blocks", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=352)
    p.add_argument("--extra", default="", help="more train_lm flags for every run (quoted)")
    p.add_argument("--runs-dir", default="runs/lm_study")
    p.add_argument("--out-dir", default="runs/lm_study")
    p.add_argument("--name", default="lm_study")
    p.add_argument("--report-only", action="store_true", help="summarise the runs on disk, run nothing")
    return p


def _fill(flag: str, args: argparse.Namespace) -> str:
    third, two_thirds = round(args.max_steps / 3), round(2 * args.max_steps / 3)
    return (
        flag.replace("{GRADLATE}", f"{two_thirds}:1")
        .replace("{GRAD}", f"{third}:0.75,{two_thirds}:1")
        .replace("{H2}", str(args.hidden_size // 2))
        .replace("{I2}", str(args.intermediate_size // 2))
    )


def run_argv(args: argparse.Namespace, policy: str, seed: int, out: Path) -> list[str]:
    argv = [
        "--dataset", str(args.dataset), "--scenario", "mild", "--clone-mode", "output",
        "--hidden-size", str(args.hidden_size), "--intermediate-size", str(args.intermediate_size),
        "--max-steps", str(args.max_steps), "--epochs", "100", "--eval-every", str(args.eval_every),
        "--seed", str(seed), "--report-to", "none", "--no-progress", "--output-dir", str(out),
    ]  # fmt: skip
    if args.max_eval_blocks:
        argv += ["--max-eval-blocks", str(args.max_eval_blocks)]
    return argv + shlex.split(args.extra) + [_fill(f, args) for f in POLICIES[policy][1].split()]


def _done(out: Path, argv: list[str]) -> dict[str, Any] | None:
    path = out / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    want = json.loads(json.dumps(vars(train_lm.parse_args(argv)), default=str))
    return metrics if metrics.get("args") == want else None


def run_all(args: argparse.Namespace) -> None:
    for policy in args.policies:
        for seed in args.seeds:
            out = Path(args.runs_dir) / f"{policy}-s{seed}"
            argv = run_argv(args, policy, seed, out)
            if _done(out, argv) is not None:
                print(f"[lm-study] {policy} seed {seed}: done before, skipped", flush=True)
                continue
            print(f"[lm-study] {policy} seed {seed}: train_lm.py {shlex.join(argv)}", flush=True)
            started = time.perf_counter()
            m = train_lm.train(train_lm.parse_args(argv))
            print(f"[lm-study] {policy} seed {seed}: ppl {m['perplexity']:.3f}, {time.perf_counter() - started:.0f} s")


def collect(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for policy in args.policies:
        for seed in args.seeds:
            run = Path(args.runs_dir) / f"{policy}-s{seed}"
            m = _done(run, run_argv(args, policy, seed, run))
            if m is not None:
                out.setdefault(policy, []).append({"seed": seed, **m})
    return out


def time_to(history: Sequence[dict[str, Any]], target: float) -> float | None:
    """Train seconds at the first evaluation with perplexity at or below ``target``."""
    return next((float(h["train_time"]) for h in history if h["perplexity"] <= target), None)


def summarise(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], command: str) -> str:
    import torch

    base = results.get("baseline")
    target = statistics.fmean(r["perplexity"] for r in base) if base else None
    base_time = statistics.fmean(r["train_time_s"] for r in base) if base else None
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()} CPU x{os.cpu_count()}, torch {torch.__version__}; {args.max_steps} steps, "
        f"evaluation every {args.eval_every}, seeds {' '.join(map(str, args.seeds))}.",
        "",
        "| policy | val. perplexity, mean ± sd | per seed | train time (s) | time vs baseline | "
        + (f"time to baseline's {target:.3f} (s) | ... to +1 % ({1.01 * target:.3f}) (s) |" if target else "")
        + " params |",
        "|---|---|---|---|---|" + ("---|---|" if target else "") + "---|",
    ]
    for policy, rows in results.items():
        ppl = [r["perplexity"] for r in rows]
        sd = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        t = statistics.fmean(r["train_time_s"] for r in rows)
        cells = [f"{statistics.fmean(ppl):.3f} ± {sd:.3f}", " / ".join(f"{p:.3f}" for p in ppl), f"{t:.0f}"]
        cells.append(f"{t / base_time:.2f}x" if base_time else "-")
        if target:
            for goal in (target, 1.01 * target):
                hits = [time_to(r["history"], goal) for r in rows]
                reached = [h for h in hits if h is not None]
                cells.append(
                    f"{statistics.fmean(reached):.0f} ({statistics.fmean(reached) / base_time:.2f}x)"
                    if len(reached) == len(hits)
                    else f"{len(reached)}/{len(hits)} reached"
                )
        cells.append(f"{rows[0]['num_parameters']:,}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines += ["", "Policies:", ""]
    for policy in results:
        lines.append(
            f"- `{policy}`: {POLICIES[policy][0]} (`{' '.join(_fill(f, args) for f in POLICIES[policy][1].split())}`)"
        )
    return "\n".join(lines) + "\n"


def plot(path: Path, results: dict[str, list[dict[str, Any]]], title: str) -> None:
    """Validation perplexity against training wall-clock, mean over seeds at each evaluation."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    base = results.get("baseline")
    for policy, rows in results.items():
        n = min(len(r["history"]) for r in rows)
        secs = [statistics.fmean(r["history"][i]["train_time"] for r in rows) for i in range(n)]
        ppl = [statistics.fmean(r["history"][i]["perplexity"] for r in rows) for i in range(n)]
        ax.plot(secs, ppl, "--" if policy == "half-width" else "-", marker="o", markersize=3, label=policy)
    if base:
        ax.axhline(statistics.fmean(r["perplexity"] for r in base), color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("validation perplexity (mean over seeds)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.report_only:
        run_all(args)
    results = collect(args)
    if not results:
        print("no finished runs to summarise", file=sys.stderr)
        return 1
    command = "python benchmarks/lm_study.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = summarise(args, results, command)
    (out / f"{args.name}.md").write_text(text)
    (out / f"{args.name}.json").write_text(
        json.dumps(
            {
                p: [{k: r[k] for k in ("seed", "perplexity", "train_time_s", "history")} for r in rows]
                for p, rows in results.items()
            },
            indent=1,
        )  # fmt: skip
    )
    plot(out / f"{args.name}.png", results, f"LM on {Path(args.dataset).name}: perplexity vs wall-clock")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
