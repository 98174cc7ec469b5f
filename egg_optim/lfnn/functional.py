"""Functional core of the leader-follower local losses (LFNN, Eqs. 1 and 2 of the seed paper).

Everything here works on plain tensors, with no modules or hooks, so it can be tested and reused alone.

Layout: a hidden layer's output is viewed as ``[N, W, S, *rest]``: ``N`` samples, ``W`` workers of ``S``
consecutive units each, and optional trailing spatial / sequence dimensions ``rest``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

READOUTS = ("direct", "gap")
REDUCTIONS = ("sum", "mean")
#: how a follower's values are compared with the best leader's (see :func:`follower_alignment_loss`)
FOLLOWER_TARGETS = ("raw", "probs", "centred")


def num_leaders(num_workers: int, delta: float) -> int:
    """How many of ``num_workers`` workers lead: ``delta * num_workers`` rounded half up, at least 1.

    Rounding (not ceil) follows the seed paper ("20 % of 32 workers: approximately 6 leaders") and the
    Boiled Egg code (``round(p * n)``); exact halves round up so the count never depends on banker's rounding.
    """
    check_delta(delta)
    if num_workers < 1:
        raise ConfigError(f"need at least one worker, got {num_workers}")
    k = math.floor(round(delta * num_workers, 9) + 0.5)
    return max(1, min(num_workers, k))


def check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0.0 < float(delta) <= 1.0):
        raise ConfigError(f"delta (leader fraction) must be a number in (0, 1], got {delta!r}")


@dataclass(frozen=True)
class Selection:
    """Leaders and followers of one layer for one step.

    ``leaders`` and ``followers`` are LongTensors ordered by increasing loss (ties: lower index first), so
    ``leaders[0] == best``. ``mask`` is a float ``[W]`` tensor, 1 for leaders and 0 for followers.
    All live on the device of the losses; building them needs no host synchronisation.
    """

    leaders: torch.Tensor
    followers: torch.Tensor
    best: torch.Tensor
    mask: torch.Tensor


def select_leaders(losses: torch.Tensor, delta: float) -> Selection:
    """Top-``delta`` workers with the LOWEST loss lead (count: :func:`num_leaders`); the best leader is the
    argmin (ties: lowest index). ``losses`` is ``[W]`` and is not differentiated through."""
    if losses.dim() != 1 or losses.numel() == 0:
        raise ConfigError(f"select_leaders expects a non-empty 1-D tensor of worker losses, got {tuple(losses.shape)}")
    k = num_leaders(losses.numel(), delta)
    order = torch.sort(losses.detach(), stable=True).indices
    leaders, followers = order[:k], order[k:]
    mask = torch.zeros(
        losses.numel(),
        dtype=losses.dtype if losses.is_floating_point() else torch.float32,
        device=losses.device,
    )
    mask[leaders] = 1.0
    return Selection(leaders=leaders, followers=followers, best=order[0], mask=mask)


def split_workers(y: torch.Tensor, worker_size: int, unit_dim: int) -> torch.Tensor:
    """View a layer output with units on ``unit_dim`` as ``[N, W, S, *rest]`` (worker ``w`` = units
    ``w*S .. w*S+S-1``). For ``nn.Linear`` use ``unit_dim=-1``, for convolutions ``unit_dim=1``."""
    z = y.movedim(unit_dim, 1)
    units = z.shape[1]
    if units % worker_size:
        raise ConfigError(f"worker_size {worker_size} does not divide the {units} units of the output")
    return z.reshape(z.shape[0], units // worker_size, worker_size, *z.shape[2:])


def readout_logits(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    readout: str | Callable[[torch.Tensor], torch.Tensor] = "direct",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores ``[N', W, C]`` and matching targets ``[N']`` from worker outputs ``[N, W, S, *rest]``.

    - ``"direct"``: the worker's ``S`` units are the class logits (``S == num_classes``). With trailing
      dimensions the targets must have shape ``[N, *rest]`` (one label per position), else use ``"gap"``.
    - ``"gap"``: global average pool over ``rest`` first (convolutions), targets ``[N]``.
    - a callable maps ``outputs`` to ``[N, W, C]`` (a per-worker head), targets ``[N]``.
    """
    if callable(readout):
        return readout(outputs), targets
    rest = outputs.dim() - 3
    if readout == "gap":
        logits = outputs.mean(dim=tuple(range(3, outputs.dim()))) if rest else outputs
        return logits, targets
    if readout == "direct":
        if rest == 0:
            return outputs, targets
        if targets.shape != (outputs.shape[0], *outputs.shape[3:]):
            raise ConfigError(
                f"readout='direct' on an output with extra dimensions {tuple(outputs.shape[3:])} needs one "
                f"target per position (shape {(outputs.shape[0], *outputs.shape[3:])}), got "
                f"{tuple(targets.shape)}; use readout='gap' to pool them"
            )
        # [N, W, S, *rest] -> [N * prod(rest), W, S]
        n, w, s = outputs.shape[:3]
        logits = outputs.reshape(n, w, s, -1).permute(0, 3, 1, 2).reshape(-1, w, s)
        return logits, targets.reshape(-1)
    raise ConfigError(f"unknown readout {readout!r}; choose one of {READOUTS} or pass a callable")


def per_worker_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of each worker's ``[N, W, C]`` logits against ``targets [N]``, averaged over the
    (non-ignored) samples: ``[W]``. Each worker's loss depends on its own logits only."""
    if logits.dim() != 3:
        raise ConfigError(f"expected logits of shape [N, W, C], got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ConfigError(f"targets of shape {tuple(targets.shape)} do not match {logits.shape[0]} samples")
    if targets.is_floating_point() or targets.is_complex():
        raise ConfigError(f"classification targets must be integer class indices, got dtype {targets.dtype}")
    n, w, _ = logits.shape
    ce = F.cross_entropy(
        logits.transpose(1, 2), targets.unsqueeze(1).expand(n, w), reduction="none", ignore_index=ignore_index
    )  # [N, W]
    valid = (targets != ignore_index).to(ce.dtype)
    return (ce * valid.unsqueeze(1)).sum(0) / valid.sum().clamp_min(1.0)


def worker_losses(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    readout: str | Callable[[torch.Tensor], torch.Tensor] = "direct",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Local prediction loss of every worker, ``[W]``, from worker outputs ``[N, W, S, *rest]`` (see
    :func:`readout_logits`). Differentiable: worker ``w``'s loss reaches only worker ``w``'s outputs."""
    if outputs.dim() < 3:
        raise ConfigError(f"expected worker outputs of shape [N, W, S, ...], got {tuple(outputs.shape)}")
    logits, tgt = readout_logits(outputs, targets, readout)
    return per_worker_cross_entropy(logits, tgt, ignore_index)


def reduce_workers(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean() if values.numel() else values.sum()
    raise ConfigError(f"unknown worker reduction {reduction!r}; choose one of {REDUCTIONS}")


def leader_loss(losses: torch.Tensor, leaders: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``L_l^delta``: the leaders' own prediction losses, summed (default) or averaged over leaders."""
    return reduce_workers(losses.index_select(0, leaders), reduction)


def follower_alignment_loss(
    outputs: torch.Tensor,
    followers: torch.Tensor,
    best: torch.Tensor | int,
    reduction: str = "sum",
    target: str = "raw",
) -> torch.Tensor:
    """``L_l^{bar delta}``: per follower, MSE between its values and the best leader's (a constant:
    detached), averaged over samples and the worker's elements; then summed (default) or averaged over
    followers. ``outputs`` is ``[N, W, ...]`` (raw unit outputs, or readout logits ``[N, W, C]``).

    ``target`` says what is compared (the transform is applied to follower and leader alike):

    - ``"raw"``: the values as given (the paper's Eq. 1/2). Unbounded, and not shift-invariant while the
      workers' own cross-entropy is: a best leader whose logits all drifted negative pulls every follower
      negative, and the ReLU after the layer then outputs zeros (the Fashion-MNIST collapses of the study).
    - ``"probs"``: softmax over dim 2 (the class dimension of logits) first: bounded in ``[0, 1]`` and
      blind to a shift of a worker's logits, so it can neither spike nor push outputs below zero.
    - ``"centred"``: subtract the mean over dim 2 first: shift-invariant but unbounded.

    Only follower outputs receive gradient; with no followers the loss is an exact zero."""
    if target not in FOLLOWER_TARGETS:
        raise ConfigError(f"unknown follower target {target!r}; choose one of {FOLLOWER_TARGETS}")
    if target != "raw" and outputs.dim() < 3:
        raise ConfigError(f"follower target {target!r} needs logits of shape [N, W, C], got {tuple(outputs.shape)}")
    if followers.numel() == 0:
        return (outputs.sum() * 0.0) if outputs.requires_grad else outputs.new_zeros(())
    if target == "probs":
        outputs = outputs.softmax(dim=2, dtype=torch.promote_types(outputs.dtype, torch.float32))
    elif target == "centred":
        outputs = outputs - outputs.mean(dim=2, keepdim=True)
    best_t = torch.as_tensor(best, device=outputs.device).reshape(1)
    ref = outputs.index_select(1, best_t).detach()
    f = outputs.index_select(1, followers)
    per = (f - ref).pow(2).movedim(1, 0).reshape(followers.numel(), -1).mean(dim=1)
    return reduce_workers(per, reduction)
