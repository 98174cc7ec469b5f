"""State dicts of a :class:`~egg_optim.optim.LeaderCloneOptimizer`: full-size base state whatever the
storage, the ``egg_optim`` entry (:mod:`egg_optim.core.state_dict`), the clones' own rows in output mode, and a
load that validates everything before it changes anything."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..core import axes, compact, sharding
from ..core.roles import Roles
from ..core.state_dict import STATE_KEY, check_base_state, check_clone_rows, dependencies, pack_book, parse_book
from ..core.units import ManagedLayer
from ..errors import StateDictMismatchError


class StateDictMixin:
    """``state_dict`` / ``load_state_dict`` and what they carry."""

    def state_bytes(self) -> int:
        """Bytes held in optimizer-state tensors, clones' parked slices (compact storage) included."""
        tensors = [v for st in self.state.values() for v in st.values() if torch.is_tensor(v)]
        tensors += [v for rows in self._parked.values() for v in rows.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict, with full-size state whatever the storage (clone slices as the
        clone-state policy gives them), plus an ``egg_optim`` entry: roles, counters, running scores.

        With parameters sharded by FSDP2 the state is the base optimizer's DTensors (this rank's shards, as a bare
        optimizer keeps them) and the ``egg_optim`` entry (identical on every rank; a collective: every rank must
        call this) is also carried, serialised, in the first parameter group, where
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (Accelerate's FSDP2 checkpoints)
        keeps it."""
        self._sync_params()
        sd = self.optimizer.state_dict()
        if self.state_storage == "compact":
            params = [p for g in self.param_groups for p in g["params"]]
            units = self._unit_params(self.roles)
            state = {}
            for i, st in sd["state"].items():
                st = dict(st)  # the base state_dict shares the live dicts
                e = units.get(params[i])
                if e is not None:
                    parked = self._parked.get(e.param) if self.clone_state == "keep" else None
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
        sd[STATE_KEY] = pack_book(
            self.book, plan=self.plan.signature(), seed=self.seed, storage=self.state_storage,
            depends=dependencies(self.config),
        )  # fmt: skip
        sd[STATE_KEY]["coupling"] = self._coupling_state()
        sd[STATE_KEY]["clone_rows"] = self._clone_rows() if self.clone_mode == "output" else {}
        if self._sharded:
            sd["param_groups"][0][STATE_KEY] = sharding.pack_entry(sd[STATE_KEY])
        return sd

    def _owned(self, layers: Mapping[str, ManagedLayer] | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(layer, qualified name, tensor) for every parameter and buffer a managed unit owns."""
        for name, layer in (self.layers if layers is None else layers).items():
            for qname, t in [*layer.params, *layer.buffers]:
                yield name, qname, t

    def _clone_rows(self) -> dict[str, torch.Tensor]:
        """Output mode: the clones' own slices of every tensor they own. A saved model holds clones as their
        sources (what output mode computes, for a plain model), and elections may read the clones' own rows
        (``weight_norm``, ``assign="nearest"``, blending): these make a resume exact."""
        out = {}
        for name, qname, t in self._owned():
            layer, roles = self.layers[name], self.roles[name]
            if roles.has_clones:
                er = layer.roles_of(qname, roles)
                whole = sharding.full(t.detach())
                out[qname] = axes.select(whole, layer.dim_of(qname), er.clones).cpu().clone()
        return out

    def _check_clone_rows(self, rows: Any, roles: Mapping[str, Roles], layers: Mapping[str, ManagedLayer]) -> None:
        """Refuse saved clone slices that do not fit the saved roles or are not finite (changes nothing)."""
        shapes = {}
        for name, qname, t in self._owned(layers):
            er = layers[name].roles_of(qname, roles[name])
            shapes[qname] = axes.slice_shape(t.shape, layers[name].dim_of(qname), er.num_clones)
        check_clone_rows(rows, shapes)

    @torch.no_grad()
    def _restore_clone_rows(self, rows: Mapping[str, torch.Tensor]) -> None:
        for name, qname, t in self._owned():
            if qname in rows:
                layer = self.layers[name]
                er = layer.roles_of(qname, self.roles[name])
                if sharding.is_sharded(t):
                    whole = sharding.full(t).clone()
                    whole.index_copy_(layer.dim_of(qname), er.clones.to(whole.device), rows[qname].to(whole))
                    sharding.write_full_(t, whole)
                else:
                    axes.copy_(t, layer.dim_of(qname), er.clones, rows[qname].to(t))

    def export_optimizer_state(self) -> dict[str, Any]:
        """A state dict for the bare base optimizer over the plain model (:meth:`export_model`)."""
        sd = self.state_dict()
        del sd[STATE_KEY]
        sd["param_groups"][0].pop(STATE_KEY, None)
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore base-optimizer state, roles, counters and running scores, and adopt the saved run's seed (as
        ``param_groups`` hyperparameters are adopted), so later random draws continue that run. Everything is
        validated first: a refused state dict raises :class:`StateDictMismatchError` naming the key and changes
        nothing."""
        if not isinstance(state_dict, Mapping):
            raise StateDictMismatchError(f"expected a state dict (a Mapping), got {type(state_dict).__name__}")
        self._sync_params()
        sd = dict(state_dict)
        extra = sd.pop(STATE_KEY, None)
        carried = sharding.take_entry(sd, STATE_KEY)  # the copy sharded state dicts carry in param_groups[0]
        if extra is None:
            extra = carried
        book = parse_book(
            extra,
            plan=self.plan.signature(),
            units={n: lay.num_units for n, lay in self.layers.items()},
            counts=lambda draw: {n: (lp.leaders, lp.independents) for n, lp in self._counts(draw).items()},
            device_of=lambda n: self.layers[n].weight.device,
            depends=dependencies(self.config),
        )
        saved_roles = {n: lb.roles for n, lb in book.layers.items()}
        saved_coupling = self._saved_coupling(extra)  # the saved run's norm coupling, if this one has none yet
        layers = {**self.layers, **(saved_coupling[0] if saved_coupling is not None else {})}
        names = {id(p): pname for pname, p in self.model.named_parameters()}
        managed = {id(p): (name, r, dim) for p, name, r, dim in self._managed_params(saved_roles, layers)}
        check_base_state(sd, self.optimizer, managed, names)
        if self._sharded:  # plain full-size state (a checkpoint of an unsharded run) takes the parameters' layout
            sd["state"] = sharding.distribute_state(sd, self.param_groups)
        clone_rows = extra.get("clone_rows", {}) if self.clone_mode == "output" else {}
        self._check_clone_rows(clone_rows, saved_roles, layers)
        previous = self.optimizer.state_dict()
        try:
            self.optimizer.load_state_dict(sd)
            # The loaded state is laid out for the saved roles (either storage): make it full size, then lay it
            # out for this optimizer's storage and roles.
            for p, e in self._unit_params(saved_roles, layers).items():
                if self.state.get(p):
                    compact.expand(p, self.state[p], e.roles, e.group, from_sources=False, dim=e.dim)
        except Exception as exc:
            self.optimizer.load_state_dict(previous)
            raise StateDictMismatchError(f"the base optimizer refused the state dict ({exc}); nothing changed") from exc
        roles_since = book.roles_since
        if book.seed is not None and book.seed != self.seed:
            # like the hyperparameters in param_groups, the saved run's seed is adopted: later draws continue it
            self.config = self.config.replace(seed=book.seed)
        if saved_coupling is not None:
            self._apply_coupling(saved_coupling[0], saved_coupling[1].fused, relayout=False)
            self._norm_coupling.adopt(saved_coupling[1])
        self.book = book
        self.layer_plans = self._counts(book.elections)
        self._parked = {}
        self._roles_changed({}, saved_roles)
        self._restore_clone_rows(clone_rows)  # after the model was loaded (as Accelerate and the Trainer do)
        self.book.roles_since = roles_since
