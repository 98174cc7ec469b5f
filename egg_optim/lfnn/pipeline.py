"""Block-parallel training of gradient-isolated blocks (block-wise LFNN-l, DGL) across processes.

Block ``k`` lives on rank ``k`` of a ``torch.distributed`` group (gloo on CPU, NCCL on GPUs). Each step, rank
``k`` receives its input activations from rank ``k - 1`` (rank 0 reads the data), sends its output, DETACHED,
to rank ``k + 1``, and updates its block from its own loss. Nothing ever travels backward, so a rank never
waits for a later block: rank ``k`` works on batch ``t`` while rank ``k + 1`` still works on batch ``t - 1``.

Semantics: zero staleness. Block ``k``'s output for batch ``t`` is computed with its parameters after ``t``
updates, exactly as in the one-process block-wise run (``LeaderFollowerLoss(..., blocks=..., mode="lfnn_l")``),
because a block's update depends only on its input and its own loss. The pipelined run is therefore the
one-process run, step for step (``tests/test_lfnn_pipeline.py`` checks equal parameters), as long as nothing
couples blocks: no global gradient clipping, no loss-dependent schedule shared across ranks. At most one send
per rank is in flight (it is waited for before the next one), which bounds the activations held per rank.
Design, checkpoints and resume: ``docs/lfnn_block_parallel.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HEADER = 10  # dtype index, ndim, up to 8 dims


def update_block(
    out: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> torch.Tensor:
    """One block's update from its own loss on its output ``out``: zero the gradients, backward, step; returns
    the detached loss. The pipeline and a one-process run of the same blocks both use it, so they compute the
    same thing."""
    loss = loss_fn(out, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


class PipelineStage:
    """One rank's block of a block-parallel pipeline.

    Args:
        block: this rank's part of the network (for the last rank: the last block and the classifier).
        loss_fn: ``loss_fn(output, targets) -> loss`` of this block: its local loss (e.g. the local terms of
            a :class:`~egg_optim.lfnn.LeaderFollowerLoss` hooked on ``block``) or, on the last rank, the
            global loss. Hook a ``LeaderFollowerLoss`` on the block with ``sync_selection=False``: the block
            lives on this rank alone, so its leaders must not be averaged over the group (that would wait
            for ranks that never run this block).
        optimizer: over this block's parameters (and its aux heads).
        group: the process group (default: the world); rank ``k`` of it runs block ``k``.
    """

    def __init__(
        self,
        block: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("PipelineStage needs torch.distributed initialised (e.g. launched with torchrun)")
        self.block, self.loss_fn, self.optimizer, self.group = block, loss_fn, optimizer, group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.steps = 0
        #: seconds spent waiting for the previous rank's activations (how unbalanced the blocks are)
        self.wait_seconds = 0.0
        self._inflight: list = []  # (work handles, tensors kept alive until sent)

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world_size - 1

    def _peer(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _send(self, t: torch.Tensor) -> None:
        self._wait_sends()  # at most one send in flight per rank
        if t.dtype not in _DTYPES or t.dim() > _HEADER - 2:
            raise ConfigError(f"cannot send a {t.dim()}-D {t.dtype} activation; use float tensors of <= 8 dims")
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
        header[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        dst = self._peer(self.rank + 1)
        if t.is_cuda:
            header = header.to(t.device)
        t = t.contiguous()
        self._inflight = [
            dist.isend(header, dst, group=self.group),
            dist.isend(t, dst, group=self.group),
            header,
            t,
        ]

    def _wait_sends(self) -> None:
        for w in self._inflight[:2]:
            w.wait()
        self._inflight = []

    def _recv(self, device: torch.device) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self._recv_tensor(device)
        finally:
            self.wait_seconds += time.perf_counter() - start

    def _recv_tensor(self, device: torch.device) -> torch.Tensor:
        src = self._peer(self.rank - 1)
        header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
        dist.recv(header, src, group=self.group)
        header = header.cpu()
        dtype, ndim = _DTYPES[int(header[0])], int(header[1])
        t = torch.empty([int(v) for v in header[2 : 2 + ndim]], dtype=dtype, device=device)
        dist.recv(t, src, group=self.group)
        return t

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor) -> float:
        """One training step on one batch: receive (or take ``inputs`` on rank 0), forward, send the detached
        output on, then this block's backward and optimizer step. Returns this block's loss."""
        device = next(self.block.parameters()).device
        if self.first:
            if inputs is None:
                raise ConfigError("rank 0 of the pipeline needs the batch inputs")
            x = inputs.to(device)
        else:
            x = self._recv(device)
        out = self.block(x)
        if not self.last:
            self._send(out.detach())
        loss = update_block(out, targets.to(device), self.loss_fn, self.optimizer)
        self.steps += 1
        return float(loss)

    @torch.no_grad()
    def forward_only(self, inputs: torch.Tensor | None) -> torch.Tensor | None:
        """Evaluation: pass a batch through the pipeline without training; the last rank returns the output."""
        device = next(self.block.parameters()).device
        x = inputs.to(device) if self.first else self._recv(device)
        out = self.block(x)
        if not self.last:
            self._send(out)
            return None
        return out

    def finish(self) -> None:
        """Wait for the last send (call before saving, evaluating on another rank, or shutting down)."""
        self._wait_sends()

    def state_dict(self) -> dict:
        """This rank's shard of a checkpoint: its block, optimizer and step count."""
        self.finish()
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "steps": self.steps,
            "block": self.block.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("rank") != self.rank or state.get("world_size") != self.world_size:
            raise ConfigError(
                f"checkpoint shard of rank {state.get('rank')} / {state.get('world_size')} cannot resume rank "
                f"{self.rank} / {self.world_size}; load the shard saved by the same rank"
            )
        self.block.load_state_dict(state["block"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
