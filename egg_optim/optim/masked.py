"""The masked optimizer: the base optimizer's exact step with clone units held fixed, and its full-size state dict.

It knows nothing of elections, schedules or rewrites. The role controller tells it, whenever roles change, which
parameter slices are clones (:class:`~egg_optim.core.compact.UnitParam` records), and it

* steps the base optimizer with clones left out of the step (compact storage, :mod:`egg_optim.core.compact`:
  clones hold no state and cost no arithmetic) or restored after it (full storage, :mod:`egg_optim.core.masking`;
  always for parameters sharded by FSDP2, masked on each rank's own slice);
* moves compact state when roles change (a unit that becomes active gets its parked, its source's or fresh
  slices, by the clone-state policy);
* writes and reads the base optimizer's state dict at full size whatever the storage, so it loads into either
  storage and into a bare optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..core import axes, compact, masking, sharding
from ..core.distributed import all_reduce_min
from ..core.roles import Roles
from ..errors import StateDictMismatchError
from .registry import OptimizerInfo

# (parameter, layer name, the roles of its positions, unit dim) for every managed parameter the optimizer holds
Managed = Iterable[tuple[torch.Tensor, str, Roles, int]]


class MaskedOptimizer:
    """Exact masked steps of ``optimizer`` (an elementwise optimizer described by ``info``).

    Args:
        optimizer: the base optimizer; its ``param_groups`` and ``state`` are used in place.
        info: its :class:`~egg_optim.optim.registry.OptimizerInfo`.
        storage: ``"compact"`` or ``"full"`` (``"full"`` is used whatever this says while :attr:`sharded`).
        clone_state: what a unit that becomes active starts from: ``"keep"``, ``"copy"`` or ``"reset"``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, info: OptimizerInfo, *, storage: str, clone_state: str):
        self.optimizer = optimizer
        self.info = info
        self.configured_storage = storage
        self.clone_state = clone_state
        self.sharded = False  # parameters sharded by FSDP2: full storage
        self.parked: compact.Parked = {}  # compact storage: clones' own state slices (clone_state="keep")
        self._mask: list[masking.MaskEntry] = []
        self._compact: list[compact.CompactEntry] = []

    @property
    def storage(self) -> str:
        return "full" if self.sharded else self.configured_storage

    @property
    def state(self):
        return self.optimizer.state

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    # ------------------------------------------------------------------ parameters
    def params_held(self) -> set[int]:
        """``id`` of every parameter the base optimizer holds."""
        return {id(p) for g in self.param_groups for p in g["params"]}

    def group_of(self) -> dict[int, tuple[dict[str, Any], int]]:
        return {id(p): (g, i) for g in self.param_groups for i, p in enumerate(g["params"])}

    def unit_params(self, managed: Managed) -> dict[torch.Tensor, compact.UnitParam]:
        groups = self.group_of()
        return {p: compact.UnitParam(p, groups[id(p)][0], r, dim) for p, _, r, dim in managed}

    # ------------------------------------------------------------------ roles
    def relayout(
        self, params: Iterable[tuple[compact.UnitParam | None, compact.UnitParam]], clone_state: str | None = None
    ) -> None:
        """Compact storage: move state from the old roles' active units to the new ones' (see
        :func:`~egg_optim.core.compact.relayout`; ``clone_state``: another policy than the run's for units that
        become active, as graduation's); nothing with full storage."""
        if self.storage == "compact":
            policy = clone_state or self.clone_state
            compact.relayout(params, self.state, self.parked, clone_state=policy, fresh=self.info.fresh_value)

    def rebuild(self, managed: Managed) -> None:
        """The step's entries for the parameters with clones under the current roles."""
        self._mask = []
        self._compact = []
        groups = self.group_of()
        for p, _, roles, dim in managed:
            if not roles.has_clones:
                continue
            if self.storage == "compact":
                group, position = groups[id(p)]
                self._compact.append(compact.compact_entry(p, group, position, roles, dim))
            else:  # a sharded parameter is masked on this rank's slice: the clones it holds, local positions
                where = sharding.localize(p, dim, roles.clones)[1]
                if where.numel():
                    runs = axes.part_runs(where, sharding.local(p).shape, dim)  # (packed roles: views)
                    self._mask.append(masking.MaskEntry(p, where.to(sharding.local(p).device), dim, runs))

    def forget_parked(self, kept: set[int]) -> None:
        """Drop parked slices of parameters that were replaced (``kept``: ``id`` of the parameters in use)."""
        self.parked = {p: rows for p, rows in self.parked.items() if id(p) in kept}

    # ------------------------------------------------------------------ the step
    def step(self) -> None:
        """The base optimizer's step with clones held fixed (left out of it, or restored after it)."""
        if self._compact:
            with compact.stand_ins(self._compact, self.state):
                self.optimizer.step()
        else:
            saved = masking.snapshot(self._mask, self.state) if self._mask else None
            self.optimizer.step()
            if saved is not None:
                masking.restore(saved, self.state)

    def is_state_init(self, process_group: Any = None) -> bool:
        """Whether this step is ``torch.distributed.checkpoint``'s optimizer-state initialisation (sharded
        parameters only): a step before any state exists with every learning rate 0 and every gradient zero.
        Only the base step should run (it creates the state a checkpoint is loaded into): counting it, or holding
        an election or a clone event, would change what the checkpoint restores."""
        if not self.sharded or self.state:
            return False
        lrs = [g["lr"] for g in self.param_groups if "lr" in g]
        if not lrs or any(float(lr) != 0.0 for lr in lrs):
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        zero = torch.tensor([float(bool(grads) and not any(bool(sharding.local(g).any()) for g in grads))])
        return bool(all_reduce_min(zero, process_group))

    # ------------------------------------------------------------------ state
    def state_bytes(self) -> int:
        """Bytes held in optimizer-state tensors, clones' parked slices (compact storage) and the kept step
        buffers of strided active blocks (columns, :meth:`~egg_optim.core.compact.CompactEntry.stand_in`)
        included: all the memory the optimizer holds between steps besides the parameters and gradients."""
        tensors = [v for st in self.state.values() for v in st.values() if torch.is_tensor(v)]
        tensors += [v for rows in self.parked.values() for v in rows.values()]
        tensors += [e._buffer for e in self._compact if e._buffer is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self, units: Mapping[torch.Tensor, compact.UnitParam]) -> dict[str, Any]:
        """The base optimizer's state dict with full-size state whatever the storage (clone slices as the
        clone-state policy gives them); ``units``: the managed parameters under the current roles."""
        sd = self.optimizer.state_dict()
        if self.storage == "compact":
            params = [p for g in self.param_groups for p in g["params"]]
            state = {}
            for i, st in sd["state"].items():
                st = dict(st)  # the base state_dict shares the live dicts
                e = units.get(params[i])
                if e is not None:
                    parked = self.parked.get(e.param) if self.clone_state == "keep" else None
                    compact.expand(
                        e.param,
                        st,
                        e.roles,
                        e.group,
                        from_sources=self.clone_state == "copy",
                        parked=parked,
                        fresh=self.info.fresh_value,
                        dim=e.dim,
                    )
                state[i] = st
            sd["state"] = state
        return sd

    def load_state_dict(self, sd: Mapping[str, Any], saved: Managed) -> None:
        """Load base state laid out for the ``saved`` roles (either storage; checked beforehand with
        :func:`~egg_optim.core.state_dict.check_base_state`) and make it full size; the caller then lays it out
        for the current roles (:meth:`relayout` from nothing). All or nothing: on failure the previous state is
        back and :class:`StateDictMismatchError` is raised."""
        if self.sharded:  # plain full-size state (a checkpoint of an unsharded run) takes the parameters' layout
            sd = {**sd, "state": sharding.distribute_state(sd, self.param_groups)}
        previous = self.optimizer.state_dict()
        try:
            self.optimizer.load_state_dict(sd)
            for p, e in self.unit_params(saved).items():
                if self.state.get(p):
                    compact.expand(p, self.state[p], e.roles, e.group, from_sources=False, dim=e.dim)
        except Exception as exc:
            self.optimizer.load_state_dict(previous)
            raise StateDictMismatchError(f"the base optimizer refused the state dict ({exc}); nothing changed") from exc
        self.parked = {}
