#!/usr/bin/env python
"""Leader/clone training of an image classifier through the transformers ``Trainer`` (``EggTrainer``).

The Trainer route of :mod:`egg_optim.integrations.transformers`: the Trainer builds the optimizer and the
LR scheduler, ``EggTrainer`` wraps the optimizer in a ``LeaderCloneOptimizer`` and drives elections / cloning
from Trainer events, role metrics go into the Trainer's logs (and so to W&B). Checkpoints, resumes, DDP
(``accelerate launch`` / ``torchrun``) are the Trainer's. Example::

    python recipes/train_trainer.py --dataset digits --model seed_mnist --scenario mild --epochs 3

Writes ``<output-dir>/metrics.json`` (test accuracy, steps, runtime) next to the Trainer's checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from egg_optim import add_config_arguments
from egg_recipes import train_image  # (shared flag types and dataset/model defaults)
from egg_recipes.common import add_compile_arguments, trainer_report_to, trainer_resume_path

TRAINER_OPTIMIZERS = ("adamw_torch", "sgd", "adagrad", "rmsprop")
TRAINER_SCHEDULES = ("constant", "cosine", "linear")


class ImageClassifier(nn.Module):
    """Adapts an image model to the Trainer's calling convention: ``forward(pixel_values, labels=None)`` ->
    ``{"loss", "logits"}``. The wrapped network is ``.net``; role plans match its layer names as suffixes
    (``layer1.conv1`` matches ``net.layer1.conv1``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def build_parser() -> argparse.ArgumentParser:
    t = train_image
    p = t._Parser(
        prog="train_trainer.py",
        description="Train an image classifier with leader/clone roles through the transformers Trainer "
        "(egg_optim.integrations.transformers.EggTrainer).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="seed_mnist", choices=t.MODELS, help="network (as in train_image.py)")
    p.add_argument("--dataset", default="digits", help="digits, fashion_mnist, a Hub name or a local path")
    p.add_argument("--max-train-samples", type=t._positive_int, default=None, help="random train subset")
    p.add_argument("--max-eval-samples", type=t._positive_int, default=None, help="random test subset")
    p.add_argument(
        "--test-split-fraction", type=t._open_fraction, default=None, metavar="F", help="as in train_image.py"
    )
    p.add_argument("--augment", nargs="?", const="auto", default=None, metavar="SPEC", help="as in train_image.py")
    p.add_argument("--scenario", default="mild", choices=t.SCENARIOS, help="as in train_image.py")
    p.add_argument("--width-match", default="widths", choices=("widths", "flops"), help="as in train_image.py")
    add_config_arguments(
        p, exclude=(*train_image.NOT_FLAGS[:-1],), defaults=train_image.RECIPE_DEFAULTS
    )  # keeps --log-per-layer
    p.add_argument("--optim", default="adamw_torch", choices=TRAINER_OPTIMIZERS, help="Trainer optimizer name")
    p.add_argument("--lr", type=t._positive_float, default=3e-4, help="learning rate")
    p.add_argument("--weight-decay", type=t._non_negative_float, default=0.0, help="weight decay")
    p.add_argument("--lr-schedule", default="constant", choices=TRAINER_SCHEDULES, help="Trainer lr_scheduler_type")
    p.add_argument("--batch-size", type=t._positive_int, default=256, help="per device")
    p.add_argument("--epochs", type=t._positive_int, default=3, help="number of epochs")
    p.add_argument("--max-steps", type=t._positive_int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--seed", type=t._seed, default=0, help="seed")
    add_compile_arguments(p)
    p.add_argument("--output-dir", default="runs/trainer", help="Trainer output dir (checkpoints, metrics.json)")
    p.add_argument("--resume-from", default=None, metavar="PATH", help="a checkpoint-N folder, or 'latest'")
    p.add_argument("--save-every", type=t._non_negative_int, default=0, help="checkpoint every N steps (0: never)")
    p.add_argument("--eval-every", type=t._non_negative_int, default=0, help="evaluate every N steps (0: per epoch)")
    p.add_argument("--log-every", type=t._positive_int, default=20, help="log every N steps")
    p.add_argument(
        "--report-to",
        default="wandb" if t._wandb_installed() else "none",
        choices=("wandb", "none"),
        help="tracker; W&B offline when no API key is configured",
    )
    return p


def train(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from transformers import TrainingArguments

    from egg_optim.integrations.transformers import EggTrainer
    from egg_recipes import checkpoint as ckpt
    from egg_recipes import storage
    from egg_recipes.data import BatchTransform, dataset_spec
    from egg_recipes.metrics import load_metric

    output_dir = storage.prepare_output_dir(args.output_dir)  # an unusable folder fails before any compute
    train_ds, eval_ds = train_image.load_image_splits(args)
    spec = dataset_spec(train_ds)
    normalize = train_image.DEFAULT_NORMALIZE.get(args.model)
    augment = args.augment
    if augment == "auto":
        augment = train_image.DEFAULT_AUGMENT.get(args.model, "crop:2")
    torch.manual_seed(args.seed)
    net, plan = train_image.build_network(args, spec)
    model = ImageClassifier(net)

    egg = train_image.egg_config(args, plan)
    report_to = trainer_report_to(args, output_dir)
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_schedule,
        optim=args.optim,
        seed=args.seed,
        eval_strategy="steps" if args.eval_every else "epoch",
        eval_steps=args.eval_every or None,
        save_strategy="steps" if args.save_every else "no",
        save_steps=args.save_every or 500,
        logging_steps=args.log_every,
        report_to=report_to,
        remove_unused_columns=False,  # keep 'label' for the collator
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        # EggTrainer couples the norms from an eager pass of two training examples before the Trainer compiles
        torch_compile=args.compile != "none",
        torch_compile_backend=args.compile_backend if args.compile != "none" else None,
        torch_compile_mode=None if args.compile in ("none", "default") else args.compile,
    )
    metric = load_metric("accuracy", keep_in_memory=True)

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    settings = run_settings(args, egg, augment, training_args.world_size, len(train_ds))
    trainer = EggTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=BatchTransform(augment=augment, normalize=normalize, seed=args.seed, return_dict=True),
        compute_metrics=compute_metrics,
        egg=egg,
        callbacks=[ckpt.run_settings_callback(settings)],
    )
    # evaluation must not augment: a second collator without augmentation
    eval_collator = BatchTransform(normalize=normalize, return_dict=True)
    trainer.get_eval_dataloader = _eval_loader_with(trainer, eval_collator)
    resume = None
    if args.resume_from:
        resume = trainer_resume_path(args.resume_from, output_dir)
        ckpt.check_run_settings(resume, settings)
        if trainer.is_world_process_zero():
            print(
                f"resuming from {resume}: weights, optimizer and LR-schedule state, roles and RNG come from the "
                f"checkpoint, which matches this run's {', '.join(settings)}; the other flags come from this "
                f"command line"
            )
    with storage.writing(output_dir, only_space=True):  # the Trainer's own checkpoint writes
        result = trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    final = trainer.evaluate()
    lco = trainer.egg_optimizer
    stats = lco.stats()
    metrics = {
        "test_accuracy": float(final["eval_accuracy"]),
        "test_loss": float(final["eval_loss"]),
        "steps": int(trainer.state.global_step),
        "train_runtime": float(result.metrics.get("train_runtime", math.nan)),
        "roles": dict(stats["total"]),
        "elections": stats["elections"],
        "clone_events": stats["clone_events"],
        "log_history": trainer.state.log_history,
        **train_image.state_digests(trainer.accelerator.unwrap_model(trainer.model), lco),
        "args": vars(args),
    }
    if trainer.is_world_process_zero():
        storage.write_text_atomic(output_dir / train_image.METRICS_FILE, json.dumps(metrics, indent=1, default=str))
    return metrics


def run_settings(
    args: argparse.Namespace, egg: train_image.EggConfig, augment: str | None, world: int, train_rows: int
) -> dict[str, Any]:
    """What defines a run: a resume must match every value (``--epochs``/``--max-steps`` only through the
    length of a non-constant LR schedule, which the Trainer rebuilds from them)."""
    steps = args.max_steps or args.epochs * math.ceil(train_rows / (args.batch_size * world))
    keys = ("model", "dataset", "max_train_samples", "test_split_fraction", "optim", "lr", "weight_decay")
    keys += ("lr_schedule", "batch_size", "seed")
    return {
        **{k: getattr(args, k) for k in keys},
        **train_image.resume_config_signature(egg),
        "augment": augment,
        "lr_schedule_steps": None if args.lr_schedule == "constant" else steps,
        "num_processes": world,
    }


def _eval_loader_with(trainer, collator):
    original = trainer.get_eval_dataloader

    def get_eval_dataloader(eval_dataset=None):
        saved = trainer.data_collator
        trainer.data_collator = collator
        try:
            return original(eval_dataset)
        finally:
            trainer.data_collator = saved

    return get_eval_dataloader


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags of ``argv``; flags the run would ignore are refused as in train_image.py."""
    parser = build_parser()
    args = parser.parse_args(argv)
    train_image.check_flags(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return train_image.run_cli(train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
