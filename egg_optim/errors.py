"""Typed errors. All subclass the builtin a user would catch (ValueError, TypeError or RuntimeError)."""

from __future__ import annotations


class EggOptimError(Exception):
    """Base class of every error raised by egg_optim."""


class PlanError(EggOptimError, ValueError):
    """A role plan cannot be applied to a model (bad fraction, too few units, unknown layer...)."""


class UnsupportedOptimizerError(EggOptimError, TypeError):
    """The base optimizer is not known to update rows independently, so clone masking could not be exact."""


class StateDictMismatchError(EggOptimError, ValueError):
    """A state dict comes from a different model, plan or version; nothing was loaded."""


class ConfigError(EggOptimError, ValueError):
    """An option given to a callback, recipe or local-loss module is invalid."""


class CheckpointError(EggOptimError, RuntimeError):
    """A checkpoint is missing, unreadable, incomplete, corrupt or does not match the run; nothing was changed."""


class ElectionError(EggOptimError, ValueError):
    """An election could not be held (a score gave non-finite or wrongly sized values); roles are unchanged."""


class RewriteCheckError(PlanError):
    """Output mode would compute a block differently from the model it saves (found by the self-check at the
    block's first forward pass, before anything trained). ``block`` names it; the message says why and what to do
    instead (``clone_mode="weight"``, or leave the block out of the plan)."""

    def __init__(self, block: str, message: str) -> None:
        super().__init__(message)
        self.block = block
