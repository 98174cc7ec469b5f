"""Block-wise training of a small ResNet (BP, DGL, block-wise LFNN-l), in one process or block-parallel.

    python recipes/train_blockwise.py --method lfnn_l --dataset fashion_mnist --output-dir runs/lfnn
    torchrun --nproc_per_node 2 recipes/train_blockwise.py --method lfnn_l --dataset fashion_mnist ...
    accelerate launch --num_processes 2 recipes/train_blockwise.py --method lfnn_l ...

The net (:class:`~egg_recipes.models.BlockResNet`) is cut after the stages named by ``--cuts`` into K blocks.
``bp`` trains it whole by backprop. ``dgl`` and ``lfnn_l`` train every block but the last from its own local
loss on its detached input (DGL: one auxiliary head per block; LFNN-l: ``--workers`` workers with auxiliary
heads, ``--delta`` of them leaders, the followers aligned to the best leader); the last block learns from the
cross-entropy alone. No gradient crosses a cut.

One process runs the blocks one after another on each batch. K processes (``torchrun`` / ``accelerate
launch``; gloo on CPU, NCCL on GPUs) run block k on rank k with :class:`egg_optim.lfnn.PipelineStage`: rank k
works on batch t while rank k + 1 still works on batch t - 1, and nobody waits for a backward. Both compute the
same numbers (staleness zero): a block's update depends only on its input and its own loss, and every rank
seeds, shuffles and schedules alike. ``tests/test_train_blockwise.py`` checks equal parameters.

Checkpoints (``--save``, at each epoch end, under ``<output-dir>/checkpoints/epoch-N``) hold one file per block,
written by the rank that owns it, and a ``complete.json`` written last. A run saved with 1 process resumes on K
processes and back. ``<output-dir>/results.json`` records the accuracy curve against training wall-clock
(evaluation excluded), throughput, and how long each rank waited for its input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from egg_optim.errors import CheckpointError, ConfigError
from egg_optim.lfnn import LeaderFollowerLoss
from egg_optim.lfnn.pipeline import PipelineStage, update_block

from .common import Parser, derived_seed, positive_float, positive_int, run_cli, seed_value
from .data import dataset_spec, load_image_dataset, make_dataloader
from .models import BlockResNet
from .storage import atomic_path, prepare_output_dir, write_text_atomic

METHODS = ("bp", "dgl", "lfnn_l")
RESULTS_FILE = "results.json"
COMPLETE = "complete.json"
#: settings a checkpoint must share with the run that resumes it (anything else may change, e.g. --epochs)
RESUME_KEYS = ("dataset", "image_size", "train_samples", "method", "delta", "workers", "widths", "cuts",
               "aux_hidden", "aux_pool", "batch_size", "lr", "schedule", "seed")  # fmt: skip
#: values of settings added later, for checkpoints saved before them
SETTING_DEFAULTS = {"aux_pool": 2}


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def _delta(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a leader fraction in (0, 1], got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="lfnn_l", help="default lfnn_l")
    p.add_argument("--dataset", default="digits", help="digits, fashion_mnist, or a Hub name / local path")
    p.add_argument("--image-size", type=positive_int, default=None, help="resize images to N x N (default: as is)")
    p.add_argument("--train-samples", type=positive_int, default=None, help="use the first N training images")
    p.add_argument("--test-samples", type=positive_int, default=None, help="use the first N test images")
    p.add_argument("--widths", type=_ints, default=[16, 32, 64], help="stage widths (default 16,32,64)")
    p.add_argument(
        "--cuts", type=_ints, default=[1], help="start a new block after these stages (default 1: K = 2 blocks)"
    )
    p.add_argument("--workers", type=positive_int, default=4, help="LFNN-l workers per local block (default 4)")
    p.add_argument("--delta", type=_delta, default=0.5, help="LFNN-l leader fraction (default 0.5)")
    p.add_argument("--aux-hidden", type=positive_int, default=64, help="width of the aux heads (default 64)")
    p.add_argument(
        "--aux-pool", type=positive_int, default=7, help="aux heads average-pool to N x N first (default 7; DGL: 2)"
    )
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after N steps (throughput runs)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="LR schedule over the run")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--evals-per-epoch", type=positive_int, default=1, help="test-set evaluations per epoch")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--output-dir", default=None, help="results.json and checkpoints go here")
    p.add_argument("--save", action="store_true", help="checkpoint at every epoch end (needs --output-dir)")
    p.add_argument("--resume-from", default=None, metavar="DIR", help="a checkpoints/epoch-N folder")
    args = p.parse_args(argv)
    if args.save and args.output_dir is None:
        p.error("--save needs --output-dir")
    if args.method == "bp" and (args.workers, args.delta) != (4, 0.5):
        p.error("--workers and --delta have no effect with --method bp")
    return args


# ============================================================================ blocks
@dataclass
class Block:
    """One block with its loss and its own optimizer and schedule (Adam is per parameter, so K optimizers
    over K blocks step exactly as one optimizer over all of them)."""

    index: int
    module: nn.Sequential
    local: LeaderFollowerLoss | None  # None: the last block (or bp), trained by the cross-entropy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.local.local_loss() if self.local is not None else F.cross_entropy(out, targets)

    def set_targets(self, targets: torch.Tensor) -> None:
        if self.local is not None:
            self.local.set_targets(targets)

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "local": None if self.local is None else self.local.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        if self.local is not None:
            self.local.load_state_dict(state["local"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_blocks(args: argparse.Namespace, spec, total_steps: int, owned: list[int], device) -> list[Block]:
    """The blocks this process owns (all of them with one process), built alike on every rank: the model from
    ``--seed``, block k's aux heads from a seed of their own, so no block's init depends on which rank builds it."""
    torch.manual_seed(args.seed)
    model = BlockResNet(spec.channels, spec.num_classes, widths=args.widths).to(device)
    modules = [nn.Sequential(*model.children())] if args.method == "bp" else model.blocks(args.cuts)

    def lr_factor(step: int) -> float:
        if args.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))

    blocks = []
    for k in owned:
        module, local = modules[k], None
        if k < len(modules) - 1:
            torch.manual_seed(derived_seed(args.seed, "aux", k))
            dgl = args.method == "dgl"
            local = LeaderFollowerLoss(
                module,
                num_classes=spec.num_classes,
                blocks={f"b{k + 1}": [name for name, _ in module.named_children()]},
                block_workers=1 if dgl else args.workers,
                mode="lfnn_l",
                delta=1.0 if dgl else args.delta,
                aux_hidden=args.aux_hidden,
                aux_pool=args.aux_pool,
                sync_selection=False,  # the block lives on one rank: its leaders are its own
            ).to(device)
        params = [*module.parameters(), *([] if local is None else local.parameters())]
        optimizer = torch.optim.Adam(params, lr=args.lr)
        blocks.append(Block(k, module, local, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)))
    return blocks


# ============================================================================ checkpoints
def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in RESUME_KEYS}


def save_checkpoint(folder: Path, blocks: list[Block], step: int, epoch: int, args, world: int, rank: int) -> None:
    """One file per block, each written atomically by its owner; ``complete.json`` last, after every rank wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    for b in blocks:
        with atomic_path(folder / f"block{b.index}.pt") as tmp:
            torch.save({"step": step, "epoch": epoch, **b.state_dict()}, tmp)
    if world > 1:
        dist.barrier()
    if rank == 0:
        info = {"step": step, "epoch": epoch, "blocks": len(args.cuts) + 1, "settings": _settings(args)}
        write_text_atomic(folder / COMPLETE, json.dumps(info, indent=1))


def load_checkpoint(folder: Path, blocks: list[Block], args) -> tuple[int, int]:
    """Load this process's blocks from ``folder``; returns ``(step, epochs done)``. Refuses an incomplete
    checkpoint or one saved by a run with other settings, before anything is changed."""
    marker = folder / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{folder} is not a complete block-wise checkpoint (no {COMPLETE}); pick another one")
    info = json.loads(marker.read_text())
    saved, now = info["settings"], _settings(args)
    saved = {**SETTING_DEFAULTS, **saved}
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now[k]!r})" for k in RESUME_KEYS
              if saved.get(k) != now[k]]  # fmt: skip
    if differ:
        raise CheckpointError(f"{folder} was saved with {', '.join(differ)}; resume with the same settings")
    states = {b.index: torch.load(folder / f"block{b.index}.pt", weights_only=False) for b in blocks}
    for b in blocks:
        if (states[b.index]["step"], states[b.index]["epoch"]) != (info["step"], info["epoch"]):
            raise CheckpointError(f"{folder}/block{b.index}.pt is from another step than {COMPLETE}")
    for b in blocks:
        b.load_state_dict(states[b.index])
    return int(info["step"]), int(info["epoch"])


# ============================================================================ training
def _distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_world_size(), dist.get_rank()


def _device(args: argparse.Namespace) -> torch.device:
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device")
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def train(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the recipe; returns the results (on the rank that holds the last block; ``None`` elsewhere)."""
    torch.set_num_threads(args.threads)
    device = _device(args)
    world, rank = _distributed(device)
    k_blocks = 1 if args.method == "bp" else len(args.cuts) + 1
    if world > 1 and args.method == "bp":
        raise ConfigError("--method bp backpropagates through the whole net, so it cannot be split over processes; "
                          "launch it with 1 process")  # fmt: skip
    if world not in (1, k_blocks):
        raise ConfigError(f"--cuts {','.join(map(str, args.cuts))} gives {k_blocks} blocks: launch 1 or "
                          f"{k_blocks} processes, not {world}")  # fmt: skip
    if args.save:
        prepare_output_dir(args.output_dir)
    train_ds = load_image_dataset(args.dataset, split="train", max_samples=args.train_samples, seed=0)
    test_ds = load_image_dataset(args.dataset, split="test", max_samples=args.test_samples, seed=0)
    spec = dataset_spec(train_ds, resize_to=args.image_size)
    steps_per_epoch = math.ceil(len(train_ds) / args.batch_size)
    total = steps_per_epoch * args.epochs
    blocks = build_blocks(args, spec, total, list(range(k_blocks)) if world == 1 else [rank], device)
    step = done = 0
    if args.resume_from is not None:
        step, done = load_checkpoint(Path(args.resume_from), blocks, args)
    stage = PipelineStage(blocks[0].module, blocks[0].loss, blocks[0].optimizer) if world > 1 else None
    last = world == 1 or rank == world - 1
    data = {"resize_to": args.image_size, "normalize": "half"}
    test_loader = make_dataloader(test_ds, 1000, **data)
    evals = {min(steps_per_epoch, round(steps_per_epoch * (i + 1) / args.evals_per_epoch))
             for i in range(args.evals_per_epoch)}  # fmt: skip
    curve: list[dict[str, float]] = []
    train_seconds = eval_seconds = 0.0
    samples = 0
    stop = total if args.max_steps is None else min(total, step + args.max_steps)

    def sync() -> None:
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def evaluate() -> float:
        waited = None if stage is None else stage.wait_seconds  # waits while evaluating are not training's
        for b in blocks:
            b.module.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in test_loader:
                if stage is None:
                    out = x.to(device)
                    for b in blocks:
                        out = b.module(out)
                else:
                    out = stage.forward_only(x if rank == 0 else None)
                if last:
                    correct += int((out.argmax(1).cpu() == y).sum())
                    seen += int(y.numel())
        for b in blocks:
            b.module.train()
        if stage is not None:
            stage.finish()
            stage.wait_seconds = waited
        return correct / max(seen, 1)

    sync()
    start = time.perf_counter()
    for epoch in range(done, args.epochs):
        loader = make_dataloader(train_ds, args.batch_size, shuffle=True, seed=derived_seed(args.seed, "order", epoch),
                                 **data)  # fmt: skip
        for i, (x, y) in enumerate(loader, start=1):
            if step >= stop:
                break
            y = y.to(device)
            if stage is not None:
                blocks[0].set_targets(y)
                stage.step(x if rank == 0 else None, y)
                blocks[0].scheduler.step()
            else:
                h = x.to(device)
                for b in blocks:
                    b.set_targets(y)
                    out = b.module(h)
                    update_block(out, y, b.loss, b.optimizer)
                    b.scheduler.step()
                    h = out.detach()
            step += 1
            samples += int(y.numel())
            if i in evals or step == stop:
                sync()
                train_seconds += time.perf_counter() - start
                t0 = time.perf_counter()
                acc = evaluate()
                eval_seconds += time.perf_counter() - t0
                curve.append({"step": step, "epoch": epoch + i / steps_per_epoch, "train_seconds": train_seconds,
                              "test_acc": acc})  # fmt: skip
                if last:
                    print(f"epoch {epoch + i / steps_per_epoch:.2f} step {step}: test acc {acc:.4f} "
                          f"({train_seconds:.1f} s training)", flush=True)  # fmt: skip
                sync()
                start = time.perf_counter()
        if args.save and step == (epoch + 1) * steps_per_epoch:  # a whole epoch: a resumable point
            folder = Path(args.output_dir) / "checkpoints" / f"epoch-{epoch + 1}"
            save_checkpoint(folder, blocks, step, epoch + 1, args, world, rank)
        if step >= stop:
            break
    waits = [0.0 if stage is None else stage.wait_seconds]
    if world > 1:
        stage.finish()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, waits[0])
        waits = gathered
        dist.destroy_process_group()
    if not last:
        return None
    results = {
        "settings": {**vars(args), "blocks": k_blocks},
        "world_size": world,
        "threads": args.threads,
        "device": str(device),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "params": sum(p.numel() for b in blocks for p in b.module.parameters()) if world == 1 else None,
        "steps": step,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "samples_per_second": samples / train_seconds if train_seconds > 0 else None,
        "wait_seconds_per_rank": waits,
        "final_acc": curve[-1]["test_acc"] if curve else None,
        "curve": curve,
    }
    if args.output_dir is not None:
        prepare_output_dir(args.output_dir)
        write_text_atomic(Path(args.output_dir) / RESULTS_FILE, json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    return run_cli(train, parse_args(argv if argv is not None else sys.argv[1:]))
