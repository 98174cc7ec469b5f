"""The role controller: which unit of a model leads, follows or stays independent, and everything that follows.

In the spirit of ``torch.ao.pruning``'s sparsifier, a separate object with a life cycle:

* **prepare** (construction): resolve the plan to managed units (:mod:`egg_optim.core.units`; a unit is a
  Linear/Conv output, or a transformer block's neuron or head, :mod:`egg_optim.core.blocks`), draw the first
  roles, build the model rewrites the options ask for (one list, :func:`~egg_optim.rewrites.factory.build_rewrites`)
  and start watching the first forward pass for norm coupling (:mod:`egg_optim.core.coupling`);
* **step** (:meth:`begin_step`, :meth:`observe_step`, :meth:`end_step` around the masked optimizer's step): follow
  parameters FSDP2 replaced, apply the norm coupling at this named point, feed the election score what it
  declared it needs, count the step, hold elections and clone events on their schedules;
* **squash / convert**: :meth:`export_model` (a plain copy of the model) and :meth:`remove_rewrites`.

It owns the managed units, roles, schedules, election scores, cloning, the rewrites and its own part of the state
dict (the ``egg_optim`` entry). Whenever roles change it tells the :class:`~egg_optim.optim.masked.MaskedOptimizer`
(which slices to hold fixed, and to move compact state), every rewrite, and the roles listeners.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..config import EggConfig
from ..core import axes, compact, repack, sharding
from ..core import coverage as _coverage
from ..core.blocks import UnitGroup, discover
from ..core.cloning import clone_layers, clone_layers_on_device, perturb_units, set_row_state
from ..core.coupling import Coupling, NormCoupling
from ..core.coverage import READ_DIRECTLY
from ..core.distributed import all_reduce_mean, derived_generator, same_on_all_ranks
from ..core.election import elect, with_hysteresis
from ..core.graduation import Graduation, graduate_roles, graduated_counts
from ..core.guards import OutputHeadCheck, frozen_layers, keep_frozen_roles, outside_inference_mode
from ..core.plan import LayerPlan, RolePlan, describe_alignment, output_heads
from ..core.policies import scaled_counts, stable_elect
from ..core.probe import example_call
from ..core.roles import Roles, by_parts, join, shares
from ..core.schedule import Schedule
from ..core.scores import RandomScore, Score, StepData, check_observed_scores, first_draw, unit_scores
from ..core.state_dict import Book, LayerBook, check_clone_rows, dependencies, pack_book, parse_book
from ..core.units import ManagedLayer, build_managed_layers, check_single_owners, couple_norm, parameter_holders
from ..errors import ConfigError, ElectionError, PlanError, RewriteCheckError, StateDictMismatchError
from ..rewrites.base import LayerRewrite
from ..rewrites.factory import build_rewrites
from . import stats as role_stats
from .masked import MaskedOptimizer

logger = logging.getLogger("egg_optim")


def _untrainable(layer: ManagedLayer, in_optimizer: set[int]) -> str | None:
    """Why the optimizer cannot train ``layer`` (a frozen or foreign parameter), or ``None``."""
    for pname, p in layer.params:
        if not p.requires_grad:
            return f"parameter {pname!r} is frozen (requires_grad=False)"
        if id(p) not in in_optimizer:
            return f"parameter {pname!r} is not in the optimizer"
    return None


def _check_ranks_agree(plans: Mapping[str, LayerPlan], layers: Mapping[str, ManagedLayer], group: Any) -> None:
    """Refuse, on every rank at once, to go on where the ranks would manage different units (models that differ
    in structure or frozen parameters, other plans, a block one rank's dataflow probe decided otherwise): the first
    election's all-reduce would otherwise mix unrelated scores or wait forever."""
    managed = [
        (
            n,
            lp.units,
            lp.leaders,
            lp.independents,
            [p for p, _ in layers[n].params],
            getattr(layers[n].group, "layout", ""),
        )
        for n, lp in plans.items()
    ]
    if not same_on_all_ranks(repr(managed), group):
        raise PlanError(
            f"the ranks of the process group would manage different layers or units; this rank manages "
            f"{len(plans)}: {list(plans)[:6]}. Construct the optimizer with the same plan on models of the same "
            "structure on every rank (opt.coverage() says what each rank found), or pass process_group= the ranks "
            "that hold replicas of this model (one pipeline stage's data-parallel group)"
        )


def _trainable_only(plan: RolePlan, layer_plans, layers, in_optimizer: set[int]):
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
        stacklevel=4,
    )
    keep = [n for n in layers if n not in reasons]
    return {n: layer_plans[n] for n in keep}, {n: layers[n] for n in keep}


def _called_only(model: nn.Module, plan: RolePlan, layer_plans, layers):
    """Output mode and the layers whose weight the model computes with without calling them (the probe saw it, in
    eval or training mode: Mamba's ``dt_proj``, Gemma 3n's ``correction_coefs``), whose clones could not take their
    sources' outputs: a default plan leaves them alone (warned); a plan naming them, or a default plan left with
    nothing else, is refused now (:class:`RewriteCheckError`). Where the probe did not run (``units="layers"``, no
    inputs), the first step refuses them (``check_called``)."""
    if plan.units != "auto":
        return layer_plans, layers
    direct = [n for n in discover(model).read_directly if n in layers and layers[n].group is None]
    if not direct:
        return layer_plans, layers
    if plan.layers is not None or plan.only_listed or len(direct) == len(layers):
        raise RewriteCheckError(
            direct[0],
            f"output mode cannot give the clones of {direct} their sources' outputs: the model computes with their "
            "weights without calling these layers (seen on the probe's forward pass), so clones would compute with "
            "their own rows while the saved model holds their sources'. Use clone_mode='weight', or leave them "
            f"out: RolePlan(..., exclude={direct!r})",
        )
    warnings.warn(
        f"egg_optim: output mode leaves alone {direct}: {READ_DIRECTLY} (clone_mode='weight' manages them)",
        stacklevel=4,
    )
    keep = [n for n in layers if n not in direct]
    return {n: layer_plans[n] for n in keep}, {n: layers[n] for n in keep}


def _only_clones(roles: Roles, units: torch.Tensor) -> Roles:
    """Roles whose clones are just ``units`` (with their sources under ``roles``): what graduation writes to."""
    rest = torch.ones(roles.num_units, dtype=torch.bool)
    rest[roles.leaders] = False
    rest[units] = False
    return Roles(roles.num_units, roles.leaders, rest.nonzero().flatten(), units, roles.source_map[units])


@dataclass
class LoadedState:
    """A validated ``egg_optim`` entry (:meth:`RoleController.read_state`), not applied yet."""

    book: Book
    roles: dict[str, Roles]
    layers: dict[str, ManagedLayer]  # the managed layers under the saved norm coupling
    coupling: tuple[dict[str, ManagedLayer], Coupling] | None
    clone_rows: Mapping[str, torch.Tensor]


def _fused_where_kernels_run(
    can_fuse: Callable[[nn.Module, nn.Module], bool], layer: nn.Module, norm: nn.Module
) -> bool:
    """``EggConfig(fuse_norms=None)``: fuse a coupled norm where egg_optim's C kernels run the fused norm (the layer
    on the CPU, the kernels built), asked when norms are coupled (the first step or ``couple_norms()``: after
    Accelerate moved the model). Elsewhere (CUDA) the fused norm would run as torch ops, which take more passes than
    the plain norm on every channel after the expansion (``docs/results/bench_norms.md``)."""
    if layer.weight.device.type != "cpu":
        return False
    from ..rewrites.output_cloning import native_kernels_available

    return native_kernels_available() and can_fuse(layer, norm)


class RoleController:
    """Roles, elections, cloning and model rewrites of ``model`` for the parameters ``masked`` steps.

    Args:
        model: the module whose units get roles.
        masked: the :class:`~egg_optim.optim.masked.MaskedOptimizer` over the model's parameters.
        config: the run's :class:`~egg_optim.config.EggConfig`.
        process_group: the ranks whose roles must agree (default: the world, when initialised).
    """

    def __init__(
        self,
        model: nn.Module,
        masked: MaskedOptimizer,
        config: EggConfig,
        process_group: Any = None,
        example_inputs: Any = None,
    ):
        role_plan = config.role_plan()
        layer_plans = role_plan.resolve(model)
        blocks = {n: c for n, c in role_plan.candidates(model).items() if isinstance(c, UnitGroup)}
        layers = build_managed_layers(
            model, list(layer_plans), dict(config.norms) if config.norms else None, groups=blocks
        )
        layer_plans, layers = _trainable_only(role_plan, layer_plans, layers, masked.params_held())
        if config.clone_mode == "output":
            layer_plans, layers = _called_only(model, role_plan, layer_plans, layers)
        _check_ranks_agree(layer_plans, layers, process_group)
        _coverage.report(
            _coverage.build(model, role_plan, layers, masked.optimizer),
            strict=config.strict_blocks,
            default_plan=role_plan.layers is None and not role_plan.only_listed and not role_plan.exclude,
        )
        # the counts of every role draw a leader_scales schedule asks for (aligned as the plan says), checked now;
        # graduation rounds its counts to the same multiples
        graduation = config.graduation
        changing = config.scales or not graduation.never
        multiples = role_plan.multiples(model, list(layer_plans)) if changing else None
        plans_by_draw = [scaled_counts(role_plan, layer_plans, scale, multiples) for scale in config.scales]
        logger.info("egg_optim: %s", describe_alignment(layer_plans, role_plan.align))

        self.model = model
        self.masked = masked
        self.config = config
        self.plan = role_plan
        self._plans_by_draw = plans_by_draw or [layer_plans]
        self._multiples = multiples
        self.graduation: Graduation = graduation
        self.layer_plans: dict[str, LayerPlan] = self.counts(0)  # the counts in force now
        self.layers: dict[str, ManagedLayer] = layers
        self.score: Score = config.score
        self.clone_every: Schedule = config.clone_schedule
        self.elect_every: Schedule = config.elect_schedule
        self.clone_mode = config.clone_mode
        self.process_group = process_group
        self.book = Book()
        self.rewrites: list[LayerRewrite] = []
        self._listeners: list[Callable[[Mapping[str, Roles]], None]] = []
        self._slots: dict[str, tuple[nn.Module, str, bool]] = {}  # owned tensor -> (module, attribute, is param)
        self._watch: list[tuple[dict, str, torch.Tensor]] | None = None  # what _stale compares (None: to build)
        # step-path clone events checked on the device: per tuple of layers, how many events kept each layer's
        # clones since settle_clone_checks last read them
        self._kept: dict[tuple[str, ...], torch.Tensor] = {}
        masked.sharded = self._check_sharding()
        # layers whose units may not move (checked on the plain model, before any rewrite): their roles stay where
        # elections put them; plain layers move with their followers (a norm's entries, the reader's columns)
        self._order_kept: dict[str, str] = {}
        self._followers: dict[str, list[repack.Follower]] = {}
        self._said_scattered = False
        if config.repack and masked.sharded:  # a unit's rows lie on several ranks: moving them is a collective
            why = "sharded by FSDP2 (repack moves units on one process or under DDP)"
            self._order_kept = dict.fromkeys(layers, why)
        elif config.repack:
            self._followers, self._order_kept = repack.plain_followers(model, layers)
            call = example_call(model, example_inputs)
            self._order_kept |= repack.orders_that_change_the_model(model, layers, call, self._followers)
            self._followers = {n: f for n, f in self._followers.items() if n not in self._order_kept}
        if self._order_kept:
            warnings.warn(
                "egg_optim: repack leaves the units of these layers in their order (their steps gather the "
                "units that elections scatter): " + "; ".join(f"{n}: {why}" for n, why in self._order_kept.items()),
                stacklevel=3,
            )
        initial = self._elect_all(first_draw(self.score, config.first_roles), True)
        # Module rewrites validate before changing anything; only then is the optimizer state laid out.
        self.rewrites = build_rewrites(
            model,
            layers,
            initial,
            clone_mode=config.clone_mode,
            eval_mode=config.eval_mode,
            skip_clone_grads=self._skip_clone_grads(config),
            clone_grads_for=self.score.name if self.score.requires("clone_grads") else None,
        )
        self.book.layers = {n: LayerBook(roles) for n, roles in initial.items()}
        self._roles_changed({}, initial)
        if config.repack:
            self._repack()
        explicit = {k: v for k, v in (config.norms or {}).items() if k in layers}
        plain = {n: lay.module for n, lay in layers.items() if lay.group is None}
        fusable = next((rw.can_fuse for rw in self.rewrites if rw.can_fuse is not None), None)
        if fusable is not None and config.fuse_norms is not True:
            fusable = None if config.fuse_norms is False else functools.partial(_fused_where_kernels_run, fusable)
        self._norm_coupling = NormCoupling(model, plain, explicit, self._couple_norms, fusable)
        if role_plan.layers is None and not role_plan.only_listed:  # the output head was found without input
            OutputHeadCheck(model, plain, output_heads(model, role_plan.candidates(model), role_plan.units))
        self._calls_checked = False

    def _skip_clone_grads(self, config: EggConfig) -> bool:
        if config.skip_clone_grads is not None:
            return config.skip_clone_grads
        # LFNN sites ask autograd for parameter and input gradients in separate calls; a skipping layer would
        # compute both in each, so its saving turns into extra work
        return not self.score.requires("grads") and config.local_losses is None

    def counts(self, draw: int, graduated: float = 0.0) -> dict[str, LayerPlan]:
        """Per-layer counts of role draw ``draw`` (0: the initial draw, k: the k-th election), with at least a
        ``graduated`` fraction of every layer's units active."""
        plans = self._plans_by_draw[min(draw, len(self._plans_by_draw) - 1)]
        return graduated_counts(plans, graduated, self._multiples) if graduated > 0 else plans

    # ------------------------------------------------------------------ rewrites
    def _clones_follow_sources(self) -> bool:
        return any(rw.clones_follow_sources for rw in self.rewrites)

    def remove_rewrites(self, which: Callable[[LayerRewrite], bool]) -> None:
        """Remove the rewrites ``which(rewrite)`` selects (their modules get their original classes back)."""
        for rw in [rw for rw in self.rewrites if which(rw)]:
            self.rewrites.remove(rw)
            rw.remove()

    def export_model(self, original_order: bool = False) -> nn.Module:
        """A plain copy of the model (original module classes, no egg_optim objects) that computes what the model
        computes as trained: every rewrite makes its modules of the copy plain (output mode: clone rows filled
        with their source's weights and norm statistics); ``original_order``: the units that ``repack`` moved put
        back in the model's original order (the same function)."""
        if self.masked.sharded:
            raise ConfigError(
                "export_model() copies the model, which FSDP2 cannot do with sharded parameters: take "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
                "full_state_dict=True)) instead (clone rows are filled in it as in model.state_dict()), on every rank"
            )
        model = copy.deepcopy(self.model)
        for rw in self.rewrites:
            rw.export(model)
        if original_order:
            tensors = dict(model.named_parameters()) | dict(model.named_buffers())
            for name, order in self.unit_order.items():
                followers = repack.resolve(self.layers[name], self._followers.get(name, ()), tensors)
                if followers is None:
                    raise ConfigError(f"export_model(original_order=True): the tensors that follow {name!r} are not "
                                      "in the exported model; export without original_order")  # fmt: skip
                repack.move_units_(self.layers[name], repack.inverse(order), tensors, followers)
        return model

    def coverage(self) -> _coverage.Coverage:
        """What this run manages in the model: blocks found and decomposed, units, rows, what is left alone and
        why (the output-mode rewrite of blocks, if any, says which blocks it verified)."""
        blocks = next((rw for rw in self.rewrites if hasattr(rw, "verified")), None)
        return _coverage.build(self.model, self.plan, self.layers, self.masked.optimizer, blocks)

    # ------------------------------------------------------------------ roles
    @property
    def roles(self) -> Mapping[str, Roles]:
        """Current roles per managed layer (read-only)."""
        return MappingProxyType({n: lb.roles for n, lb in self.book.layers.items()})

    def add_roles_listener(self, fn: Callable[[Mapping[str, Roles]], None]) -> None:
        """Call ``fn(roles)`` now and whenever roles change."""
        self._listeners.append(fn)
        fn(self.roles)

    def managed_params(
        self, roles: Mapping[str, Roles], layers: Mapping[str, ManagedLayer] | None = None
    ) -> Iterator[tuple[torch.Tensor, str, Roles, int]]:
        """(parameter, layer name, the roles of its positions, unit dim) for every managed-layer parameter the
        base optimizer holds (of ``layers``, default: the managed layers as they are), under ``roles``."""
        in_optimizer = self.masked.params_held()
        for name, layer in (self.layers if layers is None else layers).items():
            for pname, p in layer.params:
                if id(p) in in_optimizer:
                    yield p, name, layer.roles_of(pname, roles[name]), layer.dim_of(pname)

    def unit_params(
        self, roles: Mapping[str, Roles], layers: Mapping[str, ManagedLayer] | None = None
    ) -> dict[torch.Tensor, compact.UnitParam]:
        return self.masked.unit_params(self.managed_params(roles, layers))

    def _roles_changed(
        self, old: Mapping[str, Roles], new: Mapping[str, Roles], clone_state: str | None = None
    ) -> None:
        """Lay the optimizer state out for ``new`` roles (``old``: those it is laid out for; missing: full
        size), rebuild the step's indices and tell the rewrites and the listeners."""
        if self.masked.storage == "compact":
            before = self.unit_params(old, {n: self.layers[n] for n in old}) if old else {}
            after = self.unit_params(new)
            self.masked.relayout(((before.get(p), e) for p, e in after.items()), clone_state)
        self.rebuild_masks()
        roles = self.roles
        for rw in self.rewrites:
            rw.update_roles({n: roles[n] for n in rw.layers})
        for fn in self._listeners:
            fn(roles)

    def _set_roles(self, roles: Mapping[str, Roles], clone_state: str | None = None) -> None:
        """Hand over to ``roles`` (an election, a graduation): update tenure and leadership history, then lay out
        state (``clone_state``: the policy for units that become active, default the run's)."""
        self.settle_clone_checks()  # counted under the roles they ran with
        old = dict(self.roles)
        for name, new in roles.items():
            lb = self.book.layers[name]
            lb.led_steps[lb.roles.leaders] += self.book.steps - self.book.roles_since
            newcomers = new.leaders[~torch.isin(new.leaders, lb.roles.leaders)]
            lb.seated_at[newcomers] = self.book.steps
            lb.roles = new
        self.book.roles_since = self.book.steps
        self._roles_changed(old, roles, clone_state)

    @torch.no_grad()
    def _repack(self) -> dict[str, torch.Tensor]:
        """Reorder the units of every layer whose roles are not laid out as runs (:mod:`egg_optim.core.repack`):
        its parameters, buffers and gradients, their optimizer state (compact state through full size and back:
        parked slices move with their units) and the per-unit records move together, so the model computes what it
        did and the run goes on as it would have; then the roles are runs and the steps take views. Blocks frozen
        since construction, sharded by FSDP2 or whose units moving would change the model (checked at construction:
        :func:`~egg_optim.core.repack.orders_that_change_the_model`) keep their order (and their gathers).
        A plain layer moves with its followers (:func:`~egg_optim.core.repack.plain_followers`: the norm after it,
        the input columns of the layer reading it, with their gradients and state). Returns ``{layer: order}`` of
        the layers it reordered."""
        frozen = frozen_layers(self.layers, warn=False)
        todo: dict[str, torch.Tensor] = {}
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        followers: dict[str, list] = {}
        for name, layer in self.layers.items():
            roles = self.roles[name]
            movable = layer.group is not None or name in self._followers
            if not movable or name in self._order_kept or name in frozen or not roles.has_clones:
                continue
            followers[name] = repack.resolve(layer, self._followers.get(name, ()), tensors)
            if followers[name] is None:  # a follower left the model: moving the units alone would change it
                self._order_kept[name] = "a tensor that follows its units is no longer in the model"
                warnings.warn(f"egg_optim: repack leaves the units of {name!r} in their order from now on: "
                              f"{self._order_kept[name]}", stacklevel=4)  # fmt: skip
                continue
            if any(sharding.is_sharded(t) for _, _, t in self.owned({name: layer})):
                continue
            order = repack.packed_order(roles, layer.parts)
            if order is not None and not torch.equal(order, torch.arange(roles.num_units)):
                todo[name] = order
        if not todo:
            return todo
        old = dict(self.roles)
        groups = {p: g for g in self.masked.param_groups for p in g["params"]}
        state_of = self.masked.state
        for name, order in todo.items():
            layer, lb = self.layers[name], self.book.layers[name]
            repack.move_units_(layer, order, followers=followers[name])
            for f, t in followers[name]:  # a follower parameter's gradient and state
                moves = f.moves(order)
                for x in [t.grad, *(state_of.get(t) or {}).values(), *self.masked.parked.get(t, {}).values()]:
                    if torch.is_tensor(x) and x.dim() > f.dim and x.shape[f.dim] == moves.numel():
                        repack.permute_(x, f.dim, moves)
            for pname, p in layer.params:  # what moves with each parameter: its gradient and optimizer state
                dim = layer.dim_of(pname)
                moves = repack.positions(order, layer.index.get(pname))
                state = self.masked.state.get(p) or {}
                if state and self.masked.storage == "compact":  # active slices only: to full size first
                    compact.expand(p, state, layer.roles_of(pname, old[name]), groups[p], from_sources=False,
                                   parked=self.masked.parked.pop(p, None), fresh=self.masked.info.fresh_value,
                                   dim=dim)  # fmt: skip
                for t in [p.grad, *state.values()]:
                    if torch.is_tensor(t) and t.dim() and axes.units_of(p.shape, t, dim) == moves.numel():
                        repack.permute_(t, dim, moves)
            lb.led_steps, lb.seated_at = lb.led_steps[order], lb.seated_at[order]
            if lb.score_sum is not None:
                lb.score_sum = lb.score_sum[order.to(lb.score_sum.device)]
            lb.unit_order = order if lb.unit_order is None else lb.unit_order[order]
            lb.roles = repack.permuted(old[name], order)
        # compact state of the reordered parameters is full size now: laid out again for their new roles
        self._roles_changed({n: r for n, r in old.items() if n not in todo}, self.roles)
        logger.info("egg_optim: repacked the units of %d block(s): %s", len(todo), ", ".join(todo))
        return todo

    @property
    def unit_order(self) -> dict[str, torch.Tensor]:
        """``{layer: order}`` for every layer whose units :attr:`EggConfig.repack` reordered: position ``j`` of
        its tensors holds the model's original unit ``order[j]``."""
        return {n: lb.unit_order.clone() for n, lb in self.book.layers.items() if lb.unit_order is not None}

    def rebuild_masks(self) -> None:
        self.masked.rebuild(self.managed_params(self.roles))

    # ------------------------------------------------------------------ scores
    def _clone_grads(self, name: str, layer: ManagedLayer, roles: Roles) -> torch.Tensor | None:
        """Every unit's weight gradient as if each unit were computed: a probing rewrite's record for a layer
        with clones (``None`` on steps that were not probed), else ``weight.grad``'s rows."""
        if roles.has_clones:
            for rw in self.rewrites:
                if rw.probes_clone_grads and name in rw.layers:
                    return rw.take_clone_grads(name)
        return layer.unit_rows(grad=True)

    @torch.no_grad()
    def observe_step(self) -> None:
        """Give the score this step's observations (what it declared it needs), once gradients are complete."""
        score = self.score
        if not score.observes_steps:
            return
        clone_grads = score.requires("clone_grads")
        for name, layer in self.layers.items():
            roles = self.book.layers[name].roles
            grads = self._clone_grads(name, layer, roles) if clone_grads else None
            value = score.observe_step(layer, StepData(roles, grads))
            if value is not None:
                self._accumulate(name, value)

    def _arm_probe(self) -> None:
        """A score that needs clone gradients: probing rewrites probe the next forward when it is a probe step."""
        score = self.score
        if score.requires("clone_grads") and (self.book.steps + 1) % score.probe_every == 0:
            for rw in self.rewrites:
                rw.probe()

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        lb = self.book.layers[name]
        value = value.detach().float()
        lb.score_sum = value.clone() if lb.score_sum is None else lb.score_sum.add_(value.to(lb.score_sum.device))
        lb.score_count += 1

    def observe_scores(self, scores: Mapping[str, torch.Tensor]) -> None:
        """Feed per-unit scores (higher is better) from outside; averaged until the next election. All layers
        are checked before any score is added; an election that reads no observed scores refuses them."""
        units = {n: lay.num_units for n, lay in self.layers.items()}
        for name, value in check_observed_scores(self.score, scores, units).items():
            self._accumulate(name, value)

    # ------------------------------------------------------------------ the step and the schedules
    def begin_step(self) -> None:
        """Before a step's base update: output mode refuses layers the model used without calling them (the first
        step after an eager forward pass), and the norm coupling is applied here if it is still pending."""
        if not self._calls_checked:
            self._calls_checked = all(rw.check_called() for rw in self.rewrites)
        self.couple_norms()

    def end_step(self) -> None:
        """After the base update: count the step, hold what the schedules ask for, arm the next probe."""
        self.book.steps += 1
        if self.elect_every.after_step(self.book.steps):
            self.elect_now()
        if self.clone_every.after_step(self.book.steps):
            self._scheduled_clone(on_device=True)
        if self.graduation.unit == "steps":
            self._graduate_due(self.book.steps)
        self._arm_probe()

    def _new_epoch(self, epoch: Any, mark: str) -> bool:
        """Whether epoch ``epoch``'s event ``mark`` (a :class:`Book` field) is new, recording it (each epoch's
        begin and end are handled once: a resumed epoch is not handled again)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch <= getattr(self.book, mark):
            return False
        setattr(self.book, mark, epoch)
        return True

    def epoch_begin(self, epoch: int) -> bool:
        """Elections and graduations due at the start of ``epoch``; whether roles changed."""
        if not self._new_epoch(epoch, "epoch_begun"):
            return False
        changed = False
        due = self.elect_every.at_epoch_begin(epoch) and self.book.steps > 0
        if due and self.book.last_election_step != self.book.steps:
            self.elect_now()
            changed = True
        if self.graduation.unit == "epochs":
            changed = self._graduate_due(epoch) or changed
        return changed

    def epoch_end(self, epoch: int) -> bool:
        if not self._new_epoch(epoch, "epoch_ended"):
            return False
        self.settle_clone_checks()
        return self.clone_every.at_epoch_end(epoch) and self._scheduled_clone()

    def train_end(self) -> bool:
        self.settle_clone_checks()
        return self.clone_every.at_train_end and self._scheduled_clone()

    def _scheduled_clone(self, on_device: bool = False) -> bool:
        key = (self.book.steps, self.book.elections)
        if key == self.book.last_clone_key:  # nothing trained or elected since the last clone event
            return False
        self._clone(on_device)
        return True

    # ------------------------------------------------------------------ elections and cloning
    def _elect_all(self, score: Score, initial: bool = False) -> dict[str, Roles]:
        seed = self.config.seed
        gen = derived_generator(seed, "init") if initial else derived_generator(seed, "elect", self.book.elections)
        scores: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            lb = self.book.layers.get(name)
            total = lb.score_sum if lb is not None else None
            average = total.cpu() / lb.score_count if total is not None else None
            scores[name] = unit_scores(score, layer, gen, average)
        if scores:
            flat = all_reduce_mean(torch.cat(list(scores.values())), self.process_group)
            scores = dict(zip(scores, torch.split(flat, [s.numel() for s in scores.values()])))
        bad = [n for n, s in scores.items() if not bool(torch.isfinite(s).all())]
        if bad:
            raise ElectionError(f"score {score.name!r} gave non-finite values in layer(s) {bad}; roles are unchanged")
        counts = self.counts(0, 0.0) if initial else self.counts(self.book.elections + 1, self.book.graduated_to)
        follow = self._clones_follow_sources()
        out = {}
        for name, layer in self.layers.items():
            lp, roles = counts[name], None if initial else self.roles[name]
            # units that repack moved are elected in their original order (ties, draws and the stable policy's
            # choices then fall on the units they fall on without repack), and their roles moved back after
            order = self.book.layers[name].unit_order if name in self.book.layers else None
            back = None if order is None else repack.inverse(order)
            if back is not None:
                if not isinstance(score, RandomScore):  # a draw is per unit already
                    scores[name] = scores[name][back.to(scores[name].device)]
                roles = None if roles is None else repack.permuted(roles, back)
            out[name] = self._elect_layer(name, layer, lp, roles, scores[name], gen, follow, back)
            if order is not None:
                out[name] = repack.permuted(out[name], order)
        return out

    def _elect_layer(
        self,
        name: str,
        layer: ManagedLayer,
        lp: LayerPlan,
        roles: Roles | None,
        scores: torch.Tensor,
        gen: torch.Generator,
        follow: bool,
        back: torch.Tensor | None,
    ) -> Roles:
        """One layer's new roles from ``scores`` (``back``: its units' positions in their original order, where
        ``scores`` and ``roles`` are given; its weight rows are read in that order too)."""
        cfg = self.config

        def rows() -> torch.Tensor:
            w = layer.unit_rows()
            return w if back is None else w[back.to(w.device)]

        if roles is not None and cfg.election_policy == "stable":
            weight = rows()
            if follow:  # a promoted clone starts from its source's rows
                weight = weight[roles.source_map.to(weight.device)]

            def stable(units: slice, lead: int, ind: int, now: Roles | None) -> Roles:
                h, churn = float(cfg.hysteresis), float(cfg.max_churn)
                return stable_elect(now, scores[units], lead, ind, hysteresis=h, max_churn=churn, weight=weight[units])

            return self._in_parts(name, layer, lp, stable, roles)
        eff = with_hysteresis(scores, roles, float(cfg.hysteresis))  # over the whole layer, then split
        near = rows() if cfg.assign == "nearest" else None

        def draw(units: slice, lead: int, ind: int, now: Roles | None) -> Roles:
            w = None if near is None else near[units]
            return elect(eff[units], lead, ind, assign=cfg.assign, weight=w, generator=gen)

        return self._in_parts(name, layer, lp, draw)

    def _in_parts(
        self, name: str, layer: ManagedLayer, lp: LayerPlan, fn: Callable[..., Roles], current: Roles | None = None
    ) -> Roles:
        """Roles for ``layer`` from ``fn`` in each of its parts (the experts of fused MoE weights, each its own
        share of every role: :func:`~egg_optim.core.roles.by_parts`); on the whole layer, with a warning, where
        ``current`` puts clones in another part than their source (roles saved before experts were parts)."""
        new = by_parts(layer.parts, layer.num_units, lp.leaders, lp.independents, fn, current)
        if new is None:
            warnings.warn(
                f"layer {name!r}: its roles clone units of one expert from another's (a checkpoint from before "
                "egg_optim elected experts one by one); these roles are chosen over the whole layer, as then",
                stacklevel=3,
            )
            new = fn(slice(None), lp.leaders, lp.independents, current)
        return new

    @outside_inference_mode()  # in an evaluation block too: the new state must be trainable
    def elect_now(self) -> dict[str, int]:
        """Hold an election in every managed layer now; returns the leader churn per layer. Layers frozen since
        the optimizer was built keep their roles and rows (with a warning)."""
        self.sync_params()
        frozen = frozen_layers(self.layers)
        new = keep_frozen_roles(self._elect_all(self.score), self.roles, frozen)
        for name, roles in new.items():
            lb = self.book.layers[name]
            lb.churn = int((~torch.isin(roles.leaders, lb.roles.leaders)).sum())
            lb.score_sum, lb.score_count = None, 0
        self.book.elections += 1
        self.layer_plans = self.counts(self.book.elections, self.book.graduated_to)
        self.book.last_election_step = self.book.steps
        # A clone has been computing its source's output; giving it the source's rows (conv rows and norm
        # statistics; a block's producer slices) before it may become active again keeps that output
        # (function-preserving election).
        for rw in self.rewrites:
            rw.fill_clones(skip=frozen)
        self._set_roles(new)
        if self.config.repack:
            self._repack()
        elif not self._said_scattered:
            scattered = [n for n, layer in self.layers.items() if layer.group is not None and not self._on_runs(n)]
            if scattered:  # once a run: what the steps now do, and what would keep them on views
                self._said_scattered = True
                logger.info(
                    "egg_optim: the election scattered the roles of %d transformer block(s); their steps now take "
                    "their units by gathers (EggConfig.repack=True reorders the units so the steps stay on views)",
                    len(scattered),
                )
        return {n: lb.churn for n, lb in self.book.layers.items()}

    def _graduate_due(self, position: int) -> bool:
        target = self.graduation.target(position)
        if target > self.book.graduated_to:
            self.graduate_now(target)
            return True
        return False

    @outside_inference_mode()
    def graduate_now(self, fraction: float) -> dict[str, int]:
        """Graduate clones until at least ``fraction`` of every layer's units compute and train (rounded up to the
        plan's multiple; a layer already there keeps its roles); returns the units graduated per layer.

        Promoted clones become independents, spread over their sources (:func:`~egg_optim.core.graduation.
        graduate_roles`). What the model computes is kept: in output mode every clone first takes its source's
        rows (as at an election), in weight mode a clone already computes with its own. Their optimizer state
        follows ``graduate_state``; ``graduate_noise`` perturbs their rows. Every rank draws the same units."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ConfigError(f"graduate_now: fraction must be a number in (0, 1], got {fraction!r}")
        fraction = max(float(fraction), self.book.graduated_to)
        self.sync_params()
        frozen = frozen_layers(self.layers)
        counts = self.counts(self.book.elections, fraction)
        gen = derived_generator(self.config.seed, "graduate", round(fraction * 1_000_000))
        new, promoted = {}, {}
        for name in self.layers:
            roles = self.roles[name]
            extra = counts[name].independents - roles.counts()["independents"]
            new[name] = _graduate_parts(self.layers[name], roles, extra, gen)
            moved = new[name].independents[~torch.isin(new[name].independents, roles.independents)]
            promoted[name] = _only_clones(roles, moved)
        new = keep_frozen_roles(new, self.roles, frozen)
        for rw in self.rewrites:
            rw.fill_clones(skip=frozen)
        cfg = self.config
        noise_gen = derived_generator(cfg.seed, "graduate-noise", round(fraction * 1_000_000))
        groups = {p: g for g in self.masked.param_groups for p in g["params"]}
        for name, layer in self.layers.items():
            units = promoted[name]
            if name in frozen or not units.has_clones:
                continue
            perturb_units(layer, units, float(cfg.graduate_noise), noise_gen)
            if self.masked.storage == "full":
                for pname, p in layer.params:
                    er = layer.roles_of(pname, units)
                    st = self.masked.state.get(p, {})
                    set_row_state(
                        p,
                        st,
                        layer.dim_of(pname),
                        er.clones,
                        er.sources,
                        cfg.graduate_state,
                        group=groups.get(p),
                        fresh=self.masked.info.fresh_value,
                    )
        self.book.graduated_to = fraction
        self.layer_plans = self.counts(self.book.elections, fraction)
        before = {n: self.roles[n].counts()["independents"] for n in self.layers}
        self._set_roles(new, clone_state=cfg.graduate_state)
        return {n: self.roles[n].counts()["independents"] - before[n] for n in self.layers}

    def clone_now(self) -> int:
        """Copy every clone's source leader into it now; returns the number of clone units written. Layers frozen
        since the optimizer was built, and clones whose new rows would not be finite, are left as they are (with
        a warning)."""
        self.settle_clone_checks()
        return self._clone(on_device=False)

    @outside_inference_mode()
    def _clone(self, on_device: bool) -> int:
        """One clone event. ``on_device`` (the step path): the finiteness check stays on the device where it can
        (optimizer state kept: :func:`~egg_optim.core.cloning.clone_layers_on_device`), read later by
        :meth:`settle_clone_checks`; the count returned then assumes every clone was written."""
        self.sync_params()
        frozen = frozen_layers(self.layers)
        cfg = self.config
        gen = derived_generator(self.config.seed, "clone", self.book.clone_events) if cfg.clone_noise > 0 else None
        names = [name for name in self.layers if name not in frozen]
        items = [(self.layers[name], self.book.layers[name].roles) for name in names]
        blend, noise = float(cfg.clone_blend), float(cfg.clone_noise)
        if on_device and cfg.clone_state == "keep":
            held = clone_layers_on_device(items, blend=blend, noise=noise, generator=gen)
            if held is not None:
                which, kept = held
                key = tuple([names[i] for i in which])
                pending = self._kept.get(key)
                self._kept[key] = kept.long() if pending is None else pending.add_(kept)
            counts = [roles.num_clones if roles.has_clones else 0 for _, roles in items]
        else:
            # fresh values read their group's options: only "reset" needs them
            groups = None
            if cfg.clone_state == "reset":
                groups = {p: g for g in self.masked.param_groups for p in g["params"]}
            counts = clone_layers(
                items,
                blend=blend,
                noise=noise,
                state=cfg.clone_state,
                opt_state=self.masked.state,
                groups=groups,
                generator=gen,
                fresh=self.masked.info.fresh_value,
            )
        for name, n in zip(names, counts):
            self.book.layers[name].cloned_units += n
        written = sum(counts)
        self.book.clone_events += 1
        self.book.last_clone_key = (self.book.steps, self.book.elections)
        return written

    # ------------------------------------------------------------------ statistics
    def leadership_counts(self) -> dict[str, torch.Tensor]:
        return role_stats.leadership_counts(self.book)

    def stats(self) -> dict[str, Any]:
        self.settle_clone_checks()
        runs = {name: self._on_runs(name) for name in self.layers}
        return role_stats.stats(self.book, self.layer_plans, self.plan.align, runs)

    def _on_runs(self, name: str) -> bool:
        """Whether layer ``name``'s roles are runs (in every part), which its steps take by views, not gathers."""
        roles = self.roles[name]
        if not roles.has_clones:
            return True
        parts = self.layers[name].parts
        split = roles.split(parts) if parts > 1 else [roles]
        return split is not None and all(
            r.active_span is not None and (not r.has_clones or r.clone_span is not None) for r in split
        )

    def settle_clone_checks(self) -> int:
        """Read the finiteness checks that step-path clone events left on the device (one host read for all of
        them): clones they kept are taken off ``cloned_units``, and one warning names the layers. Called before
        anything reads the counters or changes roles (:meth:`stats`, state dicts, role changes, epoch ends,
        explicit clone events); returns the clone units kept since the last call."""
        if not self._kept:
            return 0
        pending = self._kept
        device = next(iter(pending.values())).device
        flat = torch.cat([t.to(device) for t in pending.values()]).tolist()
        for t in pending.values():  # zeroed in place: a step captured in a CUDA graph keeps adding to them
            t.zero_()
        kept: dict[str, tuple[int, int]] = {}  # layer -> (events that kept its clones, clone units kept)
        i = 0
        for names in pending:
            for name, events in zip(names, flat[i : i + len(names)]):
                if events:
                    units = events * self.book.layers[name].roles.num_clones
                    self.book.layers[name].cloned_units -= units
                    e, u = kept.get(name, (0, 0))
                    kept[name] = (e + events, u + units)
            i += len(names)
        if kept:
            warnings.warn(
                "egg_optim: clone events at training steps left the clones of layer(s) "
                + ", ".join(f"{n!r} ({e} event(s), {u} clone unit(s))" for n, (e, u) in kept.items())
                + " as they were, because their sources' rows held NaN or inf (a non-finite gradient or update); "
                "clone events never copy non-finite values (at a step the check is per layer and runs on the "
                "device; opt.clone_now() checks per clone unit)",
                RuntimeWarning,
                stacklevel=3,
            )
        return sum(u for _, u in kept.values())

    # ------------------------------------------------------------------ norm coupling
    @property
    def coupled_norms(self) -> dict[str, str]:
        return {n: lay.norm_name for n, lay in self.layers.items() if lay.norm_name is not None}

    @property
    def coupling_pending(self) -> bool:
        return self._norm_coupling.pending

    def couple_norms(self) -> None:
        """Decide and apply the norm coupling now, from the first complete forward pass recorded (none:
        explicit couplings only, logged as a warning); nothing once decided."""
        if self._norm_coupling.pending:
            self._norm_coupling.decide_now()

    def _couple_norms(self, coupling: Coupling) -> None:
        # called once by the NormCoupling, from couple_norms(); validates everything before changing anything
        self._apply_coupling(self._coupled_layers(coupling), coupling.fused, relayout=True)

    def _coupled_layers(self, coupling: Coupling) -> dict[str, ManagedLayer]:
        """The managed layers whose norm ``coupling`` changes, rebuilt (validated; nothing is changed)."""
        holders = parameter_holders(self.model)
        new = {
            n: couple_norm(self.model, self.layers[n], norm, holders)
            for n, norm in coupling.coupled.items()
            if self.layers[n].norm_name != norm
        }
        check_single_owners({**self.layers, **new})
        return new

    def _apply_coupling(self, new: Mapping[str, ManagedLayer], fused: Mapping[str, str], relayout: bool) -> None:
        fuser = next((rw for rw in self.rewrites if rw.can_fuse is not None), None)
        if fuser is not None and fused:
            fuser.fuse_norms(fused)  # validates before changing anything
        joining = []
        for n, lay in new.items():
            layer = self.layers[n]
            old = {id(p) for _, p in layer.params}
            joining += [(n, pname, p) for pname, p in lay.params if id(p) not in old]
            layer.norm_name, layer.norm, layer.params, layer.buffers = lay.norm_name, lay.norm, lay.params, lay.buffers
        self._watch = None
        if relayout:  # norm state already there (loaded) takes the layout
            groups = self.masked.group_of()
            self.masked.relayout(
                (None, compact.UnitParam(p, groups[id(p)][0], self.roles[n], self.layers[n].dim_of(pname)))
                for n, pname, p in joining
                if id(p) in groups
            )
        if new:
            self.rebuild_masks()

    def _coupling_state(self) -> dict[str, dict[str, str]] | None:
        """The decided coupling, for state dicts (``None`` while pending: nothing to restore)."""
        if self._norm_coupling.pending:
            return None
        fused = {k: v for rw in self.rewrites for k, v in rw.fused_norms.items()}
        return {"norms": self.coupled_norms, "fused": fused}

    def _saved_coupling(self, extra: Any) -> tuple[dict[str, ManagedLayer], Coupling] | None:
        """The coupling a state dict was saved with, validated, when this controller has none yet (a resumed run
        couples what the saved run coupled). Changes nothing."""
        if not isinstance(extra, Mapping) or extra.get("coupling") is None:
            return None
        # already decided (a step ran first): the saved decision must agree, its fusions are in place
        pending = self._norm_coupling.pending
        can_fuse = any(rw.can_fuse is not None for rw in self.rewrites)
        saved = self._norm_coupling.from_state(extra["coupling"], fuse=pending and can_fuse)
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

    # ------------------------------------------------------------------ parameters FSDP2 replaces
    def _check_sharding(self) -> bool:
        """Whether managed parameters are sharded (DTensors); refuses placements the core cannot translate."""
        flags = []
        for layer in self.layers.values():
            for pname, p in layer.params:
                sharding.check_placements(pname, p, layer.dim_of(pname))
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
        """Whether a module registers another tensor than the one a unit owns: once per step, so the (registry,
        attribute, tensor) triples are listed once, until the owned tensors change."""
        watch = self._watch
        if watch is None:
            watch = self._watch = []
            for _, qname, t in self.owned():
                module, attr, is_param = self._slot(qname)
                watch.append((module._parameters if is_param else module._buffers, attr, t))
        for registry, attr, t in watch:  # noqa: SIM110 (any(<generator>) resumes a Python frame per tensor)
            if registry.get(attr) is not t:
                return True
        return False

    def sync_params(self) -> None:
        """Follow unit-owned tensors that the model replaced since they were looked up: ``fully_shard`` registers
        new (DTensor) parameters, after the optimizer was built when Accelerate prepares the model, and between a
        forward pass and the backward pass that ends it FSDP2 registers gathered copies. Sharded parameters are
        put back first (:func:`~egg_optim.core.sharding.reshard`: writes to the gathered copies would be lost),
        then the managed layers take the registered tensors, which must be the optimizer's, and with sharded
        parameters the storage becomes ``"full"``. A cheap identity check when nothing changed."""
        if not self._stale():
            return
        sharding.reshard(self.model)
        if not self._stale():
            return
        in_optimizer = self.masked.params_held()
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
        if any(self.masked.state.get(p) for p in old if id(p) not in kept):
            raise ConfigError(
                "the model's managed parameters were replaced (fully_shard?) after the optimizer took steps: their "
                "optimizer state belongs to the old tensors; shard the model before the first step"
            )
        for name, layer in self.layers.items():
            layer.params = new[name]
            layer.buffers = [(qname, self._registered(qname)) for qname, _ in layer.buffers]
        self._watch = None
        self.masked.forget_parked(kept)  # (replaced ones hold none)
        self.masked.sharded = self._check_sharding()
        self._check_unsharded_rewrites()
        self.rebuild_masks()

    def _check_unsharded_rewrites(self) -> None:
        """Refuse class-swapping rewrites of modules that ``fully_shard`` wrapped itself: FSDP2 swaps their class
        too, so neither rewrite could be undone or recognised."""
        modules = dict(self.model.named_modules())
        for rw in self.rewrites:
            for n in rw.module_names():
                if sharding.is_fsdp_module(modules[n]):
                    raise ConfigError(
                        f"module {n!r} is itself wrapped by fully_shard, which {rw.option} cannot rewrite: apply "
                        "fully_shard to a module that contains it (a block, the model), e.g. a transformer-layer or "
                        "no auto-wrap policy rather than a size-based one"
                    )

    # ------------------------------------------------------------------ the egg_optim entry of state dicts
    def owned(self, layers: Mapping[str, ManagedLayer] | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(layer, qualified name, tensor) for every parameter and buffer a managed unit owns."""
        for name, layer in (self.layers if layers is None else layers).items():
            for qname, t in [*layer.params, *layer.buffers]:
                yield name, qname, t

    def _clone_rows(self) -> dict[str, torch.Tensor]:
        """The clones' own slices of every tensor they own, where clones compute with their source's rows. A saved
        model holds such clones as their sources (what output mode computes, for a plain model), and elections
        may read the clones' own rows (``weight_norm``, ``assign="nearest"``, blending): these make a resume
        exact."""
        out: dict[str, torch.Tensor] = {}
        if not self._clones_follow_sources():
            return out
        for name, qname, t in self.owned():
            layer, roles = self.layers[name], self.roles[name]
            if roles.has_clones:
                er = layer.roles_of(qname, roles)
                whole = sharding.full(t.detach())
                out[qname] = axes.select(whole, layer.dim_of(qname), er.clones).cpu().clone()
        return out

    def state_entry(self) -> dict[str, Any]:
        """The ``egg_optim`` entry of a state dict: roles, counters, running scores, coupling, clones' rows."""
        self.settle_clone_checks()
        entry = pack_book(
            self.book,
            plan=self.plan.signature(),
            seed=self.config.seed,
            storage=self.masked.storage,
            depends=dependencies(self.config),
        )
        entry["coupling"] = self._coupling_state()
        entry["clone_rows"] = self._clone_rows()
        return entry

    def read_state(self, extra: Any) -> LoadedState:
        """The ``egg_optim`` entry ``extra`` validated against this controller; changes nothing."""
        book = parse_book(
            extra,
            plan=self.plan.signature(),
            units={n: lay.num_units for n, lay in self.layers.items()},
            counts=lambda draw, graduated: {
                n: (lp.leaders, lp.independents) for n, lp in self.counts(draw, graduated).items()
            },
            device_of=lambda n: self.layers[n].device,
            depends=dependencies(self.config),
        )
        roles = {n: lb.roles for n, lb in book.layers.items()}
        coupling = self._saved_coupling(extra)  # the saved run's norm coupling, if this one has none yet
        layers = {**self.layers, **(coupling[0] if coupling is not None else {})}
        clone_rows = extra.get("clone_rows", {}) if self._clones_follow_sources() else {}
        return LoadedState(book, roles, layers, coupling, clone_rows)

    def check_clone_rows(self, loaded: LoadedState) -> None:
        """Refuse saved clone slices that do not fit the saved roles or are not finite (changes nothing)."""
        roles, layers = loaded.roles, loaded.layers
        shapes = {}
        for name, qname, t in self.owned(layers):
            er = layers[name].roles_of(qname, roles[name])
            shapes[qname] = axes.slice_shape(t.shape, layers[name].dim_of(qname), er.num_clones)
        check_clone_rows(loaded.clone_rows, shapes)

    def adopt(self, loaded: LoadedState) -> None:
        """Take a validated entry (after the masked optimizer loaded the base state, full size): the saved run's
        seed (as ``param_groups`` hyperparameters are adopted), coupling, counters and roles, and the clones' own
        rows (after the model was loaded, as Accelerate and the Trainer do)."""
        book = loaded.book
        roles_since = book.roles_since
        self.settle_clone_checks()  # the warning still says what happened before the load
        if book.seed is not None and book.seed != self.config.seed:
            # like the hyperparameters in param_groups, the saved run's seed is adopted: later draws continue it
            self.config = self.config.replace(seed=book.seed)
        if loaded.coupling is not None:
            self._apply_coupling(loaded.coupling[0], loaded.coupling[1].fused, relayout=False)
            self._norm_coupling.adopt(loaded.coupling[1])
        self.book = book
        self.layer_plans = self.counts(book.elections, book.graduated_to)
        self._roles_changed({}, loaded.roles)
        self._restore_clone_rows(loaded.clone_rows)
        self.book.roles_since = roles_since

    @torch.no_grad()
    def _restore_clone_rows(self, rows: Mapping[str, torch.Tensor]) -> None:
        for name, qname, t in self.owned():
            if qname in rows:
                layer = self.layers[name]
                er = layer.roles_of(qname, self.roles[name])
                if sharding.is_sharded(t):
                    whole = sharding.full(t)
                    sharding.write_full_(t, axes.copied(whole, layer.dim_of(qname), er.clones, rows[qname].to(whole)))
                else:
                    axes.copy_(t, layer.dim_of(qname), er.clones, rows[qname].to(t))


def _graduate_parts(layer: ManagedLayer, roles: Roles, extra: int, gen: torch.Generator) -> Roles:
    """:func:`graduate_roles` in each part of ``layer`` (its experts), the most clones left graduating first, so
    that the experts keep equal shares of every role; on the whole layer where ``roles`` do not split."""
    now = roles.split(layer.parts) if layer.parts > 1 else None
    if now is None:
        return graduate_roles(roles, extra, gen)
    promote = shares(extra, layer.parts, [r.num_clones for r in now])
    return join([graduate_roles(r, k, gen) for r, k in zip(now, promote)])
