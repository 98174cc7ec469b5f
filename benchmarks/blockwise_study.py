"""Block-parallel LFNN-l study (issue 23): BP vs DGL-style blocks vs block-wise LFNN-l on Fashion-MNIST, accuracy
against training wall-clock, 1 process vs K processes.

Every run is ``recipes/train_blockwise.py`` (a subprocess; ``torchrun --nproc_per_node K`` for the pipelined
runs), so the study measures what a user launches. Three phases, each resumable (a run whose ``results.json``
exists is not run again):

- ``runs``: for every seed and image size, BP in 1 process and DGL / LFNN-l block-parallel on K processes,
  ``--epochs`` epochs, evaluated ``--evals-per-epoch`` times per epoch. The pipelined run computes the same
  numbers as the 1-process run of the same blocks (zero staleness, tested), so its accuracy curve is also the
  1-process curve; only the clock differs.
- ``throughput``: short runs (``--throughput-steps``) of every configuration, interleaved over ``--rounds``
  rounds, medians: BP with 1 and with 2 threads, DGL / LFNN-l in 1 process with 1 thread, LFNN-l in 1 process
  with 2 threads, and DGL / LFNN-l on K processes of 1 thread each.
- ``report``: accuracy tables (mean, sd, every seed's distance from the mean), throughput ratios, and the time
  to reach BP's final accuracy minus 1.5 points: measured for the runs of the ``runs`` phase, and for the
  configurations that phase does not run (1-process LFNN-l, BP with 2 threads) their steps to that point priced
  at their measured throughput.

    python benchmarks/blockwise_study.py --quick --out /tmp/blockwise_quick.md          # a smoke run (digits)
    python benchmarks/blockwise_study.py --runs-dir /work/studies/blockwise --out docs/results/blockwise.md \\
        --png docs/results/blockwise.png --json docs/results/blockwise.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_blockwise.py"
LABEL = {"bp": "BP", "dgl": "DGL", "lfnn_l": "LFNN-l"}
GAP = 0.015  # the target: BP's final accuracy minus 1.5 points


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="digits, tiny net, one seed: a smoke run, not results")
    p.add_argument("--phase", choices=("all", "runs", "throughput", "report"), default="all")
    p.add_argument("--runs-dir", default="/tmp/blockwise_study", help="where every run writes its results")
    p.add_argument("--dataset", default=None, help="default fashion_mnist (quick: digits)")
    p.add_argument("--sizes", default=None, help="image sizes, comma list (default 28,32; quick: 8)")
    p.add_argument("--seeds", default=None, help="comma list (default 0,1,2; quick: 0)")
    p.add_argument("--methods", default="bp,dgl,lfnn_l", help="comma list of bp, dgl, lfnn_l")
    p.add_argument("--epochs", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--evals-per-epoch", type=int, default=2)
    p.add_argument("--throughput-steps", type=int, default=None, help="default 60 (quick: 4)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved throughput rounds (default 2; quick: 1)")
    p.add_argument("--recipe-args", default="", help="extra recipe flags for every run, e.g. '--widths 16,32,64'")
    p.add_argument("--out", default=None, help="markdown report (default: print it)")
    p.add_argument("--json", default=None, help="also write every run's numbers here")
    p.add_argument("--png", default=None, help="accuracy vs training seconds (needs matplotlib)")
    args = p.parse_args(argv)
    q = args.quick
    args.dataset = args.dataset or ("digits" if q else "fashion_mnist")
    args.sizes = [int(v) for v in (args.sizes or ("8" if q else "28,32")).split(",")]
    args.seeds = [int(v) for v in (args.seeds or ("0" if q else "0,1,2")).split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    if not set(args.methods) <= set(LABEL):
        p.error(f"--methods must be among {', '.join(LABEL)}")
    args.epochs = args.epochs or (1 if q else 3)
    args.throughput_steps = args.throughput_steps or (4 if q else 60)
    args.rounds = args.rounds or (1 if q else 2)
    if q and not args.recipe_args:
        args.recipe_args = "--widths 4,8,8 --aux-hidden 8 --test-samples 200"
    return args


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _blocks(args: argparse.Namespace) -> int:
    extra = shlex.split(args.recipe_args)
    cuts = extra[extra.index("--cuts") + 1] if "--cuts" in extra else "1"
    return len(cuts.split(",")) + 1


def launch(args, out: Path, method: str, size: int, seed: int, procs: int, threads: int, steps: int | None) -> dict:
    """Run the recipe once (unless ``out/results.json`` exists) and return its results."""
    results = out / "results.json"
    if not results.is_file():
        flags = ["--method", method, "--dataset", args.dataset, "--seed", str(seed), "--epochs", str(args.epochs),
                 "--threads", str(threads), "--output-dir", str(out), *shlex.split(args.recipe_args)]  # fmt: skip
        if size != 0:
            flags += ["--image-size", str(size)]
        flags += ["--max-steps", str(steps), "--evals-per-epoch", "1"] if steps else [
            "--evals-per-epoch", str(args.evals_per_epoch)]  # fmt: skip
        cmd = [sys.executable, str(RECIPE), *flags]
        if procs > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_port", str(_port()), str(RECIPE), *flags]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        print("$", shlex.join(cmd), flush=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not results.is_file():
            raise RuntimeError(f"run failed ({done.returncode}): {shlex.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(results.read_text())


def run_phase(args) -> None:
    k = _blocks(args)
    for seed in args.seeds:
        for size in args.sizes:
            for method in args.methods:
                procs = 1 if method == "bp" else k
                r = launch(args, Path(args.runs_dir) / f"px{size}" / f"{method}-s{seed}", method, size, seed, procs,
                           1, None)  # fmt: skip
                print(
                    f"  px {size} {method} seed {seed}: {r['final_acc']:.4f} in {r['train_seconds']:.0f} s", flush=True
                )


def tp_configs(args) -> list[tuple[str, str, int, int]]:
    """(label, method, processes, threads) of the throughput phase."""
    k = _blocks(args)
    out = []
    for m in args.methods:
        if m == "bp":
            out += [("bp-1p1t", m, 1, 1), ("bp-1p2t", m, 1, 2)]
            continue
        out += [(f"{m}-1p1t", m, 1, 1), (f"{m}-{k}p1t", m, k, 1)]
        if m == "lfnn_l":
            out.append((f"{m}-1p2t", m, 1, 2))
    return out


def throughput_phase(args) -> None:
    for r in range(args.rounds):
        for size in args.sizes:
            for label, method, procs, threads in tp_configs(args):
                out = Path(args.runs_dir) / "throughput" / f"px{size}" / label / f"r{r}"
                res = launch(args, out, method, size, 0, procs, threads, args.throughput_steps)
                print(f"  round {r} px {size} {label}: {res['samples_per_second']:.0f} samples/s", flush=True)


# ============================================================================ report
def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(args) -> dict:
    k = _blocks(args)
    runs, tp = {}, {}
    for size in args.sizes:
        for method in args.methods:
            for seed in args.seeds:
                r = _load(Path(args.runs_dir) / f"px{size}" / f"{method}-s{seed}" / "results.json")
                if r is not None:
                    runs[(size, method, seed)] = r
        for label, *_ in tp_configs(args):
            vals = []
            for r in range(args.rounds):
                res = _load(Path(args.runs_dir) / "throughput" / f"px{size}" / label / f"r{r}" / "results.json")
                if res is not None:
                    vals.append(res["samples_per_second"])
            if vals:
                tp[(size, label)] = statistics.median(vals)
    return {"runs": runs, "tp": tp, "k": k}


def _mean_sd(vals: list[float]) -> str:
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * statistics.mean(vals):.2f} ± {100 * sd:.2f}"


def time_to(curve: list[dict], target: float) -> dict | None:
    """The first evaluation at or above ``target``: its step and training seconds."""
    return next((c for c in curve if c["test_acc"] >= target - 1e-12), None)


def report(args, data: dict, wall: float) -> str:
    runs, tp, k = data["runs"], data["tp"], data["k"]
    threads = torch.get_num_threads()
    lines = [
        "# Block-parallel LFNN-l: BP vs DGL vs block-wise LFNN-l (issue 23)",
        "",
        "Command (repository root):",
        "",
        "```bash",
        "python benchmarks/blockwise_study.py " + shlex.join(sys.argv[1:]),
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; this report took "
        f"{wall / 60:.0f} min to write from its runs (the runs themselves: see the tables). Data: {args.dataset}, "
        f"sizes {', '.join(map(str, args.sizes))} px; {args.epochs} epochs; seeds {', '.join(map(str, args.seeds))}; "
        f"recipe flags `{args.recipe_args or '(defaults)'}`; K = {k} blocks. Main-process threads here: {threads}.",
        "",
    ]
    for size in args.sizes:
        bp_final = [runs[(size, "bp", s)]["final_acc"] for s in args.seeds if (size, "bp", s) in runs]
        lines += [f"## {size} px", "", "### Accuracy", "",
                  "| method | where | test accuracy % (mean ± sd) | seeds | max distance from the seed mean "
                  "| vs BP (paired) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for m in args.methods:
            accs = [(s, runs[(size, m, s)]["final_acc"]) for s in args.seeds if (size, m, s) in runs]
            if not accs:
                continue
            vals = [a for _, a in accs]
            mean = statistics.mean(vals)
            spread = max(abs(a - mean) for a in vals)
            paired = [a - runs[(size, "bp", s)]["final_acc"] for s, a in accs if (size, "bp", s) in runs]
            vs = "-" if m == "bp" or not paired else f"{100 * statistics.mean(paired):+.2f} pt"
            where = "1 process" if m == "bp" else f"{k} processes (= 1 process, step for step)"
            per_seed = ", ".join(f"{100 * a:.2f}" for _, a in accs)
            lines.append(f"| {LABEL[m]} | {where} | {_mean_sd(vals)} | {per_seed} | {100 * spread:.2f} pt | {vs} |")
        lines += ["", "### Throughput (training samples per second, medians of interleaved rounds)", "",
                  "| configuration | samples/s | vs the same method in 1 process, 1 thread | vs BP, 1 thread |",
                  "|---|---|---|---|"]  # fmt: skip
        for label, method, procs, thr in tp_configs(args):
            if (size, label) not in tp:
                continue
            base = tp.get((size, f"{method}-1p1t"))
            bp1 = tp.get((size, "bp-1p1t"))
            ratio = f"{tp[(size, label)] / base:.2f}x" if base else "-"
            vbp = f"{tp[(size, label)] / bp1:.2f}x" if bp1 else "-"
            where = f"{procs} process{'es' if procs > 1 else ''} x {thr} thread{'s' if thr > 1 else ''}"
            lines.append(f"| {LABEL[method]}, {where} | {tp[(size, label)]:.0f} | {ratio} | {vbp} |")
        if bp_final:
            target = statistics.mean(bp_final) - GAP
            lines += ["", f"### Time to BP's final accuracy minus 1.5 points ({100 * target:.2f} %)", "",
                      "Training seconds (evaluation excluded) to the first evaluation at or above the target, mean "
                      "over the seeds that reach it; `measured`: the run's own clock; `priced`: the same run's steps "
                      "to that point at the configuration's measured throughput (the same computation on another "
                      "process layout).", "",
                      "| configuration | reached (seeds) | seconds | vs BP 1 thread | how |",
                      "|---|---|---|---|---|"]  # fmt: skip
            bp_times = [t["train_seconds"] for s in args.seeds if (size, "bp", s) in runs
                        for t in [time_to(runs[(size, "bp", s)]["curve"], target)] if t]  # fmt: skip
            bp_t = statistics.mean(bp_times) if bp_times else None
            rows = []
            for m in args.methods:
                done = [runs[(size, m, s)] for s in args.seeds if (size, m, s) in runs]
                hits = [time_to(r["curve"], target) for r in done]
                n = sum(h is not None for h in hits)
                reached = [h for h in hits if h is not None]
                batch = done[0]["settings"]["batch_size"] if done else 0
                measured = statistics.mean(h["train_seconds"] for h in reached) if reached else None
                if m == "bp":
                    rows.append(("BP, 1 process x 1 thread", n, len(hits), measured, "measured"))
                    if (size, "bp-1p2t") in tp and reached:
                        est = statistics.mean(h["step"] * batch / tp[(size, "bp-1p2t")] for h in reached)
                        rows.append(("BP, 1 process x 2 threads", n, len(hits), est, "priced"))
                    continue
                rows.append((f"{LABEL[m]}, {k} processes x 1 thread", n, len(hits), measured, "measured"))
                for label, thr in ((f"{m}-1p1t", 1), (f"{m}-1p2t", 2)):
                    if (size, label) in tp and reached:
                        est = statistics.mean(h["step"] * batch / tp[(size, label)] for h in reached)
                        rows.append((f"{LABEL[m]}, 1 process x {thr} thread{'s' if thr > 1 else ''}", n, len(hits),
                                     est, "priced"))  # fmt: skip
            for name, n, total, secs, how in rows:
                s_txt = "-" if secs is None else f"{secs:.0f}"
                v = "-" if secs is None or not bp_t else f"{secs / bp_t:.2f}x"
                lines.append(f"| {name} | {n} of {total} | {s_txt} | {v} | {how} |")
        waits = [(m, runs[(size, m, s)]) for m in args.methods if m != "bp" for s in args.seeds if (size, m, s) in runs]
        if waits:
            lines += ["", "### Balance of the pipelined runs", "",
                      "Share of the training time each rank spent waiting for its input (mean over seeds):", "",
                      "| method | " + " | ".join(f"rank {r}" for r in range(k)) + " | training s (mean) |",
                      "|---|" + "---|" * (k + 1)]  # fmt: skip
            for m in args.methods:
                rs = [r for mm, r in waits if mm == m]
                if not rs:
                    continue
                shares = [
                    statistics.mean(r["wait_seconds_per_rank"][i] / r["train_seconds"] for r in rs) for i in range(k)
                ]
                lines.append(f"| {LABEL[m]} | " + " | ".join(f"{100 * v:.0f} %" for v in shares)
                             + f" | {statistics.mean(r['train_seconds'] for r in rs):.0f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot(args, data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    fig, axes = plt.subplots(1, len(args.sizes), figsize=(6 * len(args.sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], args.sizes):
        for m in args.methods:
            for s in args.seeds:
                r = runs.get((size, m, s))
                if r is None:
                    continue
                xs = [c["train_seconds"] for c in r["curve"]]
                ys = [100 * c["test_acc"] for c in r["curve"]]
                ax.plot(xs, ys, marker="o", ms=3, color={"bp": "k", "dgl": "tab:blue", "lfnn_l": "tab:red"}[m],
                        label=f"{LABEL[m]} ({'1 process' if m == 'bp' else str(data['k']) + ' processes'})"
                        if s == args.seeds[0] else None)  # fmt: skip
        ax.set_title(f"{args.dataset}, {size} px")
        ax.set_xlabel("training seconds (evaluation excluded)")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.phase in ("all", "runs"):
        run_phase(args)
    if args.phase in ("all", "throughput"):
        throughput_phase(args)
    data = collect(args)
    text = report(args, data, time.perf_counter() - t0)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if args.json:
        flat = {"runs": {f"px{s}/{m}/s{seed}": r for (s, m, seed), r in data["runs"].items()},
                "throughput": {f"px{s}/{label}": v for (s, label), v in data["tp"].items()}}  # fmt: skip
        Path(args.json).write_text(json.dumps(flat, indent=1))
    if args.png:
        plot(args, data, args.png)
    return text


if __name__ == "__main__":
    main()
