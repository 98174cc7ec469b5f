"""Net2Net widening of the seed nets: the growth baseline that graduation is measured against.

Net2Net's widening operator (Chen et al., 2016) makes a layer wider by copying units: a new unit ``j`` copies
unit ``g[j]`` (its weights, bias and BatchNorm), and every consumer divides the columns that read unit ``i`` by
how many copies ``i`` now has, so the wider net computes what the narrow one did. A dense net trained narrow and
grown this way at the points where graduation promotes clones is the natural control: same widths over time,
no clones. What carries over at a growth: every weight and BatchNorm buffer by that mapping, and the optimizer
state alike (first moments divided like the columns, second moments by the square), so Adam continues as if the
copies had always been there.

Symmetry: copies of one unit with equally split consumer columns get identical gradients and would stay equal
forever; ``noise`` (relative to each row's RMS) on a copy's input weights breaks that, changing the function by
about that much. Only the seed nets (:class:`~egg_recipes.models.SeedMNISTNet`, ``SeedCIFARNet``) are handled;
another model raises :class:`~egg_optim.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from egg_optim.core.graduation import graduated_counts
from egg_optim.core.plan import LayerPlan
from egg_optim.errors import ConfigError

from .models import _SeedNet, build_model

__all__ = ["seed_net_widths", "graduated_widths", "widen_seed_net", "carry_optimizer_state"]


def graduated_widths(layer_plans: Mapping[str, LayerPlan], fraction: float) -> dict[str, int]:
    """The widths at which graduation to ``fraction`` computes each layer (leaders + independents): what the
    growth control widens to at the same point."""
    return {n: lp.leaders + lp.independents for n, lp in graduated_counts(layer_plans, fraction).items()}


def seed_net_widths(model: nn.Module) -> dict[str, int]:
    """The output widths ``build_model(..., widths=...)`` takes for ``model`` (every block conv and ``fc1``)."""
    _check(model)
    out = {f"layer{b}.conv{c}": getattr(model, f"layer{b}").get_submodule(f"conv{c}").out_channels
           for b in (1, 2, 3) for c in (1, 2, 3)}  # fmt: skip
    return {**out, "fc1": model.fc1.out_features}


def _check(model: nn.Module) -> None:
    if not isinstance(model, _SeedNet):
        raise ConfigError(
            f"Net2Net widening handles the seed nets (SeedMNISTNet, SeedCIFARNet), got {type(model).__name__}; "
            "train a narrow-* control without --grow-net2net instead"
        )


class _Map:
    """One channel space: new unit ``j`` copies old unit ``index[j]``; ``count[i]`` copies of old unit ``i``."""

    def __init__(self, old: int, new: int, generator: torch.Generator) -> None:
        if new < old:
            raise ConfigError(f"Net2Net widening cannot narrow a layer ({old} -> {new} units)")
        extra = new - old
        # spread the copies over the old units: a fresh permutation per round, so counts differ by at most one
        rounds = [torch.randperm(old, generator=generator) for _ in range(-(-extra // old))] if extra else []
        picks = torch.cat(rounds)[:extra] if rounds else torch.empty(0, dtype=torch.long)
        self.index = torch.cat([torch.arange(old), picks])
        self.count = torch.bincount(self.index, minlength=old).to(torch.float32)
        self.old, self.new = old, new


def _spaces(old: _SeedNet, widths: Mapping[str, int], generator: torch.Generator) -> dict[str, _Map]:
    """A map per channel space, tied where the net adds or reuses channels (identity shortcuts)."""
    cur = seed_net_widths(old)
    channels = old.layer1.conv1.in_channels
    maps: dict[str, _Map] = {"input": _Map(channels, channels, generator)}  # no copies: draws nothing
    prev = "input"
    for b in (1, 2, 3):
        block = getattr(old, f"layer{b}")
        for c in (1, 2):
            name = f"layer{b}.conv{c}"
            maps[name] = _Map(cur[name], widths[name], generator)
        name = f"layer{b}.conv3"
        if len(block.shortcut) == 0:  # identity shortcut: the block's output space is its input space
            if widths[name] != maps[prev].new:
                raise ConfigError(
                    f"Net2Net: {name} adds its input through an identity shortcut, so its new width must equal "
                    f"the input's ({maps[prev].new}), got {widths[name]}"
                )
            maps[name] = maps[prev]
        else:
            maps[name] = _Map(cur[name], widths[name], generator)
        maps[f"layer{b}.in"] = maps[prev]
        prev = name
    maps["fc1"] = _Map(cur["fc1"], widths["fc1"], generator)
    return maps


def _columns(m: _Map, spatial: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Column index and divisor for a consumer reading space ``m`` (``spatial`` features per channel, as ``fc1``
    reads the flattened feature map)."""
    offsets = torch.arange(spatial)
    index = (m.index[:, None] * spatial + offsets).reshape(-1)
    count = m.count[m.index].repeat_interleave(spatial)
    return index, count


def _plan(old: _SeedNet, maps: Mapping[str, _Map]) -> dict[str, tuple]:
    """``{parameter or buffer name: (row map or None, (column index, divisor) or None)}``."""
    out: dict[str, tuple] = {}
    for b in (1, 2, 3):
        block, p = getattr(old, f"layer{b}"), f"layer{b}"
        ins = [maps[f"{p}.in"], maps[f"{p}.conv1"], maps[f"{p}.conv2"]]
        for c in (1, 2, 3):
            rows = maps[f"{p}.conv{c}"]
            out[f"{p}.conv{c}.weight"] = (rows, _columns(ins[c - 1]))
            for leaf in ("conv{c}.bias", "bn{c}.weight", "bn{c}.bias", "bn{c}.running_mean", "bn{c}.running_var"):
                out[f"{p}.{leaf.format(c=c)}"] = (rows, None)
        if len(block.shortcut):
            rows = maps[f"{p}.conv3"]
            out[f"{p}.shortcut.0.weight"] = (rows, _columns(maps[f"{p}.in"]))
            for leaf in ("0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
                out[f"{p}.shortcut.{leaf}"] = (rows, None)
    spatial = old.fc1.in_features // old.layer3.conv3.out_channels
    out["fc1.weight"] = (maps["fc1"], _columns(maps["layer3.conv3"], spatial))
    out["fc1.bias"] = (maps["fc1"], None)
    out["fc2.weight"] = (None, _columns(maps["fc1"]))
    return out


def _apply(t: torch.Tensor, rows: _Map | None, cols: tuple | None, power: int) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows.index.to(t.device))
    if cols is not None:
        index, count = (x.to(t.device) for x in cols)
        shape = [1, -1] + [1] * (t.dim() - 2)
        t = t.index_select(1, index) / count.to(t.dtype).pow(power).view(shape)
    return t


@torch.no_grad()
def widen_seed_net(
    model: nn.Module,
    name: str,
    widths: Mapping[str, int],
    *,
    generator: torch.Generator,
    noise: float = 0.0,
    **shape,
) -> tuple[nn.Module, dict[str, tuple]]:
    """A new seed net ``name`` (``build_model`` with ``shape``) whose block convs and ``fc1`` have ``widths``
    (missing names keep their width), computing what ``model`` computes up to ``noise``; and the mapping
    :func:`carry_optimizer_state` takes."""
    _check(model)
    if not (noise >= 0.0):
        raise ConfigError(f"Net2Net noise must be >= 0, got {noise!r}")
    target = {**seed_net_widths(model), **widths}
    maps = _spaces(model, target, generator)
    with torch.device("meta"):
        new = build_model(name, widths=target, **shape)
    new = new.to_empty(device=next(model.parameters()).device)
    plan = _plan(model, maps)
    old_state = model.state_dict()
    new_state = {}
    for key, value in new.state_dict().items():
        if key in plan:
            rows, cols = plan[key]
            new_state[key] = _apply(old_state[key], rows, cols, 1)
        else:  # fc2.bias, num_batches_tracked
            new_state[key] = old_state[key].clone()
        if new_state[key].shape != value.shape:
            raise AssertionError(f"Net2Net mapping of {key}: {tuple(new_state[key].shape)} != {tuple(value.shape)}")
    if noise > 0:
        for key, (rows, _) in plan.items():
            if key.endswith(".weight") and rows is not None and new_state[key].dim() >= 2:
                w = new_state[key]
                fresh = torch.arange(w.shape[0]) >= rows.old
                if fresh.any():
                    rms = w.flatten(1).pow(2).mean(1).sqrt().view([-1] + [1] * (w.dim() - 1))
                    bump = torch.randn(w.shape, generator=generator, dtype=w.dtype) * rms * noise
                    w[fresh] += bump[fresh].to(w.device)
    new.load_state_dict(new_state)
    new.train(model.training)
    params = dict(model.named_parameters())
    return new, {key: plan.get(key, (None, None)) for key in params}


@torch.no_grad()
def carry_optimizer_state(
    old_model: nn.Module,
    new_model: nn.Module,
    mapping: Mapping[str, tuple],
    old_opt: torch.optim.Optimizer,
    new_opt: torch.optim.Optimizer,
) -> None:
    """Move ``old_opt``'s per-parameter state to ``new_opt`` through ``mapping``: tensors shaped like the
    parameter are mapped like it (moments named ``*_sq`` divided by the square of the copy count), scalars kept;
    every group's ``lr`` follows the old group's (a scheduler continues from it)."""
    old_params, new_params = dict(old_model.named_parameters()), dict(new_model.named_parameters())
    for name, p in old_params.items():
        state = old_opt.state.get(p)
        if not state:
            continue
        rows, cols = mapping[name]
        new_opt.state[new_params[name]] = {
            k: _apply(v, rows, cols, 2 if k.endswith("_sq") else 1) if torch.is_tensor(v) and v.shape == p.shape
            else (v.clone() if torch.is_tensor(v) else v)
            for k, v in state.items()
        }  # fmt: skip
    if len(old_opt.param_groups) != len(new_opt.param_groups):
        raise ConfigError("Net2Net: the new optimizer must have as many parameter groups as the old one")
    for old_g, new_g in zip(old_opt.param_groups, new_opt.param_groups, strict=True):
        for k in ("lr", "initial_lr"):
            if k in old_g:
                new_g[k] = old_g[k]
