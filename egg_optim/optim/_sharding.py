"""FSDP2 support of a :class:`~egg_optim.optim.LeaderCloneOptimizer` (:mod:`egg_optim.core.sharding`):
following the parameters ``fully_shard`` replaces, refusing rewrites of sharded leaves, and recognising the
state-initialising step of distributed checkpointing."""

from __future__ import annotations

import torch
from torch import nn

from ..core import sharding
from ..core.distributed import all_reduce_min
from ..errors import ConfigError, PlanError


class ShardingMixin:
    """Following parameters that ``fully_shard`` replaces after the optimizer was built."""

    def _check_sharding(self) -> bool:
        """Whether managed parameters are sharded (DTensors); refuses placements the core cannot translate."""
        flags = []
        for layer in self.layers.values():
            for pname, p in layer.params:
                sharding.check_placements(pname, p)
                flags.append(sharding.is_sharded(p))
        return any(flags)

    def _slot(self, qname: str) -> tuple[nn.Module, str, bool]:
        """(module, attribute, is a parameter) of a unit-owned tensor, by qualified name (cached)."""
        slot = self._slots.get(qname)
        if slot is None:
            prefix, _, attr = qname.rpartition(".")
            module = self.model.get_submodule(prefix)
            slot = self._slots[qname] = (module, attr, attr in module._parameters)
        return slot

    def _registered(self, qname: str) -> torch.Tensor | None:
        module, attr, is_param = self._slot(qname)
        return (module._parameters if is_param else module._buffers).get(attr)

    def _stale(self) -> bool:
        return any(self._registered(qname) is not t for _, qname, t in self._owned())

    def _sync_params(self) -> None:
        """Follow unit-owned tensors that the model replaced since they were looked up: ``fully_shard`` registers
        new (DTensor) parameters, after this optimizer was built when Accelerate prepares the model, and between a
        forward pass and the backward pass that ends it FSDP2 registers gathered copies. Sharded parameters are
        put back first (:func:`~egg_optim.core.sharding.reshard`: writes to the gathered copies would be lost),
        then the managed layers take the registered tensors, which must be the optimizer's, and with sharded
        parameters the storage becomes ``"full"``. A cheap identity check when nothing changed."""
        if not self._stale():
            return
        sharding.reshard(self.model)
        if not self._stale():
            return
        in_optimizer = {id(p) for g in self.param_groups for p in g["params"]}
        new: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for name, layer in self.layers.items():
            params = []
            for qname, _ in layer.params:
                p = self._registered(qname)
                if p is None or id(p) not in in_optimizer:
                    raise PlanError(sharding.replacement_problem(name, qname, p))
                params.append((qname, p))
            new[name] = params
        old = [p for layer in self.layers.values() for _, p in layer.params]
        kept = {id(p) for params in new.values() for _, p in params}
        if any(self.state.get(p) for p in old if id(p) not in kept):
            raise ConfigError(
                "the model's managed parameters were replaced (fully_shard?) after the optimizer took steps: their "
                "optimizer state belongs to the old tensors; shard the model before the first step"
            )
        for name, layer in self.layers.items():
            layer.params = new[name]
            layer.buffers = [(qname, self._registered(qname)) for qname, _ in layer.buffers]
        self._parked = {p: rows for p, rows in self._parked.items() if id(p) in kept}  # (replaced ones hold none)
        self._sharded = self._check_sharding()
        self._check_unsharded_rewrites()
        self._rebuild_masks()

    def _check_unsharded_rewrites(self) -> None:
        """Refuse class-swapping rewrites of modules that ``fully_shard`` wrapped itself: FSDP2 swaps their class
        too, so neither rewrite could be undone or recognised."""
        modules = dict(self.model.named_modules())
        names: list[str] = []
        if self.output_cloning is not None:
            names += [*self.output_cloning.layers, *self.output_cloning.norms.values()]
        if self.block_output is not None:
            names += [m for g in self.block_output.groups.values() for m in g.modules]
        if self.grad_skip is not None:
            names += list(self.grad_skip.layers)
        for n in names:
            if sharding.is_fsdp_module(modules[n]):
                what = "clone_mode='output'" if self.grad_skip is None else "skip_clone_grads (set it to False)"
                raise ConfigError(
                    f"module {n!r} is itself wrapped by fully_shard, which {what} cannot rewrite: apply fully_shard "
                    "to a module that contains it (a block, the model), e.g. a transformer-layer or no auto-wrap "
                    "policy rather than a size-based one"
                )

    def _is_state_init(self) -> bool:
        """Whether this step is ``torch.distributed.checkpoint``'s optimizer-state initialisation (sharded
        parameters only): a step before any state exists with every learning rate 0 and every gradient zero.
        It runs the base step (which creates the state a checkpoint is loaded into) and nothing else: counting it,
        or holding an election or a clone event, would change what the checkpoint restores."""
        if not self._sharded or self.state:
            return False
        lrs = [g["lr"] for g in self.param_groups if "lr" in g]
        if not lrs or any(float(lr) != 0.0 for lr in lrs):
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        zero = torch.tensor([float(bool(grads) and not any(bool(sharding.local(g).any()) for g in grads))])
        return bool(all_reduce_min(zero, self.process_group))
