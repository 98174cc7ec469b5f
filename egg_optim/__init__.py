"""egg_optim: leader/clone training (Boiled Egg) and leader-follower local losses around any torch optimizer."""

from .config import EggConfig, add_config_arguments, config_from_args
from .core.election import bully_ranking, elect
from .core.plan import LayerPlan, RolePlan
from .core.roles import Roles
from .core.schedule import Schedule
from .core.scores import ObservedScore, RunningScore, Score, register_score
from .errors import (
    CheckpointError,
    ConfigError,
    EggOptimError,
    ElectionError,
    PlanError,
    RewriteCheckError,
    StateDictMismatchError,
    UnsupportedOptimizerError,
)
from .lfnn import LeaderFollowerLoss
from .optim import (
    SUPPORTED_OPTIMIZERS,
    LeaderCloneOptimizer,
    OptimizerInfo,
    find_leader_clone_optimizer,
    register_optimizer,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EggConfig",
    "EggOptimError",
    "ElectionError",
    "ObservedScore",
    "RunningScore",
    "Schedule",
    "add_config_arguments",
    "config_from_args",
    "LayerPlan",
    "LeaderFollowerLoss",
    "LeaderCloneOptimizer",
    "OptimizerInfo",
    "PlanError",
    "RewriteCheckError",
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
