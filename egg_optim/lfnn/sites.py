"""Where the LFNN workers are: validating :class:`~egg_optim.lfnn.LeaderFollowerLoss` options and turning
its ``layers`` and ``blocks`` into sites (a managed layer whose units form workers, or one block worker) and
their readout heads. Everything here validates before anything is created, so a refused configuration
leaves the model unhooked."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from .functional import REDUCTIONS, check_delta
from .heads import AuxHead, AuxWorkerHeads, WorkerHeads

MODES = ("lfnn", "lfnn_l")
LAYER_READOUTS = ("auto", "direct", "gap", "head")
ALIGNS = ("output", "readout")
#: ``follower_target`` values: what a follower compares with the best leader, and how
FOLLOWER_TARGETS = ("output", "logits", "probs", "centred")
LOCAL_ACTIVATIONS = ("relu",)


@dataclass
class _Site:
    """A managed layer (workers = groups of its units) or one block worker."""

    name: str
    kind: str  # "layer" | "block" (a block worker, or a block with workers inside: readout "aux_workers")
    module_names: list[str]
    first: nn.Module
    last: nn.Module
    params: list[nn.Parameter]
    unit_dim: int = 1
    num_units: int = 0
    worker_size: int = 1
    num_workers: int = 1
    readout: str = "direct"
    head_key: str | None = None
    ctx: dict | None = None
    handles: list = field(default_factory=list)


def _unit_info(module: nn.Module) -> tuple[int, int] | None:
    """``(num_units, unit_dim)`` for a layer whose output units can be grouped into workers."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, 1
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(getattr(module, "out_features", None), int):
        return module.out_features, -1
    if isinstance(getattr(module, "out_channels", None), int):
        return module.out_channels, 1
    return None


def _channels_of(modules: Sequence[nn.Module]) -> tuple[int, int] | None:
    """``(channels, spatial_dims)`` of a block's output, from its last Linear / ConvNd / BatchNorm{2,3}d."""
    for top in reversed(modules):
        for m in reversed(list(top.modules())):
            if isinstance(m, nn.modules.conv._ConvNd):
                return m.out_channels, len(m.kernel_size)
            if isinstance(m, nn.Linear):
                return m.out_features, 0
            if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)):
                return m.num_features, 2
            if isinstance(m, (nn.BatchNorm3d, nn.InstanceNorm3d)):
                return m.num_features, 3
    return None


def head_key(name: str) -> str:
    return name.replace(".", "__")


def check_options(
    model: nn.Module,
    *,
    mode: str,
    delta: float,
    num_classes: int,
    l1: float,
    l2: float,
    readout: str,
    align: str | None,
    follower_target: str | None,
    local_activation: object,
    worker_reduction: str,
    score_momentum: float,
    aux_hidden: int,
    aux_pool: int,
) -> tuple[str, str]:
    """Validate the scalar options; returns the normalised mode and follower target (``align`` is the older
    spelling: ``"output"`` = ``follower_target="output"``, ``"readout"`` = ``"logits"``)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    mode = str(mode).replace("-", "_").lower()
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {MODES}")
    check_delta(delta)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an int >= 2 (classification targets), got {num_classes!r}")
    for nm, v in (("l1", l1), ("l2", l2)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{nm} must be a finite number >= 0, got {v!r}")
    if readout not in LAYER_READOUTS:
        raise ConfigError(f"unknown readout {readout!r}; choose one of {LAYER_READOUTS}")
    if align is not None and align not in ALIGNS:
        raise ConfigError(f"unknown align {align!r}; choose one of {ALIGNS} (or use follower_target=)")
    if follower_target is not None and follower_target not in FOLLOWER_TARGETS:
        raise ConfigError(f"unknown follower_target {follower_target!r}; choose one of {FOLLOWER_TARGETS}")
    from_align = None if align is None else ("output" if align == "output" else "logits")
    if from_align is not None and follower_target is not None and from_align != follower_target:
        raise ConfigError(
            f"align={align!r} (= follower_target={from_align!r}) contradicts follower_target={follower_target!r}; "
            "give follower_target only"
        )
    target = follower_target or from_align or "probs"
    if local_activation is not None and not callable(local_activation) and local_activation not in LOCAL_ACTIVATIONS:
        raise ConfigError(
            f"unknown local_activation {local_activation!r}; choose None, one of {LOCAL_ACTIVATIONS} or a callable"
        )
    if worker_reduction not in REDUCTIONS:
        raise ConfigError(f"unknown worker_reduction {worker_reduction!r}; choose one of {REDUCTIONS}")
    if not (0.0 <= float(score_momentum) < 1.0):
        raise ConfigError(f"score_momentum must be in [0, 1), got {score_momentum!r}")
    if isinstance(aux_hidden, bool) or not isinstance(aux_hidden, int) or aux_hidden < 0:
        raise ConfigError(f"aux_hidden must be an int >= 0, got {aux_hidden!r}")
    if isinstance(aux_pool, bool) or not isinstance(aux_pool, int) or aux_pool < 1:
        raise ConfigError(f"aux_pool must be an int >= 1 (pooled size per spatial dimension), got {aux_pool!r}")
    return mode, target


class Claims:
    """Module names already used by a site: a module (or one inside it) can serve one site only."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self.used: dict[str, str] = {}

    def claim(self, module_name: str, owner: str) -> nn.Module:
        if not isinstance(module_name, str) or module_name == "" or module_name not in self.modules:
            hint = [n for n in self.modules if n][:12]
            raise ConfigError(f"{owner}: unknown module name {module_name!r}; some of the model's: {hint}")
        for other, by in self.used.items():
            if other == module_name or other.startswith(module_name + ".") or module_name.startswith(other + "."):
                raise ConfigError(f"{owner}: module {module_name!r} overlaps {other!r}, already used by {by}")
        self.used[module_name] = owner
        return self.modules[module_name]


def layer_sites(
    claims: Claims,
    layer_names: Sequence[str],
    worker_size: int | Mapping[str, int] | None,
    num_classes: int,
    readout: str,
) -> list[_Site]:
    """One site per managed layer, its units grouped into workers of ``worker_size``."""
    ws_map = dict(worker_size) if isinstance(worker_size, Mapping) else {}
    unknown = set(ws_map) - set(layer_names)
    if unknown:
        raise ConfigError(f"worker_size given for layers that are not managed: {sorted(unknown)}")
    sites: list[_Site] = []
    for name in layer_names:
        module = claims.claim(name, f"layer {name!r}")
        info = _unit_info(module)
        if info is None:
            raise ConfigError(
                f"layer {name!r} is a {type(module).__name__}; workers need an nn.Linear or nn.ConvNd layer "
                "(give other modules as blocks=...)"
            )
        units, unit_dim = info
        ws = ws_map.get(name, worker_size if isinstance(worker_size, int) else None)
        ws = num_classes if ws is None else ws
        if isinstance(ws, bool) or not isinstance(ws, int) or ws < 1:
            raise ConfigError(f"layer {name!r}: worker_size must be a positive int, got {ws!r}")
        if units % ws:
            raise ConfigError(f"layer {name!r} has {units} output units, not divisible into workers of {ws} units")
        ro = readout
        if ro == "auto":
            ro = "gap" if unit_dim == 1 else "direct"
        if ro in ("direct", "gap") and ws != num_classes:
            raise ConfigError(
                f"layer {name!r}: readout={ro!r} reads a worker's units as class scores, so worker_size "
                f"({ws}) must equal num_classes ({num_classes}); use readout='head' for other sizes"
            )
        sites.append(
            _Site(
                name=name,
                kind="layer",
                module_names=[name],
                first=module,
                last=module,
                params=list(module.parameters()),
                unit_dim=unit_dim,
                num_units=units,
                worker_size=ws,
                num_workers=units // ws,
                readout=ro,
            )
        )
    return sites


def block_worker_sites(
    claims: Claims,
    blocks: Mapping[str, str | Sequence[str]],
    block_channels: Mapping[str, int | tuple[int, int]] | None,
    block_group: str,
    layer_names: Sequence[str],
    block_workers: int | Mapping[str, int] | None = None,
) -> tuple[list[_Site], dict[str, tuple[int, int]]]:
    """One site per block, and each block's output ``(channels, spatial_dims)`` for its aux head(s).

    Without ``block_workers`` a block is ONE worker (they compete across blocks). With it, block ``b``'s
    output channels form ``block_workers[b]`` workers of equal size that compete inside the block, each read
    out by its own aux head (readout ``"aux_workers"``)."""
    block_channels = dict(block_channels or {})
    if block_workers is not None:
        if not blocks:
            raise ConfigError("block_workers needs blocks={...}")
        bw = dict(block_workers) if isinstance(block_workers, Mapping) else {b: block_workers for b in blocks}
        unknown = set(bw) - set(blocks)
        if unknown or set(bw) != set(blocks):
            raise ConfigError(
                f"block_workers must give every block a worker count; unknown {sorted(unknown)}, "
                f"missing {sorted(set(blocks) - set(bw))}"
            )
        for b, w in bw.items():
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ConfigError(f"block {b!r}: block_workers must be a positive int, got {w!r}")
    unknown = set(block_channels) - set(blocks)
    if unknown:
        raise ConfigError(f"block_channels given for unknown blocks: {sorted(unknown)}")
    if blocks and (block_group in layer_names):
        raise ConfigError(f"block_group name {block_group!r} clashes with a managed layer name")
    sites: list[_Site] = []
    shapes: dict[str, tuple[int, int]] = {}
    for bname, spec in blocks.items():
        names = [spec] if isinstance(spec, str) else list(spec)
        if not names:
            raise ConfigError(f"block {bname!r} has no modules")
        mods = [claims.claim(n, f"block {bname!r}") for n in names]
        shape = block_channels.get(bname)
        if isinstance(shape, int) and not isinstance(shape, bool):
            inferred = _channels_of(mods)
            shape = (shape, inferred[1] if inferred else 2)
        elif shape is None:
            shape = _channels_of(mods)
            if shape is None:
                raise ConfigError(
                    f"block {bname!r}: cannot infer its output channels; pass block_channels={{{bname!r}: C}}"
                )
        if not (isinstance(shape, tuple) and len(shape) == 2 and all(isinstance(v, int) for v in shape)):
            raise ConfigError(f"block {bname!r}: block_channels must be an int or (channels, spatial_dims)")
        shapes[bname] = shape
        params = list({id(p): p for m in mods for p in m.parameters()}.values())
        workers, readout = 1, "aux"
        if block_workers is not None:
            workers, readout = bw[bname], "aux_workers"
            if shape[0] % workers:
                raise ConfigError(
                    f"block {bname!r}: its {shape[0]} output channels do not split into {workers} equal workers"
                )
            if shape[1] == 0:
                raise ConfigError(f"block {bname!r}: block_workers needs a block with spatial output (conv)")
        sites.append(
            _Site(
                name=bname,
                kind="block",
                module_names=names,
                first=mods[0],
                last=mods[-1],
                params=params,
                unit_dim=1,
                num_units=shape[0],
                worker_size=shape[0] // workers,
                num_workers=workers,
                readout=readout,
            )
        )
    clash = {s.name for s in sites} & set(layer_names)
    if clash:
        raise ConfigError(f"block names clash with layer names: {sorted(clash)}")
    return sites, shapes


def build_heads(
    sites: Sequence[_Site],
    block_sites: Sequence[_Site],
    block_shapes: Mapping[str, tuple[int, int]],
    num_classes: int,
    aux_hidden: int,
    aux_pool: int,
) -> nn.ModuleDict:
    """The readout heads (``readout="head"`` layers) and block aux heads, on their site's device and dtype;
    sets each site's ``head_key``."""
    heads = nn.ModuleDict()
    for site in sites:
        if site.readout == "head":
            site.head_key = head_key(site.name)
            heads[site.head_key] = WorkerHeads(site.num_workers, site.worker_size, num_classes, **_placement(site))
    for site in block_sites:
        ch, sd = block_shapes[site.name]
        site.head_key = "block__" + head_key(site.name)
        if site.readout == "aux_workers":
            shape = (site.num_workers, site.worker_size, sd, num_classes)
            heads[site.head_key] = AuxWorkerHeads(*shape, hidden=aux_hidden, pool=aux_pool, **_placement(site))
        else:
            heads[site.head_key] = AuxHead(ch, sd, num_classes, hidden=aux_hidden, pool=aux_pool, **_placement(site))
    return heads


def _placement(site: _Site) -> dict:
    ref = site.params[0] if site.params else None
    return {"device": None if ref is None else ref.device, "dtype": None if ref is None else ref.dtype}


def block_unit_modules(modules: Mapping[str, nn.Module], block_sites: Sequence[_Site]) -> dict[str, list]:
    """``{block: [(module name, units), ...]}``: the layers inside each block whose units get its scores."""
    out: dict[str, list[tuple[str, int]]] = {}
    for site in block_sites:
        units = []
        for top_name in site.module_names:
            for sub_name, m in modules[top_name].named_modules():
                info = _unit_info(m)
                if info is not None:
                    units.append((top_name + ("." + sub_name if sub_name else ""), info[0]))
        out[site.name] = units
    return out
