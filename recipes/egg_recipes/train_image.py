#!/usr/bin/env python
"""Train an image classifier with Boiled Egg leader/clone roles (egg_optim) under Hugging Face Accelerate.

Runs the same with ``python recipes/train_image.py ...`` (one process) and
``accelerate launch [--config_file accelerate_configs/<cfg>.yaml] recipes/train_image.py ...`` (DDP on GPUs,
or on CPUs with ``accelerate_configs/cpu_multi.yaml``). Examples::

    python recipes/train_image.py --dataset digits --model seed_mnist --scenario mild --epochs 3 --report-to none
    accelerate launch --config_file accelerate_configs/cpu_multi.yaml recipes/train_image.py --max-steps 50

The run writes ``metrics.json`` (test accuracy, wall-clock per epoch, "updates" per epoch = active output
channels per batch summed over the epoch, as in the seed's tables, steps, role totals), ``model.safetensors``
and, with ``--save-every``, atomic checkpoints under ``<output-dir>/checkpoints`` that ``--resume-from``
continues bit-exactly (same flags and number of processes).

Exact resumes: the data order of epoch ``e`` is drawn from ``(seed, e)``, augmentation of batch ``b`` from
``(seed, rank, e, b)`` and the global torch RNG (dropout) is reseeded from ``(seed, rank, step)`` before every
step, so a resumed run draws what the uninterrupted one would, wherever it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from egg_optim import EggConfig, LeaderCloneOptimizer, RolePlan, add_config_arguments
from egg_optim.core.graduation import Graduation
from egg_optim.errors import ConfigError

# shared recipe pieces (egg_recipes.common), also read from here by train_trainer.py, sweep.py and the tests
from egg_recipes.common import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    add_compile_arguments,
    add_run_arguments,
    changed_flags,
    check_compile_flags,
    compile_model,
    derived_seed,
    egg_config,
    gathered_model_state,
    init_trackers,
    load_image_splits,
    refuse_ineffective_flags,
    resume_config_signature,
    run_cli,
    state_digests,
    tensor_digest,
)
from egg_recipes.common import SCENARIOS as LM_SCENARIOS
from egg_recipes.common import Parser as _Parser
from egg_recipes.common import clock as _clock
from egg_recipes.common import fraction as _fraction
from egg_recipes.common import non_negative_float as _non_negative_float
from egg_recipes.common import non_negative_int as _non_negative_int
from egg_recipes.common import one_line as _one_line
from egg_recipes.common import open_fraction as _open_fraction
from egg_recipes.common import positive_float as _positive_float
from egg_recipes.common import positive_int as _positive_int
from egg_recipes.common import seed_value as _seed
from egg_recipes.common import wandb_installed as _wandb_installed
from egg_recipes.net2net import carry_optimizer_state, graduated_widths, seed_net_widths, widen_seed_net

__all__ = [  # the names other recipes and the tests read from this module
    "EggConfig",
    "METRICS_FILE",
    "SCENARIOS",
    "_fraction",
    "_non_negative_float",
    "_non_negative_int",
    "_one_line",
    "_open_fraction",
    "_positive_float",
    "_seed",
    "_wandb_installed",
    "build_parser",
    "egg_config",
    "main",
    "make_plan",
    "resume_config_signature",
    "run_cli",
    "state_digests",
    "tensor_digest",
    "train",
]

MODELS = ("seed_mnist", "seed_cifar", "mlp", "small_cnn")
NARROW = "narrow-"  # a dense net narrowed to the plan's active widths: the control for cloning
SCENARIOS = LM_SCENARIOS + tuple(NARROW + s for s in LM_SCENARIOS if s != "baseline")
# EggConfig fields that are not flags of the image recipes (the plan comes from --scenario and the model)
# (--seed is the recipe's own: it seeds model init and data order too)
NOT_FLAGS = ("plan", "plan_table", "seed", "local_losses", "local_loss_scores", "log_roles", "log_per_layer")
LR_SCHEDULES = ("constant", "cosine", "onecycle")
# The recipes' role defaults: the best policy measured (docs/results/fashion_mnist_elections.md): output cloning
# (only leaders and independents computed), clones spread round-robin over the leaders, roles drawn once and kept.
RECIPE_DEFAULTS = {"clone_mode": "output", "assign": "round_robin", "elect_every": "never"}
OPTIMIZERS = {
    "adam": "Adam",
    "adamw": "AdamW",
    "sgd": "SGD",
    "rmsprop": "RMSprop",
    "nadam": "NAdam",
    "radam": "RAdam",
    "adamax": "Adamax",
    "adagrad": "Adagrad",
}
SEED_TABLES = {"seed_mnist": "mnist", "seed_cifar": "cifar"}
DEFAULT_NORMALIZE = {"seed_mnist": "mnist", "seed_cifar": "half"}
DEFAULT_AUGMENT = {"seed_mnist": "seed_mnist", "seed_cifar": "seed_cifar"}


# ============================================================================ arguments
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train_image.py",
        description=(
            "Train an image classifier with Boiled Egg leader/clone roles (egg_optim) under Hugging Face "
            "Accelerate. Works with plain `python` and with `accelerate launch`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Recipes and accelerate configs: docs/recipes.md.",
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default="seed_mnist",
        choices=MODELS,
        help="network: the seed's bottleneck CNNs (seed_mnist, seed_cifar) or a small baseline (mlp, small_cnn)",
    )
    g.add_argument(
        "--dataset",
        default="digits",
        help="'digits' (scikit-learn, bundled), 'fashion_mnist' (Debian package dataset-fashion-mnist), or a "
        "Hugging Face Hub name / local path with image + label columns",
    )
    g.add_argument("--max-train-samples", type=_positive_int, default=None, help="random subset of the train split")
    g.add_argument("--max-eval-samples", type=_positive_int, default=None, help="random subset of the test split")
    g.add_argument(
        "--test-split-fraction",
        type=_open_fraction,
        default=None,
        metavar="F",
        help="hold out this fraction of the train split (a fixed draw) as the test set; needed for a source with "
        "a single split (one data file), which is never tested on its own training rows",
    )
    g.add_argument(
        "--augment",
        nargs="?",
        const="auto",
        default=None,
        metavar="SPEC",
        help="train-time augmentation; bare --augment uses the seed's (crop pad 2 for seed_mnist, flip + crop pad 4 "
        "for seed_cifar, crop pad 2 otherwise); or a spec like 'flip+crop:4'",
    )
    g.add_argument(
        "--normalize",
        default="auto",
        choices=("auto", "none", "mnist", "half"),
        help="input normalisation; auto = the seed's (mnist stats for seed_mnist, 0.5/0.5 for seed_cifar, none else)",
    )
    g.add_argument("--resize-to", type=_positive_int, default=None, help="resize images to this square size")
    g.add_argument(
        "--channels", type=_positive_int, default=None, help="repeat grey images to this many channels (e.g. 3)"
    )

    g = p.add_argument_group("roles (egg_optim)")
    g.add_argument(
        "--scenario",
        default="mild",
        choices=SCENARIOS,
        help="the seed's presets: baseline (every unit trained), mild, aggressive; per-layer tables for the "
        "seed nets (mnist table for seed_mnist, cifar table for seed_cifar), one uniform pair for other models; "
        "narrow-mild / narrow-aggressive: the control, a dense net (no roles) whose managed layers have the "
        "plan's active widths (leaders + independents), see --width-match",
    )
    g.add_argument(
        "--width-match",
        default="widths",
        choices=("widths", "flops"),
        help="narrow-* scenarios: widths = each layer's active width (about half of output cloning's FLOPs: "
        "its layers still read every input channel); flops = the active widths scaled up by one factor until "
        "the forward FLOPs match output cloning's (the equal-compute control)",
    )
    g.add_argument(
        "--grow-net2net",
        default=None,
        metavar="SCHEDULE",
        help="narrow-* scenarios on the seed nets: the growth baseline, no clones: at each epoch point of a "
        "graduation schedule (e.g. epoch1:0.75,epoch2:1) the dense net is widened by Net2Net (copied units, the "
        "consumer's columns split among the copies, optimizer state carried alike) to the widths graduation "
        "would have active; one process, no resume",
    )
    g.add_argument(
        "--grow-noise",
        type=float,
        default=0.01,
        help="--grow-net2net: Gaussian noise on a copied unit's input weights, relative to the row's RMS (split "
        "copies get identical gradients and would stay identical without it)",
    )
    g.add_argument(
        "--leaders",
        type=_fraction,
        default=None,
        help="override: leader fraction for every managed layer (the other of --leaders/--independents defaults "
        "to 0.4 / 0.1)",
    )
    g.add_argument("--independents", type=_fraction, default=None, help="override: independent fraction per layer")
    add_config_arguments(g, exclude=NOT_FLAGS, defaults=RECIPE_DEFAULTS)

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS), help="base torch optimizer")
    g.add_argument("--lr", type=_positive_float, default=3e-4, help="learning rate (peak for onecycle)")
    g.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="weight decay of the optimizer")
    g.add_argument("--momentum", type=_non_negative_float, default=0.9, help="momentum (sgd, rmsprop)")
    g.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES, help="learning-rate schedule")
    g.add_argument("--batch-size", type=_positive_int, default=256, help="batch size per process")
    g.add_argument("--eval-batch-size", type=_positive_int, default=None, help="default: --batch-size")
    g.add_argument("--epochs", type=_positive_int, default=10, help="number of epochs")
    g.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--seed", type=_seed, default=0, help="seeds model init, data order, roles")
    add_compile_arguments(g)

    g = add_run_arguments(
        p,
        output_help="where metrics.json, model.safetensors and checkpoints go "
        "(default: runs/<dataset>-<model>-<scenario>)",
    )
    g.add_argument(
        "--dump-rank-state",
        action="store_true",
        help="write rank_state_<rank>.json (world size, rank, parameter/role hashes) for each process",
    )
    return p


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flags that this run would ignore or that contradict the scenario, in one line (exit status 2):
    role options with ``--scenario baseline`` (no clones) or a ``narrow-*`` control (a dense net, no roles; only
    ``--clone-mode`` and ``--skip-clone-grads``, which choose how such a run is computed, stay),
    ``--leaders/--independents`` with ``baseline`` (they would replace its plan), ``--width-match`` without a
    ``narrow-*`` scenario, and options of the other clone mode (``--eval-mode`` in weight mode,
    ``--skip-clone-grads`` in output mode)."""
    scenario = args.scenario
    grow = changed_flags(parser, args, ("grow_net2net", "grow_noise")) if hasattr(args, "grow_net2net") else []
    if grow and not scenario.startswith(NARROW):
        parser.error(f"{', '.join(grow)}: grows a narrow-* dense control; use it with --scenario narrow-mild")
    if getattr(args, "grow_net2net", None) is not None:
        try:
            schedule = Graduation.parse(args.grow_net2net, what="--grow-net2net")
        except ConfigError as e:
            parser.error(str(e))
        if schedule.never or schedule.unit != "epochs":
            parser.error(f"--grow-net2net {args.grow_net2net}: give epoch points, e.g. epoch1:0.75,epoch2:1 (the net "
                         "is rebuilt at epoch starts)")  # fmt: skip
        if args.model not in SEED_TABLES:
            parser.error(f"--grow-net2net: Net2Net widening handles the seed nets ({', '.join(SEED_TABLES)}), "
                         f"not --model {args.model}")  # fmt: skip
        if not args.grow_noise >= 0:
            parser.error(f"argument --grow-noise: must be >= 0, got {args.grow_noise}")
        if args.resume_from or args.save_every:
            parser.error("--grow-net2net changes parameter shapes mid-run; it takes no --resume-from/--save-every")
    grows = getattr(args, "grow_net2net", None) is not None  # (the Trainer recipe has no --grow-net2net)
    check_compile_flags(parser, args, {"--grow-net2net rebuilds the model mid-run; run the growth eagerly": grows})
    if scenario == "baseline":
        fractions = changed_flags(parser, args, ("leaders", "independents"))
        if fractions:
            parser.error(
                f"{', '.join(fractions)}: replaces the plan of --scenario baseline, which would then train clones; "
                "use --scenario mild or aggressive with it"
            )
        refuse_ineffective_flags(
            parser, args, clones=False, without_clones="--scenario baseline", also=("width_match",)
        )
    elif scenario.startswith(NARROW):
        refuse_ineffective_flags(parser, args, clones=False, without_clones=f"--scenario {scenario} (a dense control)")
    else:
        if changed_flags(parser, args, ("width_match",)):
            parser.error(f"--width-match {args.width_match}: no effect with --scenario {scenario} (it sizes the "
                         "narrow-* dense controls); drop it")  # fmt: skip
        refuse_ineffective_flags(parser, args, clones=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags of ``argv``, checked by :func:`check_flags`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    if args.output_dir is None:
        name = Path(str(args.dataset)).name or "dataset"
        args.output_dir = str(Path("runs") / f"{name}-{args.model}-{args.scenario}-{args.clone_mode}")
    return args


# ============================================================================ building blocks
def base_scenario(args: argparse.Namespace) -> str:
    """The preset behind ``--scenario`` (``narrow-mild`` -> ``mild``)."""
    return args.scenario[len(NARROW) :] if args.scenario.startswith(NARROW) else args.scenario


def make_plan(args: argparse.Namespace, model: torch.nn.Module) -> RolePlan:
    """The role plan for ``args``: the seed's per-layer table for the seed nets, a uniform pair otherwise;
    ``--leaders/--independents`` replace the fractions on the same layers. For a ``narrow-*`` scenario this is
    the plan whose active widths the dense control takes (the control itself trains with no roles)."""
    table = SEED_TABLES.get(args.model)
    lead, ind = getattr(args, "leaders", None), getattr(args, "independents", None)
    if lead is not None or ind is not None:
        lead = 0.4 if lead is None else lead
        ind = 0.1 if ind is None else ind
        if table is not None:
            return RolePlan(per_layer=dict.fromkeys(counted_layers(args, model), (lead, ind)), only_listed=True)
        return RolePlan(lead, ind)
    return RolePlan.preset(base_scenario(args), table=table or "uniform")


def build_network(args: argparse.Namespace, spec) -> tuple[torch.nn.Module, RolePlan]:
    """The model and its role plan for ``args`` and a :func:`~egg_recipes.data.dataset_spec`: a ``narrow-*``
    scenario builds the dense control (:func:`~egg_recipes.models.narrow_model`) and trains it without roles."""
    from egg_recipes.models import build_model, narrow_model

    shape = {"in_channels": spec.channels, "num_classes": spec.num_classes, "image_size": spec.image_size}
    if not args.scenario.startswith(NARROW):
        model = build_model(args.model, **shape)
        return model, make_plan(args, model)
    with torch.device("meta"):  # shapes only, so the control's init draws from the seeded RNG
        plan = make_plan(args, build_model(args.model, **shape))
    return narrow_model(args.model, plan, match=getattr(args, "width_match", "widths"), **shape), RolePlan()


def counted_layers(args: argparse.Namespace, model: torch.nn.Module) -> list[str]:
    """Layers whose active units make the seed's "updates": the 9 block convs of the seed nets, every
    Linear/Conv but the classifier otherwise (the layers the scenarios manage)."""
    table = SEED_TABLES.get(args.model)
    if table is not None:
        return list(RolePlan.preset("mild", table=table).resolve(model))
    return list(RolePlan.preset("mild", table="uniform").resolve(model))


def make_optimizer(args: argparse.Namespace, params) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, OPTIMIZERS[args.optimizer])
    kwargs: dict[str, Any] = {"lr": args.lr, "weight_decay": args.weight_decay}
    if args.optimizer in ("sgd", "rmsprop"):
        kwargs["momentum"] = args.momentum
    return cls(params, **kwargs)


def _constant(_: int) -> float:
    return 1.0


def make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, horizon: int):
    """``horizon`` counts scheduler steps (Accelerate steps a prepared scheduler once per process per step)."""
    horizon = max(int(horizon), 1)
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=horizon)
    if args.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=horizon)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)


class _SeededBatches:
    """collate_fn wrapper: reseeds the batch transform's augmentation generator from
    ``(seed, rank, epoch, batch index)`` before each batch, so a resumed run augments as the uninterrupted
    one would even though skipped batches are never collated."""

    def __init__(self, transform, seed: int, rank: int) -> None:
        self.transform, self.seed, self.rank = transform, seed, rank
        self.epoch, self.index = 0, 0

    def start(self, epoch: int, first_batch: int) -> None:
        self.epoch, self.index = epoch, first_batch

    def __call__(self, batch):
        gen = getattr(self.transform, "generator", None)
        if gen is not None:
            gen.manual_seed(derived_seed(self.seed, "augment", self.rank, self.epoch, self.index))
        self.index += 1
        return self.transform(batch)


def save_plain_model(lco: LeaderCloneOptimizer, path: Path, gathered: dict[str, torch.Tensor] | None = None) -> None:
    """Save weights that a plain (unmodified) model loads and that compute what was trained: in output mode
    the clone rows are filled with their source's weights and norm statistics. ``gathered``: under FSDP2, the
    state :func:`gathered_model_state` collected. Atomic; a full disk is a one-line
    :class:`~egg_recipes.storage.StorageError`."""
    from safetensors.torch import save_file, save_model

    from egg_recipes.storage import atomic_path

    with atomic_path(path) as tmp:
        if gathered is not None:
            save_file({k: v.contiguous() for k, v in gathered.items()}, str(tmp))
        else:
            save_model(lco.export_model(), str(tmp))


def example_images(args: argparse.Namespace, spec, config: EggConfig) -> torch.Tensor | None:
    """A batch of random images of the dataset's shape for ``repack``'s check of which layers may move their
    units (a CNN has no dummy inputs of its own); ``None`` without repack."""
    if not config.repack:
        return None
    gen = torch.Generator().manual_seed(derived_seed(args.seed, "example_images"))
    return torch.randn(2, spec.channels, *_pair(spec.image_size), generator=gen)


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ============================================================================ training
def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run one training job described by ``args`` (see :func:`build_parser`); returns the final metrics
    (also written to ``<output-dir>/metrics.json`` by the main process)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from egg_recipes import checkpoint as ckpt
    from egg_recipes import storage, tracking
    from egg_recipes.data import dataset_spec, make_dataloader
    from egg_recipes.metrics import load_metric
    from egg_recipes.models import count_conv_linear_flops

    output_dir = storage.prepare_output_dir(args.output_dir)  # an unusable folder fails before any compute
    tracker = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=tracker, project_dir=str(output_dir))
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(args.seed)

    # ---------------------------------------------------------------- data
    train_ds, eval_ds = load_image_splits(args)
    spec = dataset_spec(train_ds, resize_to=args.resize_to, channels=args.channels)
    normalize = DEFAULT_NORMALIZE.get(args.model) if args.normalize == "auto" else args.normalize
    normalize = None if normalize == "none" else normalize
    augment = args.augment
    if augment == "auto":
        augment = DEFAULT_AUGMENT.get(args.model, "crop:2")
    common = {"resize_to": args.resize_to, "channels": args.channels, "normalize": normalize}
    raw_train_dl = make_dataloader(train_ds, args.batch_size, shuffle=True, seed=args.seed, augment=augment, **common)
    collate = _SeededBatches(raw_train_dl.collate_fn, args.seed, rank)
    raw_train_dl.collate_fn = collate
    sampler = raw_train_dl.sampler  # a RandomSampler with its own generator, reseeded per epoch below
    raw_eval_dl = make_dataloader(eval_ds, args.eval_batch_size or args.batch_size, **common)

    # ---------------------------------------------------------------- model, roles, optimizer
    model, plan = build_network(args, spec)
    layer_flops = count_conv_linear_flops(model, (1, spec.channels, *_pair(spec.image_size)))
    counted = counted_layers(args, model)
    config = egg_config(args, plan)
    base = make_optimizer(args, model.parameters())
    # Built on the bare model, before prepare: DDP wraps the model but shares its parameters; FSDP2 replaces them
    # by sharded ones, which the optimizer follows (leaders and clones may then sit on different ranks).
    lco = LeaderCloneOptimizer(model, base, config=config, example_inputs=example_images(args, spec, config))
    batches_per_epoch_raw = len(raw_train_dl)
    planned_raw = args.epochs * batches_per_epoch_raw
    if args.max_steps is not None:
        planned_raw = min(planned_raw, args.max_steps * world)
    scheduler = make_scheduler(args, lco, planned_raw)

    model, opt, train_dl, eval_dl, scheduler = accelerator.prepare(model, lco, raw_train_dl, raw_eval_dl, scheduler)
    steps_per_epoch = len(train_dl)
    max_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        max_steps = min(max_steps, args.max_steps)
    unwrapped = accelerator.unwrap_model(model)

    # What defines the run: a resume must match every value (else it is refused, naming each difference);
    # --epochs/--max-steps (within the LR schedule's horizon), evaluation, logging, saving and output may change.
    run_signature = {
        "model": args.model,
        "dataset": str(args.dataset),
        "max_train_samples": args.max_train_samples,
        "test_split_fraction": args.test_split_fraction,
        "augment": augment,
        "normalize": normalize,
        "resize_to": args.resize_to,
        "channels": args.channels,
        **resume_config_signature(config),
        "optimizer": args.optimizer,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "momentum": args.momentum if args.optimizer in ("sgd", "rmsprop") else None,
        "lr_schedule": args.lr_schedule,
        "lr_schedule_steps": None if args.lr_schedule == "constant" else planned_raw,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "num_processes": world,
    }

    # ---------------------------------------------------------------- resume
    progress: dict[str, Any] = {
        "epoch": 0,
        "batch_in_epoch": 0,
        "global_step": 0,
        "history": [],
        "epochs": [],
        "epoch_updates": 0,
        "epoch_flops": 0,
        "train_flops": 0,
        "epoch_train_time": 0.0,
        "train_time": 0.0,
    }
    resumed_from = None
    if args.resume_from:
        path = ckpt.resume_path(accelerator, args.resume_from, output_dir / CHECKPOINT_DIR)
        marker = ckpt.load_checkpoint(accelerator, path, expect=run_signature)
        progress = dict(marker["metadata"]["progress"])
        resumed_from = str(path)
        accelerator.print(
            f"resumed from {path} at step {progress['global_step']} (epoch {progress['epoch']}): weights, optimizer "
            f"and LR-schedule state, roles, RNG and data position come from the checkpoint, which matches this "
            f"run's {', '.join(run_signature)}; --epochs, --max-steps and the evaluation, logging, saving and "
            f"output flags come from this command line"
        )

    if args.compile != "none":  # after a resume: a checkpoint's norm coupling is adopted, not decided again
        zeros = torch.zeros(2, spec.channels, *_pair(spec.image_size), device=accelerator.device)
        model = compile_model(model, lco, zeros, args)

    # ---------------------------------------------------------------- trackers
    init_trackers(accelerator, args, output_dir)

    metric = load_metric("accuracy", keep_in_memory=True)

    def evaluate_now() -> dict[str, float]:
        model.eval()
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for x, y in eval_dl:
                logits = model(x)
                losses = F.cross_entropy(logits.float(), y, reduction="none")
                preds, refs, losses = accelerator.gather_for_metrics((logits.argmax(dim=-1), y, losses))
                metric.add_batch(predictions=preds.cpu(), references=refs.cpu())
                loss_sum += float(losses.double().sum())
                count += int(refs.numel())
        model.train()
        return {"accuracy": float(metric.compute()["accuracy"]), "loss": loss_sum / max(count, 1)}

    def save(step: int, epoch: int) -> None:
        directory = output_dir / CHECKPOINT_DIR / f"checkpoint-{step}"
        ckpt.save_checkpoint(
            accelerator,
            directory,
            step=step,
            epoch=epoch,
            metadata={**run_signature, "progress": progress},
            keep=args.keep_checkpoints,
        )

    def record_eval(step: int, epoch: float) -> dict[str, float]:
        result = evaluate_now()
        entry = {
            "step": step,
            "epoch": epoch,
            "train_time": progress["train_time"],
            "train_flops": progress.get("train_flops", 0),
            "accuracy": result["accuracy"],
            "loss": result["loss"],
        }
        progress["history"].append(entry)
        accelerator.log({"eval/accuracy": result["accuracy"], "eval/loss": result["loss"]}, step=step)
        return result

    # ---------------------------------------------------------------- Net2Net growth (the no-clone control)
    growth = Graduation.parse(args.grow_net2net) if args.grow_net2net else Graduation()
    grown_to = 0.0
    if not growth.never and world > 1:
        raise ConfigError("--grow-net2net runs in one process (it rebuilds the model); launch without accelerate")

    def grow(fraction: float):
        """Widen the net to graduation's widths at ``fraction`` (Net2Net); a fresh optimizer and scheduler carry
        the old ones' state."""
        from egg_recipes.models import build_model

        shape = {"in_channels": spec.channels, "num_classes": spec.num_classes, "image_size": spec.image_size}
        with torch.device("meta"):
            full = build_model(args.model, **shape)
        widths = graduated_widths(make_plan(args, full).resolve(full), fraction)
        gen = torch.Generator().manual_seed(derived_seed(args.seed, "net2net", round(fraction * 1_000_000)))
        new_model, mapping = widen_seed_net(
            unwrapped, args.model, widths, generator=gen, noise=args.grow_noise, **shape
        )
        # counted before the optimizer exists: its first forward pass observes how the model uses each layer
        new_flops = count_conv_linear_flops(new_model, (1, spec.channels, *_pair(spec.image_size)))
        new_base = make_optimizer(args, new_model.parameters())
        carry_optimizer_state(unwrapped, new_model, mapping, lco.optimizer, new_base)  # and the current lr
        new_lco = LeaderCloneOptimizer(
            new_model, new_base, config=config, example_inputs=example_images(args, spec, config)
        )
        new_scheduler = make_scheduler(args, new_lco, planned_raw)
        new_scheduler.load_state_dict(scheduler.scheduler.state_dict())  # the group lr came with the state
        return new_model, new_flops, new_lco, *accelerator.prepare(new_model, new_lco, new_scheduler)

    # ---------------------------------------------------------------- loop
    model.train()
    updates_per_batch = tracking.active_units(lco, counted, unwrapped)
    flops_per_sample = tracking.forward_flops(lco, layer_flops)
    global_step = progress["global_step"]
    start_epoch = progress["epoch"]
    # told by the optimizer whenever roles change (an election or graduation inside an epoch): recount then
    roles_changed: list[bool] = []
    lco.add_roles_listener(lambda roles: roles_changed.append(True))
    started = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        if global_step >= max_steps:
            break
        skip = progress["batch_in_epoch"] if epoch == start_epoch else 0
        if skip == 0:
            progress["epoch_updates"], progress["epoch_flops"], progress["epoch_train_time"] = 0, 0, 0.0
        lco.epoch_begin(epoch)  # a resumed epoch is not re-elected: the optimizer state remembers it began
        if growth.target(epoch) > grown_to:
            grown_to = growth.target(epoch)
            unwrapped, layer_flops, lco, model, opt, scheduler = grow(grown_to)
            accelerator.print(f"epoch {epoch + 1}: grown by Net2Net to widths {seed_net_widths(unwrapped)}")
        updates_per_batch = tracking.active_units(lco, counted, unwrapped)
        flops_per_sample = tracking.forward_flops(lco, layer_flops)
        roles_changed.clear()  # counted just now
        progress["epoch"], progress["batch_in_epoch"] = epoch, skip
        sampler.generator.manual_seed(derived_seed(args.seed, "order", epoch))
        collate.start(epoch, skip)
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        loader.set_epoch(epoch)
        bar = tqdm(
            total=steps_per_epoch,
            initial=skip,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=args.no_progress or not accelerator.is_local_main_process,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            leave=False,
        )
        tick = _clock()
        for x, y in loader:
            torch.manual_seed(derived_seed(args.seed, "step", rank, global_step))
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            accelerator.backward(loss)
            opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
            global_step += 1
            progress["global_step"] = global_step
            progress["batch_in_epoch"] += 1
            progress["epoch_updates"] += updates_per_batch
            batch_flops = flops_per_sample * int(x.shape[0]) * world  # forward Conv/Linear FLOPs, all processes
            progress["epoch_flops"] = progress.get("epoch_flops", 0) + batch_flops
            progress["train_flops"] = progress.get("train_flops", 0) + batch_flops
            if roles_changed:
                roles_changed.clear()
                updates_per_batch = tracking.active_units(lco, counted, unwrapped)
                flops_per_sample = tracking.forward_flops(lco, layer_flops)
            bar.update(1)
            if global_step % args.log_every == 0 or global_step == max_steps:
                loss_value = float(loss.detach())
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if tracker is not None:
                    tracking.log_role_metrics(
                        accelerator,
                        opt,
                        step=global_step,
                        **{"train/loss": loss_value, "train/lr": float(scheduler.get_last_lr()[0]), "epoch": epoch},
                    )
            if args.eval_every and global_step % args.eval_every == 0:
                now = _clock()
                progress["epoch_train_time"] += now - tick
                progress["train_time"] += now - tick
                record_eval(global_step, epoch + progress["batch_in_epoch"] / steps_per_epoch)
                tick = _clock()
            if args.save_every and global_step % args.save_every == 0:
                now = _clock()
                progress["epoch_train_time"] += now - tick
                progress["train_time"] += now - tick
                save(global_step, epoch)
                tick = _clock()
            if global_step >= max_steps:
                break
        bar.close()
        now = _clock()
        progress["epoch_train_time"] += now - tick
        progress["train_time"] += now - tick
        if progress["batch_in_epoch"] == steps_per_epoch:
            lco.epoch_end(epoch)
        last = progress["history"][-1] if progress["history"] else None
        if last is not None and last["step"] == global_step:  # just evaluated (--eval-every)
            result = {"accuracy": last["accuracy"], "loss": last["loss"]}
        else:
            result = record_eval(global_step, epoch + progress["batch_in_epoch"] / steps_per_epoch)
        summary = {
            "epoch": epoch + 1,
            "steps": progress["batch_in_epoch"],
            "complete": progress["batch_in_epoch"] == steps_per_epoch,
            "train_time": progress["epoch_train_time"],
            "updates": progress["epoch_updates"],
            "flops": progress.get("epoch_flops", 0),
            "accuracy": result["accuracy"],
        }
        progress["epochs"].append(summary)
        accelerator.print(
            f"epoch {epoch + 1}/{args.epochs}: step {global_step}, eval accuracy {result['accuracy']:.4f}, "
            f"train time {summary['train_time']:.1f}s, updates {summary['updates']:,}"
        )
        if tracker is not None:
            accelerator.log(
                {"time/epoch": summary["train_time"], "updates/epoch": summary["updates"], "epoch": epoch + 1},
                step=global_step,
            )
            tracking.log_leadership_heatmap(accelerator, opt, step=global_step)
        progress["epoch"], progress["batch_in_epoch"] = epoch + 1, 0

    # ---------------------------------------------------------------- final metrics
    if lco.train_end():  # a clone event scheduled at the end of training changes the model: evaluate after it
        record_eval(global_step, float(progress["epoch"]))
    if not progress["history"] or progress["history"][-1]["step"] != global_step:
        record_eval(global_step, float(progress["epoch"]))
    final = progress["history"][-1]
    digests = state_digests(unwrapped, lco)
    full = [e for e in progress["epochs"] if e["complete"]] or progress["epochs"]
    stats = lco.stats()
    metrics = {
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "steps": global_step,
        "epochs_completed": sum(e["complete"] for e in progress["epochs"]),
        "steps_per_epoch": steps_per_epoch,
        "time_per_epoch": sum(e["train_time"] for e in full) / len(full) if full else 0.0,
        "updates_per_epoch": sum(e["updates"] for e in full) / len(full) if full else 0.0,
        "updates_per_batch": updates_per_batch,
        "forward_flops_per_sample": flops_per_sample,
        "flops_per_epoch": sum(e.get("flops", 0) for e in full) / len(full) if full else 0.0,
        "train_flops": progress.get("train_flops", 0),
        "counted_layers": counted,
        "epochs": progress["epochs"],
        "history": progress["history"],
        "total_train_time": progress["train_time"],
        "wall_time_this_process": time.perf_counter() - started,
        "roles": {k: v for k, v in stats["total"].items()},
        "elections": stats["elections"],
        "clone_events": stats["clone_events"],
        "num_processes": world,
        "resumed_from": resumed_from,
        **digests,
        "args": {k: v for k, v in vars(args).items()},
    }
    if args.dump_rank_state:
        storage.write_text_atomic(
            output_dir / f"rank_state_{rank}.json",
            json.dumps({"rank": rank, "world_size": world, "pid": os.getpid(), "steps": global_step, **digests}),
        )
    accelerator.wait_for_everyone()
    gathered = gathered_model_state(lco)  # FSDP2: every rank takes part
    if accelerator.is_main_process:  # the model first: metrics.json marks a finished run
        save_plain_model(lco, output_dir / "model.safetensors", gathered)
        storage.write_text_atomic(output_dir / METRICS_FILE, json.dumps(metrics, indent=1, default=str))
    if tracker is not None:
        accelerator.log({"final/test_accuracy": metrics["test_accuracy"]}, step=global_step)
    accelerator.end_training()
    lco.remove_output_cloning()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: returns the exit status."""
    return run_cli(train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
