"""When elections and clone events happen: one schedule value for both, by optimizer steps and by epochs.

A :class:`Schedule` is data (``Schedule(steps=100)``, ``Schedule(epochs=1, at_train_end=True)``) with a
compact text form for configs and command lines: ``"never"``, ``"100"`` (every 100 optimizer steps),
``"epoch"`` / ``"epoch:2"`` (every epoch / every second epoch), ``"end"`` (when training ends), joined with
``+`` (``"100+end"``). The optimizer owns its schedules: step triggers fire inside ``step()``, epoch and
train-end triggers when the training loop reports those boundaries (``epoch_begin`` / ``epoch_end`` /
``train_end``; the callback runner and the transformers integration do this for you).

Elections fire at the *start* of an epoch (epoch ``e > 0`` with ``e % epochs == 0``; the initial draw serves
epoch 0), clone events at the *end* of one (``(e + 1) % epochs == 0``), so neither changes the model between
the last step of training and its evaluation unless asked to (``at_train_end``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


def _positive(what: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive int or None, got {value!r}")
    return value


@dataclass(frozen=True)
class Schedule:
    """Every ``steps`` optimizer steps, every ``epochs`` epochs and/or once at the end of training."""

    steps: int | None = None
    epochs: int | None = None
    at_train_end: bool = False

    def __post_init__(self) -> None:
        _positive("Schedule.steps", self.steps)
        _positive("Schedule.epochs", self.epochs)
        if not isinstance(self.at_train_end, bool):
            raise ConfigError(f"Schedule.at_train_end must be a bool, got {self.at_train_end!r}")

    @classmethod
    def parse(cls, spec: Schedule | int | str | None, *, what: str = "schedule") -> Schedule:
        """A schedule from its text form, an int (steps), ``None`` (never) or a :class:`Schedule`."""
        if isinstance(spec, Schedule):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, bool) or not isinstance(spec, (int, str)):
            raise ConfigError(f"{what}: expected a Schedule, an int, a string or None, got {spec!r}")
        if isinstance(spec, int):
            return cls(steps=_positive(what, spec))
        text = spec.strip().lower()
        if text in ("never", "none"):
            return cls()
        steps = epochs = None
        end = False
        for part in text.split("+"):
            part = part.strip()
            try:
                if part == "end":
                    end = True
                elif part == "epoch":
                    epochs = 1
                elif part.startswith("epoch:"):
                    epochs = int(part[len("epoch:") :])
                else:
                    steps = int(part)
                cls(steps=steps, epochs=epochs)
            except (ValueError, ConfigError):
                raise ConfigError(
                    f"{what}: cannot read {spec!r}; use 'never', a positive number of steps ('100'), 'epoch', "
                    "'epoch:N' or 'end', joined with '+' (e.g. '100+end')"
                ) from None
        return cls(steps=steps, epochs=epochs, at_train_end=end)

    def __str__(self) -> str:
        parts = [str(self.steps)] if self.steps else []
        if self.epochs:
            parts.append("epoch" if self.epochs == 1 else f"epoch:{self.epochs}")
        if self.at_train_end:
            parts.append("end")
        return "+".join(parts) or "never"

    @property
    def never(self) -> bool:
        return self.steps is None and self.epochs is None and not self.at_train_end

    def after_step(self, steps: int) -> bool:
        """Due right after optimizer step number ``steps`` (counted from 1)."""
        return self.steps is not None and steps % self.steps == 0

    def at_epoch_begin(self, epoch: int) -> bool:
        """Due when epoch ``epoch`` (counted from 0) starts; never for the first epoch."""
        return self.epochs is not None and epoch > 0 and epoch % self.epochs == 0

    def at_epoch_end(self, epoch: int) -> bool:
        """Due when epoch ``epoch`` (counted from 0) ends."""
        return self.epochs is not None and (epoch + 1) % self.epochs == 0
