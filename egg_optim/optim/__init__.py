"""The optimizer wrapper and the registry of base optimizers it can wrap exactly."""

from .leader_clone import LeaderCloneOptimizer, find_leader_clone_optimizer
from .registry import SUPPORTED_OPTIMIZERS, OptimizerInfo, optimizer_info, register_optimizer

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "LeaderCloneOptimizer",
    "OptimizerInfo",
    "find_leader_clone_optimizer",
    "optimizer_info",
    "register_optimizer",
]
