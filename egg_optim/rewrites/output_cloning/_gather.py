"""Expanding a layer's active units to all units (``y.index_select(dim, gather)``), on torch's fast kernels."""

from __future__ import annotations

import torch


def expand_units(y: torch.Tensor, dim: int, gather: torch.Tensor) -> torch.Tensor:
    """``y.index_select(dim, gather)``, with the last dim of a >2-D contiguous tensor gathered through a 2-D view.

    torch's CPU ``index_select`` takes a generic element-wise path for the last dim of a tensor with more than two
    dims: expanding a Linear's (16, 128, 128) output to 256 units took 8.5 ms against 0.6 ms for the same data
    viewed as (2048, 128), and 68 ms against 5.7 ms at 512 -> 1024 units (1 thread). On [batch, tokens, features]
    activations that cost more than the matmul work output cloning saves. The view changes no values; its
    backward is the 2-D ``index_add_``.
    """
    if y.dim() > 2 and dim in (-1, y.dim() - 1) and y.is_contiguous():
        flat = y.view(-1, y.shape[-1]).index_select(1, gather)
        return flat.view(y.shape[:-1] + (gather.numel(),))
    return y.index_select(dim, gather)
