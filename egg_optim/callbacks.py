"""Training-loop events for plain PyTorch / Accelerate loops, and the callbacks that drive a
:class:`~egg_optim.optim.LeaderCloneOptimizer` from them.

A loop talks to ONE object, :class:`CallbackRunner`::

    opt = LeaderCloneOptimizer(model, base, "mild", elect_every="epoch", clone_every=50)
    runner = CallbackRunner([RoleLogger()], model=model, optimizer=opt, accelerator=accelerator, scheduler=sched)
    runner.train_begin()
    for epoch in range(epochs):
        runner.epoch_begin()
        for x, y in loader:
            with runner.micro_step():          # enters accelerator.accumulate(model) when there is one
                runner.backward(loss_fn(model(x), y))
            # the optimizer step (and its events) happened at the end of the block on real steps only
        runner.epoch_end()
    runner.train_end()

Elections and clone events follow the optimizer's own schedules (``elect_every``, ``clone_every``): steps are
counted by the optimizer, and the runner reports epoch boundaries and the end of training to it
(``opt.epoch_begin(e)``, ``opt.epoch_end(e)``, ``opt.train_end()``) before the callbacks see those events.

Events (methods of :class:`Callback`, each receives the runner's :class:`TrainState`):

============================  ====================================================================
``on_train_begin``            once, before the first epoch
``on_epoch_begin``            at the start of every epoch
``on_step_begin``             before every micro-batch (``state.sync_step``: it ends in a real step)
``on_before_optimizer_step``  real optimizer steps only: gradients complete, before ``optimizer.step()``
``on_after_optimizer_step``   real optimizer steps only: after the step, ``state.global_step`` counts it
``on_step_end``               after every micro-batch (after the optimizer step on sync micro-batches)
``on_epoch_end``              at the end of every epoch (after any final partial step)
``on_evaluate``               on :meth:`CallbackRunner.evaluate` (``state.metrics``)
``on_save``                   on :meth:`CallbackRunner.save` (``state.checkpoint_dir``)
``on_train_end``              once, at the end
============================  ====================================================================

Gradient accumulation: with an ``Accelerator`` the runner follows ``accelerator.sync_gradients`` exactly (with a
prepared dataloader that includes Accelerate's final partial step at the end of the dataloader). Without one,
``accumulation_steps=k`` steps every ``k`` micro-batches, and a final partial accumulation is stepped at the end
of the epoch (inside the last micro-batch when ``epoch_begin(num_micro_batches=n)`` gave the epoch length,
else in :meth:`CallbackRunner.epoch_end`): 10 micro-batches with ``k=4`` give 3 optimizer steps, as with
Accelerate and the transformers Trainer.

Every callback keeps its own bookkeeping in ``state_dict()`` / ``load_state_dict()`` (Python values and
tensors, loadable with ``torch.load(weights_only=True)``); the runner gathers them (``runner.state_dict()``,
``accelerator.register_for_checkpointing(runner)``, ``runner.save(dir)`` / ``runner.load(dir)``).

This module does not import transformers; see :mod:`egg_optim.integrations.transformers` for the Trainer.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import EggConfig
from .errors import CheckpointError, ConfigError, StateDictMismatchError
from .optim import LeaderCloneOptimizer, find_leader_clone_optimizer

EVENTS = (
    "on_train_begin",
    "on_epoch_begin",
    "on_step_begin",
    "on_before_optimizer_step",
    "on_after_optimizer_step",
    "on_step_end",
    "on_epoch_end",
    "on_evaluate",
    "on_save",
    "on_train_end",
)
STATE_FILE = "egg_callbacks.pt"
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------- helpers
def _positive_int(who: str, name: str, value: Any, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{who}: {name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def role_metrics_for(optimizer: Any, *, per_layer: bool = False, prefix: str = "roles") -> dict[str, float]:
    """:meth:`LeaderCloneOptimizer.role_metrics` of the wrapper inside ``optimizer`` (``{}`` if there is none)."""
    opt = find_leader_clone_optimizer(optimizer)
    return {} if opt is None else opt.role_metrics(prefix=prefix, per_layer=per_layer)


# ---------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """What every event receives. ``global_step`` counts optimizer steps taken (including steps a GradScaler
    skipped, like the transformers Trainer), ``micro_step`` counts micro-batches (forward/backward passes),
    ``epoch_micro_step`` those of the current epoch. ``sync_step`` is true while the current micro-batch ends
    in a real optimizer step. Callbacks write metrics into ``logs``; ``metrics`` holds the last evaluation."""

    model: Any = None
    optimizer: Any = None
    accelerator: Any = None
    scheduler: Any = None
    epoch: int = 0
    global_step: int = 0
    micro_step: int = 0
    epoch_micro_step: int = 0
    accumulation_steps: int = 1
    sync_step: bool = False
    step_skipped: bool = False
    loss: torch.Tensor | None = None
    logs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    is_main_process: bool = True

    @property
    def egg_optimizer(self) -> LeaderCloneOptimizer | None:
        """The :class:`LeaderCloneOptimizer` inside ``optimizer`` (or ``None``)."""
        return find_leader_clone_optimizer(self.optimizer)

    def require_egg_optimizer(self, who: str) -> LeaderCloneOptimizer:
        opt = self.egg_optimizer
        if opt is None:
            raise ConfigError(
                f"{who} needs a LeaderCloneOptimizer; the optimizer is {type(self.optimizer).__name__} "
                "(looked through .optimizer links)"
            )
        return opt


# ---------------------------------------------------------------------------------------------- protocol
class Callback:
    """Base class: every event is a no-op. Override the ones you need; keep any bookkeeping that must
    survive a resume in :meth:`state_dict` (Python values and tensors: loadable with ``weights_only=True``)."""

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_epoch_begin(self, state: TrainState) -> None: ...
    def on_step_begin(self, state: TrainState) -> None: ...
    def on_before_optimizer_step(self, state: TrainState) -> None: ...
    def on_after_optimizer_step(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_evaluate(self, state: TrainState) -> None: ...
    def on_save(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def callbacks_state_dict(callbacks: Sequence[Callback]) -> dict[str, Any]:
    """``{"<index>:<ClassName>": callback.state_dict()}`` for a list of callbacks."""
    return {f"{i}:{type(cb).__name__}": cb.state_dict() for i, cb in enumerate(callbacks)}


def load_callbacks_state_dict(callbacks: Sequence[Callback], state: Mapping[str, Any]) -> None:
    """Inverse of :func:`callbacks_state_dict`; refuses (before loading anything) a state saved for a different
    list of callbacks."""
    expected = [f"{i}:{type(cb).__name__}" for i, cb in enumerate(callbacks)]
    if list(state) != expected:
        raise StateDictMismatchError(f"callback state is for {list(state)}, these callbacks are {expected}")
    for key, cb in zip(expected, callbacks):
        cb.load_state_dict(state[key])


# ---------------------------------------------------------------------------------------------- runner
class CallbackRunner:
    """Fires events on a list of :class:`Callback` from a plain training loop; see the module docstring.

    Args:
        callbacks: called in list order for every event.
        model, optimizer, accelerator, scheduler: put into :class:`TrainState`. The optimizer may be a
            :class:`LeaderCloneOptimizer` or anything wrapping one (``accelerator.prepare``'s result).
            ``scheduler.step()`` is called after each real optimizer step that was not skipped.
        accumulation_steps: micro-batches per optimizer step when there is no accelerator (with one, set
            ``gradient_accumulation_steps`` on the ``Accelerator``).
        flush_partial: without an accelerator, step a final partial accumulation at the end of each epoch
            (default). With ``False`` the leftover gradients are carried into the next epoch.
        zero_grad: call ``optimizer.zero_grad()`` after every real step.
    """

    def __init__(
        self,
        callbacks: Sequence[Callback] = (),
        *,
        model: Any = None,
        optimizer: Any = None,
        accelerator: Any = None,
        scheduler: Any = None,
        accumulation_steps: int | None = None,
        flush_partial: bool = True,
        zero_grad: bool = True,
    ) -> None:
        self.callbacks: list[Callback] = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise ConfigError(f"CallbackRunner: {cb!r} is not an egg_optim.callbacks.Callback")
        _positive_int("CallbackRunner", "accumulation_steps", accumulation_steps)
        if accelerator is not None:
            acc_steps = int(getattr(accelerator, "gradient_accumulation_steps", 1))
            if accumulation_steps not in (None, acc_steps):
                raise ConfigError(
                    f"CallbackRunner: accumulation_steps={accumulation_steps} but the Accelerator accumulates "
                    f"{acc_steps}; set gradient_accumulation_steps on the Accelerator only"
                )
            accumulation_steps = acc_steps
        self.flush_partial = bool(flush_partial)
        self.zero_grad = bool(zero_grad)
        self.state = TrainState(
            model=model,
            optimizer=optimizer,
            accelerator=accelerator,
            scheduler=scheduler,
            accumulation_steps=accumulation_steps or 1,
            is_main_process=bool(getattr(accelerator, "is_main_process", True)),
        )
        self._pending = 0  # micro-batches backpropagated since the last optimizer step
        self._num_micro_batches: int | None = None
        self._in_micro_step = False
        self._stepped = False
        self._next_epoch = 0

    # ------------------------------------------------------------------ low level
    def fire(self, event: str, **updates: Any) -> None:
        """Set ``updates`` on the state, then call ``event`` on every callback (used by framework adapters)."""
        if event not in EVENTS:
            raise ConfigError(f"unknown event {event!r}; events are {EVENTS}")
        for key, value in updates.items():
            setattr(self.state, key, value)
        for cb in self.callbacks:
            getattr(cb, event)(self.state)

    def add_callback(self, callback: Callback) -> None:
        if not isinstance(callback, Callback):
            raise ConfigError(f"{callback!r} is not an egg_optim.callbacks.Callback")
        self.callbacks.append(callback)

    # ------------------------------------------------------------------ loop
    def train_begin(self) -> None:
        self.fire("on_train_begin")

    def epoch_begin(self, epoch: int | None = None, *, num_micro_batches: int | None = None) -> None:
        """Start an epoch (numbered from 0, continuing after a restored state unless ``epoch`` is given).
        ``num_micro_batches``: the epoch's length, so a final partial accumulation is stepped inside the last
        micro-batch rather than in :meth:`epoch_end`."""
        self._num_micro_batches = _positive_int("epoch_begin", "num_micro_batches", num_micro_batches)
        epoch = self._next_epoch if epoch is None else int(epoch)
        opt = self.state.egg_optimizer
        if opt is not None:
            opt.epoch_begin(epoch)
        self.fire("on_epoch_begin", epoch=epoch, epoch_micro_step=0)

    def _is_sync(self) -> bool:
        st = self.state
        if st.accelerator is not None:
            return bool(st.accelerator.sync_gradients)
        if self._pending + 1 >= st.accumulation_steps:
            return True
        return self._num_micro_batches is not None and st.epoch_micro_step + 1 >= self._num_micro_batches

    @contextlib.contextmanager
    def micro_step(self) -> Iterator[TrainState]:
        """Context manager around one micro-batch (forward + :meth:`backward`). With an accelerator it enters
        ``accelerator.accumulate(model)``. At the end of the block, on a real optimizer step, it fires
        ``on_before_optimizer_step``, steps the optimizer (and scheduler), zeroes gradients and fires
        ``on_after_optimizer_step`` -- unless :meth:`optimizer_step` was already called inside the block."""
        if self._in_micro_step:
            raise RuntimeError("micro_step() blocks cannot be nested")
        st = self.state
        acc_ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if st.accelerator is not None:
            if st.model is None:
                raise ConfigError("CallbackRunner: with an accelerator, pass model= (for accelerator.accumulate)")
            acc_ctx = st.accelerator.accumulate(st.model)
        with acc_ctx:
            self._in_micro_step = True
            self._stepped = False
            try:
                self.fire("on_step_begin", sync_step=self._is_sync(), step_skipped=False)
                yield st
                if not self._stepped:
                    self._pending += 1
                    if st.sync_step:
                        self._optimizer_step()
            finally:
                self._in_micro_step = False
            st.micro_step += 1
            st.epoch_micro_step += 1
            self.fire("on_step_end")

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``accelerator.backward(loss)`` or ``(loss / accumulation_steps).backward()``; keeps ``state.loss``."""
        st = self.state
        st.loss = loss.detach()
        if st.accelerator is not None:
            st.accelerator.backward(loss, **kwargs)
        else:
            (loss / st.accumulation_steps if st.accumulation_steps > 1 else loss).backward(**kwargs)

    def optimizer_step(self) -> bool:
        """Inside a :meth:`micro_step` block: take the optimizer step now if this micro-batch is a real step
        (returns whether it stepped); on other micro-batches it does nothing, like Accelerate's optimizer."""
        if not self._in_micro_step:
            raise RuntimeError("optimizer_step() must be called inside a runner.micro_step() block")
        if not self.state.sync_step or self._stepped:
            return False
        self._optimizer_step()
        return True

    def _optimizer_step(self) -> None:
        st = self.state
        self._stepped = True
        self.fire("on_before_optimizer_step", sync_step=True)
        if st.optimizer is not None:
            st.optimizer.step()
        skipped = bool(getattr(st.accelerator, "optimizer_step_was_skipped", False))
        if st.scheduler is not None and not skipped:
            st.scheduler.step()
        if st.optimizer is not None and self.zero_grad:
            st.optimizer.zero_grad(set_to_none=True)
        self._pending = 0
        st.global_step += 1
        self.fire("on_after_optimizer_step", step_skipped=skipped)

    def epoch_end(self) -> None:
        """Step a final partial accumulation (no accelerator, ``flush_partial``), then fire ``on_epoch_end``."""
        st = self.state
        if st.accelerator is None and self.flush_partial and self._pending > 0:
            self._optimizer_step()
        self._next_epoch = st.epoch + 1
        if st.egg_optimizer is not None:
            st.egg_optimizer.epoch_end(st.epoch)
        self.fire("on_epoch_end", sync_step=False)

    def evaluate(self, metrics: Mapping[str, Any] | None = None) -> None:
        self.fire("on_evaluate", metrics=dict(metrics or {}))

    def train_end(self) -> None:
        if self.state.egg_optimizer is not None:
            self.state.egg_optimizer.train_end()
        self.fire("on_train_end")

    def log(self, **values: Any) -> None:
        self.state.logs.update(values)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters and every callback's state; also what
        ``accelerator.register_for_checkpointing(runner)`` saves."""
        st = self.state
        return {
            "version": STATE_VERSION,
            "epoch": st.epoch,
            "next_epoch": self._next_epoch,
            "global_step": st.global_step,
            "micro_step": st.micro_step,
            "callbacks": callbacks_state_dict(self.callbacks),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise StateDictMismatchError(f"runner state version {state.get('version')!r}, expected {STATE_VERSION}")
        load_callbacks_state_dict(self.callbacks, state["callbacks"])
        self.state.epoch = int(state["epoch"])
        self._next_epoch = int(state["next_epoch"])
        self.state.global_step = int(state["global_step"])
        self.state.micro_step = int(state["micro_step"])

    def save(self, directory: str | os.PathLike) -> str:
        """Fire ``on_save`` (``state.checkpoint_dir = directory``) and write :meth:`state_dict` as
        ``egg_callbacks.pt`` there (main process only). Returns the file's path."""
        directory = os.fspath(directory)
        path = os.path.join(directory, STATE_FILE)
        self.fire("on_save", checkpoint_dir=directory)
        if self.state.is_main_process:
            os.makedirs(directory, exist_ok=True)
            torch.save(self.state_dict(), path)
        return path

    def load(self, directory: str | os.PathLike) -> None:
        """Restore what :meth:`save` wrote (loaded with ``weights_only=True``); a missing or unreadable file is a
        :class:`~egg_optim.errors.CheckpointError` and changes nothing."""
        path = os.path.join(os.fspath(directory), STATE_FILE)
        try:
            state = torch.load(path, weights_only=True)
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            raise CheckpointError(
                f"cannot read {path} ({' '.join(str(exc).split())[:200] or type(exc).__name__})"
            ) from exc
        self.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- callbacks
class RoleLogger(Callback):
    """Role metrics (:func:`role_metrics_for`) into ``state.logs`` at train begin, every ``every_steps``
    optimizer steps and at every epoch end; also passed to ``log_fn(metrics, step)`` when given (for example
    ``accelerator.log``). The last metrics are kept in ``self.last``."""

    def __init__(
        self,
        every_steps: int = 1,
        *,
        per_layer: bool = False,
        prefix: str = "roles",
        log_fn: Callable[..., Any] | None = None,
    ) -> None:
        self.every_steps = _positive_int("RoleLogger", "every_steps", every_steps, allow_none=False)
        self.per_layer = bool(per_layer)
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError(f"RoleLogger: prefix must be a non-empty string, got {prefix!r}")
        self.prefix = prefix
        if log_fn is not None and not callable(log_fn):
            raise ConfigError("RoleLogger: log_fn must be callable")
        self.log_fn = log_fn
        self.last: dict[str, float] = {}

    def _log(self, state: TrainState) -> None:
        metrics = role_metrics_for(state.optimizer, per_layer=self.per_layer, prefix=self.prefix)
        self.last = metrics
        state.logs.update(metrics)
        if self.log_fn is not None and metrics:
            self.log_fn(metrics, step=state.global_step)

    def on_train_begin(self, state: TrainState) -> None:
        state.require_egg_optimizer("RoleLogger")
        self._log(state)

    def on_after_optimizer_step(self, state: TrainState) -> None:
        if state.global_step % self.every_steps == 0:
            self._log(state)

    def on_epoch_end(self, state: TrainState) -> None:
        self._log(state)


class LocalLossCallback(Callback):
    """Feed a :class:`~egg_optim.lfnn.LeaderFollowerLoss`'s per-unit scores (minus the loss of each
    unit's worker) into ``optimizer.observe_scores`` before every optimizer step, for ``election="local_loss"``.

    ``kind="last"`` observes the last micro-batch's worker losses (averaged by the optimizer until the next
    election); ``"ema"`` the loss module's running mean. Scores of layers the optimizer does not manage are
    dropped. ``state_dict`` includes the loss module's own state (readout heads, leadership counts, running
    scores), so a checkpoint restores it.
    """

    def __init__(self, local_loss: Any, *, kind: str = "last") -> None:
        if not callable(getattr(local_loss, "unit_scores", None)):
            raise ConfigError(
                f"LocalLossCallback needs a LeaderFollowerLoss (with unit_scores()), got {type(local_loss).__name__}"
            )
        if kind not in ("last", "ema"):
            raise ConfigError(f"LocalLossCallback: kind must be 'last' or 'ema', got {kind!r}")
        self.local_loss = local_loss
        self.kind = kind
        self.observations = 0

    def on_train_begin(self, state: TrainState) -> None:
        opt = state.require_egg_optimizer("LocalLossCallback")
        if not opt.score.observed:
            raise ConfigError(
                f"LocalLossCallback feeds observed scores, which election {opt.score.name!r} does not read; use "
                "election='local_loss'"
            )

    def on_before_optimizer_step(self, state: TrainState) -> None:
        opt = state.require_egg_optimizer("LocalLossCallback")
        scores = {k: v for k, v in self.local_loss.unit_scores(self.kind).items() if k in opt.layers}
        if scores:
            opt.observe_scores(scores)
            self.observations += 1

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"observations": self.observations}
        if callable(getattr(self.local_loss, "state_dict", None)):
            out["module"] = self.local_loss.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.observations = int(state["observations"])
        if "module" in state and callable(getattr(self.local_loss, "load_state_dict", None)):
            self.local_loss.load_state_dict(state["module"])


# ---------------------------------------------------------------------------------------------- from a config
def build_local_loss(config: EggConfig, model: torch.nn.Module) -> Any:
    """The :class:`~egg_optim.lfnn.LeaderFollowerLoss` of ``config.local_losses`` (or ``None``)."""
    if config.local_losses is None:
        return None
    from .lfnn import LeaderFollowerLoss

    return LeaderFollowerLoss(model, **dict(config.local_losses))


def build_callbacks(config: EggConfig, local_loss: Any = None) -> list[Callback]:
    """The callbacks a config asks for, in the order they must run: local-loss scores (fed before the step
    that may hold an election), then role logging. Elections and cloning are the optimizer's own schedules."""
    config.validate(local_loss_given=local_loss is not None)
    cbs: list[Callback] = []
    if local_loss is not None:
        cbs.append(LocalLossCallback(local_loss, kind=config.local_loss_scores))
    if config.log_roles:
        cbs.append(RoleLogger(per_layer=config.log_per_layer))
    return cbs


__all__ = [
    "EVENTS",
    "Callback",
    "CallbackRunner",
    "LocalLossCallback",
    "RoleLogger",
    "TrainState",
    "build_callbacks",
    "build_local_loss",
    "callbacks_state_dict",
    "find_leader_clone_optimizer",
    "load_callbacks_state_dict",
    "role_metrics_for",
]
