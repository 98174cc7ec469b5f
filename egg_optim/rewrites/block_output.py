"""Output cloning for units that span modules: transformer MLP neurons and attention heads.

A clone neuron (head) carries its source's activation (attention output). The producers (up/gate, or q/k/v
projections) then compute only the active units' rows, and the consumer (down or output projection) folds each
clone's input columns into its source's::

    h_active = act(x @ W_up[active].T)                      # the producers: active rows only
    y = h_active @ (W_down[:, active] + fold(W_down[:, clones] -> their sources)).T

which equals the full computation with every clone's activation set to its source's, so both matmuls shrink
with the number of clones. Attention code that reshapes with ``view(..., -1, head_dim)`` (transformers' Llama,
Mistral, Qwen, BERT, ViT) then simply runs on the active heads. GPT-2's fused qkv projection splits its output
at fixed offsets, so its attention cannot shrink (refused); its MLP can.

The rewrite swaps the classes of the member modules in place (parameters, names and ``state_dict`` keys stay)
and is undone by :meth:`BlockOutputCloning.remove`. Clones' own weights are not used and get no gradient. Saving
(``state_dict()`` of any module above them) writes each clone's producer rows as its source's, so a plain model
loaded from it computes what the rewritten one did.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.blocks import UnitGroup, UnitSlice
from ..core.roles import Roles
from ..core.sharding import copied_positions, copy_positions_
from ..errors import ConfigError, PlanError
from . import base
from .base import check_eval_mode

OWNER = "block output cloning"
_ATTRS = ("_egg_has_clones", "_egg_dim", "_egg_produces", "_egg_own_weights")
_BUFFERS = ("_egg_active", "_egg_fold_pos", "_egg_fold_src", "_egg_sources")


class _BlockMember:
    """Mixin before the member's class: a producer selects active units' outputs, a consumer folds clones."""

    _egg_has_clones: bool
    _egg_dim: int  # the unit dimension of the weight
    _egg_produces: bool
    _egg_own_weights: bool  # eval_mode="own_weights": evaluation runs the plain module
    _egg_active: torch.Tensor  # active positions along the unit dimension
    _egg_fold_pos: torch.Tensor  # for each clone position, where its source sits among the active ones
    _egg_fold_src: torch.Tensor  # clone positions
    _egg_sources: torch.Tensor  # each clone position's source position

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._egg_has_clones or (self._egg_own_weights and not self.training):
            return super().forward(input)
        w, dim = self.weight, self._egg_dim
        if self._egg_produces:
            weight = w.index_select(dim, self._egg_active)
            bias = None if self.bias is None else self.bias.index_select(0, self._egg_active)
        else:
            clones = w.index_select(dim, self._egg_fold_src).detach()  # clones are not trained
            weight = w.index_select(dim, self._egg_active).index_add(dim, self._egg_fold_pos, clones)
            bias = self.bias
        if (dim == 1) == self._egg_produces:  # a transformers Conv1D: weight [in, out], y = x @ W + b
            y = input.reshape(-1, input.shape[-1]) @ weight
            if bias is not None:
                y = y + bias
            return y.reshape(*input.shape[:-1], weight.shape[1])
        return F.linear(input, weight, bias)

    def _clone_positions(self, key: str) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """(dim, clone positions, their sources) of a producer's ``weight`` / ``bias``, or ``None``."""
        if not (self._egg_produces and self._egg_has_clones) or getattr(self, key, None) is None:
            return None
        return (self._egg_dim if key == "weight" else 0), self._egg_fold_src, self._egg_sources

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A producer's clone slices are saved as their source's: what output mode computed, for a plain model.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if keep_vars or (self._egg_own_weights and not self.training):
            return
        for key in ("weight", "bias"):
            found = self._clone_positions(key)
            if found is not None and prefix + key in destination:
                dim, clones, sources = found
                destination[prefix + key] = copied_positions(destination[prefix + key], dim, clones, sources)


_CLASSES: dict[type, type] = {}


def _rewritten_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"_BlockOutput{cls.__name__}", (_BlockMember, cls), {})
        base.register(OWNER, {cls: _CLASSES[cls]})
    return _CLASSES[cls]


def _weight_slice(group: UnitGroup, module: str) -> UnitSlice:
    return next(s for s in group.slices if s.param == f"{module}.weight")


class BlockOutputCloning(base.LayerRewrite):
    """Output cloning for the :class:`~egg_optim.core.blocks.UnitGroup` s of ``model`` named in ``roles``.

    Args:
        model: the model; its member modules are rewritten in place.
        groups: ``{name: UnitGroup}`` (:func:`~egg_optim.core.blocks.find_unit_groups`).
        roles: ``{group name: Roles}`` over each group's units.
    """

    owner = OWNER
    option = "clone_mode='output'"
    clones_follow_sources = True

    def __init__(
        self,
        model: nn.Module,
        groups: Mapping[str, UnitGroup],
        roles: Mapping[str, Roles],
        *,
        eval_mode: str = "as_trained",
    ) -> None:
        check_eval_mode(eval_mode)
        modules = dict(model.named_modules())
        for name, r in roles.items():
            g = groups.get(name)
            if g is None:
                raise PlanError(f"{OWNER}: {name!r} is not a transformer MLP or attention block")
            if not isinstance(r, Roles) or r.num_units != g.num_units:
                raise PlanError(f"{OWNER}: roles for {name!r} must be Roles over its {g.num_units} units")
            if len(g.producers) == 1 and g.kind == "attention":
                raise ConfigError(
                    f"output mode cannot shrink attention {name!r}: its fused qkv projection ({g.producers[0]!r}) "
                    "is split at fixed offsets; use clone_mode='weight' for it (exclude it from the plan)"
                )
            for m in g.modules:
                problem = base.owner_of(modules[m])
                if problem is not None:
                    raise PlanError(f"{OWNER}: module {m!r} is already under {problem}")
        self.model = model
        self.groups = {n: groups[n] for n in roles}
        self._layers = {n: modules[self.groups[n].consumer] for n in roles}  # LayerRewrite bookkeeping
        self._roles = dict(roles)
        self._removed = False
        self._members: dict[str, list[tuple[str, nn.Module, bool]]] = {}
        for name, g in self.groups.items():
            members = [(p, modules[p], True) for p in g.producers] + [(g.consumer, modules[g.consumer], False)]
            self._members[name] = members
            for mname, m, produces in members:
                m.__class__ = _rewritten_class(type(m))
                m._egg_produces = produces
                m._egg_own_weights = eval_mode == "own_weights"
                m._egg_dim = _weight_slice(g, mname).dim
            self._apply_roles(name, roles[name])

    def _check_roles(self, name: str, roles: Roles) -> None:
        if roles.num_units != self.groups[name].num_units:
            raise PlanError(f"roles for {name!r} have {roles.num_units} units, it has {self.groups[name].num_units}")

    def update_roles(self, new_roles: Mapping[str, Roles]) -> None:
        self._check_live()
        for name, r in new_roles.items():
            if name not in self.groups:
                raise PlanError(f"{name!r} is not managed by this {type(self).__name__}")
            self._check_roles(name, r)
        for name, r in new_roles.items():
            if not r.same_as(self._roles[name]):
                self._roles[name] = r
                self._apply_roles(name, r)

    def _apply_roles(self, name: str, roles: Roles) -> None:
        g = self.groups[name]
        for mname, m, _ in self._members[name]:
            er = roles.expand(_weight_slice(g, mname).index)
            device = m.weight.device
            m._egg_has_clones = roles.has_clones
            pos = torch.full((er.num_units,), -1, dtype=torch.long)
            pos[er.active] = torch.arange(er.active.numel())
            base.set_buffer(m, "_egg_active", er.active.to(device))
            base.set_buffer(m, "_egg_fold_src", er.clones.to(device))
            base.set_buffer(m, "_egg_sources", er.sources.to(device))
            base.set_buffer(m, "_egg_fold_pos", pos[er.sources].to(device))

    @torch.no_grad()
    def fill_clones(self, skip: Collection[str] = ()) -> None:
        """Copy each clone's producer slices from its source in place (before an election: a promoted clone
        then computes what it computed as a clone); blocks named in ``skip`` (frozen ones) are left as they are."""
        self._check_live()
        for name, members in self._members.items():
            if name in skip:
                continue
            for _, m, _ in members:
                _fill(m)

    @property
    def eval_mode(self) -> str:
        m = next(iter(self._members.values()))[0][1]
        return "own_weights" if m._egg_own_weights else "as_trained"

    def module_names(self) -> list[str]:
        return [m for g in self.groups.values() for m in g.modules]

    def export(self, model: nn.Module) -> nn.Module:
        return restore_plain_blocks(model)

    def _restore_all(self) -> None:
        for members in self._members.values():
            for _, m, _ in members:
                base.restore(m, _ATTRS, _BUFFERS)


@torch.no_grad()
def restore_plain_blocks(model: nn.Module) -> nn.Module:
    """Give every block member in ``model`` (typically a copy) its original class, with each clone's producer
    slices filled from its source, so the plain modules compute what output mode computed. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, _BlockMember):
            _fill(m)
            base.restore(m, _ATTRS, _BUFFERS)
    return model


def _fill(m: _BlockMember) -> None:
    for key in ("weight", "bias"):
        found = m._clone_positions(key)
        if found is not None:
            dim, clones, sources = found
            copy_positions_(getattr(m, key), dim, clones, sources)  # FSDP2: rows on any rank
