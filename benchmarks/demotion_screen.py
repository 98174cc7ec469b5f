#!/usr/bin/env python
"""Can a demotion keep what the network computes? Demotion costs, and a recycle policy built on them.

Every measured policy that demotes leaders lost accuracy (``docs/results/fashion_mnist_elections.md``), and the
stable policy demotes a leader into the leader nearest to it in weights, which only guesses at what the network
loses. This screen measures it instead, on the seed MNIST net with output cloning (the fused BatchNorm gives a
clone its source's normalised feature under its own affine, ``y_j = gamma_j * xhat_src + beta_j``):

* **redundancy** (``fixed`` runs): after training, the correlation of each active unit's conv output with the
  most correlated other active unit of its layer. Demoting ``d`` into ``m`` replaces ``xhat_d`` by ``xhat_m``,
  so ``1 - corr`` is what it changes; only a pair near 1 is a free merge.
* **exact demotion cost**: the loss change, in ``eval()`` on ``--cost-samples`` training images, when a leader
  and its clones take the normalised output of the leader nearest in weights (what the stable policy does).
  One forward per leader: a whole election costs about ``leaders x cost-samples`` forward passes.
* **first-order cost**: the same change estimated from one forward and backward, ``<dL/dy, gamma (xhat_m -
  xhat_d)>`` summed over the demoted channels.
* **recycle policies** (``recycle``, ``recycle-first-order``): at every epoch end but the last, the stable policy at
  unchanged counts swaps up to ``--churn`` of each layer's leaders, demoting those whose cost is below zero
  and promoting (function-preserving) a clone of the most-cloned leader.

It is a screen, not the study: a plain loop (no augmentation, Adam, cosine LR to zero over the run, batch
128, images standardised by the training set's mean and std) in one process, so a run takes minutes. Each run
is cached as ``<runs-dir>/<policy>-s<seed>.json``; several processes can share a runs dir (one policy list
each); ``--report-only`` writes the summary from what is there.

    OMP_NUM_THREADS=1 python benchmarks/demotion_screen.py --seeds 0 1 2 --out docs/results/demotion_screen.md
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from egg_recipes import train_image
from egg_recipes.data import load_image_dataset
from egg_recipes.models import build_model
from torch import nn

from egg_optim import LeaderCloneOptimizer, RolePlan
from egg_optim.core.scores import RandomScore, Score

ROOT = Path(__file__).resolve().parents[1]

POLICIES = {
    "fixed": "output cloning, roles drawn once and kept",
    "recycle": "swap leaders whose exact demotion cost is < 0 for clones of the most-cloned leaders",
    "recycle-first-order": "as recycle, with the first-order cost estimate",
}
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


class DemotionCost(Score):
    """Leaders score their demotion cost (low: demote first); clones the size of their source's group
    (the most shared function is split first), just above zero so a swap needs a negative cost; independents
    stay. Until costs are set (the initial draw) it is the random score, so roles start as ``fixed``'s."""

    name = "demotion_cost"

    def __init__(self) -> None:
        self.costs: dict[str, torch.Tensor] = {}

    def __call__(self, layer, generator: torch.Generator) -> torch.Tensor:
        return self.costs[layer.name] if self.costs else RandomScore()(layer, generator)


def _norm_of(model: nn.Module, layer: str) -> nn.BatchNorm2d:
    """The BatchNorm fused with ``layer`` in the seed nets (``layerB.convC`` -> ``layerB.bnC``)."""
    return model.get_submodule(layer.replace("conv", "bn"))


def merge_targets(opt: LeaderCloneOptimizer, name: str) -> dict[int, int]:
    """Each leader of ``name`` -> the other leader nearest to it in weights (cosine), as the stable policy
    merges a demoted leader and its clones."""
    roles = opt.roles[name]
    leaders = roles.leaders
    if leaders.numel() < 2:
        return {}
    w = F.normalize(opt.layers[name].unit_rows().detach().float().flatten(1), dim=1)
    sim = w[leaders] @ w[leaders].T
    sim.fill_diagonal_(-2.0)
    return dict(zip(leaders.tolist(), leaders[sim.argmax(dim=1)].tolist()))


def _merged(out: torch.Tensor, norm: nn.BatchNorm2d, channels: torch.Tensor, into: int) -> torch.Tensor:
    """The norm's output with ``channels`` carrying unit ``into``'s normalised feature under their own affine."""
    gamma, beta = norm.weight.detach(), norm.bias.detach()
    shape = (1, -1) + (1,) * (out.dim() - 2)
    xhat = (out[:, into : into + 1] - beta[into]) / gamma[into]
    out = out.clone()
    out[:, channels] = gamma[channels].view(shape) * xhat + beta[channels].view(shape)
    return out


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def exact_costs(model: nn.Module, opt: LeaderCloneOptimizer, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict]:
    """Per layer, leader -> the measured ``eval()`` loss change of merging it (and its clones) into its target."""
    was_training = model.training
    model.eval()
    base = _loss(model, x, y)
    out: dict[str, dict[int, float]] = {}
    for name, roles in opt.roles.items():
        norm, smap, costs = _norm_of(model, name), roles.source_map, {}
        for d, m in merge_targets(opt, name).items():
            channels = torch.nonzero(smap == d).flatten()
            handle = norm.register_forward_hook(lambda mod, i, o, c=channels, m=m: _merged(o, mod, c, m))
            try:
                costs[d] = _loss(model, x, y) - base
            finally:
                handle.remove()
        out[name] = costs
    model.train(was_training)
    return out


def first_order_costs(model: nn.Module, opt: LeaderCloneOptimizer, x: torch.Tensor, y: torch.Tensor) -> dict:
    """As :func:`exact_costs`, estimated to first order from one ``eval()`` forward and backward."""
    was_training = model.training
    model.eval()
    outs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(mod, inputs, output):
            output.retain_grad()
            outs[name] = output

        return hook

    handles = [_norm_of(model, n).register_forward_hook(keep(n)) for n in opt.roles]
    try:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    result: dict[str, dict[int, float]] = {}
    for name, roles in opt.roles.items():
        norm, smap = _norm_of(model, name), roles.source_map
        out, grad = outs[name].detach(), outs[name].grad
        costs = {}
        for d, m in merge_targets(opt, name).items():
            channels = torch.nonzero(smap == d).flatten()
            costs[d] = float(((_merged(out, norm, channels, m) - out) * grad).sum())
        result[name] = costs
    opt.zero_grad()
    model.train(was_training)
    return result


def election_scores(opt: LeaderCloneOptimizer, costs: dict[str, dict[int, float]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, roles in opt.roles.items():
        s = torch.ones(roles.num_units)  # independents: never swapped
        group = torch.bincount(roles.source_map, minlength=roles.num_units).float()
        s[roles.clones] = 1e-6 * group[roles.sources]
        for d, c in costs[name].items():
            s[d] = c
        out[name] = s
    return out


def redundancy(model: nn.Module, opt: LeaderCloneOptimizer, x: torch.Tensor) -> dict[str, dict]:
    """Per layer: quantiles of each active unit's largest output correlation with another active unit."""
    outs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o.detach()))
        for n in opt.roles
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    result = {}
    for name, z in outs.items():  # output mode: the conv computes the active units only
        z = z.transpose(0, 1).flatten(1)
        z = F.normalize(z - z.mean(dim=1, keepdim=True), dim=1)
        corr = z @ z.T
        corr.fill_diagonal_(-2.0)
        best = corr.max(dim=1).values
        result[name] = {
            "active": int(z.shape[0]),
            "quantiles": [round(float(q), 3) for q in best.quantile(torch.tensor(QUANTILES))],
            "above_0.9": int((best > 0.9).sum()),
        }
    return result


# ---------------------------------------------------------------------------------------------- one run
def load(dataset: str, n_train: int | None, n_test: int | None, seed: int):
    def arrays(split: str, n: int | None):
        rows = load_image_dataset(dataset, split=split, max_samples=n, seed=seed)[:]
        return torch.as_tensor(rows["pixel_values"]).float(), torch.as_tensor(rows["label"])

    (x, y), (xt, yt) = arrays("train", n_train), arrays("test", n_test)
    mean, std = x.mean(), x.std()
    return (x - mean) / std, y, (xt - mean) / std, yt


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(x), 1000))
    model.train()
    return hits / len(x)


def run(policy: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(seed)
    x, y, xt, yt = load(args.dataset, args.max_train_samples, args.max_eval_samples, seed)
    model = build_model(args.model, in_channels=x.shape[1], num_classes=int(y.max()) + 1, image_size=x.shape[-2:])
    plan = RolePlan.preset(args.scenario, table=train_image.SEED_TABLES[args.model])
    score = DemotionCost()
    options: dict[str, Any] = {"clone_mode": "output", "assign": "round_robin", "seed": seed}
    if policy != "fixed":
        options.update(election=score, election_policy="stable", max_churn=args.churn)
    opt = LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters(), lr=args.lr), plan, **options)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed + 1)
    history, elections, train_s = [], [], 0.0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        train_s += time.perf_counter() - t0
        history.append(accuracy(model, xt, yt))
        if policy != "fixed" and epoch < args.epochs - 1:
            t0 = time.perf_counter()
            sub = torch.randperm(len(x), generator=gen)[: args.cost_samples]
            fn = exact_costs if policy == "recycle" else first_order_costs
            costs = fn(model, opt, x[sub], y[sub])
            score.costs = election_scores(opt, costs)
            churn = opt.elect_now()
            elections.append(
                {
                    "epoch": epoch + 1,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "negative_costs": sum(c < 0 for layer in costs.values() for c in layer.values()),
                    "swapped": sum(churn.values()),
                }
            )
    result: dict[str, Any] = {
        "policy": policy,
        "seed": seed,
        "accuracy": history[-1],
        "history": history,
        "train_seconds": round(train_s, 1),
        "elections": elections,
    }
    if policy == "fixed":
        result["redundancy"] = redundancy(model, opt, x[: args.cost_samples])
    return result


# ---------------------------------------------------------------------------------------------- report
def report(args: argparse.Namespace, runs: dict[tuple[str, int], dict]) -> str:
    argv = [a for a in sys.argv[1:] if a != "--report-only"]
    command = "OMP_NUM_THREADS=1 python benchmarks/demotion_screen.py " + shlex.join(argv)
    lines = [
        f"# Demotion screen: {args.dataset} / {args.model} / {args.scenario}",
        "",
        "Command (from the repository root):",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}. Plain loop (see the script's docstring): "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr:g} with cosine decay to 0, output "
        f"cloning, round-robin sources, {args.max_train_samples} training / {args.max_eval_samples} test images; "
        f"recycle elections at every epoch end but the last, churn {args.churn:g}, costs on {args.cost_samples} "
        "training images.",
        "",
        "| policy | test acc, mean | per seed | vs fixed (paired mean) | swaps at each election (first seed) "
        "| election s (median) | train s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    fixed = {s: r["accuracy"] for (p, s), r in runs.items() if p == "fixed"}
    for policy in args.policies:
        rs = [runs[(policy, s)] for s in args.seeds if (policy, s) in runs]
        if not rs:
            continue
        accs = [r["accuracy"] for r in rs]
        paired = [r["accuracy"] - fixed[r["seed"]] for r in rs if r["seed"] in fixed]
        vs = f"{100 * statistics.mean(paired):+.2f} pt" if paired and policy != "fixed" else "-"
        el = [e for r in rs for e in r["elections"]]
        swaps = " / ".join(str(e["swapped"]) for e in el[: args.epochs - 1]) if el else "-"
        secs = f"{statistics.median(e['seconds'] for e in el):.1f}" if el else "-"
        lines.append(
            f"| {policy} | {statistics.mean(accs):.4f} | {' / '.join(f'{a:.4f}' for a in accs)} | {vs} | {swaps} "
            f"| {secs} | {statistics.median(r['train_seconds'] for r in rs):.1f} |"
        )
    lines += ["", "Policies:", ""] + [f"- `{p}`: {POLICIES[p]}" for p in args.policies]
    red = [r["redundancy"] for (p, _), r in sorted(runs.items()) if p == "fixed" and "redundancy" in r]
    if red:
        q = " / ".join(f"{v:g}" for v in QUANTILES)
        lines += [
            "",
            f"Redundancy after training (`fixed`, seed {args.seeds[0]}): for each active unit, its conv output's "
            f"largest correlation with another active unit of the layer, quantiles {q}; a demotion into a unit "
            "changes the channel by `1 - corr` of its normalised feature.",
            "",
            "| layer | active units | max-correlation quantiles | units above 0.9 |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {n} | {v['active']} | {' / '.join(f'{x:.2f}' for x in v['quantiles'])} | {v['above_0.9']} |"
            for n, v in red[0].items()
        ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--model", default="seed_mnist", choices=sorted(train_image.SEED_TABLES))
    p.add_argument("--scenario", default="mild", choices=("mild", "aggressive"))
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--churn", type=float, default=0.1, help="max_churn of the recycle elections")
    p.add_argument("--cost-samples", type=int, default=512, help="training images the costs are measured on")
    p.add_argument("--max-train-samples", type=int, default=8000)
    p.add_argument("--max-eval-samples", type=int, default=5000)
    p.add_argument("--runs-dir", default="runs/demotion_screen")
    p.add_argument("--out", default=None, help="markdown summary (default: <runs-dir>/demotion_screen.md)")
    p.add_argument("--report-only", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    tag = (
        f"{args.dataset}-{args.model}-{args.scenario}-e{args.epochs}-c{args.churn:g}-n{args.cost_samples}"
        f"-t{args.max_train_samples}-v{args.max_eval_samples}"
    )
    runs: dict[tuple[str, int], dict] = {}
    for policy in args.policies:
        for seed in args.seeds:
            path = runs_dir / f"{policy}-{tag}-s{seed}.json"
            if path.exists():
                runs[(policy, seed)] = json.loads(path.read_text())
            elif not args.report_only:
                result = run(policy, seed, args)
                path.write_text(json.dumps(result, indent=1))
                runs[(policy, seed)] = result
                print(f"{policy} seed {seed}: {result['accuracy']:.4f} {result['elections']}", flush=True)
    text = report(args, runs)
    out = Path(args.out) if args.out else runs_dir / "demotion_screen.md"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
