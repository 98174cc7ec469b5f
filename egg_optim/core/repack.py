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
experts blocks move (their neurons reach nothing but their consumer) and attention blocks keep their order.

A plain Linear or convolution (a CNN's layers) owns only its rows: its units' other slices lie in the modules after
it, found by :func:`plain_followers` in registration order (the per-unit norm after it, the input columns of the
next Linear or convolution, ``k`` per unit after a flatten) and moved with them when the same check finds that the
model's output does not change; without inputs to check on, it keeps its order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from . import axes
from .axes import Axis
from .probe import checking_pass, first_tensor
from .roles import Roles
from .units import MANAGED_TYPES, ManagedLayer, norm_units


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


@dataclass(frozen=True)
class Follower:
    """A tensor after a plain layer whose positions along ``dim`` belong to the layer's units, ``k`` each, unit by
    unit (a Linear reading a flattened feature map has ``h * w`` columns per channel): a norm's entries, the input
    columns of the layer that reads it."""

    name: str  # qualified name of a parameter or buffer of the model
    dim: int
    k: int = 1

    def moves(self, order: torch.Tensor) -> torch.Tensor:
        """``order`` on this tensor's positions."""
        return positions(order, None if self.k == 1 else torch.arange(order.numel() * self.k).view(-1, self.k))


def plain_followers(model: nn.Module, layers: Mapping[str, ManagedLayer]) -> tuple[dict[str, list[Follower]], dict]:
    """``(followers, why)``: for each plain layer (a Linear or convolution, not a block), the tensors registered after
    it that its units would take along (the per-unit norm before the next Linear or convolution, and that layer's
    input columns when it takes the layer's ``n`` outputs, or ``n * k``: a flatten), or why there are none. A guess
    from registration order that :func:`orders_that_change_the_model` checks on the model."""
    named = list(model.named_modules())
    where = {name: i for i, (name, _) in enumerate(named)}
    followers: dict[str, list[Follower]] = {}
    why: dict[str, str] = {}
    for lname, layer in layers.items():
        if layer.group is not None or lname not in where:
            continue
        n, found = layer.num_units, []
        for mname, m in named[where[lname] + 1 :]:
            if isinstance(m, MANAGED_TYPES):
                width = m.in_features if isinstance(m, nn.Linear) else m.in_channels * (m.groups == 1)
                if width and width % n == 0 and (width == n or isinstance(m, nn.Linear)):
                    followers[lname] = [*found, Follower(f"{mname}.weight", 1, width // n)]
                else:
                    why[lname] = f"the next Linear or convolution, {mname!r}, does not read its {n} outputs"
                break
            if not found and norm_units(m) == n:
                tensors = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
                found = [Follower(f"{mname}.{t}", 0) for t, v in tensors if v.dim() == 1 and v.numel() == n]
        else:
            why[lname] = "no Linear or convolution after it reads its outputs"
    claimed: dict[str, str] = {}
    for lname, fs in list(followers.items()):  # a tensor two layers would move is theirs to keep
        for f in fs:
            other = claimed.setdefault(f.name, lname)
            if other != lname:
                for name in (lname, other):
                    followers.pop(name, None)
                    why[name] = f"{f.name!r} follows the units of both {other!r} and {lname!r}"
    return followers, why


def move_units_(
    layer: ManagedLayer,
    order: torch.Tensor,
    tensors: Mapping[str, torch.Tensor] | None = None,
    followers: Iterable[tuple[Follower, torch.Tensor]] = (),
) -> None:
    """Move unit ``order[j]`` of ``layer`` to position ``j`` in every parameter and buffer the layer's units own (or,
    with ``tensors``, in the tensors of those qualified names there: a copy of the model), and in ``followers``
    (each with its tensor: :func:`resolve`)."""
    for name, t in [*layer.params, *layer.buffers]:
        permute_(t if tensors is None else tensors[name], layer.dim_of(name), positions(order, layer.index.get(name)))
    for f, t in followers:
        permute_(t, f.dim, f.moves(order))


def resolve(
    layer: ManagedLayer, followers: Iterable[Follower], tensors: Mapping[str, torch.Tensor]
) -> list[tuple[Follower, torch.Tensor]] | None:
    """``[(follower, its tensor in tensors)]`` for the followers ``layer`` does not own (a norm coupled to it since
    is its own), or ``None`` where one is missing: the model changed, and its units may no longer move."""
    mine = {name for name, _ in [*layer.params, *layer.buffers]}
    out = [(f, tensors.get(f.name)) for f in followers if f.name not in mine]
    return None if any(t is None for _, t in out) else out


def swap_order(num_units: int, parts: int = 1) -> torch.Tensor:
    """The order that swaps the first and the last unit of the first of ``parts`` equal runs: a unit that moves to
    where another computed, at the cost of moving two."""
    order = torch.arange(num_units)
    last = num_units // parts - 1
    order[0], order[last] = last, 0
    return order


@torch.no_grad()
def orders_that_change_the_model(
    model: nn.Module,
    layers: Mapping[str, ManagedLayer],
    call: tuple[tuple, dict] | None,
    followers: Mapping[str, list[Follower]] | None = None,
) -> dict[str, str]:
    """``{layer: why its units keep their order}`` for the blocks of ``layers`` and the plain layers with
    ``followers`` (:func:`plain_followers`) whose units may not move: with its first and last unit swapped (and put
    back after), the model's first floating-point output on ``call`` (``(args, kwargs)``, run in eval mode)
    changed, or, without ``call``, an attention block or a plain layer (nothing to check it on).

    Checked by groups: every block's units are swapped at once and the model run once, then every plain layer's; a
    group whose output changed is halved (where its first half does not change it, its second half does: split
    without a pass), down to single layers, each refused only on a pass of its own. So a model whose layers all
    may move costs three forward passes (the reference, its blocks, its plain layers), where a pass per layer costs
    as many as it has layers (a vision-language model's towers: tens); where most layers checked alone are refused,
    the rest are checked one by one."""
    followers = followers or {}
    blocks = {n: layer for n, layer in layers.items() if layer.group is not None or n in followers}
    fixed = {n: f"per-unit values outside its slices ({layer.group.inexact})" for n, layer in blocks.items()
             if layer.group is not None and layer.group.inexact}  # fmt: skip
    blocks = {n: layer for n, layer in blocks.items() if n not in fixed}
    if call is None:
        why = "no inputs to check on that moving its units keeps the model's output (pass example_inputs)"
        return fixed | {n: why for n, layer in blocks.items() if layer.group is None or layer.group.kind == "attention"}
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with checking_pass(model):  # eval; its flags and the state a forward pass keeps (rope_deltas) put back after
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
        moves = {
            name: (swap_order(layer.num_units, layer.parts), resolve(layer, followers.get(name, ()), tensors) or [])
            for name, layer in blocks.items()
        }

        def gap(names: list[str]) -> float:
            """The largest change of the output with the units of ``names`` swapped (put back after, in reverse)."""
            done: list[str] = []
            try:
                for name in names:
                    move_units_(blocks[name], moves[name][0], followers=moves[name][1])
                    done.append(name)
                out = first_tensor(model(*call[0], **call[1]))
            finally:
                for name in reversed(done):
                    move_units_(blocks[name], inverse(moves[name][0]), followers=moves[name][1])
            return float((out.float() - ref.float()).abs().max()) if out is not None else float("inf")

        alone = [0, 0]  # layers checked alone, and refused

        def refuse(name: str, moved: float) -> None:
            fixed[name] = f"moving its units changes the model's output by {moved:.3g} (largest entry {scale:.3g})"
            alone[1] += 1

        # (layers, known to change the output): transformer blocks and plain layers apart, the plain ones more often
        # refused (one whose output reaches a residual sum; a patch embedding before its position embeddings)
        groups = [[n for n, layer in blocks.items() if (layer.group is None) == plain] for plain in (False, True)]
        todo: list[tuple[list[str], bool]] = [(names, False) for names in groups if names]
        while todo:
            names, changes = todo.pop()
            if not changes or len(names) == 1:
                moved = gap(names)
                alone[0] += len(names) == 1
                if moved <= tol * scale:
                    continue
                if len(names) == 1:
                    refuse(names[0], moved)
                    continue
            if alone[0] >= 4 and 2 * alone[1] > alone[0]:  # most layers refused so far: each alone costs less
                todo += [([n], False) for n in reversed(names)]
                continue
            first, second = names[: len(names) // 2], names[len(names) // 2 :]
            moved = gap(first)
            alone[0] += len(first) == 1
            if moved <= tol * scale:
                todo.append((second, True))  # the change is in the second half
            elif len(first) == 1:
                refuse(first[0], moved)
                todo.append((second, False))
            else:
                todo += [(second, False), (first, True)]
        return {n: fixed[n] for n in layers if n in fixed}
