"""Leader-follower neural networks with local error signals (LFNN, LFNN-l) as a loss for any model.

- :class:`LeaderFollowerLoss`: hooks a model's hidden layers (or blocks), picks leader workers every step and
  returns ONE loss tensor (Eq. 1 or Eq. 2 of the seed paper) to backward once.
- functional core: :func:`worker_losses`, :func:`select_leaders`, :func:`follower_alignment_loss`, ...
- :class:`PipelineStage`: block-parallel training of gradient-isolated blocks, block k on rank k.
"""

from .functional import (
    Selection,
    follower_alignment_loss,
    leader_loss,
    num_leaders,
    per_worker_cross_entropy,
    readout_logits,
    select_leaders,
    split_workers,
    worker_losses,
)
from .heads import AuxHead, AuxWorkerHeads, WorkerHeads
from .module import LeaderFollowerLoss
from .pipeline import PipelineStage

__all__ = [
    "AuxHead",
    "AuxWorkerHeads",
    "LeaderFollowerLoss",
    "PipelineStage",
    "Selection",
    "WorkerHeads",
    "follower_alignment_loss",
    "leader_loss",
    "num_leaders",
    "per_worker_cross_entropy",
    "readout_logits",
    "select_leaders",
    "split_workers",
    "worker_losses",
]
