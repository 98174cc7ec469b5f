"""Role statistics from a controller's :class:`~egg_optim.core.state_dict.Book`: role counts, churn, tenure and
the leadership heat map, for logs and trackers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..core.plan import LayerPlan
from ..core.state_dict import Book


def leadership_counts(book: Book) -> dict[str, torch.Tensor]:
    """Optimizer steps each unit has spent as a leader (the paper's Figure 4 heat map, per layer)."""
    out = {}
    for name, lb in book.layers.items():
        counts = lb.led_steps.clone()
        counts[lb.roles.leaders] += book.steps - book.roles_since
        out[name] = counts
    return out


def stats(
    book: Book,
    plans: Mapping[str, LayerPlan] | None = None,
    align: str | int = 1,
    runs: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """Role counts, fraction of units updated, units cloned so far, elections and churn, the fraction graduation
    raised every layer to (``graduated_to``, 0: none); ``align``: the
    multiple each layer's counts were rounded to (1: not rounded, see :class:`~egg_optim.RolePlan`) and, at
    the top, the plan's ``align`` setting; ``runs``: whether each layer's roles are runs, which its steps take by
    views (``False``: scattered, as elections leave them: gathers), counted in ``total["scattered"]``."""
    steps = book.steps
    layers = {}
    for name, lb in book.layers.items():
        roles = lb.roles
        c = roles.counts()
        lp = (plans or {}).get(name)
        layers[name] = {
            "units": roles.num_units,
            **c,
            "align": lp.align if lp is not None else 1,
            "updated_fraction": (c["leaders"] + c["independents"]) / roles.num_units,
            "cloned_units": lb.cloned_units,
            "churn": lb.churn,
            "mean_tenure": float((steps - lb.seated_at[roles.leaders]).float().mean())
            if roles.leaders.numel()
            else 0.0,
            **({"runs": bool(runs[name])} if runs is not None and name in runs else {}),
        }
    keys = ("units", "leaders", "independents", "clones", "cloned_units", "churn")
    total = {k: sum(v[k] for v in layers.values()) for k in keys}
    total["updated_fraction"] = (total["leaders"] + total["independents"]) / total["units"] if total["units"] else 1.0
    if runs is not None:
        total["scattered"] = sum(not v for v in runs.values())
    return {
        "layers": layers,
        "total": total,
        "steps": steps,
        "elections": book.elections,
        "clone_events": book.clone_events,
        "graduated_to": book.graduated_to,
        "align": align,
    }


def role_metrics(stats: dict[str, Any], prefix: str = "roles", *, per_layer: bool = True) -> dict[str, float]:
    """``stats`` (:func:`stats`) as flat floats for trackers: ``{prefix}/{layer}/{key}`` (with ``per_layer``),
    ``{prefix}/total/{key}`` (``mean_tenure`` averaged over layers), ``{prefix}/steps`` and the like."""
    out: dict[str, float] = {}
    if per_layer:
        for name, entry in stats["layers"].items():
            out.update({f"{prefix}/{name}/{k}": float(v) for k, v in entry.items()})
    out.update({f"{prefix}/total/{k}": float(v) for k, v in stats["total"].items()})
    tenures = [float(e["mean_tenure"]) for e in stats["layers"].values()]
    out[f"{prefix}/total/mean_tenure"] = sum(tenures) / len(tenures) if tenures else 0.0
    out.update({f"{prefix}/{k}": float(stats[k]) for k in ("steps", "elections", "clone_events")})
    return out
