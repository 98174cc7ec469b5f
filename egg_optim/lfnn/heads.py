"""Small readout heads trained by the local losses (they are not part of the user's model)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class WorkerHeads(nn.Module):
    """One independent linear head per worker: ``[N, W, S] -> [N, W, C]`` (``readout="head"``).

    Worker ``w``'s logits depend only on worker ``w``'s units and head ``w``'s weights, so per-worker losses
    stay independent. Initialised like ``nn.Linear(S, C)``."""

    def __init__(self, num_workers: int, worker_size: int, num_classes: int, *, device=None, dtype=None) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(worker_size)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_workers, worker_size, num_classes, **kw).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_workers, num_classes, **kw).uniform_(-bound, bound))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() > 3:  # pool spatial / sequence dimensions first
            z = z.mean(dim=tuple(range(3, z.dim())))
        return torch.einsum("nws,wsc->nwc", z, self.weight) + self.bias


class AuxHead(nn.Module):
    """DGL-style auxiliary classifier for a block worker: adaptive average pool of every spatial dimension
    to ``pool`` (2x2 for images), flatten, then an MLP ``Linear -> ReLU -> Linear`` (``hidden=0``: one
    Linear).
    """

    def __init__(
        self,
        channels: int,
        spatial_dims: int,
        num_classes: int,
        *,
        hidden: int = 256,
        pool: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.spatial_dims, self.pool = spatial_dims, pool
        features = channels * pool**spatial_dims
        kw = {"device": device, "dtype": dtype}
        if hidden:
            self.mlp = nn.Sequential(nn.Linear(features, hidden, **kw), nn.ReLU(), nn.Linear(hidden, num_classes, **kw))
        else:
            self.mlp = nn.Sequential(nn.Linear(features, num_classes, **kw))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() != 2 + self.spatial_dims:
            raise ConfigError(f"AuxHead expected a {2 + self.spatial_dims}-D block output, got {tuple(y.shape)}")
        if self.spatial_dims == 1:
            y = F.adaptive_avg_pool1d(y, self.pool)
        elif self.spatial_dims == 2:
            y = F.adaptive_avg_pool2d(y, self.pool)
        elif self.spatial_dims == 3:
            y = F.adaptive_avg_pool3d(y, self.pool)
        return self.mlp(y.flatten(1))
