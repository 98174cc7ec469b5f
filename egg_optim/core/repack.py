"""Repacking: reorder a block's units so that scattered roles become runs again, without changing the function.

An election ranks the units of a layer wherever they sit, so afterwards its active units are scattered and every
step takes them by gathers and scatter-adds (issue 19 item 2). A transformer block (an MLP's neurons, attention
heads, experts' neurons) computes the same function under any permutation of its units applied to every slice
the block owns at once (producer rows, consumer columns, per-head tables; within each expert for experts): its
units are computed apart (the dataflow probe checks that) and nothing else tells them apart (a block whose clones
cannot be exact, such as BLOOM's ALiBi heads, is not repacked). :func:`packed_order` finds the permutation that
lays out roles as the default first roles are, per part: leaders, in the order the clones take them, then
independents, then clones, so the active units and the clones are each one run and, with the round-robin or
first assignment, the clones' sources a cycle; :func:`permute_` applies it to a tensor's unit positions.

Whether a block may move its units is checked on the model itself, once, before any training
(:func:`orders_that_change_the_model`): with two of its units swapped, the model's output on its dummy inputs (or
the user's example inputs) must not change. That catches what no block shows locally: T5's first block
computes a per-head position bias that every later block reads by head index. Without inputs to run, MLP and
experts blocks move (their neurons reach nothing but their consumer) and attention blocks keep their order. A plain
Linear or convolution is never repacked: the layer that reads its outputs is not known, so its inputs could not be
permuted with them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import axes
from .axes import Axis
from .probe import first_tensor
from .roles import Roles
from .units import ManagedLayer


def packed_order(roles: Roles, parts: int = 1) -> torch.Tensor | None:
    """``order[j]``: the unit that moves to position ``j`` (within each of ``parts`` equal runs), or ``None`` where
    a clone's source lies in another part."""
    split = roles.split(parts) if parts > 1 else [roles]
    if split is None:
        return None
    n = roles.num_units // parts
    orders = []
    for g, r in enumerate(split):
        taken = dict.fromkeys(r.sources.tolist())  # leaders in the order the clones take them
        rest = [u for u in r.leaders.tolist() if u not in taken]
        orders.append(
            torch.tensor([*taken, *rest, *r.independents.tolist(), *r.clones.tolist()], dtype=torch.long) + g * n
        )
    return torch.cat(orders)


def inverse(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``order``: ``inverse(order)[order[j]] == j``."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    return inv


def permuted(roles: Roles, order: torch.Tensor) -> Roles:
    """``roles`` after unit ``order[j]`` moved to position ``j``."""
    inv = inverse(order)
    return Roles.from_codes(roles.codes[order], inv[roles.source_map[order]])


def positions(order: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``order`` on the positions of a tensor whose unit ``u`` owns positions ``index[u]`` (``None``: one each)."""
    if index is None:
        return order
    out = torch.empty(index.numel(), dtype=torch.long)
    out[index.flatten()] = index[order].flatten()
    return out


@torch.no_grad()
def permute_(t: torch.Tensor, dim: Axis, order: torch.Tensor) -> None:
    """Move ``t``'s position ``order[j]`` along ``dim`` to position ``j``, in place (the tensor object is kept:
    parameters stay registered, optimizers and hooks keep their references); only the positions that move are
    read and written."""
    moved = (order != torch.arange(order.numel())).nonzero().flatten()
    if moved.numel():
        axes.copy_(t, dim, moved.to(t.device), axes.select(t, dim, order[moved].to(t.device)))


def move_units_(layer: ManagedLayer, order: torch.Tensor, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
    """Move unit ``order[j]`` of ``layer`` to position ``j`` in every parameter and buffer the layer's units own (or,
    with ``tensors``, in the tensors of those qualified names there: a copy of the model)."""
    for name, t in [*layer.params, *layer.buffers]:
        permute_(t if tensors is None else tensors[name], layer.dim_of(name), positions(order, layer.index.get(name)))


def swap_order(num_units: int, parts: int = 1) -> torch.Tensor:
    """The order that swaps the first and the last unit of the first of ``parts`` equal runs: a unit that moves to
    where another computed, at the cost of moving two."""
    order = torch.arange(num_units)
    last = num_units // parts - 1
    order[0], order[last] = last, 0
    return order


@torch.no_grad()
def orders_that_change_the_model(
    model: nn.Module, layers: Mapping[str, ManagedLayer], call: tuple[tuple, dict] | None
) -> dict[str, str]:
    """``{block: why its units keep their order}`` for the blocks of ``layers`` whose units may not move: with its
    first and last unit swapped (and put back after), the model's first floating-point output on ``call``
    (``(args, kwargs)``, run in eval mode) changed, or, without ``call``, an attention block (nothing to check it
    on). One forward pass per block."""
    blocks = {n: layer for n, layer in layers.items() if layer.group is not None}
    fixed = {n: f"per-unit values outside its slices ({layer.group.inexact})" for n, layer in blocks.items()
             if layer.group.inexact}  # fmt: skip
    blocks = {n: layer for n, layer in blocks.items() if n not in fixed}
    if call is None:
        why = "no inputs to check on that moving its heads keeps the model's output (pass example_inputs)"
        return fixed | {n: why for n, layer in blocks.items() if layer.group.kind == "attention"}
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        try:
            ref = first_tensor(model(*call[0], **call[1]))
        except Exception as exc:  # noqa: BLE001 - inputs the model does not take: nothing is moved
            ref, why = None, f"the model did not run on its example inputs ({type(exc).__name__})"
        else:
            why = "the model returned no floating-point tensor to compare"
        if ref is None:
            return fixed | dict.fromkeys(blocks, why)
        scale = max(float(ref.abs().max()), 1e-3)
        # moving units only reorders the sums over them (float32: ~3e-7 of the output's scale on the tiny models of
        # every family, where BLOOM's ALiBi slopes moved 2.5e-5 and T5's shared position bias 2e-2)
        tol = {torch.float64: 1e-10, torch.float32: 4e-6}.get(ref.dtype, 2e-3)
        for name, layer in blocks.items():
            order = swap_order(layer.num_units, layer.parts)
            move_units_(layer, order)
            try:
                out = first_tensor(model(*call[0], **call[1]))
            finally:
                move_units_(layer, inverse(order))
            gap = float((out.float() - ref.float()).abs().max()) if out is not None else float("inf")
            if not gap <= tol * scale:
                fixed[name] = f"moving its units changes the model's output by {gap:.3g} (largest entry {scale:.3g})"
        return fixed
    finally:
        for m, flag in training.items():
            m.training = flag
