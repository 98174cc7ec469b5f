"""One frozen configuration for a leader/clone run, from which everything else is derived.

:class:`EggConfig` holds every option, validated once at construction. The optimizer takes it
(``LeaderCloneOptimizer(model, base, config=cfg)``, or the same fields as keyword arguments), the
transformers integration takes it (``EggTrainer(..., egg=cfg)``), and command lines are derived from it
(:func:`add_config_arguments` / :func:`config_from_args`), so a new option is one field here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .core.cloning import check_clone_options
from .core.compact import CLONE_STATES, STORAGES
from .core.election import ASSIGN_STRATEGIES
from .core.graduation import Graduation
from .core.plan import AUTO, PRESET_TABLES, PRESETS, RolePlan, check_align
from .core.policies import ELECTION_POLICIES, parse_leader_scales
from .core.schedule import Schedule
from .core.scores import FIRST_ROLES, SCORES, Score, is_election, resolve_score
from .errors import ConfigError, PlanError
from .rewrites.base import EVAL_MODES

CLONE_MODES = ("weight", "output")
LOCAL_LOSS_SCORES = ("last", "ema")


def _opt(help: str, **cli: Any) -> dict[str, Any]:
    """Field metadata: the help text and how the option appears on a command line (``cli=None``: it does not)."""
    return {"help": help, "cli": cli}


_NO_CLI: dict[str, Any] = {"cli": None}


@dataclass(frozen=True)
class EggConfig:
    """Every option of a leader/clone run (see each field's ``metadata["help"]``, also the ``--help`` text of
    the recipes). Invalid values raise :class:`~egg_optim.errors.ConfigError` (:class:`PlanError` for the plan)
    naming the field and the value. ``replace(**changes)`` returns a validated copy."""

    plan: RolePlan | str = field(
        default="mild",
        metadata=_opt("a RolePlan, or a preset applied with plan_table: baseline (no clones), mild, aggressive",
                      choices=PRESETS),
    )  # fmt: skip
    plan_table: str = field(
        default="uniform",
        metadata=_opt("table for a preset plan: uniform (one pair for every managed layer: mild 0.40/0.10, "
                      "aggressive 0.25/0.10) or the seed's per-layer tables for its CNNs (mnist, cifar)",
                      choices=PRESET_TABLES),
    )  # fmt: skip
    align: str | int | None = field(
        default=AUTO,
        metadata=_opt("round each managed layer's active and leader counts to a hardware multiple: auto (by the "
                      "weight's device and dtype: unchanged on CPU; on CUDA 64 neurons/rows for 16-bit weights, 8 "
                      "for float32, 8 conv channels; MoE experts 16 bytes of neurons per expert everywhere), N (that "
                      "multiple; per expert for experts), none (off). A RolePlan's own align must agree with a "
                      "non-auto value here", type="align"),
    )  # fmt: skip
    clone_mode: str = field(
        default="weight",
        metadata=_opt("weight: every unit is computed with its own weights and clones copy their leader's weights "
                      "on the clone_every schedule; output: only leaders and independents are computed and clones "
                      "carry their leader's output (saves compute)", choices=CLONE_MODES),
    )  # fmt: skip
    clone_every: Schedule | int | str | None = field(
        default="auto",
        metadata=_opt("weight-cloning schedule: auto (every step in weight mode, never in output mode), never, N "
                      "steps, epoch, epoch:N, end, joined with + (e.g. 100+end)", type="schedule"),
    )  # fmt: skip
    elect_every: Schedule | int | str | None = field(
        default="never",
        metadata=_opt("leader re-election schedule: never (roles drawn once and kept), N steps, epoch (the seed: "
                      "roles redrawn at every epoch start), epoch:N", type="schedule"),
    )  # fmt: skip
    election: str | Score | Callable[..., Any] = field(
        default="random",
        metadata=_opt("unit score that elects leaders (highest lead, ties to the higher index)",
                      choices=lambda: sorted(SCORES)),
    )  # fmt: skip
    assign: str = field(
        default="first",
        metadata=_opt("how each clone picks its source leader: first (all follow the top leader, the seed), random, "
                      "round_robin, nearest (most similar weights)", choices=ASSIGN_STRATEGIES),
    )  # fmt: skip
    first_roles: str = field(
        default="packed",
        metadata=_opt("the first roles when the election score has nothing to go on (random, or a running score): "
                      "packed (each layer's first units are the active ones, leaders first, the rest clones: one "
                      "contiguous block the step takes as views, with no index traffic), drawn (the seed's seeded "
                      "random draw)", choices=FIRST_ROLES),
    )  # fmt: skip
    hysteresis: float = field(default=0.0, metadata=_opt("relative margin a challenger needs to unseat a leader"))
    election_policy: str = field(
        default="rank",
        metadata=_opt("rank: each election re-ranks every unit by the score (the seed's redraw with 'random'); "
                      "stable: roles change only where the score asks, keeping what units compute (a promoted "
                      "clone starts as its source and shares its clones; a demoted leader merges into the "
                      "nearest leader), at most max_churn of the leaders per election at unchanged counts",
                      choices=ELECTION_POLICIES),
    )  # fmt: skip
    max_churn: float = field(
        default=0.0,
        metadata=_opt("stable policy: most leaders replaced per layer and election at unchanged counts, as a "
                      "fraction of the layer's leaders (at least one when > 0); 0: roles change only when "
                      "leader_scales changes the counts (swaps cost accuracy in every measurement so far)"),
    )  # fmt: skip
    repack: bool = field(
        default=False,
        metadata=_opt("after each election (and the first draw), reorder the units of every transformer block whose "
                      "roles it scattered, all of the block's slices at once (the block computes the same function), "
                      "so that its active units and clones are runs again and the steps take them by views instead "
                      "of gathers (GPU speed); units then move in model.state_dict() (opt.unit_order() maps them "
                      "back); a plain Linear / conv moves with the norm after it and its reader's input columns, "
                      "checked on example_inputs (without them it keeps its order)", type=bool),
    )  # fmt: skip
    leader_scales: Sequence[float] | str = field(
        default="",
        metadata=_opt("grow/shrink the plan over training: the leader fraction of every layer is scaled by entry k "
                      "from the k-th role draw on (0: the initial one; the last entry stays); comma list "
                      "'0.5,1,1.5' or 'ramp:START:END:N' (N equal pieces at their midpoints, mean (START+END)/2); "
                      "empty: the plan as is", type="scales"),
    )  # fmt: skip
    graduate: Graduation | str | Sequence[tuple[int, float]] | None = field(
        default="",
        metadata=_opt("graduation: clones become trained units (independents) at these points, each promotion "
                      "keeping what the model computes, e.g. '600:0.75,1200:1' (from step 600 at least 75 percent of "
                      "every layer's units compute and train; from 1200 all: dense) or 'epoch2:0.75,epoch4:1' "
                      "(at those epoch starts); empty: never", type="graduation"),
    )  # fmt: skip
    graduate_state: str = field(
        default="copy",
        metadata=_opt("optimizer state of a graduated unit: copy (its source's: Adam's step size stays what the "
                      "source's was), reset (fresh: Adam's first steps of a long-running tensor are large), keep",
                      choices=CLONE_STATES),
    )  # fmt: skip
    graduate_noise: float = field(
        default=0.0,
        metadata=_opt("Gaussian noise relative to each row's RMS added to a graduated unit (symmetry breaking on "
                      "top of the consumer columns, which were trained apart; changes the function by that much)"),
    )  # fmt: skip
    clone_blend: float = field(default=1.0, metadata=_opt("weight cloning: 1 copies the leader, less blends"))
    clone_noise: float = field(
        default=0.0, metadata=_opt("weight cloning: Gaussian noise relative to the leader row's RMS")
    )
    clone_state: str = field(
        default="keep",
        metadata=_opt("optimizer state of a unit that becomes trainable: keep (its own, from when it was last "
                      "active), copy (its former source's), reset (fresh)", choices=CLONE_STATES),
    )  # fmt: skip
    state_storage: str = field(
        default="compact",
        metadata=_opt("compact: clones take no part in the optimizer step and hold no state; full: whole tensors are "
                      "stepped and clone rows restored (always, with parameters sharded by FSDP2)", choices=STORAGES),
    )  # fmt: skip
    skip_clone_grads: bool | None = field(
        default=None,
        metadata=_opt("weight mode: compute weight gradients for active units only (None: on unless the election "
                      "score reads gradients)", type="auto_bool"),
    )  # fmt: skip
    eval_mode: str = field(
        default="as_trained",
        metadata=_opt("output mode: what model.eval() computes: as_trained (clones follow leaders) or own_weights",
                      choices=EVAL_MODES),
    )  # fmt: skip
    fuse_norms: bool | None = field(
        default=None,
        metadata=_opt("output mode: True runs a coupled BatchNorm on the layer's active channels and expands after it "
                      "(less activation memory), False expands first and runs the plain norm on every channel (fewer "
                      "passes); None: fused where egg_optim's C kernels run it (managed layers on the CPU when the "
                      "norms are coupled, at the first step), else unfused", type="auto_bool"),
    )  # fmt: skip
    norms: Mapping[str, str | None] | None = field(
        default=None,
        metadata={
            "help": "{layer: norm layer or None}: couple exactly these; other layers get a norm only when the "
            "first forward pass shows it normalises their output",
            **_NO_CLI,
        },
    )
    seed: int = field(default=0, metadata=_opt("seeds every random role decision", type=int))
    local_losses: Mapping[str, Any] | None = field(
        default=None,
        metadata={"help": "keyword arguments of egg_optim.LeaderFollowerLoss (LFNN local losses)", **_NO_CLI},
    )
    local_loss_scores: str = field(
        default="last",
        metadata=_opt("with election=local_loss: score units by the last step's worker losses or their EMA",
                      choices=LOCAL_LOSS_SCORES),
    )  # fmt: skip
    strict_blocks: bool = field(
        default=False,
        metadata=_opt("refuse (PlanError) a model with a transformer block found but not decomposed into units, "
                      "instead of warning and leaving its layers alone", type=bool),
    )  # fmt: skip
    log_roles: bool = field(default=True, metadata=_opt("add role metrics to the training logs", type=bool))
    log_per_layer: bool = field(default=False, metadata=_opt("role metrics per layer, not only totals", type=bool))

    def __post_init__(self) -> None:
        _validate(self)
        self.validate()

    def validate(
        self,
        *,
        local_loss_given: bool | None = None,
        model_init: bool = False,
        world_size: int = 1,
        local_loss_heads: bool = False,
    ) -> EggConfig:
        """Check every rule between fields, and between the config and where it is used (the one place such rules
        live; each field alone is checked at construction). Construction runs it with the defaults; the
        callbacks and the transformers integration run it again with what they know:

        ``local_loss_given``: whether a local-loss module exists to feed a score that needs local losses
        (``None``: not known); ``model_init``: a Trainer builds its model with ``model_init``; ``world_size``:
        processes training together; ``local_loss_heads``: the local-loss module has trainable heads.
        Raises :class:`ConfigError`; returns the config."""
        score = resolve_score(self.election)
        if self.scales and Schedule.parse(self.elect_every).never:
            raise ConfigError(
                f"EggConfig.leader_scales {self.leader_scales!r} changes the plan at elections, but elect_every is "
                "'never'; give an election schedule (e.g. 'epoch')"
            )
        if not self.graduation.never and not Schedule.parse(self.elect_every).never:
            raise ConfigError(
                f"EggConfig.graduate {str(self.graduation)!r} works with fixed roles, but elect_every is "
                f"{str(Schedule.parse(self.elect_every))!r}: an election would re-rank graduated units; set "
                "elect_every='never'"
            )
        if Schedule.parse(self.elect_every).at_train_end:
            raise ConfigError("EggConfig.elect_every: an election when training ends would change the trained model")
        if score.policies is not None and self.election_policy not in score.policies:
            raise ConfigError(
                f"EggConfig.election {score.name!r} {score.policies_reason or 'is read by other policies'}, which "
                f"only the {' or '.join(score.policies)} policy reads; got election_policy={self.election_policy!r}"
            )
        if self.repack and self.local_losses is not None:
            raise ConfigError(
                "EggConfig.repack reorders units, which local_losses' heads and sites do not follow; set repack=False"
            )
        if self.local_losses is not None and "num_classes" not in self.local_losses:
            raise ConfigError("EggConfig.local_losses needs num_classes (and usually layers=[...])")
        if local_loss_given is False and score.requires("local_losses"):
            raise ConfigError(
                f"EggConfig: election={score.name!r} scores units by their LFNN worker loss; set local_losses"
            )
        if model_init and self.local_losses is not None:
            raise ConfigError("EggConfig.local_losses cannot follow a Trainer model_init (hooks are per model)")
        if local_loss_heads and world_size > 1:
            raise ConfigError(
                "LFNN readout heads / block heads are not part of the DDP module, so their gradients would "
                "not be averaged across ranks: use readout='direct'/'gap' without blocks under DDP"
            )
        return self

    # ------------------------------------------------------------------ derived values
    def replace(self, **changes: Any) -> EggConfig:
        """A validated copy with ``changes``; unknown names raise :class:`ConfigError` listing the fields."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(
                f"unknown option(s) {sorted(unknown)}; options are {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    def role_plan(self) -> RolePlan:
        """The plan: a preset built with ``align``, or the given :class:`RolePlan` (with ``align`` when this
        config sets one and the plan's is ``"auto"``)."""
        align = check_align(self.align, "EggConfig.align", ConfigError)
        if isinstance(self.plan, str):
            return RolePlan.preset(self.plan, self.plan_table, align=align)
        if align != AUTO and self.plan.align == AUTO:
            return dataclasses.replace(self.plan, align=align)
        return self.plan

    @property
    def clone_schedule(self) -> Schedule:
        """``clone_every`` with ``"auto"`` resolved: every step in weight mode (clones track their leaders, as
        in the seed's first design), never in output mode (clones carry their leader's output anyway)."""
        if self.clone_every == "auto":
            return Schedule(steps=1) if self.clone_mode == "weight" else Schedule()
        return Schedule.parse(self.clone_every, what="clone_every")

    @property
    def elect_schedule(self) -> Schedule:
        return Schedule.parse(self.elect_every, what="elect_every")

    @property
    def graduation(self) -> Graduation:
        return Graduation.parse(self.graduate, what="EggConfig.graduate")

    @property
    def score(self) -> Score:
        return resolve_score(self.election)

    @property
    def scales(self) -> tuple[float, ...]:
        """``leader_scales`` as numbers (``()``: the plan is not scaled)."""
        return parse_leader_scales(self.leader_scales, what="EggConfig.leader_scales")

    def signature(self) -> dict[str, Any]:
        """The options as primitives (for run signatures, trackers and logs)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "plan":
                value = value if isinstance(value, str) else value.signature()
            elif f.name == "align":
                value = check_align(value, "EggConfig.align", ConfigError)
            elif f.name == "election":
                value = self.score.name
            elif f.name in ("clone_every", "elect_every") and value != "auto":
                value = str(Schedule.parse(value))
            elif f.name == "leader_scales":
                value = ",".join(f"{v:g}" for v in self.scales)
            elif f.name == "graduate":
                value = "" if self.graduation.never else str(self.graduation)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out


# ---------------------------------------------------------------------------------------------- validation
def _fail(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"EggConfig.{name} must be {expected}, got {value!r}")


def _choice(cfg: EggConfig, name: str, choices: Sequence[str]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise _fail(name, value, f"one of {list(choices)}")


def _validate(cfg: EggConfig) -> None:
    if isinstance(cfg.plan, str):
        if cfg.plan not in PRESETS:
            raise PlanError(f"EggConfig.plan: unknown preset {cfg.plan!r}; choose one of {PRESETS}")
    elif not isinstance(cfg.plan, RolePlan):
        raise PlanError(f"EggConfig.plan must be a RolePlan or a preset name, got {type(cfg.plan).__name__}")
    align = check_align(cfg.align, "EggConfig.align", ConfigError)
    if isinstance(cfg.plan, RolePlan) and align != AUTO and cfg.plan.align not in (AUTO, align):
        raise ConfigError(
            f"EggConfig.align {cfg.align!r} disagrees with the plan's align {cfg.plan.align!r}; set one of them"
        )
    for name, choices in (
        ("plan_table", PRESET_TABLES),
        ("clone_mode", CLONE_MODES),
        ("assign", ASSIGN_STRATEGIES),
        ("clone_state", CLONE_STATES),
        ("graduate_state", CLONE_STATES),
        ("state_storage", STORAGES),
        ("eval_mode", EVAL_MODES),
        ("local_loss_scores", LOCAL_LOSS_SCORES),
        ("first_roles", FIRST_ROLES),
    ):
        _choice(cfg, name, choices)
    if cfg.clone_every != "auto":
        Schedule.parse(cfg.clone_every, what="EggConfig.clone_every")
    Schedule.parse(cfg.elect_every, what="EggConfig.elect_every")
    if not is_election(cfg.election):
        raise _fail("election", cfg.election, "a score name, a Score or a callable")
    resolve_score(cfg.election)
    value = cfg.hysteresis
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise _fail("hysteresis", value, "a finite number >= 0")
    _choice(cfg, "election_policy", ELECTION_POLICIES)
    value = cfg.max_churn
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= 1):
        raise _fail("max_churn", value, "a number in [0, 1]")
    cfg.scales  # noqa: B018 - parsed: leader_scales alone is valid
    cfg.graduation  # noqa: B018
    value = cfg.graduate_noise
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise _fail("graduate_noise", value, "a finite number >= 0")
    try:
        check_clone_options(cfg.clone_blend, cfg.clone_noise, cfg.clone_state)
    except ConfigError as exc:
        raise ConfigError(f"EggConfig: {exc}") from None
    for name in ("log_roles", "log_per_layer", "strict_blocks", "repack"):
        if not isinstance(getattr(cfg, name), bool):
            raise _fail(name, getattr(cfg, name), "True or False")
    for name in ("skip_clone_grads", "fuse_norms"):
        if getattr(cfg, name) is not None and not isinstance(getattr(cfg, name), bool):
            raise _fail(name, getattr(cfg, name), "None, True or False")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**63:
        raise _fail("seed", cfg.seed, "an int in [0, 2**63)")
    if cfg.norms is not None and not (
        isinstance(cfg.norms, Mapping)
        and all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in cfg.norms.items())
    ):
        raise _fail("norms", cfg.norms, "None or a {layer name: norm layer name or None} dict")
    if cfg.local_losses is not None and not isinstance(cfg.local_losses, Mapping):
        raise _fail("local_losses", cfg.local_losses, "None or a dict of LeaderFollowerLoss keyword arguments")


# ---------------------------------------------------------------------------------------------- command lines
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argparse_type(f: dataclasses.Field, cli: Mapping[str, Any]) -> Callable[[str], Any]:
    kind = cli.get("type")

    def parse(text: str) -> Any:
        try:
            if kind == "schedule":
                if f.name == "clone_every" and text.strip().lower() == "auto":
                    return "auto"
                value: Any = str(Schedule.parse(text, what=_flag(f.name)))
            elif kind == "graduation":
                value = str(Graduation.parse(text, what=_flag(f.name)))
                value = "" if value == "never" else value
            elif kind == "auto_bool":
                value = {"auto": None, "on": True, "off": False}[text.strip().lower()]
            elif kind == "align":
                value = check_align(text, _flag(f.name), ConfigError)
            elif kind == "scales":  # needs an election schedule too: checked with the whole config
                parse_leader_scales(text, what=_flag(f.name))
                return text.strip()
            elif kind is int:
                value = int(text)
            else:
                value = float(text)
            EggConfig(**{f.name: value})  # the same validation as the config itself
        except (KeyError, ValueError, ConfigError) as exc:
            message = exc.args[0] if isinstance(exc, ConfigError) else f"invalid value {text!r}"
            raise argparse.ArgumentTypeError(str(message)) from None
        return value

    return parse


def add_config_arguments(
    parser: argparse.ArgumentParser | Any,
    *,
    exclude: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
) -> None:
    """Add one ``--flag`` per :class:`EggConfig` field to ``parser`` (or an argument group): help from the
    field, choices and validation from the config itself, so a bad value is a one-line argparse error.

    ``exclude``: fields left out; ``defaults``: other defaults than the config's; ``flags``: other flag names
    (``{"plan": "--scenario"}``). Read the values back with :func:`config_from_args`."""
    exclude, defaults, flags = set(exclude), dict(defaults or {}), dict(flags or {})
    for f in dataclasses.fields(EggConfig):
        cli = f.metadata.get("cli")
        if cli is None or f.name in exclude:
            continue
        default = defaults.get(f.name, f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if "choices" in cli:
            choices = cli["choices"]() if callable(cli["choices"]) else cli["choices"]
            kwargs.update(choices=list(choices), default=default)
        elif cli.get("type") is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        elif cli.get("type") == "auto_bool":
            kwargs.update(type=_argparse_type(f, cli), default=default, metavar="{auto,on,off}")
        elif cli.get("type") == "align":
            kwargs.update(type=_argparse_type(f, cli), default=default, metavar="{auto,none,N}")
        else:
            if isinstance(default, Schedule):
                default = str(default)
            elif cli.get("type") == "scales" and not isinstance(default, str):
                default = ",".join(f"{v:g}" for v in default)
            kwargs.update(type=_argparse_type(f, cli), default=default)
        parser.add_argument(flags.get(f.name, _flag(f.name)), **kwargs)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> EggConfig:
    """The :class:`EggConfig` of the config flags in ``args`` (as added by :func:`add_config_arguments`),
    with ``overrides`` (e.g. a ``plan`` built from other flags)."""
    names = {f.name for f in dataclasses.fields(EggConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return EggConfig(**values)
