"""``LeaderCloneOptimizer``: leader/clone training around any elementwise torch optimizer.

A thin facade over two objects (see ``docs/architecture.md``):

* the :class:`~egg_optim.optim.controller.RoleController` (``opt.controller``): managed units, roles, schedules,
  elections, cloning, norm coupling, the list of model rewrites and the ``egg_optim`` entry of state dicts;
* the :class:`~egg_optim.optim.masked.MaskedOptimizer` (``opt.masked``): the base optimizer's exact step with
  clone units held fixed, and its full-size state dict.

The facade is the ``torch.optim.Optimizer`` the training loop sees: it shares the base optimizer's
``param_groups``, ``state`` and ``defaults`` (LR schedulers, gradient clipping and Accelerate see one
optimizer), orders the two objects' work in :meth:`LeaderCloneOptimizer.step`, and joins their state dicts into
one (the format of every earlier version). Its options are one :class:`~egg_optim.config.EggConfig`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from operator import attrgetter
from typing import Any

import torch
from torch import nn

from ..config import EggConfig
from ..core import sharding
from ..core.blocks import discover
from ..core.plan import LayerPlan
from ..core.roles import Roles
from ..core.state_dict import STATE_KEY, check_base_state
from ..errors import ConfigError, StateDictMismatchError, UnsupportedOptimizerError
from . import stats as role_stats
from .controller import RoleController
from .masked import MaskedOptimizer
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


def _config(config: EggConfig | None, plan: Any, options: Mapping[str, Any]) -> EggConfig:
    if config is not None and not isinstance(config, EggConfig):
        raise ConfigError(f"config must be an EggConfig, got {type(config).__name__}")
    changes = dict(options)
    if plan is not None:
        changes["plan"] = plan
    base = EggConfig() if config is None else config
    return base.replace(**changes) if changes else base


def _delegated(name: str, doc: str | None = None) -> property:
    """A facade attribute that is the role controller's ``name`` (a dotted path: read-only)."""

    def get(self: LeaderCloneOptimizer) -> Any:
        return attrgetter(name)(self.controller)

    def set_(self: LeaderCloneOptimizer, value: Any) -> None:
        setattr(self.controller, name, value)

    return property(get, None if "." in name else set_, doc=doc or f"The role controller's ``{name}``.")


class LeaderCloneOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that, in the managed layers of ``model``, only leaders and independents learn.

    Args:
        model: the module whose Linear/ConvNd layers get roles.
        optimizer: a supported ``torch.optim.Optimizer`` (see :func:`~egg_optim.register_optimizer`) over the
            model's parameters.
        plan: shorthand for ``config.plan`` (a :class:`RolePlan` or a preset name).
        config: an :class:`~egg_optim.config.EggConfig` (default: ``EggConfig()``).
        process_group: the ranks whose roles must agree (default: the world, when initialised).
        example_inputs: a batch as the model takes it (a dict of keyword arguments, a tuple of positional ones, or
            a tensor) on which the transformer blocks found are checked by dataflow (heads and neurons computed
            apart, fused layouts); default: the model's ``dummy_inputs`` (every transformers model has them).
            Without either, blocks are decomposed by their structure alone, with a warning. ``repack=True`` also
            checks on it which blocks may move their units.
        **options: any other :class:`~egg_optim.config.EggConfig` field (``clone_mode="output"``,
            ``elect_every=500``, ``election="grad_norm"``, ...), overriding ``config``.

    Layers a default plan selects whose parameters are frozen or not in ``optimizer`` are left unmanaged with
    a warning; a layer the plan names explicitly is refused with :class:`PlanError` instead.

    Norm coupling: the model's first complete forward pass only records which norm normalises which layer's
    output; the coupling is applied at the next :meth:`step` (before its update) or by :meth:`couple_norms`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: Any = None,
        *,
        config: EggConfig | None = None,
        process_group: Any = None,
        example_inputs: Any = None,
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
        lazy = [n for n, m in model.named_modules() if any(map(nn.parameter.is_lazy, m._parameters.values()))]
        if lazy:  # units are rows of shapes these do not have yet
            raise ConfigError(
                f"modules {lazy[:5]} have uninitialised (lazy) parameters: run one forward pass of the model on a "
                "batch first, so that their shapes are known, then build the optimizer"
            )
        self.info = optimizer_info(optimizer)
        config = _config(config, plan, options)
        if example_inputs is not None and config.role_plan().units == "auto":
            discover(model, inputs=example_inputs)  # (cached for the plan to read)
        masked = MaskedOptimizer(optimizer, self.info, storage=config.state_storage, clone_state=config.clone_state)
        controller = RoleController(model, masked, config, process_group, example_inputs)

        # --- the Optimizer protocol, sharing the base optimizer's containers
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.masked = masked
        self.controller = controller

    # ------------------------------------------------------------------ the controller's state, as attributes
    model = _delegated("model")
    plan = _delegated("plan")
    layers = _delegated("layers", "The managed layers (or transformer blocks) and the tensors their units own.")
    score = _delegated("score")
    clone_every = _delegated("clone_every")
    elect_every = _delegated("elect_every")
    process_group = _delegated("process_group")
    config = _delegated("config")
    clone_mode = _delegated("clone_mode")
    book = _delegated("book")
    layer_plans = _delegated("layer_plans", "The per-layer counts in force now.")
    steps = _delegated("book.steps", "Optimizer steps taken (a step a GradScaler skipped never reaches :meth:`step`).")
    elections = _delegated("book.elections")
    clone_events = _delegated("book.clone_events")
    seed = _delegated("config.seed")

    def _counts(self, draw: int) -> dict[str, LayerPlan]:
        return self.controller.counts(draw)

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
        """The storage in use: ``config.state_storage``, except ``"full"`` for parameters sharded by FSDP2."""
        return self.masked.storage

    @property
    def sharded(self) -> bool:
        """Whether the managed parameters are sharded by FSDP2 (DTensors)."""
        return self.masked.sharded

    # ------------------------------------------------------------------ model rewrites
    def _rewrite(self, cls_name: str) -> Any:
        return next((rw for rw in self.controller.rewrites if type(rw).__name__ == cls_name), None)

    @property
    def rewrites(self) -> list:
        """The model rewrites in force (:class:`~egg_optim.rewrites.base.LayerRewrite`), in the order applied."""
        return list(self.controller.rewrites)

    @property
    def output_cloning(self) -> Any:
        """The :class:`~egg_optim.rewrites.output_cloning.OutputCloning` of plain layers (output mode), or ``None``."""
        return self._rewrite("OutputCloning")

    @property
    def block_output(self) -> Any:
        """The :class:`~egg_optim.rewrites.block_output.BlockOutputCloning` of transformer blocks, or ``None``."""
        return self._rewrite("BlockOutputCloning")

    @property
    def grad_skip(self) -> Any:
        """The :class:`~egg_optim.rewrites.grad_skip.GradSkip` of weight-mode layers, or ``None``."""
        return self._rewrite("GradSkip")

    def remove_grad_skip(self) -> None:
        """Give weight-mode layers plain autograd back (clone rows of ``weight.grad`` are computed again)."""
        self.controller.remove_rewrites(lambda rw: rw is self.grad_skip)

    def remove_output_cloning(self) -> None:
        """Give the model back its original modules (output-cloning mode only; training can go on in weight mode)."""
        self.controller.remove_rewrites(lambda rw: rw.clones_follow_sources)
        self.controller.clone_mode = "weight"

    def export_model(self, original_order: bool = False) -> nn.Module:
        """A plain copy of the model (original module classes, no egg_optim objects) that computes what the
        model computes as trained: in output mode, clone rows are filled with their source's conv weights and
        norm statistics; in weight mode a plain copy. ``original_order=True``: units that ``repack`` moved are put
        back in the model's original order (the same function; :meth:`unit_order`)."""
        return self.controller.export_model(original_order)

    def coverage(self) -> Any:
        """What this run manages in the model: blocks found and decomposed, units, rows, what is left alone and
        why (a :class:`~egg_optim.core.coverage.Coverage`)."""
        return self.controller.coverage()

    # ------------------------------------------------------------------ norm coupling
    @property
    def coupled_norms(self) -> dict[str, str]:
        """Layer name -> the norm layer its units own. Explicit ``norms`` hold from construction; the others
        are decided once, from the first complete forward pass, at the next :meth:`step` or
        :meth:`couple_norms` (:attr:`coupling_pending` until then), and logged."""
        return self.controller.coupled_norms

    @property
    def coupling_pending(self) -> bool:
        """True until norm coupling is decided: at the first optimizer step or :meth:`couple_norms` (from the
        first complete forward pass recorded before it), or by loading a state dict that holds a decision."""
        return self.controller.coupling_pending

    def couple_norms(self, *example_args: Any, **example_kwargs: Any) -> dict[str, str]:
        """Apply the norm coupling now (the next :meth:`step` would): from the first complete forward pass
        recorded, or explicit couplings only when none ran. Nothing once decided. Returns :attr:`coupled_norms`.

        Given example inputs, while the coupling is still pending it first calls the model on them once, eagerly,
        in eval mode and without gradients (nothing trains, no running statistic moves): the evidence a compiled
        forward pass cannot give. Call it so before ``torch.compile`` (coupling swaps norm classes)::

            opt.couple_norms(example_batch)
            model = torch.compile(model)
        """
        controller = self.controller
        if (example_args or example_kwargs) and controller.coupling_pending:
            model = controller.model
            training = model.training
            cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
            model.eval()
            try:  # the random streams are put back too: a run with the probe draws what one without does
                with torch.random.fork_rng(devices=cuda), torch.no_grad():
                    model(*example_args, **example_kwargs)
            finally:
                model.train(training)
        controller.couple_norms()
        return self.coupled_norms

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
        self.controller.rebuild_masks()

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

    # ------------------------------------------------------------------ roles and scores
    @property
    def roles(self) -> Mapping[str, Roles]:
        """Current roles per managed layer (read-only)."""
        return self.controller.roles

    def unit_order(self) -> dict[str, torch.Tensor]:
        """``{layer: order}`` for the layers whose units ``EggConfig.repack`` reordered (none without it): position
        ``j`` of the layer's tensors holds the model's original unit ``order[j]``, so ``t.index_select(dim,
        argsort(order))`` puts a unit-major tensor back in the original order. The model computes what it would
        with its units unmoved; copies of its weights taken before (an EMA model) are in the old order."""
        return self.controller.unit_order

    def add_roles_listener(self, fn: Callable[[Mapping[str, Roles]], None]) -> None:
        """Call ``fn(roles)`` now and whenever roles change."""
        self.controller.add_roles_listener(fn)

    def observe_scores(self, scores: Mapping[str, torch.Tensor]) -> None:
        """Feed per-unit scores (higher is better) for an observed election score such as ``"local_loss"``;
        they are averaged until the next election. All layers are checked before any score is added."""
        self.controller.observe_scores(scores)

    # ------------------------------------------------------------------ step and schedules
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One base-optimizer step with clones held fixed, then any election and clone event due by steps.

        In order: follow parameters FSDP2 replaced; apply the pending norm coupling (the one named point besides
        :meth:`couple_norms`); the closure, if any; the score's observations; the masked base step; the step
        count, and the elections and clone events due."""
        controller, masked = self.controller, self.masked
        controller.sync_params()
        if masked.is_state_init(controller.process_group):
            masked.step()  # creates the state a checkpoint loads into; counts as nothing
            return None
        controller.begin_step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            controller.sync_params()
        controller.observe_step()
        masked.step()
        controller.end_step()
        return loss

    def epoch_begin(self, epoch: int) -> bool:
        """Tell the schedules that epoch ``epoch`` (from 0) starts: holds a due election (never for the first
        epoch, right after another election, or twice for one epoch, so a resumed epoch is not re-elected).
        Returns whether it held one. The callback runner and the transformers integration call this."""
        return self.controller.epoch_begin(epoch)

    def epoch_end(self, epoch: int) -> bool:
        """Tell the schedules that epoch ``epoch`` ended: holds a due clone event. Returns whether it did."""
        return self.controller.epoch_end(epoch)

    def train_end(self) -> bool:
        """Tell the schedules that training ended: holds a clone event scheduled ``at_train_end``."""
        return self.controller.train_end()

    def elect_now(self) -> dict[str, int]:
        """Hold an election in every managed layer now; returns the leader churn per layer."""
        return self.controller.elect_now()

    def clone_now(self) -> int:
        """Copy every clone's source leader into it now; returns the number of clone units written."""
        return self.controller.clone_now()

    def graduate(self, fraction: float) -> dict[str, int]:
        """Graduate clones now until at least ``fraction`` of every managed layer's units compute and train
        (``1``: dense), keeping what the model computes; returns the units graduated per layer. The ``graduate``
        option schedules this by steps or epochs."""
        return self.controller.graduate_now(fraction)

    # ------------------------------------------------------------------ statistics
    def leadership_counts(self) -> dict[str, torch.Tensor]:
        """Optimizer steps each unit has spent as a leader (the paper's Figure 4 heat map, per layer)."""
        return self.controller.leadership_counts()

    def stats(self) -> dict[str, Any]:
        """Role counts, fraction of units updated, units cloned so far, elections and churn."""
        return self.controller.stats()

    def role_metrics(self, prefix: str = "roles", *, per_layer: bool = True) -> dict[str, float]:
        """:meth:`stats` as flat floats for trackers: ``{prefix}/{layer}/{key}`` (with ``per_layer``),
        ``{prefix}/total/{key}`` (``mean_tenure`` averaged over layers), ``{prefix}/steps`` and the like."""
        return role_stats.role_metrics(self.stats(), prefix, per_layer=per_layer)

    # ------------------------------------------------------------------ state dicts
    def state_bytes(self) -> int:
        """Bytes the optimizer holds between steps: its state tensors, clones' parked slices and the step
        buffers of strided active blocks (compact storage)."""
        return self.masked.state_bytes()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict, with full-size state whatever the storage (clone slices as the
        clone-state policy gives them), plus an ``egg_optim`` entry: roles, counters, running scores.

        With parameters sharded by FSDP2 the state is the base optimizer's DTensors (this rank's shards, as a bare
        optimizer keeps them) and the ``egg_optim`` entry (identical on every rank; a collective: every rank must
        call this) is also carried, serialised, in the first parameter group, where
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (Accelerate's FSDP2 checkpoints)
        keeps it."""
        controller = self.controller
        controller.sync_params()
        sd = self.masked.state_dict(controller.unit_params(controller.roles))
        sd[STATE_KEY] = controller.state_entry()
        if self.sharded:
            sd["param_groups"][0][STATE_KEY] = sharding.pack_entry(sd[STATE_KEY])
        return sd

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
        controller = self.controller
        controller.sync_params()
        sd = dict(state_dict)
        extra = sd.pop(STATE_KEY, None)
        carried = sharding.take_entry(sd, STATE_KEY)  # the copy sharded state dicts carry in param_groups[0]
        if extra is None:
            extra = carried
        loaded = controller.read_state(extra)
        names = {id(p): pname for pname, p in self.model.named_parameters()}
        saved = list(controller.managed_params(loaded.roles, loaded.layers))
        check_base_state(sd, self.optimizer, {id(p): (name, r, dim) for p, name, r, dim in saved}, names)
        controller.check_clone_rows(loaded)
        # the loaded state is laid out for the saved roles (either storage): made full size here, then laid out
        # for this optimizer's storage and roles when the controller adopts them
        self.masked.load_state_dict(sd, saved)
        controller.adopt(loaded)
