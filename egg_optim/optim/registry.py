"""Which base optimizers LeaderCloneOptimizer can wrap exactly, and what it must know about each.

Leaving clone units out of a base step is exact only for *elementwise* optimizers: a unit's update depends
only on that unit's gradient, state and value. For each such class an :class:`OptimizerInfo` record (like
timm's ``OptimInfo``) says what a state entry holds before the first step (``fresh``: what a unit that
becomes trainable starts from under ``clone_state="reset"`` or compact storage) and which entries are per
unit (``unit_state``; by default every state tensor shaped like its parameter).

Do not register optimizers with per-tensor norms (LAMB, LARS), factored moments (Adafactor) or matrix updates
(Shampoo, Muon): clones would still be frozen, but the other units would not get the bare optimizer's update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from ..errors import UnsupportedOptimizerError


@dataclass(frozen=True)
class OptimizerInfo:
    """What the wrapper needs to know about an elementwise optimizer class.

    Args:
        cls: the optimizer class.
        fresh: ``{state key: value}`` for state whose value before any step is not zero: a number, or the
            name of the param-group option that holds it (Adagrad's ``sum`` starts at
            ``initial_accumulator_value``, Rprop's ``step_size`` at ``lr``).
        unit_state: names of the per-unit state entries; ``None``: every state tensor shaped like its
            parameter (right for every torch optimizer).
    """

    cls: type[torch.optim.Optimizer]
    fresh: Mapping[str, float | str] = field(default_factory=dict)
    unit_state: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.cls, type) and issubclass(self.cls, torch.optim.Optimizer)):
            raise UnsupportedOptimizerError(
                f"OptimizerInfo.cls must be a torch.optim.Optimizer subclass, got {self.cls!r}"
            )
        fresh = dict(self.fresh)
        for key, value in fresh.items():
            ok = isinstance(value, str) or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            )
            if not (isinstance(key, str) and ok):
                raise UnsupportedOptimizerError(
                    f"OptimizerInfo.fresh[{key!r}] must be a finite number or a param-group option name, got {value!r}"
                )
        object.__setattr__(self, "fresh", MappingProxyType(fresh))
        if self.unit_state is not None:
            object.__setattr__(self, "unit_state", tuple(str(k) for k in self.unit_state))

    def fresh_value(self, key: str, group: Mapping[str, Any]) -> float:
        """The value state entry ``key`` holds before any step, in a parameter of ``group``."""
        value = self.fresh.get(key, 0.0)
        return float(group.get(value, 0.0)) if isinstance(value, str) else float(value)

    def is_unit_state(self, key: str, value: Any, param: torch.Tensor) -> bool:
        """Whether state entry ``key`` of ``param`` holds one slice per unit (full size)."""
        if self.unit_state is not None and key not in self.unit_state:
            return False
        return torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape


SUPPORTED_OPTIMIZERS: dict[type[torch.optim.Optimizer], OptimizerInfo] = {
    info.cls: info
    for info in (
        OptimizerInfo(torch.optim.SGD),
        OptimizerInfo(torch.optim.Adam),
        OptimizerInfo(torch.optim.AdamW),
        OptimizerInfo(torch.optim.RMSprop),
        OptimizerInfo(torch.optim.Adagrad, fresh={"sum": "initial_accumulator_value"}),
        OptimizerInfo(torch.optim.NAdam),
        OptimizerInfo(torch.optim.RAdam),
        OptimizerInfo(torch.optim.Adamax),
        OptimizerInfo(torch.optim.Adadelta),
        OptimizerInfo(torch.optim.ASGD),
        OptimizerInfo(torch.optim.Rprop, fresh={"step_size": "lr"}),
    )
}


def register_optimizer(
    cls: type[torch.optim.Optimizer] | None = None,
    *,
    fresh: Mapping[str, float | str] | None = None,
    unit_state: tuple[str, ...] | None = None,
    overwrite: bool = False,
):
    """Declare an optimizer class elementwise (see :class:`OptimizerInfo` for ``fresh`` and ``unit_state``).

    Usable as ``register_optimizer(MyOpt)``, ``@register_optimizer`` or
    ``@register_optimizer(fresh={"acc": "initial_acc"})``. Returns the class.
    """

    def register(c: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
        info = OptimizerInfo(c, fresh or {}, unit_state)
        if c in SUPPORTED_OPTIMIZERS and not overwrite and SUPPORTED_OPTIMIZERS[c] != info:
            raise UnsupportedOptimizerError(
                f"{c.__name__} is already registered with {SUPPORTED_OPTIMIZERS[c]}; pass overwrite=True"
            )
        SUPPORTED_OPTIMIZERS[c] = info
        return c

    if cls is None:
        return register
    if not isinstance(cls, type):
        raise UnsupportedOptimizerError(f"register_optimizer expects a torch.optim.Optimizer subclass, got {cls!r}")
    return register(cls)


def optimizer_info(optimizer: torch.optim.Optimizer) -> OptimizerInfo:
    """The record for ``optimizer``'s exact class; refuses unregistered classes (subclasses may change the
    update, so they are not assumed elementwise)."""
    info = SUPPORTED_OPTIMIZERS.get(type(optimizer))
    if info is None:
        raise UnsupportedOptimizerError(
            f"{type(optimizer).__name__} is not known to update units independently, so leaving clones out of its "
            f"step could not be exact. Supported: {sorted(c.__name__ for c in SUPPORTED_OPTIMIZERS)}. If it is "
            "elementwise, declare it with egg_optim.register_optimizer(cls)."
        )
    return info
