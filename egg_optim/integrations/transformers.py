"""Leader/clone training in the transformers ``Trainer`` (optional extra ``egg-optim[hf]``).

One line turns a ``Trainer`` run into a leader/clone run::

    trainer = EggTrainer(model=model, args=args, train_dataset=ds,
                         egg=EggConfig(plan="mild", clone_mode="output", elect_every=200, election="weight_norm"))
    trainer.train()

- :class:`EggTrainer` (= ``make_egg_trainer(transformers.Trainer)``) wraps the optimizer the Trainer builds in a
  :class:`~egg_optim.optim.LeaderCloneOptimizer` (``create_optimizer``; the LR scheduler, built afterwards
  on the Trainer's optimizer, drives the wrapper's shared ``param_groups``), adds LFNN local losses to the ONE
  training loss (``compute_loss``: one forward, one backward), puts role metrics into the Trainer's logs and
  registers an :class:`EggTrainerCallback`.
- :class:`EggTrainerCallback` reports epoch boundaries and the end of training to the optimizer's election
  and clone schedules, and drives any :mod:`egg_optim.callbacks` callbacks (role logging, local-loss scores)
  from Trainer events and saves their state in every checkpoint folder
  (``egg_callbacks.pt``), restoring it when training resumes from a checkpoint. It also works with a plain
  ``Trainer`` given a ``LeaderCloneOptimizer`` through ``optimizers=(opt, None)``.

Event mapping (a Trainer "step" is one optimizer step, i.e. one gradient-accumulation group):

========================  ==============================================
Trainer                   egg_optim
========================  ==============================================
``on_train_begin``        restore state (on resume), ``on_train_begin``
``on_epoch_begin``        ``on_epoch_begin`` (``epoch = floor(state.epoch)``)
``on_step_begin``         ``on_step_begin``
``on_pre_optimizer_step`` ``on_before_optimizer_step``
``on_step_end``           ``on_after_optimizer_step``, ``on_step_end``
``on_epoch_end``          ``on_epoch_end``
``on_evaluate``           ``on_evaluate``
``on_save``               ``on_save``, then ``egg_callbacks.pt`` into the checkpoint folder
``on_log``                pending egg metrics into the logs
``on_train_end``          ``on_train_end``
========================  ==============================================

Resuming is all-or-nothing under :class:`EggTrainer`: before the Trainer loads a checkpoint's weights into the
model, the checkpoint's ``optimizer.pt``, ``scheduler.pt`` and ``egg_callbacks.pt`` must be readable (a file
truncated by a killed save is a :class:`~egg_optim.errors.CheckpointError` with the model untouched), and when
the optimizer then refuses its saved state (another plan, or other options it depends on: clone mode, election,
schedules, clone options, assignment; a :class:`~egg_optim.errors.StateDictMismatchError`), the model's weights,
the optimizer and the LR scheduler are restored to what they were before ``train()`` was called.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import pickle
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from transformers.trainer_callback import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..callbacks import (
    STATE_FILE,
    Callback,
    CallbackRunner,
    build_callbacks,
    build_local_loss,
    callbacks_state_dict,
    find_leader_clone_optimizer,
    load_callbacks_state_dict,
)
from ..config import EggConfig
from ..errors import CheckpointError, ConfigError, EggOptimError, StateDictMismatchError
from ..optim import LeaderCloneOptimizer

logger = logging.getLogger(__name__)

__all__ = ["EggConfig", "EggTrainer", "EggTrainerCallback", "EggTrainerMixin", "make_egg_trainer"]

_STATE_VERSION = 1
_EVAL_PREFIXES = ("eval_", "test_")
# what torch.load raises on a truncated or garbled file (a killed save): not a programming error
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError)
_CHECKED_FILES = ("optimizer.pt", "scheduler.pt", STATE_FILE)


def _load_file(path: str) -> Any:
    """``torch.load(path)`` as the Trainer does (CPU, ``weights_only``); an unreadable file is a
    :class:`CheckpointError` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as exc:
        raise CheckpointError(
            f"checkpoint {os.path.dirname(path)}: unreadable {os.path.basename(path)} "
            f"({' '.join(str(exc).split())[:200] or type(exc).__name__}; was the save interrupted?)"
        ) from exc


def _check_readable(checkpoint: str, names: Sequence[str] = _CHECKED_FILES) -> None:
    """Refuse a checkpoint holding a file among ``names`` that ``torch.load`` cannot read (nothing is loaded)."""
    for name in names:
        path = os.path.join(checkpoint, name)
        if os.path.isfile(path):
            _load_file(path)


def _model_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state on the CPU (device memory stays free); sharded tensors are copied as they are."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        out[k] = v.clone() if type(v) is not torch.Tensor else v.to("cpu", copy=True)
    return out


def _epoch_index(state: Any) -> int:
    """The 0-based epoch a Trainer is in (``state.epoch`` is a float; a finished epoch reads ``e + 1.0``)."""
    return int(math.floor(float(state.epoch or 0.0) + 1e-9))


def _is_training_log(logs: dict[str, Any]) -> bool:
    return not any(str(k).startswith(_EVAL_PREFIXES) for k in logs)


class EggTrainerCallback(TrainerCallback):
    """Drive :mod:`egg_optim.callbacks` callbacks from ``Trainer`` events (see the module docstring).

    Args:
        callbacks: egg callbacks, called in order (e.g. ``[RoleLogger()]``); see :meth:`from_config`.
        state_file: file name written into each checkpoint folder.

    The LeaderCloneOptimizer is found inside the Trainer's optimizer (``kwargs["optimizer"]`` is Accelerate's
    ``AcceleratedOptimizer``; the wrapper is its ``.optimizer``). Its roles are saved by the Trainer itself
    (``optimizer.pt``); this callback saves the callbacks' own state (schedule bookkeeping, local-loss module).
    On resume the state is read from the checkpoint given to ``train(resume_from_checkpoint=...)`` (known
    exactly under :class:`EggTrainer`), else ``args.resume_from_checkpoint``, else
    ``<output_dir>/checkpoint-<global_step>``.
    """

    def __init__(self, callbacks: Sequence[Callback] = (), *, state_file: str = STATE_FILE) -> None:
        self.runner = CallbackRunner(callbacks)
        if not isinstance(state_file, str) or not state_file or os.sep in state_file:
            raise ConfigError(f"EggTrainerCallback: state_file must be a plain file name, got {state_file!r}")
        self.state_file = state_file
        self.resume_from: str | None = None  # set by EggTrainer.train
        self.restored_from: str | None = None
        self._epoch = 0

    @classmethod
    def from_config(cls, config: EggConfig, local_loss: Any = None, **kwargs: Any) -> EggTrainerCallback:
        if not isinstance(config, EggConfig):
            raise ConfigError(f"from_config expects an EggConfig, got {type(config).__name__}")
        return cls(build_callbacks(config, local_loss), **kwargs)

    @property
    def callbacks(self) -> list[Callback]:
        return self.runner.callbacks

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "callbacks": callbacks_state_dict(self.runner.callbacks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise StateDictMismatchError(
                f"EggTrainerCallback state version {state.get('version')!r}, expected {_STATE_VERSION}"
            )
        load_callbacks_state_dict(self.runner.callbacks, state["callbacks"])

    def pop_logs(self) -> dict[str, Any]:
        """Metrics the egg callbacks logged since the last call (cleared)."""
        logs = dict(self.runner.state.logs)
        self.runner.state.logs.clear()
        return logs

    # ------------------------------------------------------------------ helpers
    def _fire(self, event: str, args: Any, state: Any, kwargs: dict[str, Any], **updates: Any) -> None:
        st = self.runner.state
        if kwargs.get("model") is not None:
            st.model = kwargs["model"]
        if kwargs.get("optimizer") is not None:
            st.optimizer = kwargs["optimizer"]
        if kwargs.get("lr_scheduler") is not None:
            st.scheduler = kwargs["lr_scheduler"]
        st.accumulation_steps = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
        st.is_main_process = bool(getattr(state, "is_world_process_zero", True))
        self.runner.fire(event, global_step=int(state.global_step), **updates)

    def _checkpoint_to_restore(self, args: Any, state: Any) -> str | None:
        if self.resume_from is not None:
            return self.resume_from
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, (str, os.PathLike)) and os.path.isdir(resume):
            return os.fspath(resume)
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        self.restored_from = None
        if state.global_step > 0:  # the Trainer loaded a checkpoint's TrainerState: a resume
            ckpt = self._checkpoint_to_restore(args, state)
            path = os.path.join(ckpt, self.state_file) if ckpt else None
            if path and os.path.isfile(path):
                self.load_state_dict(_load_file(path))
                self.restored_from = ckpt
            else:
                logger.warning(
                    "egg_optim: resuming at step %d but found no %s in %s; callback schedules restart with fresh "
                    "bookkeeping (roles still come from the optimizer state)",
                    state.global_step,
                    self.state_file,
                    ckpt,
                )
        self.resume_from = None
        self._epoch = _epoch_index(state)
        self._fire("on_train_begin", args, state, kwargs, epoch=self._epoch)

    def _egg_optimizer(self, kwargs: dict[str, Any]) -> LeaderCloneOptimizer | None:
        return find_leader_clone_optimizer(kwargs.get("optimizer") or self.runner.state.optimizer)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch = _epoch_index(state)
        opt = self._egg_optimizer(kwargs)
        if opt is not None:
            opt.epoch_begin(self._epoch)
        self._fire("on_epoch_begin", args, state, kwargs, epoch=self._epoch)

    def on_step_begin(self, args, state, control, **kwargs):
        self._fire("on_step_begin", args, state, kwargs, sync_step=True)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._fire("on_before_optimizer_step", args, state, kwargs, sync_step=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.runner.state.micro_step += int(getattr(args, "gradient_accumulation_steps", 1) or 1)
        self._fire("on_after_optimizer_step", args, state, kwargs, sync_step=True)
        self._fire("on_step_end", args, state, kwargs)

    def on_epoch_end(self, args, state, control, **kwargs):
        opt = self._egg_optimizer(kwargs)
        if opt is not None:
            opt.epoch_end(self._epoch)
        self._fire("on_epoch_end", args, state, kwargs, epoch=self._epoch, sync_step=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._fire("on_evaluate", args, state, kwargs, metrics=dict(metrics or {}))

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._fire("on_save", args, state, kwargs, checkpoint_dir=folder)
        if not getattr(args, "should_save", state.is_world_process_zero):
            return
        if not os.path.isdir(folder):
            logger.warning("egg_optim: checkpoint folder %s not found; callback state not saved", folder)
            return
        torch.save(self.state_dict(), os.path.join(folder, self.state_file))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not _is_training_log(logs):
            return
        pending = self.pop_logs()
        if not pending:
            return
        logs.update(pending)
        # Trainer.log appended a copy of `logs` to the history before calling us: update that copy too.
        if state.log_history:
            state.log_history[-1].update(pending)

    def on_train_end(self, args, state, control, **kwargs):
        opt = self._egg_optimizer(kwargs)
        if opt is not None:
            opt.train_end()
        self._fire("on_train_end", args, state, kwargs, epoch=self._epoch)


# ---------------------------------------------------------------------------------------------- Trainer
@contextlib.contextmanager
def _random_states_kept():
    """Python's, NumPy's and torch's (CPU and every CUDA device) random states as they were, after the block."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


class EggTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (see :func:`make_egg_trainer`).

    Extra keyword arguments: ``egg`` (an :class:`EggConfig`, default ``EggConfig()``) and ``egg_callbacks``
    (more egg callbacks, run after the configured ones). Attributes: ``egg``, ``egg_callback``,
    ``egg_local_loss`` (the :class:`~egg_optim.lfnn.LeaderFollowerLoss` or ``None``),
    and :attr:`egg_optimizer` (its ``output_cloning`` is the model rewrite with ``clone_mode="output"``).
    """

    def __init__(self, *args: Any, egg: EggConfig | None = None, egg_callbacks: Sequence[Callback] = (), **kwargs):
        egg = EggConfig() if egg is None else egg
        if not isinstance(egg, EggConfig):
            raise ConfigError(f"egg must be an EggConfig, got {type(egg).__name__}")
        super().__init__(*args, **kwargs)
        self.egg = egg
        self.egg_local_loss = build_local_loss(egg, self.model)
        lf = self.egg_local_loss
        if lf is not None:
            egg.validate(
                model_init=getattr(self, "model_init", None) is not None,
                world_size=self.args.world_size,
                local_loss_heads=any(True for _ in lf.parameters()),
            )
            lf.to(self.args.device)
        self._egg_local_sum = 0.0
        self._egg_local_count = 0
        self.egg_callback = EggTrainerCallback.from_config(egg, local_loss=lf)
        for cb in egg_callbacks:
            self.egg_callback.runner.add_callback(cb)
        self.add_callback(self.egg_callback)

    @property
    def egg_optimizer(self) -> LeaderCloneOptimizer | None:
        """The LeaderCloneOptimizer the Trainer steps (``None`` before ``create_optimizer``)."""
        return find_leader_clone_optimizer(getattr(self, "optimizer", None))

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if find_leader_clone_optimizer(self.optimizer) is not None:
            return self.optimizer
        base = super().create_optimizer(model)
        if find_leader_clone_optimizer(base) is not None:
            return base
        lf = self.egg_local_loss
        if lf is not None:
            head_params = [p for p in lf.parameters() if p.requires_grad]
            if head_params:
                base.add_param_group({"params": head_params, "weight_decay": self.args.weight_decay})
        target = self.model if model is None else self.accelerator.unwrap_model(model)
        wrapper = LeaderCloneOptimizer(target, base, config=self.egg)
        self.optimizer = wrapper
        if getattr(self.args, "torch_compile", False) and self.egg_callback.resume_from is None:
            with _random_states_kept():  # a collator may draw (augmentation, masking)
                example = self._egg_example_batch()
            if example is not None:  # a compiled first pass gives the norm coupling no evidence
                wrapper.couple_norms(**example)
        return wrapper

    def _egg_example_batch(self) -> dict[str, Any] | None:
        """The first two training examples, collated (by a copy of the collator) and on the device as a training
        batch would be, columns the model does not take removed, or ``None`` without a dataset. No sampler is drawn
        and no collator's own random state moves."""
        ds = self.train_dataset
        try:
            n = min(2, len(ds))
        except TypeError:  # an iterable dataset: nothing to index
            return None
        if n == 0:
            return None
        if getattr(self.args, "remove_unused_columns", False) and hasattr(ds, "column_names"):
            ds = self._remove_unused_columns(ds, description="egg_optim coupling probe")
        try:  # a copy: a collator may keep its own random generator (augmentation), which must not move
            collate = copy.deepcopy(self.data_collator)
        except Exception:  # not copyable: the global random states are still kept by the caller
            collate = self.data_collator
        return self._prepare_inputs(collate([ds[i] for i in range(n)]))

    # ------------------------------------------------------------------ loss
    def _egg_loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        # mirrors Trainer.training_step: True when the Trainer will NOT divide the loss by the accumulation steps
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        lf = self.egg_local_loss
        if lf is None or not model.training or not torch.is_grad_enabled():
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs.get("labels") if isinstance(inputs, dict) else None
        if labels is None:
            raise ConfigError("EggConfig.local_losses needs class labels in the batch under 'labels'")
        with lf.targets(labels):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        local = lf.local_loss()
        if self._egg_loss_scaled_for_ga(num_items_in_batch):
            local = local / max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        self._egg_local_sum += float(local.detach())
        self._egg_local_count += 1
        loss = loss + local.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logs / resume
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if _is_training_log(logs):
            logs.update(self.egg_callback.pop_logs())
            if self._egg_local_count:
                logs["local_loss"] = self._egg_local_sum / self._egg_local_count
                self._egg_local_sum, self._egg_local_count = 0.0, 0
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        self.egg_callback.resume_from = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        self._egg_model_backup = None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._egg_model_backup = None

    # ------------------------------------------------------------------ all-or-nothing resume
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Check that the checkpoint's optimizer, scheduler and callback files are readable before any weight is
        loaded, and keep a copy of the model's weights until the optimizer has accepted its state."""
        _check_readable(resume_from_checkpoint)
        if not getattr(self, "is_deepspeed_enabled", False):
            self._egg_model_backup = _model_snapshot(self.model)
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except Exception:
            self._egg_restore_model()
            raise

    def _egg_restore_model(self) -> bool:
        backup, self._egg_model_backup = getattr(self, "_egg_model_backup", None), None
        if backup is None:
            return False
        self.model.load_state_dict(backup)
        return True

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Load the optimizer and scheduler states; if either is refused or unreadable, restore the model's
        weights, the optimizer and the scheduler and raise a typed error (nothing of the checkpoint stays)."""
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        opt_before = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None
        sched = getattr(self, "lr_scheduler", None)
        sched_before = copy.deepcopy(sched.state_dict()) if sched is not None else None
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except Exception as exc:
            if opt_before is not None:
                self.optimizer.load_state_dict(opt_before)
            if sched_before is not None:
                sched.load_state_dict(sched_before)
            restored = self._egg_restore_model()
            what = "the model's weights, " if restored else ""
            note = f"; {what}the optimizer and the LR scheduler are as they were before train()"
            if isinstance(exc, EggOptimError):
                raise type(exc)(f"checkpoint {checkpoint}: {exc}{note}") from exc
            if isinstance(exc, _UNREADABLE):
                raise CheckpointError(
                    f"checkpoint {checkpoint}: its optimizer or scheduler state could not be loaded "
                    f"({' '.join(str(exc).split())[:200] or type(exc).__name__}){note}"
                ) from exc
            raise
        self._egg_model_backup = None


_MADE: dict[type, type] = {}


def make_egg_trainer(trainer_cls: type) -> type:
    """A subclass of ``trainer_cls`` (``transformers.Trainer`` or a subclass, e.g. ``Seq2SeqTrainer``) with
    :class:`EggTrainerMixin`; cached per class."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, transformers.Trainer)):
        raise ConfigError(f"make_egg_trainer expects a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, EggTrainerMixin):
        return trainer_cls
    if trainer_cls not in _MADE:
        _MADE[trainer_cls] = type(f"Egg{trainer_cls.__name__}", (EggTrainerMixin, trainer_cls), {})
    return _MADE[trainer_cls]


class EggTrainer(EggTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with leader/clone training; extra argument ``egg=EggConfig(...)``."""


_MADE[transformers.Trainer] = EggTrainer
