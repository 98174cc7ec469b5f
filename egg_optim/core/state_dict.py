"""The ``egg_optim`` entry of a LeaderCloneOptimizer state dict, and the checks that make loading atomic.

A state dict is the base optimizer's ``{state, param_groups}`` (always full-size state, whatever the storage)
plus an ``egg_optim`` entry of tensors and primitives only (loadable with ``torch.load(weights_only=True)``):
roles, counters, running election scores and leadership history, and the options the saved state only means
something under (``depends``: clone mode, election score and policy, schedules, clone options, assignment;
:func:`dependencies`). :func:`parse_book`, :func:`check_clone_rows` and :func:`check_base_state` validate
everything a load would touch *before* anything is changed: the entry, the options it depends on (a state dict
written before they were recorded skips that check), the clones' saved rows, and the base optimizer's
hyperparameters (types, finiteness and its own constructor's checks) and state (shapes, finiteness, signs), so a
refused state dict raises :class:`StateDictMismatchError` naming the offending key and value and leaves the
optimizer as it was.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PlanError, StateDictMismatchError
from . import compact
from .roles import Roles

STATE_KEY = "egg_optim"
STATE_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1 had no epoch/schedule bookkeeping


@dataclass
class LayerBook:
    """Per-layer bookkeeping: roles and what the statistics need."""

    roles: Roles
    cloned_units: int = 0
    churn: int = 0
    led_steps: torch.Tensor | None = None  # steps each unit has led, up to the last role change
    seated_at: torch.Tensor | None = None  # the step each current leader took its seat
    score_sum: torch.Tensor | None = None  # running election score since the last election
    score_count: int = 0
    unit_order: torch.Tensor | None = None  # repacked (EggConfig.repack): the model's unit at each position

    def __post_init__(self) -> None:
        n = self.roles.num_units
        if self.led_steps is None:
            self.led_steps = torch.zeros(n, dtype=torch.long)
        if self.seated_at is None:
            self.seated_at = torch.zeros(n, dtype=torch.long)


@dataclass
class Book:
    """Everything a LeaderCloneOptimizer counts, by layer and in total."""

    layers: dict[str, LayerBook] = field(default_factory=dict)
    steps: int = 0
    elections: int = 0
    clone_events: int = 0
    roles_since: int = 0  # the step roles last changed
    epoch_begun: int = -1  # the last epoch whose start the schedules handled
    epoch_ended: int = -1
    last_election_step: int = -1
    last_clone_key: tuple[int, int] | None = None  # (steps, elections) at the last clone event
    seed: int | None = None  # the seed the saved run drew its roles from (None: this optimizer's)
    graduated_to: float = 0.0  # the active fraction graduation last raised every layer to (0: none)


# The options whose change makes saved roles, running scores and clone rows mean something else (or makes the
# resumed run another run): recorded in every state dict and compared on load.
DEPENDS_ON = (
    "clone_mode",
    "election",
    "election_policy",
    "elect_every",
    "clone_every",
    "assign",
    "hysteresis",
    "max_churn",
    "leader_scales",
    "clone_blend",
    "clone_noise",
    "clone_state",
    "graduate",
    "graduate_state",
    "graduate_noise",
    "fuse_norms",
)


def dependencies(config: Any) -> dict[str, Any]:
    """What a state dict depends on, from an :class:`~egg_optim.config.EggConfig` (as primitives: the score's
    name, schedules as text with ``clone_every="auto"`` resolved)."""
    signature = config.signature()
    out = {k: signature[k] for k in DEPENDS_ON if k in signature}
    out["clone_every"] = str(config.clone_schedule)
    return out


def pack_book(
    book: Book, *, plan: str, seed: int, storage: str, depends: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``egg_optim`` entry of a state dict (tensors and primitives only)."""
    return {
        "version": STATE_VERSION,
        "plan": plan,
        **({"depends": dict(depends)} if depends is not None else {}),
        "seed": seed,
        "state_storage": storage,
        "steps": book.steps,
        "elections": book.elections,
        "clone_events": book.clone_events,
        "roles_since": book.roles_since,
        "epoch_begun": book.epoch_begun,
        "epoch_ended": book.epoch_ended,
        "last_election_step": book.last_election_step,
        "last_clone_key": list(book.last_clone_key) if book.last_clone_key is not None else [],
        "graduated_to": book.graduated_to,
        "layers": {
            name: {
                "units": lb.roles.num_units,
                **lb.roles.state(),
                "cloned_units": lb.cloned_units,
                "churn": lb.churn,
                "led_steps": lb.led_steps.clone(),
                "seated_at": lb.seated_at.clone(),
                "score_count": lb.score_count,
                "score_sum": lb.score_sum.detach().cpu().clone() if lb.score_sum is not None else torch.empty(0),
                **({"unit_order": lb.unit_order.clone()} if lb.unit_order is not None else {}),
            }
            for name, lb in book.layers.items()
        },
    }


def _int(where: str, value: Any, *, low: int = 0) -> int:
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise StateDictMismatchError(f"{where} must be an int >= {low}, got {value!r}")
    return value


def _tensor(where: str, value: Any, numel: tuple[int, ...], *, integer: bool) -> torch.Tensor:
    if not torch.is_tensor(value) or value.dim() > 1 or value.numel() not in numel:
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise StateDictMismatchError(
            f"{where} must be a 1-d tensor of {' or '.join(map(str, numel))} values, got {shape}"
        )
    if integer and value.is_floating_point():
        raise StateDictMismatchError(f"{where} must hold integers, got {value.dtype}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise StateDictMismatchError(f"{where} holds non-finite values")
    if integer and value.numel() and int(value.min()) < 0:
        raise StateDictMismatchError(f"{where} holds negative values")
    return value.detach().cpu().reshape(-1).clone()


def check_dependencies(extra: Mapping[str, Any], depends: Mapping[str, Any]) -> None:
    """Refuse an entry saved under other options than ``depends`` (:func:`dependencies` of this optimizer's
    config), naming every difference; an entry without ``depends`` (written before it was recorded) passes."""
    saved = extra.get("depends")
    if saved is None:
        return
    if not isinstance(saved, Mapping):
        raise StateDictMismatchError(f"{STATE_KEY}.depends must be a dict, got {type(saved).__name__}")
    diffs = [f"{k}={saved[k]!r} (this optimizer: {v!r})" for k, v in depends.items() if k in saved and saved[k] != v]
    if diffs:
        raise StateDictMismatchError(
            f"state dict was saved under other options: {', '.join(diffs)}; its roles, running scores and clone "
            "rows mean something else under these, so build the optimizer with the saved options to resume (to "
            f"adopt the state anyway, delete state_dict[{STATE_KEY!r}]['depends'] before loading)"
        )


def parse_book(
    extra: Any,
    *,
    plan: str,
    units: Mapping[str, int],
    counts: Mapping[str, tuple[int, int]] | Callable[[int, float], Mapping[str, tuple[int, int]]],
    device_of: Any,
    depends: Mapping[str, Any] | None = None,
) -> Book:
    """Validate the ``egg_optim`` entry against this optimizer (plan signature, the options the state depends on
    (:func:`check_dependencies`, when ``depends`` is given), managed layers and their unit counts, per-layer
    ``(leaders, independents)`` counts, or a function of the number of elections held and the graduated fraction
    when the plan changes over training) and return its :class:`Book`. Changes nothing."""
    if not isinstance(extra, Mapping):
        raise StateDictMismatchError(
            f"state dict has no {STATE_KEY!r} entry: it was not saved by a LeaderCloneOptimizer "
            "(load a bare optimizer's state into .optimizer instead)"
        )
    version = extra.get("version")
    if version not in _READABLE_VERSIONS:
        raise StateDictMismatchError(f"state dict version {version!r}, expected one of {_READABLE_VERSIONS}")
    if extra.get("plan") != plan:
        raise StateDictMismatchError(
            f"state dict was saved with plan {extra.get('plan')!r}, this optimizer has {plan!r}"
        )
    required = {"steps", "elections", "clone_events", "roles_since", "layers"}
    if version >= 2:
        required |= {"epoch_begun", "epoch_ended", "last_election_step", "last_clone_key"}
    missing = required - set(extra)
    if missing:
        raise StateDictMismatchError(f"state dict's {STATE_KEY!r} entry lacks {sorted(missing)}")
    book = Book(
        steps=_int(f"{STATE_KEY}.steps", extra["steps"]),
        elections=_int(f"{STATE_KEY}.elections", extra["elections"]),
        clone_events=_int(f"{STATE_KEY}.clone_events", extra["clone_events"]),
        roles_since=_int(f"{STATE_KEY}.roles_since", extra["roles_since"]),
    )
    if "graduated_to" in extra:  # (absent before graduation existed: none)
        value = extra["graduated_to"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise StateDictMismatchError(f"{STATE_KEY}.graduated_to must be a number in [0, 1], got {value!r}")
        book.graduated_to = float(value)
    if callable(counts):
        counts = counts(book.elections, book.graduated_to)
    if book.roles_since > book.steps:
        raise StateDictMismatchError(f"{STATE_KEY}.roles_since {book.roles_since} is after steps {book.steps}")
    if version >= 2:
        book.epoch_begun = _int(f"{STATE_KEY}.epoch_begun", extra["epoch_begun"], low=-1)
        book.epoch_ended = _int(f"{STATE_KEY}.epoch_ended", extra["epoch_ended"], low=-1)
        book.last_election_step = _int(f"{STATE_KEY}.last_election_step", extra["last_election_step"], low=-1)
        key = extra["last_clone_key"]
        if not isinstance(key, (list, tuple)) or len(key) not in (0, 2):
            raise StateDictMismatchError(f"{STATE_KEY}.last_clone_key must be [] or [steps, elections], got {key!r}")
        book.last_clone_key = tuple(_int(f"{STATE_KEY}.last_clone_key", v) for v in key) if key else None
    if "seed" in extra:
        book.seed = _int(f"{STATE_KEY}.seed", extra["seed"])
    saved = extra["layers"]
    if not isinstance(saved, Mapping) or set(saved) != set(units):
        got = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
        raise StateDictMismatchError(f"state dict manages layers {got}, this optimizer manages {sorted(units)}")
    for name, entry in saved.items():
        where = f"{STATE_KEY}.layers[{name!r}]"
        if not isinstance(entry, Mapping):
            raise StateDictMismatchError(f"{where} must be a dict, got {type(entry).__name__}")
        n = units[name]
        if entry.get("units") != n:
            raise StateDictMismatchError(
                f"layer {name!r}: state dict has {entry.get('units')!r} units, the model has {n}"
            )
        lacking = {
            "codes", "source_map", "cloned_units", "churn", "led_steps", "seated_at", "score_count", "score_sum"
        } - set(entry)  # fmt: skip
        if lacking:
            raise StateDictMismatchError(f"{where} lacks {sorted(lacking)}")
        try:
            roles = Roles.from_state(
                {k: _tensor(f"{where}.{k}", entry[k], (n,), integer=True) for k in ("codes", "source_map")}
            )
        except (PlanError, RuntimeError, IndexError) as exc:
            raise StateDictMismatchError(f"layer {name!r}: invalid roles in state dict ({exc})") from exc
        c = roles.counts()
        if (c["leaders"], c["independents"]) != tuple(counts[name]):
            raise StateDictMismatchError(
                f"layer {name!r}: state dict has {c['leaders']} leaders / {c['independents']} independents, "
                f"the plan asks for {counts[name][0]} / {counts[name][1]} (RolePlan align='auto' rounds counts by "
                "the weights' device and dtype: load with the saving run's align, e.g. align=None or 64)"
            )
        score_sum = _tensor(f"{where}.score_sum", entry["score_sum"], (0, n), integer=False)
        score_count = _int(f"{where}.score_count", entry["score_count"])
        if (score_sum.numel() == 0) != (score_count == 0):
            raise StateDictMismatchError(f"{where}: score_count {score_count} does not match score_sum")
        book.layers[name] = LayerBook(
            roles=roles,
            cloned_units=_int(f"{where}.cloned_units", entry["cloned_units"]),
            churn=_int(f"{where}.churn", entry["churn"]),
            led_steps=_tensor(f"{where}.led_steps", entry["led_steps"], (n,), integer=True).long(),
            seated_at=_tensor(f"{where}.seated_at", entry["seated_at"], (n,), integer=True).long(),
            score_sum=score_sum.float().to(device_of(name)) if score_count else None,
            score_count=score_count,
            unit_order=_order(f"{where}.unit_order", entry["unit_order"], n) if "unit_order" in entry else None,
        )
    if depends is not None:  # last: a state dict of another model is named as that first
        check_dependencies(extra, depends)
    return book


def _order(where: str, value: Any, n: int) -> torch.Tensor:
    order = _tensor(where, value, (n,), integer=True).long()
    if not torch.equal(torch.sort(order).values, torch.arange(n)):
        raise StateDictMismatchError(f"{where} must be a permutation of the layer's {n} units")
    return order


def check_clone_rows(rows: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse saved clone slices (``egg_optim.clone_rows``, output mode) that do not fit: a tensor the saved roles
    do not give a shape in ``shapes`` (qualified name -> shape), another shape, or non-finite values (they would
    be written into the model's clone rows)."""
    if not isinstance(rows, Mapping):
        raise StateDictMismatchError(f"{STATE_KEY}.clone_rows must be a dict, got {type(rows).__name__}")
    for qname, v in rows.items():
        if qname not in shapes:
            raise StateDictMismatchError(f"{STATE_KEY}.clone_rows holds {qname!r}, which no managed unit owns")
        if not torch.is_tensor(v) or tuple(v.shape) != tuple(shapes[qname]):
            got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise StateDictMismatchError(
                f"{STATE_KEY}.clone_rows[{qname!r}] has shape {got}, the saved roles need {tuple(shapes[qname])}"
            )
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            raise StateDictMismatchError(
                f"{STATE_KEY}.clone_rows[{qname!r}] holds {_nonfinite(v)}: loading it would write them into the "
                "model's clone rows"
            )


def _nonfinite(t: torch.Tensor) -> str:
    t = t.detach()
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return " and ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if part)


# ---------------------------------------------------------------------------- base optimizer hyperparameters
def _is_number(value: Any) -> bool:
    if torch.is_tensor(value):
        return value.numel() == 1 and value.dtype != torch.bool and not value.is_complex()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return math.isfinite(float(value))


def _hyperparameter_problem(live: Any, saved: Any) -> str | None:
    """Why ``saved`` cannot stand for the option whose value in this optimizer is ``live`` (or ``None``)."""
    if live is None:  # foreach / fused: None means 'choose'; a saved choice is fine
        return None
    if isinstance(live, bool):
        return None if isinstance(saved, bool) else "expected True or False"
    if _is_number(live):
        if not _is_number(saved):
            return "expected a number"
        return None if _finite(saved) else "expected a finite number"
    if isinstance(live, (tuple, list)) and all(_is_number(v) for v in live):
        if not isinstance(saved, (tuple, list)) or len(saved) != len(live) or not all(_is_number(v) for v in saved):
            return f"expected {len(live)} numbers"
        return None if all(_finite(v) for v in saved) else "expected finite numbers"
    if isinstance(live, str):
        return None if isinstance(saved, str) else "expected a string"
    return None


def _constructor_error(cls: type, options: Mapping[str, Any]) -> Exception | None:
    """The error ``cls([probe], **options)`` raises (its own checks of lr, betas, eps...), or ``None``."""
    try:
        accepted = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return None
    kwargs = {k: v for k, v in options.items() if k in accepted and k not in ("self", "params")}
    try:
        cls([torch.zeros(1, requires_grad=True)], **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever the constructor refuses
        return exc
    return None


def check_hyperparameters(saved_groups: list[Any], groups: list[Mapping[str, Any]], optimizer_cls: type) -> None:
    """Refuse saved ``param_groups`` hyperparameters that ``load_state_dict`` would adopt as they are but that
    the optimizer could not run with: a value of another type than this optimizer's (``lr="0.01"``), a non-finite
    number (``lr=nan``), or a value the optimizer's own constructor refuses (``betas=(0.9, 1.5)``, ``lr=-1``;
    checked when it accepts this optimizer's own values)."""
    for i, (sg, g) in enumerate(zip(saved_groups, groups)):
        for key, live in g.items():
            if key in ("params", "param_names", STATE_KEY) or key not in sg:
                continue
            problem = _hyperparameter_problem(live, sg[key])
            if problem is not None:
                raise StateDictMismatchError(
                    f"state dict's param_groups[{i}][{key!r}] is {sg[key]!r}: {problem} (this optimizer has {live!r})"
                )
        ours = {k: v for k, v in g.items() if k != "params"}
        theirs = {k: sg[k] for k in ours if k in sg}
        changed = {k: v for k, v in theirs.items() if not _same(v, ours[k])}
        if changed and _constructor_error(optimizer_cls, ours) is None:
            exc = _constructor_error(optimizer_cls, {**ours, **theirs})
            if exc is not None:
                raise StateDictMismatchError(
                    f"state dict's param_groups[{i}] holds {changed}, which {optimizer_cls.__name__} refuses: "
                    f"{' '.join(str(exc).split())}"
                )


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - tensors of several values
        return False


# ---------------------------------------------------------------------------- base optimizer state values
# state entries that are sums of squares (or products of positive factors): never negative
_NON_NEGATIVE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf", "acc_delta", "mu_product"})


def check_state_values(pname: str, state: Mapping[str, Any]) -> None:
    """Refuse optimizer state of parameter ``pname`` holding NaN or inf, a negative ``step``, or negative values
    in an entry that is a sum of squares (``exp_avg_sq``, ``square_avg``, ``sum``...). Tensors sharded by FSDP2
    are checked on this rank's shard."""
    from .sharding import local

    for key, value in state.items():
        where = f"optimizer state {key!r} of {pname!r}"
        if torch.is_tensor(value):
            t = local(value).detach()
            if t.dtype == torch.bool or t.numel() == 0:
                continue
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                raise StateDictMismatchError(f"{where} holds {_nonfinite(t)}")
            if t.is_complex():
                continue
            low = float(t.min())
        elif _is_number(value):
            if not _finite(value):
                raise StateDictMismatchError(f"{where} is {value}")
            low = float(value)
        else:
            continue
        if key == "step" and low < 0:
            raise StateDictMismatchError(f"{where} is {low:g}: a step count cannot be negative")
        if key in _NON_NEGATIVE and low < 0:
            raise StateDictMismatchError(f"{where} holds negative values (min {low:g}); it is a sum of squares")


def expected_state_keys(optimizer: torch.optim.Optimizer, options: Mapping[str, Any]) -> frozenset[str] | None:
    """The state keys ``type(optimizer)`` creates for a parameter of a group with ``options``, found by one
    probe step on a scratch tensor (``None`` if the probe cannot run, e.g. for an optimizer needing a closure)."""
    probe = torch.zeros(2, requires_grad=True)
    try:
        opt = type(optimizer)([{**{k: v for k, v in options.items() if k != "params"}, "params": [probe]}])
        probe.grad = torch.zeros(2)
        opt.step()
    except Exception:  # noqa: BLE001 - a probe that cannot run means "don't know", not an error
        return None
    return frozenset(opt.state[probe]) if probe in opt.state else frozenset()


def check_base_state(
    sd: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    managed: Mapping[int, tuple[str, Roles, int]],
    names: Mapping[int, str],
) -> None:
    """Refuse base-optimizer state that ``optimizer.load_state_dict`` would accept but that does not fit:
    wrong group sizes, hyperparameters it could not run with (:func:`check_hyperparameters`), another optimizer's
    state keys, non-finite or impossible state values (:func:`check_state_values`), per-unit state of the wrong
    shape (full or, for a managed parameter, ``managed[id(p)] = (layer, roles, dim)``, active units only).
    ``names`` names parameters in messages."""
    groups, saved_groups = optimizer.param_groups, sd.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        n = len(saved_groups) if isinstance(saved_groups, list) else type(saved_groups).__name__
        raise StateDictMismatchError(f"state dict has {n} parameter groups, the optimizer has {len(groups)}")
    if not all(isinstance(sg, Mapping) for sg in saved_groups):
        raise StateDictMismatchError("state dict's param_groups must be dicts")
    id_map: dict[Any, tuple[torch.Tensor, Mapping[str, Any]]] = {}
    for i, (sg, g) in enumerate(zip(saved_groups, groups)):
        if not isinstance(sg, Mapping) or not isinstance(sg.get("params"), (list, tuple)):
            raise StateDictMismatchError(f"parameter group {i} of the state dict has no 'params' list")
        if len(sg["params"]) != len(g["params"]):
            raise StateDictMismatchError(
                f"parameter group {i} of the state dict has {len(sg['params'])} parameters, the optimizer's has "
                f"{len(g['params'])}"
            )
        id_map.update((sid, (p, sg)) for sid, p in zip(sg["params"], g["params"]))
    check_hyperparameters(saved_groups, groups, type(optimizer))
    state = sd.get("state")
    if not isinstance(state, Mapping):
        raise StateDictMismatchError(f"state dict's 'state' must be a dict, got {type(state).__name__}")
    keys_cache: dict[int, frozenset[str] | None] = {}
    for sid, st in state.items():
        if sid not in id_map:
            raise StateDictMismatchError(f"state dict holds state for parameter id {sid!r}, which no group lists")
        p, sg = id_map[sid]
        pname = names.get(id(p), f"parameter {sid}")
        if not isinstance(st, Mapping):
            raise StateDictMismatchError(f"optimizer state of {pname!r} must be a dict, got {type(st).__name__}")
        if not st:
            continue
        check_state_values(pname, st)
        expected = keys_cache.setdefault(id(sg), expected_state_keys(optimizer, sg))
        if expected is not None and set(st) != expected:
            raise StateDictMismatchError(
                f"optimizer state of {pname!r} has keys {sorted(st)}, {type(optimizer).__name__} with these "
                f"options keeps {sorted(expected)}: it was saved by another optimizer or with other options"
            )
        if id(p) in managed:
            layer, roles, dim = managed[id(p)]
            err = compact.layout_error(p, dict(st), roles, dim)
            if err is not None:
                raise StateDictMismatchError(f"optimizer state of {pname!r} (layer {layer!r}): {err}")
            continue
        for key, value in st.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                raise StateDictMismatchError(
                    f"optimizer state {key!r} of {pname!r} has shape {tuple(value.shape)}, the parameter has "
                    f"{tuple(p.shape)}"
                )
