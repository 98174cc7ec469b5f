"""Role metrics for experiment trackers and the leadership heat map.

* :func:`role_metrics` flattens :meth:`LeaderCloneOptimizer.stats` into ``{"roles/<layer>/<key>": float}``
  (plus ``roles/total/...``), ready for ``accelerator.log`` or any tracker.
* :func:`leadership_heatmap` draws how long each unit has led (layers x units), like Figure 4 of the
  leader-follower paper.
* :func:`log_role_metrics` / :func:`log_leadership_heatmap` send both through an ``Accelerator``; the heat map
  goes to W&B as a ``wandb.Image`` when W&B is one of the trackers.
* :func:`read_wandb_offline_history` reads the metrics of an offline W&B run file back (``wandb.Api`` cannot).

Every function accepts the wrapper itself or anything wrapping it through ``.optimizer`` (Accelerate's
``AcceleratedOptimizer``, the transformers Trainer's optimizer), see :func:`find_leader_clone_optimizer`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from egg_optim.errors import ConfigError
from egg_optim.optim import LeaderCloneOptimizer, find_leader_clone_optimizer

ROLE_PREFIX = "roles"


def _require(optimizer: Any) -> LeaderCloneOptimizer:
    lco = find_leader_clone_optimizer(optimizer)
    if lco is None:
        raise ConfigError(
            f"no LeaderCloneOptimizer found in {type(optimizer).__name__} (looked through .optimizer links)"
        )
    return lco


def role_metrics(optimizer: Any, prefix: str = ROLE_PREFIX) -> dict[str, float]:
    """:meth:`LeaderCloneOptimizer.role_metrics` of the wrapper inside ``optimizer``."""
    return _require(optimizer).role_metrics(prefix=prefix)


def active_units(optimizer: Any, layers: Iterable[str] | None = None, model: torch.nn.Module | None = None) -> int:
    """Output units computed and trained per batch (leaders + independents) summed over ``layers``.

    ``layers`` defaults to the managed layers. A listed layer that is not managed counts all of its units
    (``model`` is then needed to look it up). This is the seed's "updates" per batch."""
    lco = _require(optimizer)
    names = list(lco.roles) if layers is None else list(layers)
    modules = dict(model.named_modules()) if model is not None else {}
    total = 0
    for name in names:
        if name in lco.roles:
            c = lco.roles[name].counts()
            total += c["leaders"] + c["independents"]
        elif name in modules:
            m = modules[name]
            total += int(getattr(m, "out_channels", getattr(m, "out_features", 0)))
        else:
            raise ConfigError(f"active_units: {name!r} is neither a managed layer nor a module of the model")
    return total


def forward_flops(optimizer: Any, layer_flops: Mapping[str, int]) -> int:
    """Forward Conv/Linear FLOPs per sample as the model trains now, from the plain model's per-layer counts
    (:func:`egg_recipes.models.count_conv_linear_flops`): in output mode a managed layer computes only its
    leaders and independents (every input channel read); in weight mode every unit is computed."""
    lco = _require(optimizer)
    total = 0
    for name, flops in layer_flops.items():
        roles = lco.roles.get(name) if lco.clone_mode == "output" else None
        if roles is None:
            total += int(flops)
        else:
            c = roles.counts()
            total += int(flops) // roles.num_units * (c["leaders"] + c["independents"])
    return total


def leadership_heatmap(optimizer: Any, *, normalize: bool = True, title: str | None = None):
    """A matplotlib ``Figure``: one row per managed layer, one column per unit, colour = steps led
    (a fraction of all steps when ``normalize``). Layers narrower than the widest are padded (blank)."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global to close

    lco = _require(optimizer)
    counts = lco.leadership_counts()
    names = list(counts)
    width = max((int(c.numel()) for c in counts.values()), default=1)
    grid = np.full((max(len(names), 1), width), np.nan)
    for i, name in enumerate(names):
        c = counts[name].double()
        if normalize:
            c = c / max(lco.steps, 1)
        grid[i, : c.numel()] = c.numpy()
    fig = Figure(figsize=(min(3 + width * 0.06, 16), 1.2 + 0.4 * max(len(names), 1)), layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        vmin=0.0,
        vmax=1.0 if normalize else None,
    )
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("unit")
    ax.set_title(title or f"leadership after {lco.steps} steps ({lco.elections} elections)")
    fig.colorbar(image, ax=ax, label="fraction of steps led" if normalize else "steps led")
    return fig


def _trackers(accelerator: Any) -> list[str]:
    return [getattr(t, "name", "") for t in getattr(accelerator, "trackers", [])]


def log_role_metrics(accelerator: Any, optimizer: Any, step: int | None = None, **extra: float) -> dict[str, float]:
    """Log :func:`role_metrics` (plus ``extra`` scalars) through ``accelerator.log``; returns what was logged.
    Does nothing but return the metrics when the accelerator has no tracker."""
    metrics = {**role_metrics(optimizer), **{k: float(v) for k, v in extra.items()}}
    if _trackers(accelerator):
        accelerator.log(metrics, step=step)
    return metrics


def log_leadership_heatmap(accelerator: Any, optimizer: Any, step: int | None = None, *, key: str = "roles/leadership"):
    """Log the heat map as a ``wandb.Image`` when W&B is a tracker (main process only); returns the figure
    (``None`` on other processes or without W&B)."""
    if "wandb" not in _trackers(accelerator) or not accelerator.is_main_process:
        return None
    fig = leadership_heatmap(optimizer)
    run = accelerator.get_tracker("wandb", unwrap=True)
    run.log({key: figure_to_wandb_image(fig)}, step=step)
    return fig


def figure_to_wandb_image(fig):
    """A ``wandb.Image`` of a matplotlib figure, rendered to PNG here (works for pyplot-free figures)."""
    import io

    import wandb
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    with Image.open(buf) as im:
        return wandb.Image(im.convert("RGB"))


# ---------------------------------------------------------------------------- offline W&B reader
_WANDB_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
_WANDB_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> Iterable[bytes]:
    data = path.read_bytes()
    if len(data) < _WANDB_HEADER.size:
        raise ConfigError(f"{path}: too short to be a W&B run file")
    ident, magic, _version = _WANDB_HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ConfigError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, pending = _WANDB_HEADER.size, b""
    while pos + 7 <= len(data):
        left_in_block = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left_in_block < 7:  # block trailer
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at the end of a partly written block
            pos += left_in_block - 7
        else:
            break


def read_wandb_offline_history(run: str | Path, *, timeout: float = 0.0) -> list[dict[str, Any]]:
    """Rows logged to an offline W&B run: ``run`` is a ``run-*.wandb`` file or an ``offline-run-*`` folder
    (or a ``wandb`` folder holding exactly one). Each row maps keys to the JSON-decoded values
    (``_step`` included); an image appears as its JSON summary, flattened (``<key>/_type`` = ``"image-file"``).

    W&B's service writes the file asynchronously, also after ``run.finish()`` returns: with ``timeout`` > 0
    this waits up to that many seconds for the run's ``exit`` record before reading."""
    import time

    from wandb.proto import wandb_internal_pb2

    path = Path(run)
    if path.is_dir():
        files = sorted({p.resolve() for p in path.rglob("run-*.wandb")})  # latest-run is a symlink
        if len(files) != 1:
            raise ConfigError(f"{path}: expected one run-*.wandb file below it, found {len(files)}")
        path = files[0]
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for raw in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            records.append(record)
        finished = any(r.WhichOneof("record_type") == "exit" for r in records)
        if finished or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def history_keys(rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """All keys seen in :func:`read_wandb_offline_history` rows."""
    return {k for row in rows for k in row}
