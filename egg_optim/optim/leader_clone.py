"""``LeaderCloneOptimizer``: leader/clone training around any elementwise torch optimizer.

The wrapper shares the base optimizer's ``param_groups``, ``state`` and ``defaults`` (LR schedulers, gradient
clipping and Accelerate see one optimizer), keeps clone units exactly frozen through each base step (by leaving
them out of it, :mod:`egg_optim.core.compact`, or by restoring them, :mod:`egg_optim.core.masking`), and runs periodic
cloning (:mod:`egg_optim.core.cloning`) and leader elections (:mod:`egg_optim.core.election`) on a step schedule.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..core import compact, masking
from ..core.cloning import check_clone_options, clone_layer
from ..core.distributed import all_reduce_mean, derived_generator
from ..core.election import ASSIGN_STRATEGIES, elect
from ..core.plan import LayerPlan, RolePlan
from ..core.roles import Roles
from ..core.scores import Score, ScoreFn, resolve_score
from ..core.units import ManagedLayer, build_managed_layers
from ..errors import PlanError, StateDictMismatchError, UnsupportedOptimizerError
from .registry import SUPPORTED_OPTIMIZERS

STATE_KEY = "egg_optim"
CLONE_MODES = ("weight", "output")
STATE_VERSION = 1


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


def _check_every(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{name} must be a positive int or None, got {value!r}")
    return value


class LeaderCloneOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that, in the managed layers of ``model``, only leaders and independents learn.

    Args:
        model: the module whose Linear/ConvNd layers get roles.
        optimizer: any supported ``torch.optim.Optimizer`` over (some of) the model's parameters.
        plan: a :class:`RolePlan` (default: the baseline, no clones).
        clone_every: copy leaders into clones every this many optimizer steps (``None``: only on
            :meth:`clone_now`).
        elect_every: re-elect leaders every this many steps (``None``: only on :meth:`elect_now`).
        election: unit score: ``"random"``, ``"weight_norm"``, ``"grad_norm"``, ``"taylor"``,
            ``"local_loss"``, a registered :class:`~egg_optim.core.election.Score`, or ``fn(layer) -> scores``.
        assign: how clones pick a source leader: ``"first"``, ``"random"``, ``"round_robin"``, ``"nearest"``.
        hysteresis: relative margin a challenger needs to unseat a sitting leader.
        clone_blend, clone_noise, clone_state: cloning options (see :mod:`egg_optim.core.cloning`).
        state_storage: ``"compact"``: clones take no part in the base step, and the base optimizer holds state
            for active rows only (faster; with ``clone_state="copy"`` or ``"reset"`` also smaller, as clones then
            need no state; see :mod:`egg_optim.core.compact`). ``"full"``: the base optimizer steps whole tensors and
            clone rows of the parameters and their state are restored afterwards (:mod:`egg_optim.core.masking`).
            Both train identically.
        clone_mode: ``"weight"``: every unit is computed with its own weights and clones are frozen between
            cloning events (the seed's first design). ``"output"``: only leaders and independents are computed
            and clones carry their source's output in every forward pass (the seed's final design, and the one
            that saves compute; see :mod:`egg_optim.rewrites.output_cloning`). The model is rewritten in place,
            reversibly (:meth:`remove_output_cloning`).
        skip_clone_grads: with ``clone_mode="weight"``, compute weight gradients for active rows only
            (:mod:`egg_optim.rewrites.grad_skip`; clone rows of ``weight.grad`` are then zero). ``None`` (default): on
            unless the election score reads gradients (``"grad_norm"``, ``"taylor"``, custom callables). Layers
            it cannot rewrite (subclasses of Linear/ConvNd) keep plain autograd. Ignored in output mode, which
            computes only active units anyway. Pass ``False`` with LFNN local losses on managed layers (they
            request parameter and input gradients separately, which a skipping layer computes together, twice).
            :meth:`remove_grad_skip` undoes it.
        eval_mode: with ``clone_mode="output"``, what ``model.eval()`` computes: ``"as_trained"`` (clones
            follow leaders) or ``"own_weights"``.
        norms: ``{layer: norm_layer or None}`` overrides of the automatic Conv/Linear -> norm coupling.
        seed: seeds every random decision; identical across ranks and resumes.
        process_group: the group whose ranks must agree (default: the world, when initialised).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: RolePlan | None = None,
        *,
        clone_every: int | None = None,
        elect_every: int | None = None,
        election: str | Score | ScoreFn = "random",
        assign: str = "first",
        hysteresis: float = 0.0,
        clone_blend: float = 1.0,
        clone_noise: float = 0.0,
        clone_state: str = "keep",
        clone_mode: str = "weight",
        state_storage: str = "compact",
        skip_clone_grads: bool | None = None,
        eval_mode: str = "as_trained",
        norms: Mapping[str, str | None] | None = None,
        seed: int = 0,
        process_group: Any = None,
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
        if type(optimizer) not in SUPPORTED_OPTIMIZERS:
            raise UnsupportedOptimizerError(
                f"{type(optimizer).__name__} is not known to update rows independently, so clone masking could "
                f"not be exact. Supported: {sorted(c.__name__ for c in SUPPORTED_OPTIMIZERS)}. If it is "
                "elementwise, declare it with egg_optim.register_optimizer(cls)."
            )
        plan = RolePlan() if plan is None else plan
        if not isinstance(plan, RolePlan):
            raise PlanError(f"plan must be a RolePlan, got {type(plan).__name__}")
        self.clone_every = _check_every("clone_every", clone_every)
        self.elect_every = _check_every("elect_every", elect_every)
        self.score = resolve_score(election)
        if assign not in ASSIGN_STRATEGIES:
            raise PlanError(f"unknown assign strategy {assign!r}; choose one of {ASSIGN_STRATEGIES}")
        if not hysteresis >= 0:
            raise PlanError(f"hysteresis must be >= 0, got {hysteresis}")
        check_clone_options(clone_blend, clone_noise, clone_state)
        if clone_mode not in CLONE_MODES:
            raise PlanError(f"unknown clone_mode {clone_mode!r}; choose one of {CLONE_MODES}")
        if skip_clone_grads not in (None, True, False):
            raise PlanError(f"skip_clone_grads must be None, True or False, got {skip_clone_grads!r}")
        if state_storage not in compact.STORAGES:
            raise PlanError(f"unknown state_storage {state_storage!r}; choose one of {compact.STORAGES}")
        layer_plans = plan.resolve(model)
        layers = build_managed_layers(model, list(layer_plans), dict(norms) if norms is not None else None)

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
        self.plan = plan
        self.layer_plans: dict[str, LayerPlan] = layer_plans
        self.layers: dict[str, ManagedLayer] = layers
        self.assign = assign
        self.hysteresis = float(hysteresis)
        self.clone_blend = float(clone_blend)
        self.clone_noise = float(clone_noise)
        self.clone_state = clone_state
        self.state_storage = state_storage
        self.seed = int(seed)
        self.process_group = process_group
        self.steps = 0
        self.elections = 0
        self.clone_events = 0
        self._cloned_units = dict.fromkeys(layers, 0)
        self._churn = dict.fromkeys(layers, 0)
        self._score_sum: dict[str, torch.Tensor | None] = dict.fromkeys(layers)
        self._score_count = dict.fromkeys(layers, 0)
        self._listeners: list[Callable[[Mapping[str, Roles]], None]] = []
        self._roles: dict[str, Roles] = {}
        self._parked: dict[torch.Tensor, dict[str, torch.Tensor]] = {}  # compact storage: clones' own state rows
        self.clone_mode = clone_mode
        self.output_cloning = None
        # steps each unit has led, up to the last role change, and the step roles last changed
        self._led_steps = {n: torch.zeros(layer.num_units, dtype=torch.long) for n, layer in layers.items()}
        self._seated_at = {n: torch.zeros(layer.num_units, dtype=torch.long) for n, layer in layers.items()}
        self._roles_since = 0
        self.grad_skip = None
        initial = self._initial_roles()
        # Module rewrites validate before changing anything; only then is the optimizer state laid out.
        if clone_mode == "output":
            from ..rewrites.output_cloning import OutputCloning

            fusable = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
            bn = {n: lay.norm_name for n, lay in layers.items() if type(lay.norm) in fusable}
            self.output_cloning = OutputCloning(model, initial, norms=bn, eval_mode=eval_mode)
            self._listeners.append(self.output_cloning.update_roles)
        elif skip_clone_grads if skip_clone_grads is not None else not self.score.reads_grad:
            from ..rewrites.grad_skip import GradSkip, supports

            rewritable = {n: r for n, r in initial.items() if supports(layers[n].module)}
            if rewritable:
                self.grad_skip = GradSkip(model, rewritable)
                self._listeners.append(self._update_grad_skip)
        self._set_roles(initial)

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
            self._listeners.remove(self.output_cloning.update_roles)
            self.output_cloning.remove()
            self.output_cloning = None
            self.clone_mode = "weight"

    def export_model(self) -> nn.Module:
        """A plain copy of the model (original module classes, no egg_optim objects) that computes what the
        model computes as trained: in output mode, clone rows are filled with their source's conv weights and
        norm statistics; in weight mode a plain copy."""
        import copy

        if self.output_cloning is None:
            from ..rewrites.grad_skip import restore_plain

            return restore_plain(copy.deepcopy(self.model))
        from ..rewrites.output_cloning import export_plain

        return export_plain(self.output_cloning)

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
            f"clone_every={self.clone_every}, elect_every={self.elect_every}, election={self.score.name!r})"
        )

    # ------------------------------------------------------------------ roles
    @property
    def roles(self) -> Mapping[str, Roles]:
        """Current roles per managed layer (read-only)."""
        return MappingProxyType(self._roles)

    def add_roles_listener(self, fn: Callable[[Mapping[str, Roles]], None]) -> None:
        """Call ``fn(roles)`` now and whenever roles change (used by output cloning)."""
        self._listeners.append(fn)
        fn(self.roles)

    def _initial_roles(self) -> dict[str, Roles]:
        # Scores that need training statistics have none yet: start from a seeded random draw (the seed's way).
        score = self.score if self.score.at_election is not None else resolve_score("random")
        return self._elect_all(score, initial=True)

    def _set_roles(self, roles: dict[str, Roles]) -> None:
        for name, new in roles.items():
            old = self._roles.get(name)
            if old is not None:
                self._led_steps[name][old.leaders] += self.steps - self._roles_since
                newcomers = new.leaders[~torch.isin(new.leaders, old.leaders)]
                self._seated_at[name][newcomers] = self.steps
        self._roles_since = self.steps
        if self.state_storage == "compact":
            self._relayout_state(self._roles, roles)
        self._roles = roles
        self._rebuild_masks()
        for fn in self._listeners:
            fn(self.roles)

    def _managed_params(self) -> Iterator[tuple[torch.Tensor, str]]:
        """(parameter, layer name) for every managed-layer parameter the base optimizer holds."""
        in_optimizer = {id(p) for g in self.param_groups for p in g["params"]}
        for name, layer in self.layers.items():
            for _, p in layer.params:
                if id(p) in in_optimizer:
                    yield p, name

    def _group_of(self) -> dict[int, tuple[dict[str, Any], int]]:
        return {id(p): (g, i) for g in self.param_groups for i, p in enumerate(g["params"])}

    def _expand_state(self, p: torch.Tensor, st: dict[str, Any], roles: Roles, group: dict[str, Any]) -> None:
        """Compact state of ``p`` to full size, clone rows as the clone-state policy gives them."""
        parked = self._parked.get(p) if self.clone_state == "keep" else None
        compact.expand(p, st, roles, group, from_sources=self.clone_state == "copy", parked=parked)

    def _relayout_state(self, old: Mapping[str, Roles], new: Mapping[str, Roles]) -> None:
        """Move compact optimizer state from the active rows of ``old`` roles (full size where ``old`` has no
        entry) to the active rows of ``new``, parking the new clones' rows under ``clone_state="keep"``."""
        groups = self._group_of()
        for p, name in self._managed_params():
            st = self.state.get(p)
            if not st:
                continue
            if name in old:
                if old[name].same_as(new[name]):
                    continue
                self._expand_state(p, st, old[name], groups[id(p)][0])
            self._parked.pop(p, None)
            if self.clone_state == "keep" and new[name].has_clones:
                self._parked[p] = compact.park(p, st, new[name])
            compact.compact(p, st, new[name])

    def _rebuild_masks(self) -> None:
        self._mask: list[masking.MaskEntry] = []
        self._compact: list[compact.CompactEntry] = []
        groups = self._group_of()
        for p, name in self._managed_params():
            roles = self._roles[name]
            if not roles.has_clones:
                continue
            if self.state_storage == "compact":
                group, position = groups[id(p)]
                self._compact.append(compact.CompactEntry(p, group, position, roles.active.to(p.device)))
            else:
                self._mask.append(masking.MaskEntry(p, roles.clones.to(p.device)))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def _observe_step(self) -> None:
        if self.score.per_step is None:
            return
        for name, layer in self.layers.items():
            value = self.score.per_step(layer)
            if value is not None:
                self._accumulate(name, value)

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        prev = self._score_sum[name]
        self._score_sum[name] = value.clone() if prev is None else prev.add_(value.to(prev.device))
        self._score_count[name] += 1

    def observe_scores(self, scores: Mapping[str, torch.Tensor]) -> None:
        """Feed per-unit scores (higher is better) for an ``observed`` election score such as
        ``"local_loss"``; they are averaged until the next election."""
        for name, value in scores.items():
            if name not in self.layers:
                raise PlanError(f"observe_scores: {name!r} is not a managed layer; managed: {list(self.layers)}")
            if value.shape != (self.layers[name].num_units,):
                raise PlanError(
                    f"observe_scores: layer {name!r} has {self.layers[name].num_units} units, "
                    f"got scores of shape {tuple(value.shape)}"
                )
            self._accumulate(name, value)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One base-optimizer step with clones held fixed, then any due election and cloning."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._observe_step()
        if self._compact:
            with compact.stand_ins(self._compact, self.state):
                self.optimizer.step()
        else:
            saved = masking.snapshot(self._mask, self.state) if self._mask else None
            self.optimizer.step()
            if saved is not None:
                masking.restore(saved, self.state)
        self.steps += 1
        if self.elect_every and self.steps % self.elect_every == 0:
            self.elect_now()
        if self.clone_every and self.steps % self.clone_every == 0:
            self.clone_now()
        return loss

    # ------------------------------------------------------------------ elections and cloning
    def _elect_all(self, score: Score, initial: bool = False) -> dict[str, Roles]:
        gen = derived_generator(self.seed, "init") if initial else derived_generator(self.seed, "elect", self.elections)
        scores: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            if score.accumulates:
                total = self._score_sum[name]
                count = self._score_count[name]
                scores[name] = total.cpu() / count if total is not None and count else torch.zeros(layer.num_units)
            else:
                scores[name] = score.at_election(layer, gen).detach().float().cpu().reshape(-1)
                if scores[name].numel() != layer.num_units:
                    raise PlanError(
                        f"score {score.name!r} returned {scores[name].numel()} values for layer {name!r} "
                        f"with {layer.num_units} units"
                    )
        if scores:
            flat = all_reduce_mean(torch.cat(list(scores.values())), self.process_group)
            scores = dict(zip(scores, torch.split(flat, [s.numel() for s in scores.values()])))
        roles = {}
        for name, layer in self.layers.items():
            lp = self.layer_plans[name]
            roles[name] = elect(
                scores[name],
                lp.leaders,
                lp.independents,
                current=None if initial else self._roles[name],
                hysteresis=self.hysteresis,
                assign=self.assign,
                weight=layer.weight,
                generator=gen,
            )
        return roles

    def elect_now(self) -> dict[str, int]:
        """Hold an election in every managed layer now; returns the leader churn per layer."""
        new = self._elect_all(self.score)
        for name, roles in new.items():
            old = self._roles[name].leaders
            self._churn[name] = int((~torch.isin(roles.leaders, old)).sum())
        for name in self.layers:
            self._score_sum[name] = None
            self._score_count[name] = 0
        self.elections += 1
        if self.output_cloning is not None:
            # A clone has been computing its source's output; giving it the source's conv rows and norm
            # statistics before it may become active again keeps that output (function-preserving election).
            self.output_cloning.fill_clones()
        self._set_roles(new)
        return dict(self._churn)

    def clone_now(self) -> int:
        """Copy every clone's source leader into it now; returns the number of clone units written."""
        gen = derived_generator(self.seed, "clone", self.clone_events) if self.clone_noise > 0 else None
        groups = {p: g for g in self.param_groups for p in g["params"]}
        written = 0
        for name, layer in self.layers.items():
            n = clone_layer(
                layer,
                self._roles[name],
                blend=self.clone_blend,
                noise=self.clone_noise,
                state=self.clone_state,
                opt_state=self.state,
                groups=groups,
                generator=gen,
            )
            self._cloned_units[name] += n
            written += n
        self.clone_events += 1
        return written

    # ------------------------------------------------------------------ stats
    def leadership_counts(self) -> dict[str, torch.Tensor]:
        """Optimizer steps each unit has spent as a leader (the paper's Figure 4 heat map, per layer)."""
        out = {}
        for name, roles in self._roles.items():
            counts = self._led_steps[name].clone()
            counts[roles.leaders] += self.steps - self._roles_since
            out[name] = counts
        return out

    def stats(self) -> dict[str, Any]:
        """Role counts, fraction of units updated, units cloned so far, elections and churn."""
        layers = {}
        for name, roles in self._roles.items():
            c = roles.counts()
            layers[name] = {
                "units": roles.num_units,
                **c,
                "updated_fraction": (c["leaders"] + c["independents"]) / roles.num_units,
                "cloned_units": self._cloned_units[name],
                "churn": self._churn[name],
                "mean_tenure": float((self.steps - self._seated_at[name][roles.leaders]).float().mean())
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
        ``{prefix}/total/{key}`` (``mean_tenure`` averaged over layers), ``{prefix}/steps|elections|clone_events``."""
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
        """Bytes held in optimizer-state tensors, clones' parked rows (compact storage) included."""
        tensors = [v for st in self.state.values() for v in st.values() if torch.is_tensor(v)]
        tensors += [v for rows in self._parked.values() for v in rows.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict, with full-size state whatever the storage (clone rows as the
        clone-state policy gives them), plus an ``egg_optim`` entry: roles, counters, running scores."""
        sd = self.optimizer.state_dict()
        if self.state_storage == "compact":
            params = [p for g in self.param_groups for p in g["params"]]
            managed = {id(p): name for p, name in self._managed_params()}
            groups = self._group_of()
            state = {}
            for i, st in sd["state"].items():
                st = dict(st)  # the base state_dict shares the live dicts
                p = params[i]
                if id(p) in managed:
                    self._expand_state(p, st, self._roles[managed[id(p)]], groups[id(p)][0])
                state[i] = st
            sd["state"] = state
        sd[STATE_KEY] = {
            "version": STATE_VERSION,
            "plan": self.plan.signature(),
            "steps": self.steps,
            "elections": self.elections,
            "clone_events": self.clone_events,
            "seed": self.seed,
            "state_storage": self.state_storage,
            "roles_since": self._roles_since,
            "layers": {
                name: {
                    "units": roles.num_units,
                    **roles.state(),
                    "cloned_units": self._cloned_units[name],
                    "churn": self._churn[name],
                    "led_steps": self._led_steps[name].clone(),
                    "seated_at": self._seated_at[name].clone(),
                    "score_count": self._score_count[name],
                    "score_sum": (
                        self._score_sum[name].detach().cpu().clone()
                        if self._score_sum[name] is not None
                        else torch.empty(0)
                    ),
                }
                for name, roles in self._roles.items()
            },
        }
        return sd

    def _parse_extra(self, extra: Any) -> dict[str, Roles]:
        """Validate the egg_optim part of a state dict; returns the roles it holds. Changes nothing."""
        if not isinstance(extra, Mapping):
            raise StateDictMismatchError(
                f"state dict has no {STATE_KEY!r} entry: it was not saved by a LeaderCloneOptimizer "
                "(load a bare optimizer's state into .optimizer instead)"
            )
        if extra.get("version") != STATE_VERSION:
            raise StateDictMismatchError(f"state dict version {extra.get('version')!r}, expected {STATE_VERSION}")
        if extra.get("plan") != self.plan.signature():
            raise StateDictMismatchError(
                f"state dict was saved with plan {extra.get('plan')!r}, this optimizer has {self.plan.signature()!r}"
            )
        missing = {"steps", "elections", "clone_events", "roles_since", "layers"} - set(extra)
        if missing:
            raise StateDictMismatchError(f"state dict's {STATE_KEY!r} entry lacks {sorted(missing)}")
        saved_layers = extra["layers"]
        if set(saved_layers) != set(self.layers):
            raise StateDictMismatchError(
                f"state dict manages layers {sorted(saved_layers)}, this optimizer manages {sorted(self.layers)}"
            )
        roles = {}
        for name, entry in saved_layers.items():
            units = self.layers[name].num_units
            if entry.get("units") != units:
                raise StateDictMismatchError(
                    f"layer {name!r}: state dict has {entry.get('units')} units, the model has {units}"
                )
            try:
                r = Roles.from_state({k: torch.as_tensor(entry[k]).cpu() for k in ("codes", "source_map")})
            except (KeyError, PlanError, RuntimeError, IndexError) as exc:
                raise StateDictMismatchError(f"layer {name!r}: invalid roles in state dict ({exc})") from exc
            lp = self.layer_plans[name]
            c = r.counts()
            if (c["leaders"], c["independents"]) != (lp.leaders, lp.independents):
                raise StateDictMismatchError(
                    f"layer {name!r}: state dict has {c['leaders']} leaders / {c['independents']} independents, "
                    f"the plan asks for {lp.leaders} / {lp.independents}"
                )
            for key in ("led_steps", "seated_at"):
                if torch.as_tensor(entry.get(key, torch.empty(0))).numel() != units:
                    raise StateDictMismatchError(f"layer {name!r}: {key} missing or not {units} long")
            sum_ = entry.get("score_sum")
            if torch.is_tensor(sum_) and sum_.numel() not in (0, units):
                raise StateDictMismatchError(f"layer {name!r}: score_sum has {sum_.numel()} values, expected {units}")
            roles[name] = r
        return roles

    def _check_state_layout(self, sd: Mapping[str, Any], roles: Mapping[str, Roles]) -> None:
        """Refuse per-row state that fits neither the full nor the compact layout of the saved roles."""
        saved_groups = sd.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            return  # the base optimizer refuses it
        id_map = {}
        for sg, g in zip(saved_groups, self.param_groups):
            if not isinstance(sg, Mapping) or len(sg.get("params", ())) != len(g["params"]):
                return
            id_map.update(zip(sg["params"], g["params"]))
        names = {id(p): pname for layer in self.layers.values() for pname, p in layer.params}
        managed = {id(p): name for p, name in self._managed_params()}
        for sid, st in (sd.get("state") or {}).items():
            p = id_map.get(sid)
            if p is None or id(p) not in managed or not isinstance(st, Mapping):
                continue
            err = compact.layout_error(p, dict(st), roles[managed[id(p)]])
            if err is not None:
                raise StateDictMismatchError(f"optimizer state of {names[id(p)]!r}: {err}")

    def export_optimizer_state(self) -> dict[str, Any]:
        """A state dict for the bare base optimizer over the plain model (:meth:`export_model`)."""
        sd = self.state_dict()
        del sd[STATE_KEY]
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore base-optimizer state, roles, counters and running scores; refuses a mismatched state dict
        before changing anything."""
        sd = dict(state_dict)
        extra = sd.pop(STATE_KEY, None)
        roles = self._parse_extra(extra)
        self._check_state_layout(sd, roles)
        self.optimizer.load_state_dict(sd)  # validates group sizes before mutating
        # The loaded state is laid out for the saved roles (either storage): make it full size, then
        # _set_roles lays it out for this optimizer's storage.
        groups = self._group_of()
        for p, name in self._managed_params():
            if self.state.get(p):
                compact.expand(p, self.state[p], roles[name], groups[id(p)][0], from_sources=False)
        self.steps = int(extra["steps"])
        self.elections = int(extra["elections"])
        self.clone_events = int(extra["clone_events"])
        for name, entry in extra["layers"].items():
            self._cloned_units[name] = int(entry["cloned_units"])
            self._churn[name] = int(entry["churn"])
            self._led_steps[name] = torch.as_tensor(entry["led_steps"]).cpu().long().clone()
            self._seated_at[name] = torch.as_tensor(entry["seated_at"]).cpu().long().clone()
            self._score_count[name] = int(entry["score_count"])
            s = entry["score_sum"]
            device = self.layers[name].weight.device
            self._score_sum[name] = s.detach().to(device).float().clone() if s.numel() else None
        self._roles = {}  # restored roles replace, they are not an election
        self._parked = {}
        self._set_roles(roles)
        self._roles_since = int(extra["roles_since"])
