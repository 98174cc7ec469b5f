"""Pieces the recipes share, so that each recipe holds only what is particular to its task.

- flags: :class:`Parser` (a bad flag is one line, ``error: ...``, exit status 2), the flag types
  (:func:`positive_int`, :func:`fraction`, :func:`seed_value`, ...) and :func:`add_run_arguments` (output folder,
  checkpoints, evaluation and logging cadence, tracker); the role flags come from
  :func:`egg_optim.add_config_arguments`, read back by :func:`egg_config`; :func:`refuse_ineffective_flags`
  (a flag that would change nothing in this run is refused in one line, not ignored);
- exact resumes: :func:`derived_seed` (data order, dropout), :func:`resume_config_signature`,
  :func:`state_digests` (equal digests = bit-identical runs), :func:`trainer_resume_path`;
- FSDP2: :func:`gathered_model_state` (the plain model's weights, gathered onto the main process);
- trackers: :func:`init_trackers` (Accelerate) and :func:`trainer_report_to` (transformers Trainer), W&B offline
  unless a key is configured;
- :func:`run_cli`: library errors become ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from egg_optim import EggConfig, LeaderCloneOptimizer, RolePlan, config_from_args
from egg_optim.core.sharding import full, reshard
from egg_optim.errors import ConfigError, EggOptimError

SCENARIOS = ("baseline", "mild", "aggressive")
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"


# ============================================================================ flags
class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (``error: ...``) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {' '.join(message.split())} (see --help)\n")


def bounded(cast: type, low: float, high: float, what: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses with ``cast`` and accepts ``low <= value <= high``."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = bounded(int, 1, math.inf, "a positive integer")
non_negative_int = bounded(int, 0, math.inf, "an integer >= 0")
fraction = bounded(float, 0.0, 1.0, "a number in [0, 1]")
# numpy's legacy seeding (accelerate's set_seed) accepts 0 <= seed < 2**32; torch and random accept more
seed_value = bounded(int, 0, 2**32 - 1, f"an integer in [0, {2**32 - 1}]")


def open_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def add_run_arguments(p: argparse.ArgumentParser, *, output_help: str) -> argparse._ArgumentGroup:
    """The "run, logging and checkpoints" group: ``--output-dir`` ... ``--no-progress``; returns the group so a
    recipe can add its own run flags to it."""
    g = p.add_argument_group("run, logging and checkpoints")
    g.add_argument("--output-dir", default=None, help=output_help)
    g.add_argument(
        "--resume-from",
        default=None,
        metavar="PATH",
        help="continue from a checkpoint folder, or 'latest' (the newest complete one in <output-dir>/checkpoints)",
    )
    g.add_argument(
        "--save-every", type=non_negative_int, default=0, help="checkpoint every N optimizer steps (0: never)"
    )
    g.add_argument(
        "--keep-checkpoints", type=non_negative_int, default=2, help="keep the newest N checkpoints (0: all)"
    )
    g.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=0,
        help="also evaluate every N optimizer steps (0: at the end of each epoch only)",
    )
    g.add_argument("--log-every", type=positive_int, default=20, help="log loss and role metrics every N steps")
    g.add_argument(
        "--report-to",
        default="wandb" if wandb_installed() else "none",
        choices=("wandb", "none"),
        help="experiment tracker; W&B runs offline (WANDB_MODE=offline) when no API key is configured",
    )
    g.add_argument("--project", default="egg_optim", help="tracker project name")
    g.add_argument("--run-name", default=None, help="tracker run name")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars (epoch summaries only)")
    return g


# ============================================================================ flags that would do nothing
# EggConfig options that only act on one clone mode
OUTPUT_MODE_ONLY = ("eval_mode", "fuse_norms")
WEIGHT_MODE_ONLY = ("skip_clone_grads",)
# options that still choose how a run without clones is computed (which layer rewrite: speed, rounding)
HOW_COMPUTED = ("clone_mode", "skip_clone_grads")


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def add_compile_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--compile",
        default="none",
        choices=COMPILE_MODES,
        help="torch.compile the model in this mode (reduce-overhead: CUDA graphs on a GPU) after one eager forward "
        "pass that lets the optimizer couple the norms; a role change recompiles once",
    )
    g.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager, aot_eager: debugging)")


def check_compile_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, refuse: dict[str, bool]) -> None:
    """``--compile-backend`` without ``--compile``, and ``--compile`` with a flag of ``refuse`` (``{why: given}``)
    that it cannot serve, exit with one line."""
    if args.compile == "none" and changed_flags(parser, args, ("compile_backend",)):
        parser.error("--compile-backend: chooses how --compile compiles; give --compile too")
    for why, given in refuse.items():
        if args.compile != "none" and given:
            parser.error(f"--compile: {why}")


def compile_model(model: torch.nn.Module, lco: LeaderCloneOptimizer, example: Any, args: argparse.Namespace):
    """``torch.compile(model)`` once the optimizer has coupled the norms from an eager forward pass of ``example``
    (:meth:`~egg_optim.LeaderCloneOptimizer.couple_norms`, eval mode, no gradients: nothing trains), which also
    lets transformer blocks check their output mode; a compiled first pass gives no evidence, and coupling later
    would swap norm classes under the compiled graph. After a resume the checkpoint's coupling is kept."""
    if isinstance(example, dict):
        lco.couple_norms(**example)
    else:
        lco.couple_norms(example)
    mode = None if args.compile == "default" else args.compile
    return torch.compile(model, mode=mode, backend=args.compile_backend)


def _as_typed(parser: argparse.ArgumentParser, dest: str, value: Any) -> str:
    """``--flag value`` as one would type it."""
    action = next((a for a in parser._actions if a.dest == dest and a.option_strings), None)
    if action is None:
        return f"--{dest.replace('_', '-')} {value}"
    if isinstance(action, argparse.BooleanOptionalAction):
        return action.option_strings[0 if value else 1]
    if action.metavar == "{auto,on,off}":
        value = {None: "auto", True: "on", False: "off"}.get(value, value)
    return f"{action.option_strings[0]} {value}"


def changed_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, dests) -> list[str]:
    """The flags among ``dests`` whose value in ``args`` is not the parser's default (given on the command line
    with another value), as typed (``--flag value``)."""
    return [
        _as_typed(parser, dest, getattr(args, dest))
        for dest in dests
        if hasattr(args, dest) and getattr(args, dest) != parser.get_default(dest)
    ]


def role_dests(parser: argparse.ArgumentParser) -> list[str]:
    """The :class:`EggConfig` options this parser has flags for that act on clones and roles only (all but
    :data:`HOW_COMPUTED`, which also choose how a run without clones is computed, and ``seed``: a recipe's
    ``--seed`` also seeds the model's initialisation and the data order)."""
    fields = {f.name for f in dataclasses.fields(EggConfig)} - set(HOW_COMPUTED) - {"seed"}
    return [a.dest for a in parser._actions if a.dest in fields]


def refuse_ineffective_flags(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    *,
    clones: bool,
    without_clones: str = "",
    also: tuple[str, ...] = (),
) -> None:
    """Refuse, in one line (``parser.error``), flags that would change nothing in this run instead of running as
    if they were absent: without clones (``clones=False``; ``without_clones`` says why, e.g. ``--scenario
    baseline``) every role option (:func:`role_dests`) and the ``also`` flags; in any case the options of the
    other clone mode (``--eval-mode`` acts in output mode only, ``--skip-clone-grads`` in weight mode only)."""
    if not clones:
        flags = changed_flags(parser, args, [*role_dests(parser), *also])
        if flags:
            parser.error(
                f"{', '.join(flags)}: no effect with {without_clones}, which trains no clones; drop "
                f"{'it' if len(flags) == 1 else 'them'}"
            )
    mode = getattr(args, "clone_mode", None)
    other = WEIGHT_MODE_ONLY if mode == "output" else OUTPUT_MODE_ONLY if mode == "weight" else ()
    flags = changed_flags(parser, args, other)
    if flags:
        parser.error(
            f"{', '.join(flags)}: no effect with --clone-mode {mode} (it acts in "
            f"{'weight' if mode == 'output' else 'output'} mode only); drop it or change --clone-mode"
        )


def reset_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, dests) -> list[str]:
    """Put the flags among ``dests`` back to their defaults; returns those that were changed."""
    changed = changed_flags(parser, args, dests)
    for dest in dests:
        if hasattr(args, dest):
            setattr(args, dest, parser.get_default(dest))
    return changed


# ============================================================================ roles
def egg_config(args: argparse.Namespace, plan: RolePlan) -> EggConfig:
    """The run's :class:`EggConfig`: the role flags, with the plan built from --scenario and the model."""
    config = config_from_args(args, plan=plan, seed=args.seed)
    if config.score.name == "local_loss":
        raise ConfigError("--election local_loss needs LFNN local losses, which this recipe does not add")
    return config


def resume_config_signature(config: EggConfig) -> dict[str, Any]:
    """The config options a resume must match: all but the logging ones (the plan as its signature)."""
    return {k: v for k, v in config.signature().items() if k not in ("log_roles", "log_per_layer", "strict_blocks")}


# ============================================================================ determinism and digests
def load_image_splits(args: argparse.Namespace) -> tuple[Any, Any]:
    """The train and test splits of ``--dataset`` (with ``--max-*-samples`` and ``--test-split-fraction``),
    checked to make a meaningful classification task."""
    from egg_recipes.data import check_splits, load_image_dataset

    common = {"seed": args.seed, "test_split_fraction": args.test_split_fraction}
    train = load_image_dataset(args.dataset, split="train", max_samples=args.max_train_samples, **common)
    test = load_image_dataset(args.dataset, split="test", max_samples=args.max_eval_samples, **common)
    check_splits(train, test)
    return train, test


def derived_seed(*keys: object) -> int:
    """A 63-bit seed from ``keys`` (e.g. ``(seed, "order", epoch)``): a resumed run redraws what it skipped."""
    text = ":".join(str(k) for k in keys).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        t = full(t.detach())  # FSDP2: the whole tensor (every rank must call this), so digests compare across runs
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gathered_model_state(lco: LeaderCloneOptimizer) -> dict[str, torch.Tensor] | None:
    """With parameters sharded by FSDP2: the model's full state dict, which holds clone rows filled as
    ``lco.export_model()`` does (that copies the model, which FSDP2 cannot), gathered onto the main process (the
    other ranks get ``{}``); every rank must call it. ``None`` without sharding: use ``lco.export_model()``."""
    if not lco.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(lco.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def state_digests(model: torch.nn.Module, lco: LeaderCloneOptimizer) -> dict[str, str]:
    """sha256 of the parameters, buffers and roles: equal digests mean bit-identical runs."""
    # FSDP2: after an evaluation pass the root holds gathered copies, whose storage FSDP2 must free (and numpy
    # views would pin); the sharded parameters, gathered, are what the digest is of
    reshard(model)
    roles = []
    for name, r in lco.roles.items():
        roles += [(f"{name}.codes", r.codes), (f"{name}.source_map", r.source_map)]
    return {
        "param_sha256": tensor_digest(model.named_parameters()),
        "buffer_sha256": tensor_digest(
            (n, b) for n, b in model.named_buffers() if not n.split(".")[-1].startswith("_")
        ),
        "roles_sha256": tensor_digest(roles),
    }


def trainer_resume_path(resume_from: str, output_dir: Path) -> Path:
    """The Trainer checkpoint ``--resume-from`` names: a folder, or ``latest`` (the newest ``checkpoint-N``)."""
    from transformers.trainer_utils import get_last_checkpoint

    from egg_recipes.checkpoint import CheckpointError

    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return path
    found = get_last_checkpoint(str(output_dir))
    if found is None:
        raise CheckpointError(f"--resume-from latest: no checkpoint-N folder in {output_dir}")
    return Path(found)


# ============================================================================ trackers
def configure_wandb(output_dir: Path) -> dict[str, Any]:
    """Offline mode unless a W&B API key is configured; returns wandb.init kwargs: the run folder is
    ``$WANDB_DIR``, else ``output_dir``, always passed explicitly (wandb reads ``WANDB_DIR`` once per process,
    so a second run in the same process would otherwise land in the first one's folder)."""
    if "WANDB_MODE" not in os.environ:
        has_key = bool(os.environ.get("WANDB_API_KEY"))
        if not has_key:
            try:
                import netrc

                has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
            except (OSError, netrc.NetrcParseError):
                has_key = False
        if not has_key:
            os.environ["WANDB_MODE"] = "offline"
    return {"dir": os.environ.get("WANDB_DIR") or str(output_dir)}


def init_trackers(accelerator: Any, args: argparse.Namespace, output_dir: Path) -> None:
    """Start the ``--report-to`` tracker on ``accelerator`` with the flags as its config (nothing for ``none``)."""
    if args.report_to == "none":
        return
    init_kwargs = {}
    if args.report_to == "wandb":
        init_kwargs["wandb"] = {**configure_wandb(output_dir), "name": args.run_name or output_dir.name}
    accelerator.init_trackers(
        args.project,
        config={
            k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in vars(args).items()
        },
        init_kwargs=init_kwargs,
    )


def trainer_report_to(args: argparse.Namespace, output_dir: Path) -> str | list[str]:
    """``TrainingArguments.report_to`` of ``--report-to``; for W&B also its offline mode, run folder and project
    (the Trainer's W&B callback reads them from the environment)."""
    if args.report_to == "none":
        return "none"
    os.environ.setdefault("WANDB_DIR", configure_wandb(output_dir)["dir"])
    if getattr(args, "project", None):
        os.environ.setdefault("WANDB_PROJECT", args.project)
    return ["wandb"]


# ============================================================================ running
def clock() -> float:
    """Wall-clock seconds, after the GPU has finished queued work (timings would otherwise be too low)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def run_cli(train_fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run ``train_fn(args)``; bad input becomes a one-line ``error: ...`` and exit status 2 (no stack trace)."""
    try:
        train_fn(args)
    except EggOptimError as exc:  # ConfigError, PlanError, CheckpointError, StorageError, DatasetUnavailableError
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
