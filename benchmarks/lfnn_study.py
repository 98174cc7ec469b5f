"""LFNN study: backprop vs LFNN (Eq. 1) vs LFNN-l (Eq. 2, BP-free) across leadership fractions, plus the
paper's loss ablation, on scikit-learn digits and Fashion-MNIST (CPU, one process, runs one after another).

What runs (defaults; ``--quick`` shrinks everything to about a minute):

- models: the paper's appendix-C MLP (2 hidden FC layers of 32 workers x 10 units, ReLU, direct readout: a
  worker's 10 units are its class logits) and a small CNN (two 3x3 conv layers of 5 workers x 10 filters,
  ReLU, max-pool, linear head; a filter worker's class logits are the global average of its 10 maps);
- methods: ``bp`` (same model, plain cross-entropy, no local losses), ``lfnn`` (Eq. 1, l1 = l2 = 1) and
  ``lfnn_l`` (Eq. 2, BP-free, lambda = 1) for every leadership fraction delta in ``--deltas``;
- ablation (MLP, ``lfnn`` mode, each delta in ``--ablation-deltas``): global + leader + follower loss,
  global + leader, global + follower, global only (l1 / l2 set to 0; followers stay blocked from the global
  gradient), next to plain BP;
- Adam, batch 128, test accuracy on the full test split, fixed seeds;
- ``--presets paper,default``: every LFNN cell once with the paper's losses (summed over workers, followers
  matched to raw outputs) and once with the module's defaults (averaged, softmax-probability targets), plus a
  table of every seed and its distance from the seed mean (collapse: more than 2 points);
- ``--models resnet``: a small ResNet cut into gradient-isolated blocks (``BlockResNet``), trained block-wise
  (``--methods dgl``: one worker per block; ``lfnn_l``: ``--resnet-workers`` leader / follower workers per block).

The report (markdown: command, machine, wall-clock, tables) goes to ``--out``; a plot to ``--png``.
Progress, one line per epoch and per run, goes to ``--log`` (follow it with ``tail -f``).

    python benchmarks/lfnn_study.py --quick --out /tmp/lfnn_quick.md
    nice python benchmarks/lfnn_study.py --out docs/results/lfnn_study.md --png docs/results/lfnn_study.png
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from egg_recipes.data import dataset_spec, load_image_dataset, make_dataloader
from egg_recipes.models import MLP, BlockResNet
from torch import nn

from egg_optim.lfnn import LeaderFollowerLoss, num_leaders

DATASETS = ("digits", "fashion_mnist")
MODELS = ("mlp", "cnn", "resnet")
METHODS = ("bp", "dgl", "lfnn", "lfnn_l")
#: methods without a leadership fraction (one run per seed); ``dgl`` only runs on the block-wise ResNet
NO_DELTA = ("bp", "dgl")
METHOD_LABEL = {"bp": "BP", "dgl": "DGL", "lfnn": "LFNN", "lfnn_l": "LFNN-l"}
MODEL_LABEL = {"mlp": "MLP", "cnn": "CNN", "resnet": "ResNet"}
REDUCED = {"sum": "summed", "mean": "averaged"}
#: named loss settings (``--presets``): the paper's Eq. 1/2 as written, and the module's defaults
PRESETS = {
    "paper": {"worker_reduction": "sum", "follower_target": "output"},
    "default": {},
}
DATASET_LABEL = {"digits": "digits", "fashion_mnist": "Fashion-MNIST"}
#: ablation variants of Eq. 1: (key, l1, l2, label)
ABLATION = (
    ("full", 1.0, 1.0, "L_g + L_leader + L_follower"),
    ("leader", 1.0, 0.0, "L_g + L_leader"),
    ("follower", 0.0, 1.0, "L_g + L_follower"),
    ("global", 0.0, 0.0, "L_g only (followers blocked)"),
)
ABLATION_MEANING = {
    "full": "leaders: global gradient + own CE; followers: only MSE to the best leader's output",
    "leader": "leaders: global gradient + own CE; followers: no gradient at all in that step",
    "follower": "leaders: global gradient only; followers: only MSE to the best leader's output",
    "global": "leaders: global gradient only; followers: no gradient (leaders still chosen by their CE)",
    "bp": "plain backprop of L_g through every unit, no workers (reference)",
}


# ----------------------------------------------------------------------------------------------- models
class WorkerCNN(nn.Module):
    """``conv1 -> ReLU -> MaxPool2 -> conv2 -> ReLU -> MaxPool2 -> Linear head`` (3x3 convs with bias, no BN,
    so a filter worker's output is exactly what its local loss sees). ``stride1=2`` makes the first conv
    stride 2 (used on 28x28 inputs to fit the CPU budget)."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, channels=(50, 50), stride1: int = 1
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, stride=stride1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        side = (image_size + 2 - 3) // stride1 + 1
        side = (side // 2) // 2
        self.head = nn.Linear(c2 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.head(torch.flatten(x, 1))


def build(model: str, spec, cfg: Config) -> tuple[nn.Module, list[str]]:
    if model == "mlp":
        m = MLP(spec.channels * spec.height * spec.width, hidden=(cfg.mlp_workers * 10,) * 2, num_classes=10)
        return m, ["fc1", "fc2"]
    if model == "resnet":
        return BlockResNet(spec.channels, 10, widths=cfg.resnet_widths), []
    stride1 = 2 if spec.height >= 16 else 1
    m = WorkerCNN(spec.channels, 10, spec.height, channels=(cfg.cnn_workers * 10,) * 2, stride1=stride1)
    return m, ["conv1", "conv2"]


# ----------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    datasets: list[str]
    models: list[str]
    methods: list[str]
    deltas: list[float]
    ablation_deltas: list[float]
    seeds: dict[str, list[int]]
    epochs: dict[str, int]
    train_samples: dict[str, int | None]
    test_samples: dict[str, int | None]
    batch_size: int = 128
    lr: float = 1e-3
    mlp_workers: int = 32
    cnn_workers: int = 5
    resnet_widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    resnet_workers: int = 4
    aux_hidden: int = 64
    threads: int = 1
    worker_reduction: str | None = None
    follower_target: str | None = None
    local_activation: str | None = None
    presets: list[str] = field(default_factory=lambda: [""])
    log: str | None = None
    out: str | None = None
    png: str | None = None
    json: str | None = None
    plot_from: str | None = None
    quick: bool = False
    argv: list[str] = field(default_factory=list)


@dataclass
class Run:
    dataset: str
    model: str
    method: str
    delta: float | None
    l1: float
    l2: float
    seed: int
    epochs: int
    train_samples: int
    test_samples: int
    params: int
    test_acc: float
    train_acc: float
    fixed_leaders: float | None
    seconds: float
    leaders_per_layer: str = ""
    preset: str = ""


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    out = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in out if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {bad}; choose from {list(allowed)}")
    return out


def parse_args(argv: Sequence[str] | None) -> Config:
    p = argparse.ArgumentParser(
        description="BP vs LFNN vs LFNN-l across leadership fractions, and the loss ablation (CPU study).",
    )
    p.add_argument("--quick", action="store_true", help="tiny settings (about a minute): a smoke run, not results")
    p.add_argument(
        "--datasets", default=",".join(DATASETS), help="comma list of " + "/".join(DATASETS) + " (default: both)"
    )
    p.add_argument(
        "--models",
        default="mlp,cnn",
        help="comma list of " + "/".join(MODELS) + " (default: mlp,cnn; resnet: the block-wise BlockResNet)",
    )
    p.add_argument(
        "--methods",
        default="bp,lfnn,lfnn_l",
        help="comma list of " + "/".join(METHODS) + " (default: bp,lfnn,lfnn_l; dgl: the ResNet's blocks with "
        "one worker each, i.e. DGL; lfnn/lfnn_l on the ResNet: block-wise, --resnet-workers per block)",
    )
    p.add_argument(
        "--deltas", default=None, help="leadership fractions (default 0.1,0.3,0.5,0.7,1.0; quick: 0.1,0.5,1.0)"
    )
    p.add_argument(
        "--ablation-deltas",
        default=None,
        help="deltas of the MLP loss ablation (default 0.3,0.7; quick: 0.7; '' to skip)",
    )
    p.add_argument("--digits-epochs", type=int, default=None, help="default 20 (quick: 3)")
    p.add_argument("--fmnist-epochs", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument(
        "--fmnist-train", type=int, default=None, help="Fashion-MNIST training subset (default all 60k; quick: 2000)"
    )
    p.add_argument(
        "--fmnist-test", type=int, default=None, help="Fashion-MNIST test subset (default all 10k; quick: 2000)"
    )
    p.add_argument("--digits-seeds", default=None, help="comma list (default 0,1,2; quick: 0)")
    p.add_argument("--fmnist-seeds", default=None, help="comma list (default 0,1; quick: 0)")
    p.add_argument("--fmnist-cnn-seeds", default=None, help="seeds of the Fashion-MNIST CNN runs (default 0)")
    p.add_argument("--batch-size", type=int, default=128, help="default 128")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--mlp-workers", type=int, default=32, help="workers (of 10 units) per hidden MLP layer (default 32)"
    )
    p.add_argument("--cnn-workers", type=int, default=5, help="workers (of 10 filters) per conv layer (default 5)")
    p.add_argument(
        "--resnet-widths", default="16,32,64", help="BlockResNet stage widths = its K blocks (default 16,32,64)"
    )
    p.add_argument("--resnet-workers", type=int, default=4, help="workers per ResNet block (default 4)")
    p.add_argument("--aux-hidden", type=int, default=64, help="width of the ResNet blocks' aux heads (default 64)")
    p.add_argument(
        "--worker-reduction",
        choices=("sum", "mean"),
        default=None,
        help="leader / follower losses summed (the paper) or averaged over workers (default: the module's, mean)",
    )
    p.add_argument(
        "--follower-target",
        choices=("output", "logits", "probs", "centred"),
        default=None,
        help="what followers match to the best leader by MSE (default: the module's, probs; the paper: output)",
    )
    p.add_argument(
        "--local-activation",
        choices=("none", "relu"),
        default=None,
        help="apply a ReLU to a layer's output before its workers read it (default: none)",
    )
    p.add_argument(
        "--presets",
        default="",
        help="comma list of named loss settings, each run for every LFNN cell: "
        + ", ".join(f"{k} = {v or 'the module defaults'}" for k, v in PRESETS.items())
        + " (the flags above apply on top; default: none, just the flags)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: keep 1 on a shared CPU)")
    p.add_argument(
        "--log",
        default="/tmp/lfnn_study.progress.log",
        help="progress log, appended to ('' for none; default /tmp/lfnn_study.progress.log)",
    )
    p.add_argument("--out", default=None, help="markdown report path (default: print it)")
    p.add_argument("--png", default=None, help="plot of accuracy vs delta (needs matplotlib)")
    p.add_argument("--json", default=None, help="also dump every run as JSON to this path")
    p.add_argument(
        "--plot-from",
        default=None,
        help="no training: redraw --png (and --out) from a --json dump made with the same settings",
    )
    a = p.parse_args(argv)
    q = a.quick
    deltas = _floats(a.deltas) if a.deltas is not None else ([0.1, 0.5, 1.0] if q else [0.1, 0.3, 0.5, 0.7, 1.0])
    abl = _floats(a.ablation_deltas) if a.ablation_deltas is not None else ([0.7] if q else [0.3, 0.7])
    for d in [*deltas, *abl]:
        if not 0.0 < d <= 1.0:
            raise SystemExit(f"delta must be in (0, 1], got {d}")
    fm_seeds = [int(s) for s in (a.fmnist_seeds or ("0" if q else "0,1")).split(",")]
    seeds = {
        "digits": [int(s) for s in (a.digits_seeds or ("0" if q else "0,1,2")).split(",")],
        "fashion_mnist": fm_seeds,
        "fashion_mnist/cnn": [int(s) for s in (a.fmnist_cnn_seeds or "0").split(",")],
    }
    return Config(
        datasets=_names(a.datasets, DATASETS, "datasets"),
        models=_names(a.models, MODELS, "models"),
        methods=_names(a.methods, METHODS, "methods"),
        deltas=deltas,
        ablation_deltas=abl,
        seeds=seeds,
        epochs={
            "digits": a.digits_epochs or (3 if q else 20),
            "fashion_mnist": a.fmnist_epochs or (1 if q else 3),
        },
        train_samples={"digits": None, "fashion_mnist": a.fmnist_train or (2000 if q else None)},
        test_samples={"digits": None, "fashion_mnist": a.fmnist_test or (2000 if q else None)},
        batch_size=a.batch_size,
        lr=a.lr,
        mlp_workers=a.mlp_workers,
        cnn_workers=a.cnn_workers,
        resnet_widths=[int(v) for v in a.resnet_widths.split(",")],
        resnet_workers=a.resnet_workers,
        aux_hidden=a.aux_hidden,
        threads=a.threads,
        worker_reduction=a.worker_reduction,
        follower_target=a.follower_target,
        local_activation=a.local_activation,
        presets=_names(a.presets, tuple(PRESETS), "presets") or [""],
        log=a.log or None,
        out=a.out,
        png=a.png,
        json=a.json,
        plot_from=a.plot_from,
        quick=q,
        argv=list(sys.argv[1:] if argv is None else argv),
    )


# ----------------------------------------------------------------------------------------------- training
class Logger:
    def __init__(self, path: str | None) -> None:
        self.f = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (kept open for the whole study)

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")

    def close(self) -> None:
        if self.f:
            self.f.close()


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    model.train()
    return correct / max(total, 1)


def train_one(
    cfg: Config,
    data: dict,
    dataset: str,
    model_name: str,
    method: str,
    delta: float | None,
    seed: int,
    l1: float = 1.0,
    l2: float = 1.0,
    log: Logger | None = None,
    preset: str = "",
) -> Run:
    spec, train_ds, test_loader = data["spec"], data["train"], data["test_loader"]
    torch.manual_seed(seed)
    model, layers = build(model_name, spec, cfg)
    lf = None
    if method != "bp":
        blockwise = {}
        if model_name == "resnet":
            blockwise = {
                "blocks": model.local_blocks(),
                "block_workers": 1 if method == "dgl" else cfg.resnet_workers,
                "aux_hidden": cfg.aux_hidden,
            }
        lf = LeaderFollowerLoss(
            model,
            layers,
            num_classes=10,
            delta=1.0 if delta is None else delta,
            mode="lfnn_l" if method == "dgl" else method,
            l1=l1,
            l2=l2,
            **blockwise,
            **loss_options(cfg, preset),
        )
    params = [*model.parameters(), *(lf.parameters() if lf is not None else [])]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    loader = make_dataloader(train_ds, cfg.batch_size, shuffle=True, seed=seed, normalize="half")
    epochs = cfg.epochs[dataset]
    t0 = time.perf_counter()
    fixed = None
    train_acc = 0.0
    for epoch in range(epochs):
        if lf is not None and epoch == epochs - 1:
            lf.reset_stats()  # leadership counts over the last epoch only
        steps = correct = seen = 0
        loss_sum = 0.0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            if lf is None:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            else:
                with lf.targets(y):
                    logits = model(x)
                loss = lf.loss(logits, y)
            loss.backward()
            opt.step()
            steps += 1
            loss_sum += float(loss.detach())
            correct += int((logits.argmax(1) == y).sum())
            seen += int(y.numel())
        train_acc = correct / max(seen, 1)
        if log is not None:
            log(f"    epoch {epoch + 1}/{epochs}: loss {loss_sum / max(steps, 1):.4f} train acc {train_acc:.4f}")
        if lf is not None and epoch == epochs - 1:
            counts = lf.leadership_counts()
            shares = []
            for name, (w, _) in lf.workers().items():
                k = num_leaders(w, delta or 1.0)
                c = counts[name].float()
                shares.append(float((c >= 0.9 * steps).sum()) / k)
            fixed = sum(shares) / len(shares)
    test_acc = evaluate(model, test_loader)
    seconds = time.perf_counter() - t0
    leaders = ""
    if lf is not None:
        leaders = "/".join(f"{num_leaders(w, delta or 1.0)} of {w}" for w, _ in lf.workers().values())
        lf.remove()
    return Run(
        dataset=dataset,
        model=model_name,
        method=method,
        delta=delta,
        l1=l1,
        l2=l2,
        seed=seed,
        epochs=epochs,
        train_samples=len(train_ds),
        test_samples=data["n_test"],
        params=sum(p.numel() for p in model.parameters()),
        test_acc=test_acc,
        train_acc=train_acc,
        fixed_leaders=fixed,
        seconds=seconds,
        leaders_per_layer=leaders,
        preset=preset,
    )


def loss_options(cfg: Config, preset: str = "") -> dict:
    """``LeaderFollowerLoss`` keyword arguments of a run: the preset, then the explicit flags on top."""
    kw = dict(PRESETS.get(preset, {}))
    if cfg.worker_reduction is not None:
        kw["worker_reduction"] = cfg.worker_reduction
    if cfg.follower_target is not None:
        kw["follower_target"] = cfg.follower_target
    if cfg.local_activation not in (None, "none"):
        kw["local_activation"] = cfg.local_activation
    return kw


def load(dataset: str, cfg: Config) -> dict:
    train = load_image_dataset(dataset, split="train", max_samples=cfg.train_samples[dataset], seed=0)
    test = load_image_dataset(dataset, split="test", max_samples=cfg.test_samples[dataset], seed=0)
    return {
        "spec": dataset_spec(train),
        "train": train,
        "n_test": len(test),
        "test_loader": make_dataloader(test, 1000, normalize="half"),
    }


# ----------------------------------------------------------------------------------------------- report
def _cell(accs: list[float]) -> str:
    if not accs:
        return ""
    m = 100 * statistics.fmean(accs)
    if len(accs) == 1:
        return f"{m:.2f}"
    return f"{m:.2f} ± {100 * statistics.stdev(accs):.2f}"


def _delta_label(d: float) -> str:
    return f"{100 * d:g} %"


def _group(runs: list[Run], **key) -> list[float]:
    out = []
    for r in runs:
        if all(
            (getattr(r, k) == v) if not isinstance(v, float) else math.isclose(getattr(r, k), v) for k, v in key.items()
        ):
            out.append(r.test_acc)
    return out


def _rows(cfg: Config) -> list[tuple[str, str]]:
    """``(method, preset)`` rows: BP once, every LFNN method once per preset."""
    return [(m, p) for m in cfg.methods for p in (cfg.presets if m not in NO_DELTA else [""])]


def _method_label(method: str, preset: str) -> str:
    return METHOD_LABEL[method] + (f" [{preset}]" if preset else "")


def spread_table(runs: list[Run], cfg: Config) -> list[str]:
    """Per cell with more than one seed: every seed, and the largest distance of a seed from the seed mean
    (the issue's collapse criterion: more than 2 points)."""
    head = ["dataset", "model", "method", "δ", "seeds (test acc %)", "max |seed - mean| (pt)", "collapse"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ds in cfg.datasets:
        for m in cfg.models:
            for meth, preset in _rows(cfg):
                for d in [None] if meth in NO_DELTA else cfg.deltas:
                    key = {"dataset": ds, "model": m, "method": meth}
                    if meth not in NO_DELTA:
                        key.update(delta=d, l1=1.0, l2=1.0, preset=preset)
                    accs = [100 * a for a in _group(runs, **key)]
                    if len(accs) < 2:
                        continue
                    mean = statistics.fmean(accs)
                    worst = max(abs(a - mean) for a in accs)
                    lines.append(
                        f"| {DATASET_LABEL[ds]} | {MODEL_LABEL[m]} | {_method_label(meth, preset)} | "
                        f"{'' if d is None else _delta_label(d)} | {', '.join(f'{a:.2f}' for a in accs)} | "
                        f"{worst:.2f} | {'yes' if worst > 2.0 else 'no'} |"
                    )
    return lines


def main_table(runs: list[Run], cfg: Config) -> list[str]:
    head = ["dataset", "model", "method", "no δ", *[_delta_label(d) for d in cfg.deltas]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ds in cfg.datasets:
        for m in cfg.models:
            for meth, preset in _rows(cfg):
                row = [DATASET_LABEL[ds], MODEL_LABEL[m], _method_label(meth, preset)]
                if meth == "dgl" and m != "resnet":
                    continue
                if meth in NO_DELTA:
                    row += [_cell(_group(runs, dataset=ds, model=m, method=meth))] + [""] * len(cfg.deltas)
                else:
                    row += [""] + [
                        _cell(_group(runs, dataset=ds, model=m, method=meth, delta=d, l1=1.0, l2=1.0, preset=preset))
                        for d in cfg.deltas
                    ]
                lines.append("| " + " | ".join(row) + " |")
    return lines


def ablation_table(runs: list[Run], cfg: Config) -> list[str]:
    head = ["dataset", "δ", "variant", "l1", "l2", "test acc (%)", "who gets which gradient"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ds in cfg.datasets:
        for d in cfg.ablation_deltas:
            for key, l1, l2, label in ABLATION:
                acc = _cell(
                    _group(runs, dataset=ds, model="mlp", method="lfnn", delta=d, l1=l1, l2=l2, preset=cfg.presets[0])
                )
                lines.append(
                    f"| {DATASET_LABEL[ds]} | {_delta_label(d)} | {label} | {l1:g} | {l2:g} | {acc} | "
                    f"{ABLATION_MEANING[key]} |"
                )
        acc = _cell(_group(runs, dataset=ds, model="mlp", method="bp"))
        lines.append(f"| {DATASET_LABEL[ds]} | — | BP, no workers | — | — | {acc} | {ABLATION_MEANING['bp']} |")
    return lines


def detail_table(runs: list[Run]) -> list[str]:
    head = [
        "dataset",
        "model",
        "method",
        "δ",
        "leaders/layer",
        "l1",
        "l2",
        "seed",
        "epochs",
        "train n",
        "test n",
        "params",
        "train acc (last epoch)",
        "test acc",
        "fixed leaders",
        "seconds",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        lines.append(
            "| "
            + " | ".join(
                [
                    DATASET_LABEL[r.dataset],
                    MODEL_LABEL[r.model],
                    _method_label(r.method, r.preset),
                    "" if r.delta is None else f"{r.delta:g}",
                    r.leaders_per_layer,
                    "" if r.method in NO_DELTA else f"{r.l1:g}",
                    "" if r.method in NO_DELTA else f"{r.l2:g}",
                    str(r.seed),
                    str(r.epochs),
                    str(r.train_samples),
                    str(r.test_samples),
                    str(r.params),
                    f"{100 * r.train_acc:.2f}",
                    f"{100 * r.test_acc:.2f}",
                    "" if r.fixed_leaders is None else f"{r.fixed_leaders:.2f}",
                    f"{r.seconds:.1f}",
                ]
            )
            + " |"
        )
    return lines


def report(runs: list[Run], cfg: Config, wall: float) -> str:
    cmd = "python benchmarks/lfnn_study.py" + ("" if not cfg.argv else " " + shlex.join(cfg.argv))
    seeds = "; ".join(f"{k}: {v}" for k, v in cfg.seeds.items())
    train_n = {ds: next((r.train_samples for r in runs if r.dataset == ds), None) for ds in cfg.datasets}
    test_n = {ds: next((r.test_samples for r in runs if r.dataset == ds), None) for ds in cfg.datasets}
    out = [
        "# LFNN study: BP vs LFNN vs LFNN-l, leadership fractions, loss ablation",
        "",
        "Command (from the repository root):",
        "",
        "```",
        cmd,
        "```",
        "",
        f"- machine: {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s) (shared 2-core box), "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        f"- wall-clock of the whole study: {wall / 60:.1f} min ({len(runs)} training runs, one after another)",
        f"- data: {', '.join(f'{DATASET_LABEL[d]} train {train_n[d]} / test {test_n[d]}' for d in cfg.datasets)}; "
        "pixels scaled to [-1, 1]; no augmentation",
        f"- epochs: {', '.join(f'{DATASET_LABEL[d]} {cfg.epochs[d]}' for d in cfg.datasets)}; Adam lr {cfg.lr:g}, "
        f"batch {cfg.batch_size}; seeds {seeds} (cells: mean ± std over seeds when more than one)",
        f"- MLP: 2 hidden Linear layers of {cfg.mlp_workers} workers x 10 units (ReLU), direct readout; "
        f"CNN: 2 conv3x3 layers of {cfg.cnn_workers} workers x 10 filters (ReLU, max-pool 2, first conv stride 2 "
        "on 28x28 inputs), global-average-pool readout; both end in a Linear head"
        + (
            f"; ResNet: BlockResNet widths {cfg.resnet_widths} = {len(cfg.resnet_widths)} blocks (stem + basic "
            "blocks, BN), the last block and the Linear head trained by L_g alone, the others local with "
            f"{cfg.resnet_workers} workers each (DGL: 1), aux heads pool 2x2 + MLP of width {cfg.aux_hidden}"
            if "resnet" in cfg.models
            else ""
        ),
        "- LFNN = Eq. 1 with l1 = l2 = 1; LFNN-l = Eq. 2 (hidden layers learn only from their local losses, the "
        "global loss trains only the head), lambda = 1; delta = fraction of workers per layer that lead "
        "(rounded half up)",
        "- local-loss options (`LeaderFollowerLoss` keywords; {} = the module defaults: worker_reduction "
        "'mean', follower_target 'probs', no local_activation): "
        + "; ".join(f"{p or 'runs'}: {loss_options(cfg, p)}" for p in cfg.presets),
        "",
        "## Test accuracy (%)",
        "",
        *main_table(runs, cfg),
        "",
    ]
    spread = spread_table(runs, cfg)
    if len(spread) > 2:
        out += ["## Seeds and collapses", "", *spread, ""]
    if cfg.ablation_deltas and "mlp" in cfg.models:
        out += ["## Loss ablation (MLP, LFNN mode, Eq. 1 with terms switched off)", "", *ablation_table(runs, cfg), ""]
    out += [
        "## Every run",
        "",
        "`fixed leaders`: over the last epoch, (workers that led in >= 90 % of the steps) / (leaders per step), "
        "averaged over the layers (1.00: the leader set no longer changes).",
        "",
        *detail_table(runs),
        "",
    ]
    return "\n".join(out)


def plot(runs: list[Run], cfg: Config, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(ds, m) for ds in cfg.datasets for m in cfg.models]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (ds, m) in zip(axes[0], panels):
        bp = _group(runs, dataset=ds, model=m, method="bp")
        if bp:
            ax.axhline(100 * statistics.fmean(bp), color="k", ls="--", label="BP")
        for (meth, preset), (color, style) in zip(
            [r for r in _rows(cfg) if r[0] not in NO_DELTA], [(f"C{i}", "o-") for i in range(10)]
        ):
            ys = [
                _group(runs, dataset=ds, model=m, method=meth, delta=d, l1=1.0, l2=1.0, preset=preset)
                for d in cfg.deltas
            ]
            xs = [100 * d for d, y in zip(cfg.deltas, ys) if y]
            label = _method_label(meth, preset)
            ax.plot(xs, [100 * statistics.fmean(y) for y in ys if y], style, color=color, label=label)
            seeds = [(100 * d, 100 * a) for d, y in zip(cfg.deltas, ys) if len(y) > 1 for a in y]
            if seeds:  # every seed as a small cross, so a collapsed seed is visible behind the mean
                ax.plot(*zip(*seeds), "x", color=color, ms=4, alpha=0.6)
        ax.set_title(f"{DATASET_LABEL[ds]}, {MODEL_LABEL[m]}")
        ax.set_xlabel("leadership fraction δ (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main
def plan(cfg: Config) -> list[tuple]:
    """Unique runs ``(dataset, model, method, delta, l1, l2, seed, preset)`` in execution order."""
    jobs: list[tuple] = []
    for ds in cfg.datasets:
        for m in cfg.models:
            seeds = cfg.seeds.get(f"{ds}/{m}", cfg.seeds[ds])
            for seed in seeds:
                for meth in cfg.methods:
                    if meth == "dgl" and m != "resnet":
                        continue
                    if meth in NO_DELTA:
                        jobs.append((ds, m, meth, None, 1.0, 1.0, seed, ""))
                    else:
                        jobs += [(ds, m, meth, d, 1.0, 1.0, seed, p) for p in cfg.presets for d in cfg.deltas]
        if "mlp" in cfg.models:
            for seed in cfg.seeds[ds]:
                if cfg.ablation_deltas and (ds, "mlp", "bp", None, 1.0, 1.0, seed, "") not in jobs:
                    jobs.append((ds, "mlp", "bp", None, 1.0, 1.0, seed, ""))
                for d in cfg.ablation_deltas:
                    for _, l1, l2, _ in ABLATION:
                        job = (ds, "mlp", "lfnn", d, l1, l2, seed, cfg.presets[0])
                        if job not in jobs:
                            jobs.append(job)
    return jobs


def main(argv: Sequence[str] | None = None) -> tuple[list[Run], str]:
    cfg = parse_args(argv)
    if cfg.plot_from:
        runs = [Run(**r) for r in json.loads(Path(cfg.plot_from).read_text())]
        text = report(runs, cfg, float("nan"))
        if cfg.out:
            Path(cfg.out).write_text(text)
        if cfg.png:
            plot(runs, cfg, cfg.png)
        return runs, text
    torch.set_num_threads(cfg.threads)
    log = Logger(cfg.log)
    jobs = plan(cfg)
    log(f"lfnn_study: {len(jobs)} runs; args {cfg.argv}")
    t_start = time.perf_counter()
    runs: list[Run] = []
    data: dict[str, dict] = {}
    try:
        for i, (ds, m, meth, d, l1, l2, seed, preset) in enumerate(jobs, 1):
            if ds not in data:
                data[ds] = load(ds, cfg)
            log(f"[{i}/{len(jobs)}] {ds} {m} {meth} {preset} delta={d} l1={l1:g} l2={l2:g} seed={seed}")
            r = train_one(cfg, data[ds], ds, m, meth, d, seed, l1, l2, log, preset)
            runs.append(r)
            log(
                f"[{i}/{len(jobs)}] done: test acc {r.test_acc:.4f} (train {r.train_acc:.4f}) in {r.seconds:.1f}s; "
                f"elapsed {(time.perf_counter() - t_start) / 60:.1f} min"
            )
        wall = time.perf_counter() - t_start
        text = report(runs, cfg, wall)
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.out).write_text(text)
            log(f"wrote {cfg.out}")
        if cfg.json:
            Path(cfg.json).write_text(json.dumps(runs_as_dicts(runs), indent=1))
        if cfg.png:
            plot(runs, cfg, cfg.png)
            log(f"wrote {cfg.png}")
        if not cfg.out:
            print(text)
        log(f"lfnn_study finished in {wall / 60:.1f} min")
    finally:
        log.close()
    return runs, text


def runs_as_dicts(runs: list[Run]) -> list[dict]:
    return [asdict(r) for r in runs]


if __name__ == "__main__":
    main()
