"""``LeaderCloneOptimizer``: leader/clone training around any elementwise torch optimizer.

A thin stateful shell over the functional core (:mod:`egg_optim.core`). The wrapper shares the base
optimizer's ``param_groups``, ``state`` and ``defaults`` (LR schedulers, gradient clipping and Accelerate see
one optimizer), keeps clone units exactly frozen through each base step (by leaving them out of it,
:mod:`egg_optim.core.compact`, or by restoring them, :mod:`egg_optim.core.masking`), and runs cloning
(:mod:`egg_optim.core.cloning`) and leader elections (:mod:`egg_optim.core.election`) on its schedules
(:mod:`egg_optim.core.schedule`). Its options are one :class:`~egg_optim.config.EggConfig`.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..config import EggConfig
from ..core import compact, masking, sharding
from ..core.blocks import UnitGroup
from ..core.cloning import clone_layer
from ..core.coupling import Coupling, NormCoupling
from ..core.distributed import all_reduce_mean, all_reduce_min, derived_generator
from ..core.election import elect
from ..core.plan import LayerPlan, RolePlan
from ..core.roles import Roles
from ..core.schedule import Schedule
from ..core.scores import RandomScore, RunningScore, Score
from ..core.state_dict import STATE_KEY, Book, LayerBook, check_base_state, pack_book, parse_book
from ..core.units import ManagedLayer, build_managed_layers, couple_norm, parameter_holders
from ..errors import ConfigError, ElectionError, PlanError, StateDictMismatchError, UnsupportedOptimizerError
from .registry import optimizer_info


def find_leader_clone_optimizer(optimizer: Any) -> LeaderCloneOptimizer | None:
    """The :class:`LeaderCloneOptimizer` inside ``optimizer``, following ``.optimizer`` links (Accelerate's
    ``AcceleratedOptimizer``, the transformers Trainer's optimizer), or ``None``."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, LeaderCloneOptimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _config(config: EggConfig | None, plan: RolePlan | str | None, options: Mapping[str, Any]) -> EggConfig:
    if config is not None and not isinstance(config, EggConfig):
        raise ConfigError(f"config must be an EggConfig, got {type(config).__name__}")
    changes = dict(options)
    if plan is not None:
        changes["plan"] = plan
    base = EggConfig() if config is None else config
    return base.replace(**changes) if changes else base


def _untrainable(layer: ManagedLayer, in_optimizer: set[int]) -> str | None:
    """Why the optimizer cannot train ``layer`` (a frozen or foreign parameter), or ``None``."""
    for pname, p in layer.params:
        if not p.requires_grad:
            return f"parameter {pname!r} is frozen (requires_grad=False)"
        if id(p) not in in_optimizer:
            return f"parameter {pname!r} is not in the optimizer"
    return None


class LeaderCloneOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that, in the managed layers of ``model``, only leaders and independents learn.

    Args:
        model: the module whose Linear/ConvNd layers get roles.
        optimizer: a supported ``torch.optim.Optimizer`` (see :func:`~egg_optim.register_optimizer`) over the
            model's parameters.
        plan: shorthand for ``config.plan`` (a :class:`RolePlan` or a preset name).
        config: an :class:`~egg_optim.config.EggConfig` (default: ``EggConfig()``).
        process_group: the ranks whose roles must agree (default: the world, when initialised).
        **options: any other :class:`~egg_optim.config.EggConfig` field (``clone_mode="output"``,
            ``elect_every=500``, ``election="grad_norm"``, ...), overriding ``config``.

    Layers a default plan selects whose parameters are frozen or not in ``optimizer`` are left unmanaged with
    a warning; a layer the plan names explicitly is refused with :class:`PlanError` instead.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: RolePlan | str | None = None,
        *,
        config: EggConfig | None = None,
        process_group: Any = None,
        **options: Any,
    ) -> None:
        # --- validate everything before touching anything
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UnsupportedOptimizerError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, LeaderCloneOptimizer):
            raise UnsupportedOptimizerError("optimizer is already a LeaderCloneOptimizer")
        self.info = optimizer_info(optimizer)
        config = _config(config, plan, options)
        if config.elect_schedule.at_train_end:
            raise ConfigError("EggConfig.elect_every: an election when training ends would change the trained model")
        role_plan = config.role_plan()
        layer_plans = role_plan.resolve(model)
        blocks = {n: c for n, c in role_plan.candidates(model).items() if isinstance(c, UnitGroup)}
        layers = build_managed_layers(
            model, list(layer_plans), dict(config.norms) if config.norms else None, groups=blocks
        )
        layer_plans, layers = self._trainable_only(role_plan, layer_plans, layers, optimizer)

        # --- the Optimizer protocol, sharing the base optimizer's containers
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        self.model = model
        self.config = config
        self.plan = role_plan
        self.layer_plans: dict[str, LayerPlan] = layer_plans
        self.layers: dict[str, ManagedLayer] = layers
        self.score: Score = config.score
        self.clone_every: Schedule = config.clone_schedule
        self.elect_every: Schedule = config.elect_schedule
        self.clone_mode = config.clone_mode
        self.process_group = process_group
        self.book = Book()
        self._listeners: list[Callable[[Mapping[str, Roles]], None]] = []
        self._parked: compact.Parked = {}  # compact storage: clones' own state slices (clone_state="keep")
        self.output_cloning = None  # output mode, plain layers
        self.block_output = None  # output mode, transformer blocks
        self.grad_skip = None
        self._slots: dict[str, tuple[nn.Module, str, bool]] = {}  # owned tensor -> (module, attribute, is param)
        self._sharded = self._check_sharding()
        initial = self._elect_all(self.score if not isinstance(self.score, RunningScore) else RandomScore(), True)
        # Module rewrites validate before changing anything; only then is the optimizer state laid out.
        fusable = None
        # a list in the layers' order, not a set: every rank must rewrite (and later gather) in the same order
        plain = [n for n, lay in layers.items() if lay.group is None]
        if config.clone_mode == "output":
            from ..rewrites.block_output import BlockOutputCloning
            from ..rewrites.output_cloning import OutputCloning, can_fuse

            in_blocks = {n: r for n, r in initial.items() if n not in plain}
            if in_blocks:
                self.block_output = BlockOutputCloning(
                    model, {n: layers[n].group for n in in_blocks}, in_blocks, eval_mode=config.eval_mode
                )
                self._listeners.append(self._update_block_output)
            # norms are fused once a forward pass proves the pair (core.coupling); until then the layers expand
            # their output themselves, which computes the same
            try:
                self.output_cloning = OutputCloning(model, {n: initial[n] for n in plain}, eval_mode=config.eval_mode)
            except Exception:
                if self.block_output is not None:
                    self.block_output.remove()
                raise
            self._listeners.append(self._update_output_cloning)
            fusable = can_fuse
        elif self._skip_clone_grads(config):
            from ..rewrites.grad_skip import GradSkip, supports

            rewritable = {n: r for n, r in initial.items() if n in plain and supports(layers[n].module)}
            if rewritable:
                self.grad_skip = GradSkip(model, rewritable)
                self._listeners.append(self._update_grad_skip)
        self.book.layers = {n: LayerBook(roles) for n, roles in initial.items()}
        self._roles_changed({}, initial)
        explicit = {k: v for k, v in (config.norms or {}).items() if k in layers}
        self._norm_coupling = NormCoupling(
            model, {n: layers[n].module for n in plain}, explicit, self._couple_norms, fusable
        )

    def _skip_clone_grads(self, config: EggConfig) -> bool:
        if config.skip_clone_grads is not None:
            return config.skip_clone_grads
        # LFNN sites ask autograd for parameter and input gradients in separate calls; a skipping layer would
        # compute both in each, so its saving turns into extra work
        return not self.score.reads_grad and config.local_losses is None

    @staticmethod
    def _trainable_only(plan: RolePlan, layer_plans, layers, optimizer):
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        reasons = {n: r for n, lay in layers.items() if (r := _untrainable(lay, in_optimizer)) is not None}
        if not reasons:
            return layer_plans, layers
        explicit = plan.layers is not None or plan.only_listed
        if explicit or len(reasons) == len(layers):
            name, why = next(iter(reasons.items()))
            hint = (
                "the optimizer holds none of the managed layers' parameters (is it over another model?)"
                if len(reasons) == len(layers) and all("not in the optimizer" in r for r in reasons.values())
                else f"exclude it (RolePlan(exclude=[{name!r}])) or train it"
            )
            raise PlanError(f"layer {name!r} cannot have roles: its {why}; {hint}")
        warnings.warn(
            f"egg_optim: leaving {len(reasons)} layer(s) unmanaged because the optimizer does not train them: "
            + "; ".join(f"{n}: {r}" for n, r in reasons.items()),
            stacklevel=3,
        )
        keep = [n for n in layers if n not in reasons]
        return {n: layer_plans[n] for n in keep}, {n: layers[n] for n in keep}

    # ------------------------------------------------------------------ norm coupling (core.coupling)
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

    # ------------------------------------------------------------------ options, as attributes
    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def assign(self) -> str:
        return self.config.assign

    @property
    def hysteresis(self) -> float:
        return float(self.config.hysteresis)

    @property
    def clone_state(self) -> str:
        return self.config.clone_state

    @property
    def state_storage(self) -> str:
        """The storage in use: ``config.state_storage``, except ``"full"`` for parameters sharded by FSDP2
        (:meth:`_sync_params`)."""
        return "full" if self._sharded else self.config.state_storage

    @property
    def sharded(self) -> bool:
        """Whether the managed parameters are sharded by FSDP2 (DTensors)."""
        return self._sharded

    @property
    def steps(self) -> int:
        """Optimizer steps taken (a step a GradScaler skipped never reaches :meth:`step`)."""
        return self.book.steps

    @property
    def elections(self) -> int:
        return self.book.elections

    @property
    def clone_events(self) -> int:
        return self.book.clone_events

    # ------------------------------------------------------------------ model rewrites
    def _update_output_cloning(self, roles: Mapping[str, Roles]) -> None:
        if self.output_cloning is not None:
            self.output_cloning.update_roles({n: roles[n] for n in self.output_cloning.layers})

    def _update_block_output(self, roles: Mapping[str, Roles]) -> None:
        if self.block_output is not None:
            self.block_output.update_roles({n: roles[n] for n in self.block_output.groups})

    def _update_grad_skip(self, roles: Mapping[str, Roles]) -> None:
        if self.grad_skip is not None:
            self.grad_skip.update_roles({n: roles[n] for n in self.grad_skip.layers})

    def remove_grad_skip(self) -> None:
        """Give weight-mode layers plain autograd back (clone rows of ``weight.grad`` are computed again)."""
        if self.grad_skip is not None:
            self._listeners.remove(self._update_grad_skip)
            self.grad_skip.remove()
            self.grad_skip = None

    def remove_output_cloning(self) -> None:
        """Give the model back its original modules (output-cloning mode only; training can go on in weight mode)."""
        if self.output_cloning is not None:
            self._listeners.remove(self._update_output_cloning)
            self.output_cloning.remove()
            self.output_cloning = None
        if self.block_output is not None:
            self._listeners.remove(self._update_block_output)
            self.block_output.remove()
            self.block_output = None
        self.clone_mode = "weight"

    def export_model(self) -> nn.Module:
        """A plain copy of the model (original module classes, no egg_optim objects) that computes what the
        model computes as trained: in output mode, clone rows are filled with their source's conv weights and
        norm statistics; in weight mode a plain copy."""
        if self._sharded:
            raise ConfigError(
                "export_model() copies the model, which FSDP2 cannot do with sharded parameters: take "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
                "full_state_dict=True)) instead (clone rows are filled in it as in model.state_dict()), on every rank"
            )
        from ..rewrites.block_output import restore_plain_blocks

        if self.output_cloning is None:
            from ..rewrites.grad_skip import restore_plain

            return restore_plain_blocks(restore_plain(copy.deepcopy(self.model)))
        from ..rewrites.output_cloning import export_plain

        return restore_plain_blocks(export_plain(self.output_cloning))

    # ------------------------------------------------------------------ Optimizer protocol (shared state)
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._rebuild_masks()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("LeaderCloneOptimizer is not picklable; save state_dict() instead")

    def __repr__(self) -> str:
        c = self.stats()["total"]
        return (
            f"LeaderCloneOptimizer({type(self.optimizer).__name__}, layers={len(self.layers)}, "
            f"leaders={c['leaders']}, independents={c['independents']}, clones={c['clones']}, "
            f"clone_every={str(self.clone_every)!r}, elect_every={str(self.elect_every)!r}, "
            f"election={self.score.name!r})"
        )

    # ------------------------------------------------------------------ roles
    @property
    def roles(self) -> Mapping[str, Roles]:
        """Current roles per managed layer (read-only)."""
        return MappingProxyType({n: lb.roles for n, lb in self.book.layers.items()})

    def add_roles_listener(self, fn: Callable[[Mapping[str, Roles]], None]) -> None:
        """Call ``fn(roles)`` now and whenever roles change (used by output cloning)."""
        self._listeners.append(fn)
        fn(self.roles)

    def _managed_params(
        self, roles: Mapping[str, Roles], layers: Mapping[str, ManagedLayer] | None = None
    ) -> Iterator[tuple[torch.Tensor, str, Roles, int]]:
        """(parameter, layer name, the roles of its positions, unit dim) for every managed-layer parameter the
        base optimizer holds (of ``layers``, default: the managed layers as they are), under ``roles``."""
        in_optimizer = {id(p) for g in self.param_groups for p in g["params"]}
        for name, layer in (self.layers if layers is None else layers).items():
            for pname, p in layer.params:
                if id(p) in in_optimizer:
                    yield p, name, layer.roles_of(pname, roles[name]), layer.dim_of(pname)

    def _group_of(self) -> dict[int, tuple[dict[str, Any], int]]:
        return {id(p): (g, i) for g in self.param_groups for i, p in enumerate(g["params"])}

    def _unit_params(
        self, roles: Mapping[str, Roles], layers: Mapping[str, ManagedLayer] | None = None
    ) -> dict[torch.Tensor, compact.UnitParam]:
        groups = self._group_of()
        return {
            p: compact.UnitParam(p, groups[id(p)][0], r, dim) for p, _, r, dim in self._managed_params(roles, layers)
        }

    def _roles_changed(self, old: Mapping[str, Roles], new: Mapping[str, Roles]) -> None:
        """Lay the optimizer state out for ``new`` roles (``old``: those it is laid out for; missing: full
        size), rebuild the step's indices and tell the listeners."""
        if self.state_storage == "compact":
            before = self._unit_params(old) if old else {}
            after = self._unit_params(new)
            compact.relayout(
                ((before.get(p), e) for p, e in after.items()),
                self.state,
                self._parked,
                clone_state=self.clone_state,
                fresh=self.info.fresh_value,
            )
        self._rebuild_masks()
        for fn in self._listeners:
            fn(self.roles)

    def _set_roles(self, roles: Mapping[str, Roles]) -> None:
        """Hand over to ``roles`` (an election): update tenure and leadership history, then lay out state."""
        old = dict(self.roles)
        for name, new in roles.items():
            lb = self.book.layers[name]
            lb.led_steps[lb.roles.leaders] += self.steps - self.book.roles_since
            newcomers = new.leaders[~torch.isin(new.leaders, lb.roles.leaders)]
            lb.seated_at[newcomers] = self.steps
            lb.roles = new
        self.book.roles_since = self.steps
        self._roles_changed(old, roles)

    def _rebuild_masks(self) -> None:
        self._mask: list[masking.MaskEntry] = []
        self._compact: list[compact.CompactEntry] = []
        groups = self._group_of()
        for p, _, roles, dim in self._managed_params(self.roles):
            if not roles.has_clones:
                continue
            if self.state_storage == "compact":
                group, position = groups[id(p)]
                self._compact.append(compact.CompactEntry(p, group, position, roles.active.to(p.device), dim))
            else:  # a sharded parameter is masked on this rank's slice: the clones it holds, local positions
                where = sharding.localize(p, dim, roles.clones)[1]
                if where.numel():
                    self._mask.append(masking.MaskEntry(p, where.to(sharding.local(p).device), dim))

    # ------------------------------------------------------------------ FSDP2 (core.sharding)
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
                    raise PlanError(
                        f"layer {name!r}: parameter {qname!r} was replaced by one the optimizer does not hold; when "
                        "the model is wrapped (fully_shard) after the optimizer is built, update the optimizer's "
                        "param_groups to the new parameters (Accelerate's prepare does)"
                    )
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

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def _observe_step(self) -> None:
        if not isinstance(self.score, RunningScore):
            return
        for name, layer in self.layers.items():
            value = self.score.observe(layer)
            if value is not None:
                self._accumulate(name, value)

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        lb = self.book.layers[name]
        value = value.detach().float()
        lb.score_sum = value.clone() if lb.score_sum is None else lb.score_sum.add_(value.to(lb.score_sum.device))
        lb.score_count += 1

    def observe_scores(self, scores: Mapping[str, torch.Tensor]) -> None:
        """Feed per-unit scores (higher is better) for an observed election score such as ``"local_loss"``;
        they are averaged until the next election. All layers are checked before any score is added."""
        for name, value in scores.items():
            if name not in self.layers:
                raise ConfigError(f"observe_scores: {name!r} is not a managed layer; managed: {list(self.layers)}")
            units = self.layers[name].num_units
            if not torch.is_tensor(value) or value.shape != (units,):
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ConfigError(f"observe_scores: layer {name!r} has {units} units, got scores of shape {shape}")
            if not bool(torch.isfinite(value).all()):
                raise ElectionError(f"observe_scores: layer {name!r} got non-finite scores")
        for name, value in scores.items():
            self._accumulate(name, value)

    # ------------------------------------------------------------------ step and schedules
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One base-optimizer step with clones held fixed, then any election and clone event due by steps."""
        self._sync_params()
        if self._is_state_init():
            self._base_step()  # creates the state a checkpoint loads into; counts as nothing
            return None
        if self._norm_coupling.pending:
            self._norm_coupling.decide_now()  # no complete forward pass seen: explicit couplings only
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self._sync_params()
        self._observe_step()
        self._base_step()
        self.book.steps += 1
        if self.elect_every.after_step(self.steps):
            self.elect_now()
        if self.clone_every.after_step(self.steps):
            self._scheduled_clone()
        return loss

    def _base_step(self) -> None:
        """The base optimizer's step with clones held fixed (left out of it, or restored after it)."""
        if self._compact:
            with compact.stand_ins(self._compact, self.state):
                self.optimizer.step()
        else:
            saved = masking.snapshot(self._mask, self.state) if self._mask else None
            self.optimizer.step()
            if saved is not None:
                masking.restore(saved, self.state)

    @staticmethod
    def _epoch(epoch: Any) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be an int >= 0, got {epoch!r}")
        return epoch

    def epoch_begin(self, epoch: int) -> bool:
        """Tell the schedules that epoch ``epoch`` (from 0) starts: holds a due election (never for the first
        epoch, right after another election, or twice for one epoch, so a resumed epoch is not re-elected).
        Returns whether it held one. The callback runner and the transformers integration call this."""
        epoch = self._epoch(epoch)
        if epoch <= self.book.epoch_begun:
            return False
        self.book.epoch_begun = epoch
        due = self.elect_every.at_epoch_begin(epoch) and self.steps > 0
        if due and self.book.last_election_step != self.steps:
            self.elect_now()
            return True
        return False

    def epoch_end(self, epoch: int) -> bool:
        """Tell the schedules that epoch ``epoch`` ended: holds a due clone event. Returns whether it did."""
        epoch = self._epoch(epoch)
        if epoch <= self.book.epoch_ended:
            return False
        self.book.epoch_ended = epoch
        return self.clone_every.at_epoch_end(epoch) and self._scheduled_clone()

    def train_end(self) -> bool:
        """Tell the schedules that training ended: holds a clone event scheduled ``at_train_end``."""
        return self.clone_every.at_train_end and self._scheduled_clone()

    def _scheduled_clone(self) -> bool:
        key = (self.steps, self.elections)
        if key == self.book.last_clone_key:  # nothing trained or elected since the last clone event
            return False
        self.clone_now()
        return True

    # ------------------------------------------------------------------ elections and cloning
    def _elect_all(self, score: Score, initial: bool = False) -> dict[str, Roles]:
        gen = derived_generator(self.seed, "init") if initial else derived_generator(self.seed, "elect", self.elections)
        scores: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            if isinstance(score, RunningScore):
                lb = self.book.layers[name]
                total = lb.score_sum
                scores[name] = total.cpu() / lb.score_count if total is not None else torch.zeros(layer.num_units)
            else:
                scores[name] = score(layer, gen).detach().float().cpu().reshape(-1)
                if scores[name].numel() != layer.num_units:
                    raise ElectionError(
                        f"score {score.name!r} returned {scores[name].numel()} values for layer {name!r} "
                        f"with {layer.num_units} units"
                    )
        if scores:
            flat = all_reduce_mean(torch.cat(list(scores.values())), self.process_group)
            scores = dict(zip(scores, torch.split(flat, [s.numel() for s in scores.values()])))
        bad = [n for n, s in scores.items() if not bool(torch.isfinite(s).all())]
        if bad:
            raise ElectionError(f"score {score.name!r} gave non-finite values in layer(s) {bad}; roles are unchanged")
        current = None if initial else self.roles
        return {
            name: elect(
                scores[name],
                self.layer_plans[name].leaders,
                self.layer_plans[name].independents,
                current=None if current is None else current[name],
                hysteresis=self.hysteresis,
                assign=self.assign,
                weight=layer.unit_rows() if self.assign == "nearest" else None,
                generator=gen,
            )
            for name, layer in self.layers.items()
        }

    def elect_now(self) -> dict[str, int]:
        """Hold an election in every managed layer now; returns the leader churn per layer."""
        self._sync_params()
        new = self._elect_all(self.score)
        for name, roles in new.items():
            lb = self.book.layers[name]
            lb.churn = int((~torch.isin(roles.leaders, lb.roles.leaders)).sum())
            lb.score_sum, lb.score_count = None, 0
        self.book.elections += 1
        self.book.last_election_step = self.steps
        # A clone has been computing its source's output; giving it the source's rows (conv rows and norm
        # statistics; a block's producer slices) before it may become active again keeps that output
        # (function-preserving election).
        if self.output_cloning is not None:
            self.output_cloning.fill_clones()
        if self.block_output is not None:
            self.block_output.fill_clones()
        self._set_roles(new)
        return {n: lb.churn for n, lb in self.book.layers.items()}

    def clone_now(self) -> int:
        """Copy every clone's source leader into it now; returns the number of clone units written."""
        self._sync_params()
        cfg = self.config
        gen = derived_generator(self.seed, "clone", self.clone_events) if cfg.clone_noise > 0 else None
        groups = {p: g for g in self.param_groups for p in g["params"]}
        written = 0
        for name, layer in self.layers.items():
            lb = self.book.layers[name]
            n = clone_layer(
                layer,
                lb.roles,
                blend=float(cfg.clone_blend),
                noise=float(cfg.clone_noise),
                state=cfg.clone_state,
                opt_state=self.state,
                groups=groups,
                generator=gen,
                fresh=self.info.fresh_value,
            )
            lb.cloned_units += n
            written += n
        self.book.clone_events += 1
        self.book.last_clone_key = (self.steps, self.elections)
        return written

    # ------------------------------------------------------------------ stats
    def leadership_counts(self) -> dict[str, torch.Tensor]:
        """Optimizer steps each unit has spent as a leader (the paper's Figure 4 heat map, per layer)."""
        out = {}
        for name, lb in self.book.layers.items():
            counts = lb.led_steps.clone()
            counts[lb.roles.leaders] += self.steps - self.book.roles_since
            out[name] = counts
        return out

    def stats(self) -> dict[str, Any]:
        """Role counts, fraction of units updated, units cloned so far, elections and churn."""
        layers = {}
        for name, lb in self.book.layers.items():
            roles = lb.roles
            c = roles.counts()
            layers[name] = {
                "units": roles.num_units,
                **c,
                "updated_fraction": (c["leaders"] + c["independents"]) / roles.num_units,
                "cloned_units": lb.cloned_units,
                "churn": lb.churn,
                "mean_tenure": float((self.steps - lb.seated_at[roles.leaders]).float().mean())
                if roles.leaders.numel()
                else 0.0,
            }
        keys = ("units", "leaders", "independents", "clones", "cloned_units", "churn")
        total = {k: sum(v[k] for v in layers.values()) for k in keys}
        total["updated_fraction"] = (
            (total["leaders"] + total["independents"]) / total["units"] if total["units"] else 1.0
        )
        return {
            "layers": layers,
            "total": total,
            "steps": self.steps,
            "elections": self.elections,
            "clone_events": self.clone_events,
        }

    def role_metrics(self, prefix: str = "roles", *, per_layer: bool = True) -> dict[str, float]:
        """:meth:`stats` as flat floats for trackers: ``{prefix}/{layer}/{key}`` (with ``per_layer``),
        ``{prefix}/total/{key}`` (``mean_tenure`` averaged over layers), ``{prefix}/steps`` and the like."""
        stats = self.stats()
        out: dict[str, float] = {}
        if per_layer:
            for name, entry in stats["layers"].items():
                out.update({f"{prefix}/{name}/{k}": float(v) for k, v in entry.items()})
        out.update({f"{prefix}/total/{k}": float(v) for k, v in stats["total"].items()})
        tenures = [float(e["mean_tenure"]) for e in stats["layers"].values()]
        out[f"{prefix}/total/mean_tenure"] = sum(tenures) / len(tenures) if tenures else 0.0
        out.update({f"{prefix}/{k}": float(stats[k]) for k in ("steps", "elections", "clone_events")})
        return out

    # ------------------------------------------------------------------ state
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
        sd[STATE_KEY] = pack_book(self.book, plan=self.plan.signature(), seed=self.seed, storage=self.state_storage)
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
                out[qname] = whole.index_select(layer.dim_of(qname), er.clones.to(whole.device)).cpu().clone()
        return out

    def _check_clone_rows(self, rows: Any, roles: Mapping[str, Roles], layers: Mapping[str, ManagedLayer]) -> None:
        """Refuse saved clone slices that do not fit the saved roles (changes nothing)."""
        if not isinstance(rows, Mapping):
            raise StateDictMismatchError(f"{STATE_KEY}.clone_rows must be a dict, got {type(rows).__name__}")
        shapes = {}
        for name, qname, t in self._owned(layers):
            er = layers[name].roles_of(qname, roles[name])
            shape = list(t.shape)
            shape[layers[name].dim_of(qname)] = er.num_clones
            shapes[qname] = tuple(shape)
        for qname, v in rows.items():
            if qname not in shapes:
                raise StateDictMismatchError(f"{STATE_KEY}.clone_rows holds {qname!r}, which no managed unit owns")
            if not torch.is_tensor(v) or tuple(v.shape) != shapes[qname]:
                got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
                raise StateDictMismatchError(
                    f"{STATE_KEY}.clone_rows[{qname!r}] has shape {got}, the saved roles need {shapes[qname]}"
                )

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
                    t.index_copy_(layer.dim_of(qname), er.clones.to(t.device), rows[qname].to(t))

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
            counts={n: (lp.leaders, lp.independents) for n, lp in self.layer_plans.items()},
            device_of=lambda n: self.layers[n].weight.device,
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
        self._parked = {}
        self._roles_changed({}, saved_roles)
        self._restore_clone_rows(clone_rows)  # after the model was loaded (as Accelerate and the Trainer do)
        self.book.roles_since = roles_since
