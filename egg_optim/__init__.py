"""egg_optim: leader/clone training (Boiled Egg) and leader-follower local losses around any torch optimizer."""

from .core.election import bully_ranking, elect
from .core.plan import LayerPlan, RolePlan
from .core.roles import Roles
from .core.scores import Score, register_score
from .errors import (
    ConfigError,
    EggOptimError,
    PlanError,
    StateDictMismatchError,
    UnsupportedOptimizerError,
)
from .lfnn import LeaderFollowerLoss
from .optim import SUPPORTED_OPTIMIZERS, LeaderCloneOptimizer, find_leader_clone_optimizer, register_optimizer

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "EggOptimError",
    "LayerPlan",
    "LeaderFollowerLoss",
    "LeaderCloneOptimizer",
    "PlanError",
    "RolePlan",
    "Roles",
    "SUPPORTED_OPTIMIZERS",
    "Score",
    "StateDictMismatchError",
    "UnsupportedOptimizerError",
    "bully_ranking",
    "elect",
    "find_leader_clone_optimizer",
    "register_optimizer",
    "register_score",
]
