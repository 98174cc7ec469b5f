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


class AuxWorkerHeads(nn.Module):
    """DGL-style auxiliary heads, one per worker of a block: ``[N, W, S, *spatial] -> [N, W, C]``.

    Each worker's ``S`` channels are average-pooled to ``pool`` per spatial dimension (2x2 for images),
    flattened, then go through the worker's own MLP ``Linear -> ReLU -> Linear`` (``hidden=0``: one Linear),
    computed for all workers at once. Worker ``w``'s logits depend only on its own channels and head, so the
    per-worker losses stay independent (the block body below them is shared)."""

    def __init__(
        self,
        num_workers: int,
        worker_size: int,
        spatial_dims: int,
        num_classes: int,
        *,
        hidden: int = 256,
        pool: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ConfigError(f"AuxWorkerHeads needs 1-3 spatial dimensions, got {spatial_dims}")
        self.spatial_dims, self.pool = spatial_dims, pool
        features = worker_size * pool**spatial_dims
        kw = {"device": device, "dtype": dtype}
        dims = [features, hidden, num_classes] if hidden else [features, num_classes]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation, per worker
            self.weights.append(nn.Parameter(torch.empty(num_workers, fan_in, fan_out, **kw).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_workers, fan_out, **kw).uniform_(-bound, bound)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 3 + self.spatial_dims:
            raise ConfigError(f"AuxWorkerHeads expected [N, W, S, *{self.spatial_dims} dims], got {tuple(z.shape)}")
        n, w, s = z.shape[:3]
        flat = z.reshape(n, w * s, *z.shape[3:])
        pooled = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[self.spatial_dims - 1](
            flat, self.pool
        )
        h = pooled.reshape(n, w, -1)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if i:
                h = F.relu(h)
            h = torch.einsum("nwf,wfo->nwo", h, weight) + bias
        return h
