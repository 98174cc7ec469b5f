"""Election policies beyond re-ranking: role changes that keep what the network computes, and plans that grow or
shrink over training.

Re-ranking every unit at each election (:func:`~egg_optim.core.election.elect`, policy ``"rank"``) abandons
trained leaders and reassigns clones, which changes the function the network computes; that is what made the
seed's per-epoch redraws cost accuracy. :func:`stable_elect` (policy ``"stable"``) changes only what the scores
ask for and keeps every unit's output where it can:

* **promotion** (split): a promoted clone becomes a leader starting from its source's weights (in output mode
  the optimizer fills clone rows before an election), so it computes what it computed; the clones that carried
  the same function are dealt round-robin between the old carrier and the new one, which changes nothing at
  the moment of the election and lets the two diverge afterwards;
* **demotion** (merge): a demoted leader becomes a clone of the leader nearest to it in weights (cosine), and so
  do its clones unless a promoted clone carries their function;
* at unchanged counts, a clone replaces the worst leader only when its score beats that leader's by the
  hysteresis margin, and at most ``max_churn`` of a layer's leaders change per election.

:func:`parse_leader_scales` / :func:`scaled_counts` express grow and shrink schedules as a list of leader-fraction
scales, one per role draw: ``"ramp:0.5:1.5:4"`` is four equal pieces from 0.5 to 1.5 taken at their midpoints
(0.625, 0.875, 1.125, 1.375), whose mean is 1, so over four equal intervals the plan's compute is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, PlanError
from .election import bully_ranking
from .plan import LayerPlan, RolePlan, aligned_plan
from .roles import CLONE, INDEPENDENT, LEADER, Roles

ELECTION_POLICIES = ("rank", "stable")


# ---------------------------------------------------------------------------------------------- plan schedules
def ramp(start: float, end: float, pieces: int) -> tuple[float, ...]:
    """``pieces`` scales from ``start`` to ``end``, each the midpoint of its equal piece (mean ``(start+end)/2``)."""
    return tuple(start + (end - start) * (i + 0.5) / pieces for i in range(pieces))


def parse_leader_scales(spec: str | Sequence[float] | None, *, what: str = "leader_scales") -> tuple[float, ...]:
    """Scales from ``()``/``None``/``""`` (none), a sequence of numbers, ``"0.5,1,1.5"`` or
    ``"ramp:START:END:N"``; every scale must be a finite number > 0."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "none"):
            return ()
        try:
            if text.startswith("ramp:"):
                parts = text.split(":")
                if len(parts) != 4:
                    raise ValueError
                start, end, n = float(parts[1]), float(parts[2]), int(parts[3])
                if n < 1:
                    raise ValueError
                values: Sequence[float] = ramp(start, end, n)
            else:
                values = [float(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(
                f"{what}: cannot read {spec!r}; use comma-separated scales ('0.5,1,1.5') or 'ramp:START:END:N'"
            ) from None
    elif isinstance(spec, Sequence):
        values = spec
    else:
        raise ConfigError(f"{what}: expected a string or a sequence of numbers, got {spec!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{what}: every scale must be a finite number > 0, got {v!r} in {spec!r}")
        out.append(float(v))
    return tuple(out)


def scaled_counts(
    plan: RolePlan,
    layer_plans: Mapping[str, LayerPlan],
    scale: float,
    multiples: Mapping[str, int] | None = None,
) -> dict[str, LayerPlan]:
    """Layer counts with every layer's leader fraction multiplied by ``scale`` (``round(scale * pL * units)``
    leaders, independents as the plan rounds them), then rounded to ``multiples[name]`` (the plan's alignment,
    :func:`~egg_optim.core.plan.align_counts`; none when not given). Raises :class:`PlanError` naming the layer
    when the scaled plan is impossible (more active units than units, or clones without a leader)."""
    if scale == 1.0:
        return dict(layer_plans)
    out = {}
    for name, lp in layer_plans.items():
        p_lead, _ = plan.fractions_for(name)
        leaders = round(scale * p_lead * lp.units)
        independents = lp.unaligned[1] if lp.unaligned else lp.independents
        if leaders + independents > lp.units:
            raise PlanError(
                f"leader scale {scale:g} gives layer {name!r} {leaders} leaders + {independents} independents "
                f"> {lp.units} units; lower the scale"
            )
        if leaders == 0 and lp.units - independents > 0:
            raise PlanError(f"leader scale {scale:g} rounds layer {name!r} to 0 leaders; raise the scale")
        out[name] = aligned_plan(name, lp.units, leaders, independents, (multiples or {}).get(name, 1))
    return out


# ---------------------------------------------------------------------------------------------- stable elections
def _nearest(rows: torch.Tensor, candidates: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """For each unit in ``rows``, the candidate with the most similar weight row (cosine; the first without
    weights)."""
    if weight is None or candidates.numel() == 1:
        return candidates[:1].expand(rows.numel()).clone()
    w = F.normalize(weight.detach().float().cpu().flatten(1), dim=1)
    return candidates[(w[rows] @ w[candidates].T).argmax(dim=1)]


def stable_elect(
    current: Roles,
    scores: torch.Tensor,
    n_leaders: int,
    n_independents: int,
    *,
    hysteresis: float = 0.0,
    max_churn: float = 0.0,
    weight: torch.Tensor | None = None,
) -> Roles:
    """New roles for one layer that change only what ``scores`` (higher: should be active) ask for.

    Leaders and independents stay unless counts shrink (the lowest-scored go) or, at unchanged counts, the
    best clone beats the worst leader by ``hysteresis`` (``s_clone > s_leader + h * |s_leader|``), at most
    ``floor(max_churn * leaders)`` such swaps (at least one when ``max_churn > 0``). New seats go to the
    highest-scored clones. Clones keep a source that computes what they computed (see the module docstring).
    Ties follow the bully rule (the higher index ranks first).
    """
    n = current.num_units
    if scores.numel() != n:
        raise PlanError(f"stable_elect: {scores.numel()} scores for {n} units")
    if n_leaders + n_independents > n or (n_leaders == 0 and n - n_independents > 0):
        raise PlanError(f"stable_elect: cannot seat {n_leaders} leaders + {n_independents} independents of {n}")
    rank = torch.empty(n, dtype=torch.long)
    rank[bully_ranking(scores)] = torch.arange(n)  # 0 = best
    codes = current.codes.clone()
    old_src = current.source_map  # the function each unit computes now (itself when active)

    def best(role: int, k: int, worst: bool = False) -> list[int]:
        units = torch.nonzero(codes == role).flatten()
        order = units[torch.argsort(rank[units], descending=worst, stable=True)]
        return [int(u) for u in order[:k]]

    # independents: fill or free seats (promotions from clones, demotions to clones)
    n_ind = int((codes == INDEPENDENT).sum())
    for u in best(CLONE, max(n_independents - n_ind, 0)):
        codes[u] = INDEPENDENT
    for u in best(INDEPENDENT, max(n_ind - n_independents, 0), worst=True):
        codes[u] = CLONE
    # leaders: grow, shrink, or swap at unchanged counts
    n_lead = int((codes == LEADER).sum())
    if n_leaders > n_lead:
        for u in best(CLONE, n_leaders - n_lead):
            codes[u] = LEADER
    elif n_leaders < n_lead:
        for u in best(LEADER, n_lead - n_leaders, worst=True):
            codes[u] = CLONE
    elif max_churn > 0:
        limit = max(1, math.floor(max_churn * n_lead))
        for c, d in zip(best(CLONE, limit), best(LEADER, limit, worst=True)):
            sc, sd = float(scores[c]), float(scores[d])
            if not sc > sd + hysteresis * abs(sd):
                break
            codes[c], codes[d] = LEADER, CLONE
    # sources: each clone goes to a leader that carries the function it carried, round-robin among several
    leaders = torch.nonzero(codes == LEADER).flatten()
    clones = torch.nonzero(codes == CLONE).flatten()
    carriers: dict[int, list[int]] = {}
    for lead in leaders.tolist():
        carriers.setdefault(int(old_src[lead]), []).append(lead)
    for group in carriers.values():  # the sitting carrier first, then the promoted ones
        group.sort(key=lambda u: (int(current.codes[u]) == CLONE, u))
    dealt: dict[int, int] = {}
    sources = torch.empty(clones.numel(), dtype=torch.long)
    orphans = []
    for i, u in enumerate(clones.tolist()):
        fid = int(old_src[u])
        group = carriers.get(fid)
        if group:
            k = dealt.get(fid, 0)
            sources[i] = group[k % len(group)]
            dealt[fid] = k + 1
        else:
            orphans.append(i)
    if orphans:  # their function is gone (a demoted leader's): the leader nearest to it in weights
        idx = torch.tensor(orphans)
        sources[idx] = _nearest(old_src[clones[idx]], leaders, weight)
    return Roles(n, leaders, torch.nonzero(codes == INDEPENDENT).flatten(), clones, sources)
