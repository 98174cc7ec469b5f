#!/usr/bin/env python
"""Election policies against fixed roles and the dense controls, at equal data passes, over several seeds.

Every run is ``recipes/train_image.py`` in this process, with the same data, seeds, batch size, optimizer and a
learning rate that decays to zero (``--lr-schedule cosine`` by default), so runs differ only in the policy
flags below. Each run writes ``<runs-dir>/<policy>-s<seed>/metrics.json``; a run whose metrics exist with the
same flags is not run again, so a stopped study continues where it was (and several processes may share a
runs dir, one policy list each). ``--report-only`` just rewrites the summary from the runs on disk.

Summary: ``<out-dir>/<name>.md`` (per-policy mean, spread and per-seed accuracy, counted forward FLOPs,
indicative wall-clock, time to a target accuracy), ``<name>.png`` (accuracy against counted FLOPs and against
training wall-clock, mean over seeds), ``<name>.json``.

    python benchmarks/election_study.py --dataset digits --epochs 10 --batch-size 64 --lr 3e-3 \\
        --seeds 0 1 2 --out-dir /tmp/study --name digits_screen
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

from egg_recipes import train_image

ROOT = Path(__file__).resolve().parents[1]

# the election flags every stable-policy row shares; its score follows
_STABLE = "--elect-every epoch --election-policy stable --election "

#: policy name -> (what it is, train_image flags; "{E}" is the number of epochs, "{S}" the scenario)
POLICIES: dict[str, tuple[str, str]] = {
    "baseline": (
        "dense full-width network, no roles",
        "--scenario baseline",
    ),
    "narrow": (
        "dense network with the plan's active widths (width-matched control)",
        "--scenario narrow-{S}",
    ),
    "narrow-flops": (
        "dense network, active widths scaled to output cloning's forward FLOPs (FLOP-matched control)",
        "--scenario narrow-{S} --width-match flops",
    ),
    "fixed": (
        "output cloning, roles drawn once and kept",
        "--elect-every never",
    ),
    "seed-redraw": (
        "output cloning, roles redrawn at random every epoch (the seed's protocol)",
        "--elect-every epoch --election random --election-policy rank",
    ),
    "grow-random": (
        "stable policy, leaders grown 0.5x -> 1.5x of the plan over the epochs (mean 1x), random promotions",
        _STABLE + "random --leader-scales ramp:0.5:1.5:{E}",
    ),
    "grow-conflict": (
        "as grow-random, promoting the clones whose gradient conflicts most with their group's",
        _STABLE + "clone_conflict --leader-scales ramp:0.5:1.5:{E}",
    ),
    "grow-random-copy": (
        "as grow-random, a promoted clone also starts from its source's optimizer state (warm handover)",
        _STABLE + "random --leader-scales ramp:0.5:1.5:{E} --clone-state copy",
    ),
    "grow-conflict-copy": (
        "as grow-conflict, with the source's optimizer state (warm handover)",
        _STABLE + "clone_conflict --leader-scales ramp:0.5:1.5:{E} --clone-state copy",
    ),
    "grow-wide-copy": (
        "leaders grown 0.25x -> 1.75x (mean 1x), conflict promotions, warm handover",
        _STABLE + "clone_conflict --leader-scales ramp:0.25:1.75:{E} --clone-state copy",
    ),
    "swap-conflict-copy": (
        "as swap-conflict, with warm handover",
        _STABLE + "clone_conflict --max-churn 0.1 --clone-state copy",
    ),
    "grow-early": (
        "stable policy, leaders at 0.5x for the first quarter of the epochs, then the rest at the scale that keeps "
        "the mean at 1x; conflict promotions",
        _STABLE + "clone_conflict --leader-scales {EARLY}",
    ),
    "grow-early-random": (
        "as grow-early, random promotions",
        _STABLE + "random --leader-scales {EARLY}",
    ),
    "shrink-conflict": (
        "stable policy, leaders shrunk 1.5x -> 0.5x (mean 1x), demoting the most redundant leaders",
        _STABLE + "clone_conflict --leader-scales ramp:1.5:0.5:{E}",
    ),
    "swap-conflict": (
        "stable policy at fixed counts, every epoch up to 10% of leaders swapped for conflicting clones",
        _STABLE + "clone_conflict --max-churn 0.1",
    ),
    "swap-conflict-h": (
        "as swap-conflict, hysteresis 1 (a clone must beat the leader's score by |score|)",
        _STABLE + "clone_conflict --max-churn 0.1 --hysteresis 1",
    ),
    "graduate": (
        "output cloning, then graduation (clones become independents, function kept): every layer 0.75 active "
        "from a third of the epochs, dense from two thirds",
        "--elect-every never --graduate {GRAD}",
    ),
    "graduate-late": (
        "output cloning for two thirds of the epochs, then every clone graduates (dense for the last third)",
        "--elect-every never --graduate {GRADLATE}",
    ),
    "graduate-late-reset": (
        "as graduate-late, graduated units start with fresh optimizer state instead of their source's",
        "--elect-every never --graduate {GRADLATE} --graduate-state reset",
    ),
    "graduate-late-noise": (
        "as graduate-late, graduated units' rows perturbed by noise of 0.1x their RMS (symmetry breaking)",
        "--elect-every never --graduate {GRADLATE} --graduate-noise 0.1",
    ),
    "net2net": (
        "growth baseline, no clones: the width-matched dense net widened by Net2Net at graduate's points to "
        "graduate's active widths",
        "--scenario narrow-{S} --grow-net2net {GRAD}",
    ),
    "net2net-late": (
        "as net2net at graduate-late's point",
        "--scenario narrow-{S} --grow-net2net {GRADLATE}",
    ),
}
CONTROLS = ("baseline", "narrow", "narrow-flops")


def build_parser() -> argparse.ArgumentParser:
    p = train_image._Parser(
        prog="election_study.py",
        description="Election policies vs fixed roles and dense controls, several seeds, one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="seed_mnist", choices=train_image.MODELS)
    p.add_argument("--scenario", default="mild", choices=("mild", "aggressive"), help="the plan of every policy")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="cosine", choices=train_image.LR_SCHEDULES)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps too (0: epoch ends only)")
    p.add_argument("--reference", default="fixed", help="the policy others are compared with")
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="accuracy for time-to-target (default: 0.98 x the baseline's mean, else the reference policy's)",
    )
    p.add_argument("--runs-dir", default="runs/election_study")
    p.add_argument("--out-dir", default="runs/election_study")
    p.add_argument("--name", default="election_study")
    p.add_argument("--report-only", action="store_true", help="summarise the runs on disk, run nothing")
    p.add_argument(
        "--time-steps",
        type=int,
        default=0,
        help="also time N training steps of every network configuration the policies train, interleaved in this "
        "process (same machine conditions for all), and estimate each run's wall-clock from them",
    )
    p.add_argument("--time-rounds", type=int, default=3, help="interleaved rounds of --time-steps steps each")
    return p


def early_scales(epochs: int) -> str:
    """0.5 for the first quarter of the epochs (at least one), then the scale that keeps the mean at 1."""
    k = max(1, epochs // 4)
    rest = (epochs - 0.5 * k) / (epochs - k)
    return ",".join(["0.5"] * k + [f"{rest:.6g}"])


def graduation_points(epochs: int) -> tuple[str, str]:
    """``graduate``'s schedule (0.75 active from a third of the epochs, dense from two thirds) and
    ``graduate-late``'s (dense from two thirds)."""
    third, two_thirds = max(1, round(epochs / 3)), max(1, round(2 * epochs / 3))
    early = f"epoch{third}:0.75,epoch{two_thirds}:1" if two_thirds > third else f"epoch{third}:1"
    return early, f"epoch{two_thirds}:1"


def _fill(flag: str, args: argparse.Namespace) -> str:
    grad, grad_late = graduation_points(args.epochs)
    return (
        flag.replace("{GRAD}", grad)
        .replace("{GRADLATE}", grad_late)
        .replace("{E}", str(args.epochs))
        .replace("{S}", args.scenario)
        .replace("{EARLY}", early_scales(args.epochs))
    )


def run_argv(args: argparse.Namespace, policy: str, seed: int, out: Path) -> list[str]:
    flags = [_fill(f, args) for f in POLICIES[policy][1].split()]
    argv = [
        "--dataset", str(args.dataset), "--model", args.model, "--scenario", args.scenario,
        "--clone-mode", "output", "--assign", "round_robin",
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--lr-schedule", args.lr_schedule, "--seed", str(seed), "--eval-every", str(args.eval_every),
        "--report-to", "none", "--no-progress", "--output-dir", str(out),
    ]  # fmt: skip
    for flag, value in (("--max-train-samples", args.max_train_samples), ("--max-eval-samples", args.max_eval_samples)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + flags  # later flags win (e.g. --scenario baseline)


def _done(out: Path, argv: list[str]) -> dict[str, Any] | None:
    path = out / train_image.METRICS_FILE
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    want = vars(train_image.parse_args(argv))
    return metrics if metrics.get("args") == json.loads(json.dumps(want, default=str)) else None


def run_all(args: argparse.Namespace) -> None:
    runs = Path(args.runs_dir)
    for policy in args.policies:
        for seed in args.seeds:
            out = runs / f"{policy}-s{seed}"
            argv = run_argv(args, policy, seed, out)
            if _done(out, argv) is not None:
                print(f"[study] {policy} seed {seed}: done before, skipped", flush=True)
                continue
            print(f"[study] {policy} seed {seed}: train_image.py {shlex.join(argv)}", flush=True)
            started = time.perf_counter()
            m = train_image.train(train_image.parse_args(argv))
            print(
                f"[study] {policy} seed {seed}: acc {m['test_accuracy']:.4f}, "
                f"{m['train_flops'] / 1e12:.3f} TFLOP fwd, {time.perf_counter() - started:.0f} s",
                flush=True,
            )


# ---------------------------------------------------------------------------------------------- same-conditions timing
def _flag_value(flags: Sequence[str], name: str) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else None


def epoch_configs(args: argparse.Namespace, policy: str) -> list[str]:
    """The network configuration each epoch of ``policy`` trains: ``baseline``, ``narrow``, ``narrow-flops`` or
    ``<scenario>@<leader scale>`` (``+probe`` when the score probes output-cloned layers)."""
    flags = [_fill(f, args) for f in POLICIES[policy][1].split()]
    if policy in CONTROLS:
        return [policy] * args.epochs
    from egg_optim.core.graduation import Graduation

    for flag, name in (("--graduate", f"{args.scenario}+grad"), ("--grow-net2net", "narrow+grow")):
        if flag in flags:
            schedule = Graduation.parse(_flag_value(flags, flag))
            fractions = [schedule.target(e) for e in range(args.epochs)]
            start = "narrow" if flag == "--grow-net2net" else f"{args.scenario}@1"
            return [f"{name}{f:g}" if f > 0 else start for f in fractions]
    from egg_optim.core.policies import parse_leader_scales

    scales = parse_leader_scales(_flag_value(flags, "--leader-scales") or "") or (1.0,)
    probe = "+probe" if _flag_value(flags, "--election") == "clone_conflict" else ""
    return [f"{args.scenario}@{scales[min(e, len(scales) - 1)]:g}{probe}" for e in range(args.epochs)]


def _timing_case(args: argparse.Namespace, config: str, spec):
    import torch
    import torch.nn.functional as F
    from egg_recipes.models import build_model, narrow_model

    from egg_optim import LeaderCloneOptimizer, RolePlan
    from egg_optim.core.scores import CloneConflictScore

    shape = {"in_channels": spec.channels, "num_classes": spec.num_classes, "image_size": spec.image_size}
    table = train_image.SEED_TABLES.get(args.model, "uniform")
    plan = RolePlan.preset(args.scenario, table=table)
    torch.manual_seed(0)
    probe = config.endswith("+probe")
    if config == "baseline":
        model, plan = build_model(args.model, **shape), RolePlan()
    elif "+grow" in config:  # the Net2Net-grown dense net: graduation's active widths at that fraction
        from egg_recipes.net2net import graduated_widths

        with torch.device("meta"):
            layer_plans = plan.resolve(build_model(args.model, **shape))
        widths = graduated_widths(layer_plans, float(config.split("+grow")[1]))
        model, plan = build_model(args.model, widths=widths, **shape), RolePlan()
    elif config.startswith("narrow"):
        match = "flops" if config == "narrow-flops" else "widths"
        model, plan = narrow_model(args.model, plan, match=match, **shape), RolePlan()
    elif "+grad" in config:
        model = build_model(args.model, **shape)
    else:
        scale = float(config.split("@")[1].removesuffix("+probe"))
        model = build_model(args.model, **shape)
        plan = RolePlan(per_layer={k: (v[0] * scale, v[1]) for k, v in plan.per_layer.items()}, only_listed=True)
    opt = LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-4), plan, clone_mode="output")
    if "+grad" in config:
        opt.graduate(float(config.split("+grad")[1]))
    size = spec.image_size if isinstance(spec.image_size, int) else spec.image_size[0]
    x = torch.randn(args.batch_size, spec.channels, size, size)
    y = torch.randint(0, spec.num_classes, (args.batch_size,))
    every = CloneConflictScore().probe_every

    def step(i: int) -> None:
        if probe and i % every == 0:
            opt.output_cloning.probe()  # one probed step in probe_every, as in training
        F.cross_entropy(model(x), y).backward()
        if probe and i % every == 0:
            from egg_optim.rewrites.output_cloning import take_probe

            for name, layer in opt.layers.items():  # the work the score does with a probe
                if opt.roles[name].has_clones:
                    take_probe(layer.module)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt  # what is timed, for a look from outside
    return step


def measure_times(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per training step of every configuration, interleaved round-robin."""
    import statistics as st

    from egg_recipes.data import dataset_spec, load_image_dataset

    spec = dataset_spec(load_image_dataset(args.dataset, split="train", max_samples=64, seed=0))
    configs = sorted({c for p in args.policies for c in epoch_configs(args, p)})
    cases = {c: _timing_case(args, c, spec) for c in configs}
    times: dict[str, list[float]] = {c: [] for c in configs}
    for c in configs:  # warm-up
        cases[c](1)
    for _ in range(args.time_rounds):
        for c in configs:
            for i in range(args.time_steps):
                t0 = time.perf_counter()
                cases[c](i)
                times[c].append(time.perf_counter() - t0)
    return {c: st.median(v) if not c.endswith("+probe") else st.fmean(v) for c, v in times.items()}


def estimated_history(args: argparse.Namespace, policy: str, run: dict[str, Any], step_times: dict[str, float]):
    """``run["history"]`` with ``est_time``: the steps done so far priced at the same-conditions step times."""
    configs = epoch_configs(args, policy)
    per_epoch = run["steps_per_epoch"]
    out = []
    for h in run["history"]:
        done, total = h["step"], 0.0
        for e, config in enumerate(configs):
            n = max(0, min(done - e * per_epoch, per_epoch))
            total += n * step_times[config]
        out.append({**h, "est_time": total})
    return out


# ---------------------------------------------------------------------------------------------- summary
def collect(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    runs = Path(args.runs_dir)
    out: dict[str, list[dict[str, Any]]] = {}
    for policy in args.policies:
        for seed in args.seeds:
            m = _done(runs / f"{policy}-s{seed}", run_argv(args, policy, seed, runs / f"{policy}-s{seed}"))
            if m is not None:
                out.setdefault(policy, []).append({"seed": seed, **m})
    return out


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def time_to(history: Sequence[dict[str, Any]], target: float, key: str) -> float | None:
    for h in history:
        if h["accuracy"] >= target:
            return float(h[key])
    return None


def default_target(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> float:
    """``--target``, else 98 % of the baseline's mean final accuracy (of the reference policy's without one)."""
    if args.target is not None:
        return args.target
    rows = results.get("baseline") or results.get(args.reference) or next(iter(results.values()))
    return 0.98 * statistics.fmean(r["test_accuracy"] for r in rows)


def summarise(
    args: argparse.Namespace,
    results: dict[str, list[dict[str, Any]]],
    command: str,
    step_times: dict[str, float] | None = None,
) -> str:
    target = default_target(args, results)
    ref = results.get(args.reference)
    ref_acc = {r["seed"]: r["test_accuracy"] for r in ref} if ref else {}
    ref_flops = statistics.fmean(r["train_flops"] for r in ref) if ref else None
    lines = [
        f"# Election study: {args.dataset} / {args.model} / {args.scenario}",
        "",
        "Command (from the repository root):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {platform.machine()} CPU x{os.cpu_count()}, torch {_torch_version()}. Every run: "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr:g} with `{args.lr_schedule}` decay to "
        f"0, output cloning, round-robin clone sources, seeds {' '.join(map(str, args.seeds))}"
        + (f", {args.max_train_samples} training samples" if args.max_train_samples else "")
        + (f", {args.max_eval_samples} test samples" if args.max_eval_samples else "")
        + ".",
        "",
        f"| policy | test acc, mean ± sd | per seed | vs {args.reference} (paired mean) | fwd TFLOP (train) | "
        f"FLOPs vs {args.reference} | time/epoch (s) | time to {target:.4f} (s) | TFLOP to {target:.4f} |"
        + (f" est. train time (s) | est. time to {target:.4f} (s) |" if step_times else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if step_times else ""),
    ]
    for policy, rows in results.items():
        accs = [r["test_accuracy"] for r in rows]
        mean, sd = _mean_sd(accs)
        paired = [r["test_accuracy"] - ref_acc[r["seed"]] for r in rows if r["seed"] in ref_acc]
        delta = f"{100 * statistics.fmean(paired):+.2f} pt" if paired and policy != args.reference else "-"
        flops = statistics.fmean(r["train_flops"] for r in rows)
        ratio = f"{flops / ref_flops:.3f}" if ref_flops else "-"
        tpe = statistics.fmean(r["time_per_epoch"] for r in rows)
        t_hit = [time_to(r["history"], target, "train_time") for r in rows]
        f_hit = [time_to(r["history"], target, "train_flops") for r in rows]
        t_txt = (
            f"{statistics.fmean(t_hit):.0f}"
            if all(t is not None for t in t_hit)
            else f"{sum(t is not None for t in t_hit)}/{len(t_hit)} reached"
        )
        f_txt = f"{statistics.fmean(f_hit) / 1e12:.3f}" if all(f is not None for f in f_hit) else "-"
        per_seed = " / ".join(f"{a:.4f}" for a in accs)
        est = ""
        if step_times:
            hists = [estimated_history(args, policy, r, step_times) for r in rows]
            e_hit = [time_to(h, target, "est_time") for h in hists]
            e_txt = f"{statistics.fmean(e_hit):.0f}" if all(e is not None for e in e_hit) else "-"
            est = f" {statistics.fmean(h[-1]['est_time'] for h in hists):.0f} | {e_txt} |"
        lines.append(
            f"| {policy} | {mean:.4f} ± {sd:.4f} | {per_seed} | {delta} | {flops / 1e12:.3f} | {ratio} | {tpe:.1f} | "
            f"{t_txt} | {f_txt} |{est}"
        )
    lines += ["", "Policies:", ""]
    for policy in results:
        flags = " ".join(_fill(f, args) for f in POLICIES[policy][1].split())
        lines.append(f"- `{policy}`: {POLICIES[policy][0]} (`{flags}`)")
    lines += [
        "",
        "fwd TFLOP: counted forward Conv/Linear FLOPs over all training samples (exact; output cloning computes "
        "leaders and independents only, growing/shrinking plans at their actual counts). Wall-clock columns are "
        "indicative: the 2 CPU cores were shared with other jobs. Time/FLOPs to target: at the first evaluation "
        f"at or above the target ({'every ' + str(args.eval_every) + ' steps and ' if args.eval_every else ''}"
        "at epoch ends), mean over seeds.",
        "",
    ]
    if step_times:
        lines += [
            "Same-conditions step times (median seconds per training step, batch "
            f"{args.batch_size}, every configuration timed interleaved in one process, {args.time_rounds} rounds of "
            f"{args.time_steps} steps; `+probe`: the mean, one probed step in 10): "
            + ", ".join(f"`{c}` {t:.3f}" for c, t in sorted(step_times.items()))
            + ". est. train time prices each run's steps at these times (the configuration of each epoch).",
            "",
        ]
    return "\n".join(lines)


def plot(
    path: Path,
    args: argparse.Namespace,
    results: dict[str, list[dict[str, Any]]],
    target: float | None,
    title: str,
    step_times: dict[str, float] | None = None,
) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_f, ax_t = fig.subplots(1, 2)
    for policy, rows in results.items():
        hists = [estimated_history(args, policy, r, step_times) if step_times else r["history"] for r in rows]
        n = min(len(h) for h in hists)
        acc = [statistics.fmean(h[i]["accuracy"] for h in hists) for i in range(n)]
        flops = [statistics.fmean(h[i]["train_flops"] for h in hists) / 1e12 for i in range(n)]
        key = "est_time" if step_times else "train_time"
        secs = [statistics.fmean(h[i][key] for h in hists) for i in range(n)]
        style = "--" if policy in CONTROLS else "-"
        ax_f.plot(flops, acc, style, marker="o", markersize=3, label=policy)
        ax_t.plot(secs, acc, style, marker="o", markersize=3, label=policy)
    time_label = (
        "training wall-clock (s) at same-conditions step times" if step_times else "training wall-clock (s), indicative"
    )
    for ax, label in ((ax_f, "counted forward TFLOP (training)"), (ax_t, time_label)):
        if target:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
    ax_f.legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python benchmarks/election_study.py "
    command += shlex.join(a for a in argv if a != "--report-only")
    if not args.report_only:
        run_all(args)
    results = collect(args)
    if not results:
        print("[study] no finished runs", flush=True)
        return 1
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step_times = None
    timing_file = out / f"{args.name}_timing.json"
    if args.time_steps:
        step_times = measure_times(args)
        timing_file.write_text(json.dumps(step_times, indent=1))
    elif timing_file.exists():
        step_times = json.loads(timing_file.read_text())
    if step_times and not all(c in step_times for p in results for c in epoch_configs(args, p)):
        step_times = None  # timed for other policies: rerun with --time-steps
    text = summarise(args, results, command, step_times)
    (out / f"{args.name}.md").write_text(text)
    target = default_target(args, results)
    title = f"{args.dataset} / {args.model} / {args.scenario}"
    plot(out / f"{args.name}.png", args, results, target, title, step_times)
    slim = {
        p: [{k: r[k] for k in ("seed", "test_accuracy", "train_flops", "history")} for r in rs]
        for p, rs in results.items()
    }
    (out / f"{args.name}.json").write_text(json.dumps({"command": command, "runs": slim}, indent=1))
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
