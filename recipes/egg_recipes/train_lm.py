#!/usr/bin/env python
"""Train a tiny Llama-style causal LM with leader/clone roles (egg_optim), through plain Accelerate or the
transformers ``Trainer`` (``EggTrainer``).

Runs with no flags on the corpus shipped in ``recipes/data/tiny_tales`` (byte-level tokens, no download)::

    python recipes/train_lm.py                                   # mild plan, weight cloning, Accelerate loop
    python recipes/train_lm.py --trainer hf --scenario baseline  # the same job through EggTrainer
    python recipes/train_lm.py --dataset my_texts/ --tokenizer path/to/tokenizer --block-size 256
    accelerate launch --config_file accelerate_configs/cpu_multi.yaml recipes/train_lm.py --max-steps 100

The managed layers are every ``nn.Linear`` but the LM head (q/k/v/o and gate/up/down projections); their output
rows are the units. ``--experts N`` trains a Mixtral-style mixture of experts instead (units: attention heads and
each expert's hidden neurons). ``<output-dir>/metrics.json`` holds the validation perplexity (``exp`` of the mean
NLL over the real next-token predictions), tokens/s, wall-clock and role totals; ``<output-dir>/model`` a plain
``LlamaForCausalLM`` or ``MixtralForCausalLM`` (``from_pretrained``-loadable, clone rows filled in). Checkpoints:
``--trainer accelerate`` writes atomic safetensors checkpoints (``egg_recipes.checkpoint``) under
``<output-dir>/checkpoints`` and resumes bit-exactly (data order of epoch ``e`` from ``(seed, e)``, torch RNG from
``(seed, rank, step)``, position in the epoch in the checkpoint); ``--trainer hf`` uses the Trainer's
``checkpoint-N`` folders.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from egg_optim import EggConfig, LeaderCloneOptimizer, RolePlan, add_config_arguments
from egg_optim.core.sharding import is_fsdp_class
from egg_recipes.common import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    SCENARIOS,
    Parser,
    add_compile_arguments,
    add_run_arguments,
    changed_flags,
    check_compile_flags,
    clock,
    compile_model,
    derived_seed,
    egg_config,
    fraction,
    gathered_model_state,
    init_trackers,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    refuse_ineffective_flags,
    resume_config_signature,
    run_cli,
    seed_value,
    state_digests,
    trainer_report_to,
    trainer_resume_path,
)

DEFAULT_DATASET = Path(__file__).resolve().parents[1] / "data" / "tiny_tales"
TRAINERS = ("accelerate", "hf")
# flag -> (torch.optim class, transformers Trainer `optim` name): one flag, the same optimizer on both routes
OPTIMIZERS = {
    "adamw": ("AdamW", "adamw_torch"),
    "sgd": ("SGD", "sgd"),
    "rmsprop": ("RMSprop", "rmsprop"),
    "adagrad": ("Adagrad", "adagrad"),
}
LR_SCHEDULES = ("constant", "cosine", "linear")  # transformers.get_scheduler names, used on both routes
MODEL_DIR = "model"
# EggConfig fields that are not flags here: the plan comes from --scenario/--leaders/--independents, --seed is the
# recipe's own (model init and data order too), LFNN local losses need class labels
NOT_FLAGS = ("plan", "plan_table", "seed", "local_losses", "local_loss_scores", "log_roles")


# ============================================================================ arguments
def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="train_lm.py",
        description="Train a tiny Llama-style causal LM with Boiled Egg leader/clone roles (egg_optim), through "
        "plain Accelerate or the transformers Trainer (EggTrainer).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Recipes and accelerate configs: docs/recipes.md.",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=str(DEFAULT_DATASET),
        help="a folder of .txt (or parquet/json/csv) files, one .txt file, a save_to_disk folder, or a Hugging Face "
        "Hub name (default: the generated corpus shipped in recipes/data/tiny_tales)",
    )
    g.add_argument("--dataset-config", default=None, help="Hub configuration name (e.g. wikitext-2-raw-v1)")
    g.add_argument("--text-column", default=None, help="text column (default: 'text', 'content', ...)")
    g.add_argument(
        "--validation-fraction",
        type=open_fraction,
        default=0.05,
        help="without a validation split: the last fraction of the train rows is the validation split",
    )
    g.add_argument(
        "--tokenizer",
        default="bytes",
        metavar="bytes|PATH",
        help="'bytes' (UTF-8 bytes + BOS/EOS/PAD, 259 ids) or a local Hugging Face tokenizer folder",
    )
    g.add_argument("--block-size", type=positive_int, default=128, help="tokens per training sequence")
    g.add_argument("--append-eos", action="store_true", help="end every row with EOS (rows that are documents)")
    g.add_argument("--max-train-blocks", type=positive_int, default=None, help="use only the first N train blocks")
    g.add_argument("--max-eval-blocks", type=positive_int, default=None, help="score only the first N eval blocks")

    g = p.add_argument_group("model (transformers.LlamaConfig, or MixtralConfig with --experts; random init)")
    g.add_argument("--hidden-size", type=positive_int, default=128, help="model width")
    g.add_argument("--layers", type=positive_int, default=4, help="decoder layers")
    g.add_argument("--heads", type=positive_int, default=4, help="attention heads (must divide --hidden-size)")
    g.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (default: --heads)")
    g.add_argument("--intermediate-size", type=positive_int, default=352, help="MLP width (of each expert)")
    g.add_argument(
        "--experts", type=non_negative_int, default=0, help="a Mixtral-style mixture of N experts per layer (0: Llama)"
    )
    g.add_argument("--experts-per-token", type=positive_int, default=2, help="experts each token is routed to")

    g = p.add_argument_group("roles (egg_optim)")
    g.add_argument(
        "--scenario",
        default="mild",
        choices=SCENARIOS,
        help="baseline (every unit trained), mild (0.40 leaders / 0.10 independents) or aggressive (0.25 / 0.10) "
        "on every managed layer: RolePlan.preset(name, table='uniform')",
    )
    g.add_argument("--leaders", type=fraction, default=None, help="override: leader fraction of every managed layer")
    g.add_argument("--independents", type=fraction, default=None, help="override: independent fraction (0.1)")
    add_config_arguments(g, exclude=NOT_FLAGS)

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--trainer",
        default="accelerate",
        choices=TRAINERS,
        help="accelerate: this script's loop (atomic checkpoints, exact resumes); hf: transformers Trainer "
        "(EggTrainer)",
    )
    g.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS), help="base optimizer")
    g.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="weight decay")
    g.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES, help="learning-rate schedule")
    g.add_argument("--warmup-steps", type=non_negative_int, default=20, help="linear warm-up steps")
    g.add_argument("--max-grad-norm", type=non_negative_float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--batch-size", type=positive_int, default=16, help="sequences per batch and process")
    g.add_argument("--eval-batch-size", type=positive_int, default=None, help="default: --batch-size")
    g.add_argument("--epochs", type=positive_int, default=2, help="passes over the training blocks")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--seed", type=seed_value, default=0, help="seeds model init, data order, roles")
    add_compile_arguments(g)

    add_run_arguments(
        p, output_help="metrics.json, model/ and checkpoints (default: runs/lm-<scenario>-<mode>-<trainer>)"
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    kv = args.kv_heads or args.heads
    if args.hidden_size % args.heads:
        parser.error(f"argument --heads: {args.heads} does not divide --hidden-size {args.hidden_size}")
    if args.heads % kv:
        parser.error(f"argument --kv-heads: {kv} does not divide --heads {args.heads}")
    if (args.hidden_size // args.heads) % 2:
        parser.error(f"argument --heads: head size {args.hidden_size // args.heads} must be even (rotary embeddings)")
    if args.experts == 1 or args.experts_per_token > max(args.experts, 2):
        parser.error(
            f"argument --experts: expected 0 (no experts) or at least 2 and --experts-per-token "
            f"({args.experts_per_token}) of them, got {args.experts}"
        )
    if args.block_size < 2:
        parser.error(f"argument --block-size: expected at least 2 tokens, got {args.block_size}")
    check_compile_flags(parser, args, {})
    if args.scenario == "baseline":  # flags this run would ignore, or that would give the baseline clones
        fractions = changed_flags(parser, args, ("leaders", "independents"))
        if fractions:
            parser.error(
                f"{', '.join(fractions)}: replaces the plan of --scenario baseline, which would then train clones; "
                "use --scenario mild or aggressive with it"
            )
    refuse_ineffective_flags(parser, args, clones=args.scenario != "baseline", without_clones="--scenario baseline")
    if args.output_dir is None:
        args.output_dir = str(Path("runs") / f"lm-{args.scenario}-{args.clone_mode}-{args.trainer}")
    return args


# ============================================================================ building blocks
def make_plan(args: argparse.Namespace) -> RolePlan:
    """The uniform preset of ``--scenario``, or ``--leaders/--independents`` on every managed layer."""
    if args.leaders is not None or args.independents is not None:
        lead = 0.4 if args.leaders is None else args.leaders
        return RolePlan(lead, 0.1 if args.independents is None else args.independents)
    return RolePlan.preset(args.scenario, table="uniform")


def build_lm(args: argparse.Namespace, tokenizer) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM``, or with ``--experts`` a ``MixtralForCausalLM`` (its MLPs a
    mixture of experts, routed top ``--experts-per-token``, no auxiliary loss); seeded by ``--seed``, untied
    embeddings."""
    import transformers

    common = {
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads or args.heads,
        "max_position_embeddings": args.block_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    if args.experts:
        config = transformers.MixtralConfig(
            **common, num_local_experts=args.experts, num_experts_per_tok=args.experts_per_token,
            router_aux_loss_coef=0.0,
        )  # fmt: skip
        torch.manual_seed(args.seed)
        return transformers.MixtralForCausalLM(config)
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


def load_blocks(args: argparse.Namespace, tokenizer):
    """Train blocks (full ``--block-size``) and validation blocks (every token kept: the last block per map batch
    may be shorter)."""
    import datasets

    from egg_recipes.text import load_text_dataset, tokenize_and_group

    if args.no_progress:
        datasets.disable_progress_bars()
    common = {"config_name": args.dataset_config, "text_column": args.text_column}
    splits = {}
    for split, keep in (("train", False), ("validation", True)):
        raw = load_text_dataset(args.dataset, split=split, validation_fraction=args.validation_fraction, **common)
        blocks = tokenize_and_group(raw, tokenizer, args.block_size, keep_remainder=keep, append_eos=args.append_eos)
        limit = args.max_train_blocks if split == "train" else args.max_eval_blocks
        splits[split] = blocks.select(range(min(limit, len(blocks)))) if limit else blocks
    return splits["train"], splits["validation"]


def run_settings(
    args: argparse.Namespace, tokenizer, config: EggConfig, world: int, schedule_steps: int
) -> dict[str, Any]:
    """What defines a run: a resume must match every value (else it is refused, each difference named).
    ``--epochs``/``--max-steps`` may change, but only within the LR schedule's horizon (``lr_schedule_steps``);
    evaluation, logging, saving and output flags may change freely."""
    keys = ("trainer", "dataset", "dataset_config", "text_column", "validation_fraction", "block_size")
    keys += ("append_eos", "max_train_blocks", "hidden_size", "layers", "heads", "kv_heads", "intermediate_size")
    keys += ("experts", "experts_per_token")
    keys += ("optimizer", "lr", "weight_decay", "lr_schedule", "warmup_steps", "max_grad_norm", "batch_size", "seed")
    return {
        **{k: getattr(args, k) for k in keys},
        "tokenizer": tokenizer.name,
        **resume_config_signature(config),
        "lr_schedule_steps": None if args.lr_schedule == "constant" else schedule_steps,
        "num_processes": world,
    }


def save_model_atomic(model: torch.nn.Module, folder: Path) -> None:
    """``save_pretrained`` (config.json + model.safetensors) into a temporary folder, renamed into place; a full
    disk or an unwritable folder is a one-line :class:`~egg_recipes.storage.StorageError`."""
    from egg_recipes import storage

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    with storage.writing(folder):
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own unfinished export, if any
        try:
            model.save_pretrained(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        moved = folder.exists()
        if moved:
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except BaseException:
            if moved and not folder.exists():  # the previous model goes back: never lost
                os.replace(old, folder)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if moved:
            shutil.rmtree(old, ignore_errors=True)  # replaced by the new one, as asked


def write_outputs(
    lco: LeaderCloneOptimizer,
    output_dir: Path,
    metrics: dict[str, Any],
    gathered: dict[str, torch.Tensor] | None = None,
) -> None:
    """The plain model first, then ``metrics.json`` (which marks a finished run); both atomic. ``gathered``:
    under FSDP2, the weights :func:`gathered_model_state` collected, loaded into a fresh plain model."""
    from egg_recipes import storage

    if gathered is not None:
        plain_cls = next(c for c in type(lco.model).__mro__ if not is_fsdp_class(c))  # FSDP2 subclasses the model
        plain = plain_cls(copy.deepcopy(lco.model.config))
        plain.load_state_dict(gathered)
    else:
        plain = lco.export_model()
    save_model_atomic(plain, output_dir / MODEL_DIR)
    storage.write_text_atomic(output_dir / METRICS_FILE, json.dumps(metrics, indent=1, default=str))


def _summary(args, lco: LeaderCloneOptimizer, model, result: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    stats = lco.stats()
    return {
        "perplexity": result["perplexity"],
        "eval_loss": result["loss"],
        "eval_tokens": result["tokens"],
        **extra,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "roles": dict(stats["total"]),
        "elections": stats["elections"],
        "clone_events": stats["clone_events"],
        **state_digests(model, lco),
        "args": dict(vars(args)),
    }


# ============================================================================ Accelerate loop
def train_accelerate(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from egg_recipes import checkpoint as ckpt
    from egg_recipes import storage, tracking
    from egg_recipes.text import evaluate_perplexity, load_tokenizer, make_lm_dataloader

    started = time.perf_counter()
    output_dir = storage.prepare_output_dir(args.output_dir)  # an unusable folder fails before any compute
    tracker = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=tracker, project_dir=str(output_dir))
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(args.seed)

    tokenizer = load_tokenizer(args.tokenizer)
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
        train_blocks, eval_blocks = load_blocks(args, tokenizer)
    pad = tokenizer.pad_token_id
    raw_train_dl = make_lm_dataloader(train_blocks, args.batch_size, pad_token_id=pad, shuffle=True, seed=args.seed)
    sampler = raw_train_dl.sampler  # reseeded per epoch below
    raw_eval_dl = make_lm_dataloader(eval_blocks, args.eval_batch_size or args.batch_size, pad_token_id=pad)

    model = build_lm(args, tokenizer)
    config = egg_config(args, make_plan(args))
    name, _ = OPTIMIZERS[args.optimizer]
    base = getattr(torch.optim, name)(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lco = LeaderCloneOptimizer(model, base, config=config)  # before prepare: DDP wraps the model, shares its params
    planned = args.epochs * math.ceil(len(raw_train_dl) / world)
    if args.max_steps is not None:
        planned = min(planned, args.max_steps)
    # a prepared scheduler steps once per process per optimizer step: count in those units
    scheduler = get_scheduler(
        args.lr_schedule, lco, num_warmup_steps=args.warmup_steps * world, num_training_steps=max(planned, 1) * world
    )
    model, opt, train_dl, eval_dl, scheduler = accelerator.prepare(model, lco, raw_train_dl, raw_eval_dl, scheduler)
    steps_per_epoch = len(train_dl)
    max_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    unwrapped = accelerator.unwrap_model(model)
    settings = run_settings(args, tokenizer, config, world, planned)

    progress: dict[str, Any] = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "tokens": 0, "train_time": 0.0}
    progress["history"] = []
    resumed_from = None
    if args.resume_from:
        path = ckpt.resume_path(accelerator, args.resume_from, output_dir / CHECKPOINT_DIR)
        marker = ckpt.load_checkpoint(accelerator, path, expect=settings)
        progress, resumed_from = dict(marker["metadata"]["progress"]), str(path)
        accelerator.print(
            f"resumed from {path} at step {progress['global_step']}: weights, optimizer and LR-schedule state, "
            f"roles, RNG and data position come from the checkpoint, which matches this run's {', '.join(settings)}"
        )
    if args.compile != "none":  # after a resume: a checkpoint's norm coupling is adopted, not decided again
        ids = torch.zeros(2, args.block_size, dtype=torch.long, device=accelerator.device)
        model = compile_model(model, lco, {"input_ids": ids}, args)
    init_trackers(accelerator, args, output_dir)

    def record_eval() -> dict[str, Any]:
        result = evaluate_perplexity(model, eval_dl, accelerator)
        step = progress["global_step"]
        progress["history"].append({"step": step, "train_time": progress["train_time"], **result})
        accelerator.log({"eval/perplexity": result["perplexity"], "eval/loss": result["loss"]}, step=step)
        accelerator.print(f"step {step}: validation perplexity {result['perplexity']:.3f}")
        return result

    def pause(tick: float) -> None:
        progress["train_time"] += clock() - tick

    model.train()
    step = progress["global_step"]
    for epoch in range(progress["epoch"], args.epochs):
        if step >= max_steps:
            break
        skip = progress["batch_in_epoch"] if epoch == progress["epoch"] else 0
        lco.epoch_begin(epoch)  # elections due at an epoch start; a resumed epoch is not re-elected
        progress["epoch"], progress["batch_in_epoch"] = epoch, skip
        sampler.generator.manual_seed(derived_seed(args.seed, "order", epoch))
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        bar = tqdm(
            total=steps_per_epoch,
            initial=skip,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=args.no_progress or not accelerator.is_local_main_process,
            leave=False,
        )
        tick = clock()
        for batch in loader:
            torch.manual_seed(derived_seed(args.seed, "step", rank, step))
            loss = model(**batch).loss
            accelerator.backward(loss)
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            progress["global_step"], progress["batch_in_epoch"] = step, progress["batch_in_epoch"] + 1
            progress["tokens"] += int(batch["attention_mask"].sum()) * world
            bar.update(1)
            if step % args.log_every == 0 or step == max_steps:
                value = float(loss.detach())
                bar.set_postfix(loss=f"{value:.4f}")
                if tracker is not None:
                    roles = tracking.role_metrics(opt)
                    if not config.log_per_layer:  # totals and counters only
                        roles = {k: v for k, v in roles.items() if k.count("/") == 1 or k.startswith("roles/total/")}
                    lr = float(scheduler.get_last_lr()[0])
                    accelerator.log({**roles, "train/loss": value, "train/lr": lr}, step=step)
            if args.eval_every and step % args.eval_every == 0:
                pause(tick)
                record_eval()
                tick = clock()
            if args.save_every and step % args.save_every == 0:
                pause(tick)
                ckpt.save_checkpoint(
                    accelerator,
                    output_dir / CHECKPOINT_DIR / f"checkpoint-{step}",
                    step=step,
                    epoch=epoch,
                    metadata={**settings, "progress": progress},
                    keep=args.keep_checkpoints,
                )
                tick = clock()
            if step >= max_steps:
                break
        bar.close()
        pause(tick)
        if tracker is not None:
            tracking.log_leadership_heatmap(accelerator, opt, step=step)
        if progress["batch_in_epoch"] == steps_per_epoch:
            lco.epoch_end(epoch)
            progress["epoch"], progress["batch_in_epoch"] = epoch + 1, 0

    changed = lco.train_end()  # a clone event scheduled at the end of training changes the model
    last = progress["history"][-1] if progress["history"] else None
    result = last if last is not None and last["step"] == step and not changed else record_eval()
    metrics = _summary(
        args,
        lco,
        unwrapped,
        result,
        {
            "trainer": "accelerate",
            "steps": step,
            "epochs_completed": progress["epoch"],
            "steps_per_epoch": steps_per_epoch,
            "train_tokens": progress["tokens"],
            "train_time_s": progress["train_time"],
            "tokens_per_second": progress["tokens"] / progress["train_time"] if progress["train_time"] else 0.0,
            "wall_clock_s": time.perf_counter() - started,
            "history": progress["history"],
            "num_processes": world,
            "resumed_from": resumed_from,
        },
    )
    accelerator.wait_for_everyone()
    gathered = gathered_model_state(lco)  # FSDP2: every rank takes part
    if accelerator.is_main_process:
        write_outputs(lco, output_dir, metrics, gathered)
    if tracker is not None:
        accelerator.log({"final/perplexity": metrics["perplexity"]}, step=step)
    accelerator.end_training()
    lco.remove_output_cloning()
    return metrics


# ============================================================================ transformers Trainer
def _nll_per_sequence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: keep (summed NLL, scored tokens) per sequence, not the logits."""
    from egg_recipes.text import token_nll

    nll, count = token_nll(logits, labels)
    return torch.stack([nll, count.double()], dim=1)


def _perplexity_metrics(eval_pred) -> dict[str, float]:
    sums = torch.as_tensor(eval_pred.predictions, dtype=torch.float64).reshape(-1, 2).sum(dim=0)
    loss = float(sums[0] / sums[1])
    return {"perplexity": math.exp(loss), "token_nll": loss, "tokens": float(sums[1])}


def train_hf(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import TrainerCallback, TrainingArguments

    from egg_optim.integrations.transformers import EggTrainer
    from egg_recipes import checkpoint as ckpt
    from egg_recipes import storage
    from egg_recipes.text import CausalLMCollator, load_tokenizer

    started = time.perf_counter()
    output_dir = storage.prepare_output_dir(args.output_dir)  # an unusable folder fails before any compute
    config = egg_config(args, make_plan(args))
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        run_name=args.run_name or output_dir.name,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        optim=OPTIMIZERS[args.optimizer][1],
        seed=args.seed,
        eval_strategy="steps" if args.eval_every else "no",
        eval_steps=args.eval_every or None,
        save_strategy="steps" if args.save_every else "no",
        save_steps=args.save_every or 500,
        save_total_limit=args.keep_checkpoints or None,
        logging_steps=args.log_every,
        report_to=trainer_report_to(args, output_dir),
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=args.no_progress,
        # EggTrainer couples the norms from an eager pass of two training examples before the Trainer compiles
        torch_compile=args.compile != "none",
        torch_compile_backend=args.compile_backend if args.compile != "none" else None,
        torch_compile_mode=None if args.compile in ("none", "default") else args.compile,
    )
    tokenizer = load_tokenizer(args.tokenizer)
    with training_args.main_process_first(desc="tokenising"):
        train_blocks, eval_blocks = load_blocks(args, tokenizer)
    model = build_lm(args, tokenizer)
    world = training_args.world_size
    steps = args.max_steps or args.epochs * math.ceil(len(train_blocks) / (args.batch_size * world))
    settings = run_settings(args, tokenizer, config, world, steps)

    class FirstStep(TrainerCallback):
        """The global step training starts from (> 0 on a resume), for the token count."""

        step = 0

        def on_train_begin(self, args, state, control, **kwargs) -> None:
            self.step = int(state.global_step)

    first_step = FirstStep()
    trainer = EggTrainer(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=CausalLMCollator(tokenizer.pad_token_id),
        compute_metrics=_perplexity_metrics,
        preprocess_logits_for_metrics=_nll_per_sequence,
        egg=config,
        callbacks=[ckpt.run_settings_callback(settings), first_step],
    )
    resume = None
    if args.resume_from:
        resume = trainer_resume_path(args.resume_from, output_dir)
        ckpt.check_run_settings(resume, settings)
    tick = clock()
    with storage.writing(output_dir, only_space=True):  # the Trainer's own checkpoint writes
        result = trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    train_time = clock() - tick  # includes the Trainer's evaluations and checkpoint saves, if any
    final = trainer.evaluate()
    lco = trainer.egg_optimizer
    step = int(trainer.state.global_step)
    tokens = (step - first_step.step) * args.batch_size * args.block_size * world  # train blocks are full
    metrics = _summary(
        args,
        lco,
        trainer.accelerator.unwrap_model(trainer.model),
        {"perplexity": final["eval_perplexity"], "loss": final["eval_token_nll"], "tokens": int(final["eval_tokens"])},
        {
            "trainer": "hf",
            "steps": step,
            "train_tokens": tokens,
            "train_time_s": train_time,
            "train_runtime_s": float(result.metrics.get("train_runtime", math.nan)),
            "tokens_per_second": tokens / train_time if train_time else 0.0,
            "wall_clock_s": time.perf_counter() - started,
            "log_history": trainer.state.log_history,
            "num_processes": world,
            "resumed_from": None if resume is None else str(resume),
        },
    )
    if trainer.is_world_process_zero():
        write_outputs(lco, output_dir, metrics)
    lco.remove_output_cloning()
    return metrics


# ============================================================================ entry points
def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the job ``args`` describes on the chosen route; returns the metrics written to ``metrics.json``."""
    return train_hf(args) if args.trainer == "hf" else train_accelerate(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: returns the exit status."""
    return run_cli(train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
