"""``LeaderCloneOptimizer``: leader/clone training around any elementwise torch optimizer.

A thin stateful shell over the functional core (:mod:`egg_optim.core`). The wrapper shares the base
optimizer's ``param_groups``, ``state`` and ``defaults`` (LR schedulers, gradient clipping and Accelerate see
one optimizer), keeps clone units exactly frozen through each base step (by leaving them out of it,
:mod:`egg_optim.core.compact`, or by restoring them, :mod:`egg_optim.core.masking`), and runs cloning
(:mod:`egg_optim.core.cloning`) and leader elections (:mod:`egg_optim.core.election`) on its schedules
(:mod:`egg_optim.core.schedule`). Its options are one :class:`~egg_optim.config.EggConfig`. Norm coupling
(``_coupling``), FSDP2 (``_sharding``), state dicts (``_state``) and statistics (``_stats``) live in mixins
of their own.
"""

from __future__ import annotations

import copy
import logging
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
from ..core.coupling import NormCoupling
from ..core.distributed import all_reduce_mean, derived_generator
from ..core.election import elect
from ..core.plan import LayerPlan, RolePlan, describe_alignment
from ..core.policies import scaled_counts, stable_elect
from ..core.roles import Roles
from ..core.schedule import Schedule
from ..core.scores import RandomScore, RunningScore, Score, UnitGradScore
from ..core.state_dict import Book, LayerBook
from ..core.units import ManagedLayer, build_managed_layers
from ..errors import ConfigError, ElectionError, PlanError, UnsupportedOptimizerError
from ._coupling import NormCouplingMixin
from ._sharding import ShardingMixin
from ._state import StateDictMixin
from ._stats import StatsMixin
from .registry import optimizer_info

logger = logging.getLogger("egg_optim")


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


class LeaderCloneOptimizer(NormCouplingMixin, ShardingMixin, StateDictMixin, StatsMixin, torch.optim.Optimizer):
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
        if config.clone_mode == "output" and isinstance(config.score, UnitGradScore):
            in_blocks = [n for n, lay in layers.items() if lay.group is not None]
            if in_blocks:  # the output-mode probe records plain layers only: blocks would score nothing
                raise ConfigError(
                    f"EggConfig.election {config.score.name!r} probes clone gradients, which output mode records "
                    f"for plain layers only, not for transformer blocks {in_blocks}; use weight mode, "
                    "RolePlan(units='layers') or another score"
                )
        # the counts of every role draw a leader_scales schedule asks for, checked now
        multiples = role_plan.multiples(model, list(layer_plans)) if config.scales else None
        plans_by_draw = [scaled_counts(role_plan, layer_plans, scale, multiples) for scale in config.scales]
        logger.info("egg_optim: %s", describe_alignment(layer_plans, role_plan.align))

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
        self._plans_by_draw = plans_by_draw or [layer_plans]
        self.layer_plans: dict[str, LayerPlan] = self._counts(0)  # the counts in force now
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

    def _counts(self, draw: int) -> dict[str, LayerPlan]:
        """Per-layer counts of role draw ``draw`` (0: the initial draw, k: the k-th election)."""
        return self._plans_by_draw[min(draw, len(self._plans_by_draw) - 1)]

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

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def _observe_step(self) -> None:
        if not isinstance(self.score, RunningScore):
            return
        for name, layer in self.layers.items():
            if isinstance(self.score, UnitGradScore):
                roles = self.book.layers[name].roles
                if self.output_cloning is not None and roles.has_clones:
                    from ..rewrites.output_cloning import take_probe

                    grad = take_probe(layer.module)  # None on steps that were not probed
                else:
                    grad = layer.unit_rows(grad=True)
                value = None if grad is None else self.score.observe_grads(grad, roles)
            else:
                value = self.score.observe(layer)
            if value is not None:
                self._accumulate(name, value)

    def _arm_probe(self) -> None:
        """Output mode with a :class:`UnitGradScore`: probe the next forward when it is a probe step."""
        score = self.score
        probing = self.output_cloning is not None and isinstance(score, UnitGradScore)
        if probing and (self.steps + 1) % score.probe_every == 0:
            self.output_cloning.probe()

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
        self._arm_probe()
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
        counts = self._counts(0 if initial else self.elections + 1)
        if not initial and self.config.election_policy == "stable":
            out = {}
            for name, layer in self.layers.items():
                roles = self.roles[name]
                weight = layer.unit_rows()
                if self.clone_mode == "output":  # a promoted clone starts from its source's rows
                    weight = weight[roles.source_map.to(weight.device)]
                out[name] = stable_elect(
                    roles,
                    scores[name],
                    counts[name].leaders,
                    counts[name].independents,
                    hysteresis=self.hysteresis,
                    max_churn=float(self.config.max_churn),
                    weight=weight,
                )
            return out
        current = None if initial else self.roles
        return {
            name: elect(
                scores[name],
                counts[name].leaders,
                counts[name].independents,
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
        self.layer_plans = self._counts(self.elections)
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
