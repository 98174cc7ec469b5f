"""Norm coupling of a :class:`~egg_optim.optim.LeaderCloneOptimizer`: applying the decision
:mod:`egg_optim.core.coupling` makes from the first forward pass (or a state dict), and recording it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core import compact
from ..core.coupling import Coupling
from ..core.units import ManagedLayer, couple_norm, parameter_holders
from ..errors import PlanError, StateDictMismatchError


class NormCouplingMixin:
    """Norm coupling: which norm each plain managed layer owns, decided once."""

    @property
    def coupled_norms(self) -> dict[str, str]:
        """Layer name -> the norm layer its units own. Explicit ``norms`` hold from construction; the others
        are decided once, from the first complete forward pass (:attr:`coupling_pending`), and logged."""
        return {n: lay.norm_name for n, lay in self.layers.items() if lay.norm_name is not None}

    @property
    def coupling_pending(self) -> bool:
        """True until norm coupling is decided: at the end of the first complete forward pass of the model, at
        the first optimizer step without one, or by loading a state dict that holds a decision."""
        return self._norm_coupling.pending

    def _couple_norms(self, coupling: Coupling) -> None:
        # called once by the NormCoupling; validates everything before changing anything
        self._apply_coupling(self._coupled_layers(coupling), coupling.fused, relayout=True)

    def _coupled_layers(self, coupling: Coupling) -> dict[str, ManagedLayer]:
        """The managed layers whose norm ``coupling`` changes, rebuilt (validated; nothing is changed)."""
        holders = parameter_holders(self.model)
        new = {
            n: couple_norm(self.model, self.layers[n], norm, holders)
            for n, norm in coupling.coupled.items()
            if self.layers[n].norm_name != norm
        }
        owner: dict[int, str] = {}
        for n, lay in {**self.layers, **new}.items():
            for pname, p in lay.params:
                if owner.setdefault(id(p), n) != n:
                    raise PlanError(f"parameter {pname!r} of layer {n!r} is shared with layer {owner[id(p)]!r}")
        return new

    def _apply_coupling(self, new: Mapping[str, ManagedLayer], fused: Mapping[str, str], relayout: bool) -> None:
        if self.output_cloning is not None and fused:
            self.output_cloning.fuse_norms(fused)  # validates before changing anything
        joining = []
        for n, lay in new.items():
            layer = self.layers[n]
            old = {id(p) for _, p in layer.params}
            joining += [(n, pname, p) for pname, p in lay.params if id(p) not in old]
            layer.norm_name, layer.norm, layer.params, layer.buffers = lay.norm_name, lay.norm, lay.params, lay.buffers
        if relayout and self.state_storage == "compact":  # norm state already there (loaded) takes the layout
            groups = self._group_of()
            compact.relayout(
                (
                    (None, compact.UnitParam(p, groups[id(p)][0], self.roles[n], self.layers[n].dim_of(pname)))
                    for n, pname, p in joining
                    if id(p) in groups
                ),
                self.state,
                self._parked,
                clone_state=self.clone_state,
                fresh=self.info.fresh_value,
            )
        if new:
            self._rebuild_masks()

    def _coupling_state(self) -> dict[str, dict[str, str]] | None:
        """The decided coupling, for state dicts (``None`` while pending: nothing to restore)."""
        if self._norm_coupling.pending:
            return None
        fused = self.output_cloning.norms if self.output_cloning is not None else {}
        return {"norms": self.coupled_norms, "fused": fused}

    def _saved_coupling(self, extra: Any) -> tuple[dict[str, ManagedLayer], Coupling] | None:
        """The coupling a state dict was saved with, validated, when this optimizer has none yet (a resumed run
        couples what the saved run coupled). Changes nothing."""
        if not isinstance(extra, Mapping) or extra.get("coupling") is None:
            return None
        # already decided (a forward pass ran first): the saved decision must agree, its fusions are in place
        pending = self._norm_coupling.pending
        saved = self._norm_coupling.from_state(extra["coupling"], fuse=pending and self.output_cloning is not None)
        if not pending:
            if saved.coupled != self.coupled_norms:
                raise StateDictMismatchError(
                    f"state dict was saved with norm coupling {saved.coupled}, this optimizer couples "
                    f"{self.coupled_norms}"
                )
            return None
        try:
            return self._coupled_layers(saved), saved
        except PlanError as exc:
            raise StateDictMismatchError(f"state dict's norm coupling does not fit this model: {exc}") from exc
