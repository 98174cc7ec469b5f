"""Fused ``norm on active channels -> expand to all channels -> every channel's own affine``.

For a layer whose ``A`` computed (active) channels ``x_a`` carry all ``C`` channels through the gather index
``g`` (``x_full[:, c] == x_a[:, g[c]]``), a BatchNorm over the full tensor computes, for every channel ``c``::

    y[:, c] = (x_a[:, g[c]] - mean[g[c]]) * invstd[g[c]] * weight[c] + bias[c]

with batch statistics taken over the active channels only (a clone's statistics equal its source's). This
module computes that without ever materialising ``x_full``:

* :class:`_ExpandNorm` (CPU, float32/float64, when the native kernels in :mod:`._kernel` are available): one
  statistics pass over ``x_a``, one pass writing ``y``; backward: one reduction pass (weight/bias gradients) and
  one pass writing ``grad x_a`` (the gather's backward and the batch-statistics terms folded in).
* :func:`_torch_path` otherwise (GPU, other dtypes, no compiler): batch_norm on ``x_a`` without affine,
  ``index_select``, then the per-channel affine as an eval-mode batch_norm (one native kernel each way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _kernel

# Per-channel affine ``y = x * w + b`` as an eval-mode batch_norm with mean 0 and ``var + eps == 1`` exactly.
AFFINE_EPS = 2.0**-20


class _ExpandNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gather, mean, invstd, batch_stats: bool):
        # x: (N, A, *) contiguous; mean/invstd: (A,) float64 constants (their gradient is handled here)
        C = gather.numel()
        ig = invstd.index_select(0, gather)
        mg = mean.index_select(0, gather)
        s = ig if weight is None else weight.detach().double() * ig
        t = -mg * s if bias is None else bias.detach().double() - mg * s
        out = torch.empty((x.shape[0], C) + tuple(x.shape[2:]), dtype=x.dtype)
        _kernel.run(0, x, out=out, g=gather, s=s, t=t, C=C)
        ctx.save_for_backward(x, weight, gather, mean, invstd)
        ctx.batch_stats = batch_stats
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight, gather, mean, invstd = ctx.saved_tensors
        gy = gy.contiguous()
        C = gather.numel()
        A = x.shape[1]
        M = x.numel() // A if A else 1
        ig = invstd.index_select(0, gather)
        mg = mean.index_select(0, gather)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        w = None if weight is None else weight.detach().double()
        gsum = gdot = None
        if need_w or need_b or (need_x and ctx.batch_stats):
            gsum = torch.empty(C, dtype=torch.float64)  # sum gy_c
            gdot = torch.empty(C, dtype=torch.float64)  # sum gy_c * (x_g(c) - mean_g(c))
            _kernel.run(1, x, gy=gy, g=gather, t=mg, acc1=gsum, acc2=gdot, C=C)
            gdot = gdot * ig  # sum gy_c * xhat_g(c): the weight gradient
        gx = None
        if need_x:
            coef = ig if w is None else w * ig
            if ctx.batch_stats:
                # grad x_a = invstd * (H - mean(H) - xhat * mean(H * xhat)),  H_a = sum_{c->a} w_c gy_c
                wc = torch.ones(C, dtype=torch.float64) if w is None else w
                dsum = torch.zeros(A, dtype=torch.float64).index_add_(0, gather, wc * gsum)
                dxsum = torch.zeros(A, dtype=torch.float64).index_add_(0, gather, wc * gdot)
                p = -invstd * invstd * dxsum / M
                q = -invstd * dsum / M - p * mean
            else:
                p = torch.zeros(A, dtype=torch.float64)
                q = p
            gx = torch.empty_like(x)
            _kernel.run(2, x, gy=gy, out=gx, g=gather, s=coef, p=p, q=q, C=C)
        gw = gdot.to(weight.dtype) if need_w and weight is not None else None
        gb = gsum.to(gy.dtype) if need_b and ctx.has_bias else None
        return gx, gw, gb, None, None, None, None


def _verify_batch_size(x: torch.Tensor) -> None:
    if x.numel() // max(x.shape[1], 1) == 1 and x.shape[1] > 0:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")


def _kernel_ok(x: torch.Tensor, norm) -> bool:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0:
        return False
    for t in (norm.weight, norm.bias):
        if t is not None and (t.dtype != x.dtype or t.device.type != "cpu"):
            return False
    return _kernel.load() is not None


def fused_norm_expand(norm, x: torch.Tensor) -> torch.Tensor:
    """The forward of a fused BatchNorm ``norm`` (a ``_FusedNorm``) on the active-channel tensor ``x``."""
    # momentum / num_batches_tracked exactly as torch.nn.modules.batchnorm._BatchNorm.forward
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    use_batch = norm.training or (norm.running_mean is None and norm.running_var is None)
    running = norm.running_mean is not None and (not norm.training or norm.track_running_stats)
    active = norm._egg_active
    if norm._egg_kernel and _kernel_ok(x, norm):
        return _kernel_path(norm, x, use_batch, running, factor, active)
    return _torch_path(norm, x, use_batch, running, factor, active)


def _kernel_path(norm, x, use_batch, running, factor, active):
    x = x.contiguous()
    gather = norm._egg_gather
    if use_batch:
        _verify_batch_size(x)
        A = x.shape[1]
        mean = torch.empty(A, dtype=torch.float64)
        var = torch.empty(A, dtype=torch.float64)
        _kernel.run(3, x.detach(), acc1=mean, acc2=var)
        if running:
            m = x.numel() // A
            with torch.no_grad():
                rm, rv = norm.running_mean, norm.running_var
                new_m = rm.index_select(0, active).mul_(1 - factor).add_(mean.to(rm.dtype), alpha=factor)
                unbiased = (var * (m / max(m - 1, 1))).to(rv.dtype)
                new_v = rv.index_select(0, active).mul_(1 - factor).add_(unbiased, alpha=factor)
                rm.index_copy_(0, active, new_m)
                rv.index_copy_(0, active, new_v)
    else:
        mean = norm.running_mean.index_select(0, active).double()
        var = norm.running_var.index_select(0, active).double()
    invstd = (var + norm.eps).rsqrt_()
    return _ExpandNorm.apply(x, norm.weight, norm.bias, gather, mean, invstd, use_batch)


def _torch_path(norm, x, use_batch, running, factor, active):
    if running:
        mean = norm.running_mean.index_select(0, active)
        var = norm.running_var.index_select(0, active)
        y = F.batch_norm(x, mean, var, None, None, use_batch, factor, norm.eps)
        if use_batch:
            with torch.no_grad():
                norm.running_mean.index_copy_(0, active, mean)
                norm.running_var.index_copy_(0, active, var)
    else:
        y = F.batch_norm(x, None, None, None, None, use_batch, factor, norm.eps)
    y = y.index_select(1, norm._egg_gather)
    if norm.weight is None:
        return y if norm.bias is None else y + norm.bias.view((1, -1) + (1,) * (y.dim() - 2))
    return F.batch_norm(y, norm._egg_zero, norm._egg_one, norm.weight, norm.bias, False, 0.0, AFFINE_EPS)
