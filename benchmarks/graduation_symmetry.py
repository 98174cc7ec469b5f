#!/usr/bin/env python
"""Did graduated units leave their source? Cosines of weight rows and consumer columns after a train_image run.

For a finished ``recipes/train_image.py`` run (its ``metrics.json`` and ``model.safetensors``), the roles drawn at
the start are rebuilt from the run's flags and seed. Per managed layer this prints:

* ``unit``: the mean cosine between each clone's weight row and its source's at the end. For a graduated run that
  is how far promoted units moved away from the unit they copied; 1 means they are still copies.
* ``leaders``: the mean |cosine| between random pairs of leaders, the level of two unrelated units.
* ``columns``: for the layer's consumer (the next conv of its block), the mean cosine between the columns that
  read a clone and those that read its source, at the end and at initialisation.

    python benchmarks/graduation_symmetry.py runs/graduation_fm/graduate-late-s0 --against runs/graduation_fm/fixed-s0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from egg_recipes import train_image
from egg_recipes.data import dataset_spec
from safetensors.torch import load_file

from egg_optim import LeaderCloneOptimizer


def _columns(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The consumer's input columns ``index`` as rows (conv: every output channel and kernel position)."""
    return w[:, index].transpose(0, 1).flatten(1)


def analyse(run: Path) -> dict[str, dict[str, float]]:
    metrics = json.loads((run / train_image.METRICS_FILE).read_text())
    args = train_image.parse_args([])
    for key, value in metrics["args"].items():
        setattr(args, key, value)
    args.graduate = None  # the roles as drawn at the start; graduation changes them later
    spec = dataset_spec(train_image.load_image_splits(args)[0])
    torch.manual_seed(args.seed)
    model, plan = train_image.build_network(args, spec)
    lco = LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters()), config=train_image.egg_config(args, plan))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    final = load_file(str(run / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    for name, roles in lco.roles.items():
        if not len(roles.clones):
            continue
        w = F.normalize(final[f"{name}.weight"].flatten(1), dim=1)
        row = {"unit": (w[roles.clones] * w[roles.sources]).sum(1).mean().item()}
        i, j = (roles.leaders[torch.randint(len(roles.leaders), (256,), generator=gen)] for _ in range(2))
        if (i != j).any():
            row["leaders"] = (w[i[i != j]] * w[j[i != j]]).sum(1).abs().mean().item()
        block, conv = name.rsplit(".conv", 1)
        consumer = f"{block}.conv{int(conv) + 1}.weight" if conv in ("1", "2") else None
        if consumer in final:
            for key, tensor in (("columns", final[consumer]), ("columns_init", init[consumer])):
                c, s = _columns(tensor, roles.clones), _columns(tensor, roles.sources)
                row[key] = F.cosine_similarity(c, s, dim=1).mean().item()
        out[name] = row
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="train_image output folders")
    p.add_argument(
        "--against",
        type=Path,
        default=None,
        help="another run of the same net (e.g. the fixed-roles run a graduated one branched from): also print "
        "each layer's |W - W_against| / |W_against| at the end",
    )
    args = p.parse_args(argv)
    other = load_file(str(args.against / "model.safetensors")) if args.against else None
    for run in args.runs:
        result = analyse(run)
        final = load_file(str(run / "model.safetensors")) if other is not None else None
        print(f"## {run}")
        for name, row in result.items():
            if final is not None:
                key = f"{name}.weight"
                row["vs_against"] = ((final[key] - other[key]).norm() / other[key].norm()).item()
            print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
        print(f"mean unit cosine to source: {statistics.fmean(r['unit'] for r in result.values()):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
