"""Which base optimizers LeaderCloneOptimizer can wrap exactly."""

from __future__ import annotations

import torch

from ..errors import UnsupportedOptimizerError

# Optimizers whose update of a tensor row depends only on that row's gradient, state and value: for them
# restoring clone rows after the step is exact and leaves the other rows as the bare optimizer would.
SUPPORTED_OPTIMIZERS: set[type[torch.optim.Optimizer]] = {
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.Adadelta,
    torch.optim.ASGD,
    torch.optim.Rprop,
}


def register_optimizer(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """Declare an optimizer class elementwise (each row's update depends only on that row). Usable as a
    decorator. Do not register optimizers with per-tensor norms (LAMB, LARS), factored moments (Adafactor)
    or matrix updates (Shampoo, Muon): clone rows would still be frozen, but other rows would not get the
    bare optimizer's update."""
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UnsupportedOptimizerError(f"register_optimizer expects a torch.optim.Optimizer subclass, got {cls!r}")
    SUPPORTED_OPTIMIZERS.add(cls)
    return cls
