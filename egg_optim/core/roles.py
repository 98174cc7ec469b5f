"""Per-layer unit roles: leaders (trained, cloned from), clones (not trained, copy a leader), independents.

A :class:`Roles` is an immutable value. Everything that depends on roles (masking indices, output-cloning
gather indices) is derived from it once, when roles change, never per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import PlanError
from .axes import Cycle, Span, cycle, span

LEADER, INDEPENDENT, CLONE = 0, 1, 2
ROLE_NAMES = {LEADER: "leader", INDEPENDENT: "independent", CLONE: "clone"}


def _as_index(x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long).flatten().cpu()
    return t


@dataclass(frozen=True, eq=False)
class Roles:
    """Roles of the ``num_units`` output units of one layer.

    ``leaders``, ``independents`` and ``clones`` are sorted LongTensors of unit indices that partition
    ``range(num_units)``; ``sources[i]`` is the leader that ``clones[i]`` copies.
    """

    num_units: int
    leaders: torch.Tensor
    independents: torch.Tensor
    clones: torch.Tensor
    sources: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("leaders", "independents", "clones", "sources"):
            object.__setattr__(self, name, _as_index(getattr(self, name)))
        order = torch.argsort(self.clones)
        object.__setattr__(self, "clones", self.clones[order])
        object.__setattr__(self, "sources", self.sources[order])
        object.__setattr__(self, "leaders", torch.sort(self.leaders).values)
        object.__setattr__(self, "independents", torch.sort(self.independents).values)
        self.validate()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def all_leaders(cls, num_units: int) -> Roles:
        """Every unit trained, nothing cloned: the baseline."""
        empty = torch.empty(0, dtype=torch.long)
        return cls(num_units, torch.arange(num_units), empty, empty, empty)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, source_map: torch.Tensor) -> Roles:
        """Build from a per-unit role code vector and a full-length source map (see :meth:`source_map`)."""
        codes = _as_index(codes)
        source_map = _as_index(source_map)
        clones = torch.nonzero(codes == CLONE).flatten()
        return cls(
            int(codes.numel()),
            torch.nonzero(codes == LEADER).flatten(),
            torch.nonzero(codes == INDEPENDENT).flatten(),
            clones,
            source_map[clones],
        )

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        n = self.num_units
        seen = torch.cat([self.leaders, self.independents, self.clones])
        if seen.numel() != n or (n and not torch.equal(torch.sort(seen).values, torch.arange(n))):
            raise PlanError(
                f"roles must partition the {n} units exactly once: got {self.leaders.numel()} leaders, "
                f"{self.independents.numel()} independents, {self.clones.numel()} clones"
            )
        if self.sources.numel() != self.clones.numel():
            raise PlanError(f"{self.clones.numel()} clones but {self.sources.numel()} sources")
        if self.clones.numel() and not bool(torch.isin(self.sources, self.leaders).all()):
            raise PlanError("every clone's source must be a leader")

    # ------------------------------------------------------------------ derived views
    @property
    def num_clones(self) -> int:
        return int(self.clones.numel())

    @property
    def has_clones(self) -> bool:
        return self.num_clones > 0

    def on(self, device: torch.device, which: str = "clones") -> torch.Tensor:
        """The index ``which`` (``"clones"``, ``"sources"``, ``"active"``...) on ``device``, kept with these roles:
        a role index copied to a GPU at every use is a host-to-device copy, which synchronises the device, at
        every step (weight mode clones at every step)."""
        cache = self.__dict__.setdefault("_on_device", {})
        t = cache.get((which, device))
        if t is None:
            t = cache[which, device] = getattr(self, which).to(device, copy=True)  # never the host tensor itself
        return t

    @cached_property
    def codes(self) -> torch.Tensor:
        """Role code per unit: 0 leader, 1 independent, 2 clone (int8)."""
        c = torch.full((self.num_units,), LEADER, dtype=torch.int8)
        c[self.independents] = INDEPENDENT
        c[self.clones] = CLONE
        return c

    @cached_property
    def active(self) -> torch.Tensor:
        """Sorted indices of units that are computed and trained (leaders and independents)."""
        return torch.sort(torch.cat([self.leaders, self.independents])).values

    @cached_property
    def source_map(self) -> torch.Tensor:
        """``source_map[u]``: the unit whose weights/outputs ``u`` carries (itself unless a clone)."""
        m = torch.arange(self.num_units)
        m[self.clones] = self.sources
        return m

    @cached_property
    def gather_index(self) -> torch.Tensor:
        """Index into the *active* units that rebuilds all units: ``full = active_out[..., gather_index]``."""
        pos = torch.full((self.num_units,), -1, dtype=torch.long)
        pos[self.active] = torch.arange(self.active.numel())
        return pos[self.source_map]

    # one run of positions each, when they are (the default packed roles): the step then takes views, not gathers
    @cached_property
    def active_span(self) -> Span | None:
        """``(start, length)`` of :attr:`active` when it is one run of units, else ``None``."""
        return span(self.active)

    @cached_property
    def clone_span(self) -> Span | None:
        """``(start, length)`` of :attr:`clones` when it is one run of units, else ``None``."""
        return span(self.clones)

    @cached_property
    def source_cycle(self) -> Cycle | None:
        """``(q, m, r)`` when clone ``k``'s source is ``q + (k + r) % m`` (:func:`~egg_optim.core.axes.cycle`)."""
        return cycle(self.sources)

    @cached_property
    def distinct_sources(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sources, back)``: the distinct sources, ascending, and for each clone its source's place among them
        (what a clone event must read, worked out once per role change)."""
        return torch.unique(self.sources, return_inverse=True)

    def counts(self) -> dict[str, int]:
        return {
            "leaders": int(self.leaders.numel()),
            "independents": int(self.independents.numel()),
            "clones": self.num_clones,
        }

    def same_as(self, other: Roles) -> bool:
        return (
            self.num_units == other.num_units
            and torch.equal(self.codes, other.codes)
            and torch.equal(self.source_map, other.source_map)
        )

    def expand(self, index: torch.Tensor) -> Roles:
        """The roles of the *elements* a tensor holds for these units: ``index[u]`` lists the positions (along
        the tensor's unit dimension) of unit ``u``'s ``k`` elements, ``index`` of shape ``[num_units, k]``
        covering every position once. Clone ``c``'s ``i``-th element copies source ``s``'s ``i``-th element, so
        masking, cloning and compact storage work on grouped units (attention heads: ``head_dim`` rows each;
        GQA groups; a fused qkv projection) exactly as on single rows."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        if index.dim() != 2 or index.shape[0] != self.num_units:
            raise PlanError(f"unit index must have shape [{self.num_units}, k], got {tuple(index.shape)}")
        if index.shape[1] == 1 and torch.equal(index[:, 0], torch.arange(self.num_units)):
            return self
        return Roles(
            int(index.numel()),
            index[self.leaders].flatten(),
            index[self.independents].flatten(),
            index[self.clones].flatten(),
            index[self.sources].flatten(),
        )

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, torch.Tensor]:
        """Tensors only (safe for ``torch.load(weights_only=True)``)."""
        return {"codes": self.codes.clone(), "source_map": self.source_map.clone()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Roles:
        return cls.from_codes(state["codes"], state["source_map"])

    # ------------------------------------------------------------------ parts (the experts of a MoE layer)
    def split(self, parts: int) -> list[Roles] | None:
        """These roles as ``parts`` equal runs of units, each with roles of its own (indices from 0 in each run),
        or ``None`` where a clone's source lies in another run. See :func:`join`."""
        if parts < 1 or self.num_units % parts:
            raise PlanError(f"cannot split {self.num_units} units into {parts} equal parts")
        n = self.num_units // parts
        part = torch.arange(self.num_units) // n
        if self.has_clones and not torch.equal(part[self.clones], part[self.sources]):
            return None
        codes, smap = self.codes, self.source_map
        return [Roles.from_codes(codes[g * n : (g + 1) * n], smap[g * n : (g + 1) * n] - g * n) for g in range(parts)]

    def __repr__(self) -> str:
        c = self.counts()
        return (
            f"Roles(units={self.num_units}, leaders={c['leaders']}, independents={c['independents']}, "
            f"clones={c['clones']})"
        )


def join(parts: list[Roles]) -> Roles:
    """The roles of the units of ``parts`` laid end to end (the inverse of :meth:`Roles.split`)."""
    offsets = [0]
    for r in parts[:-1]:
        offsets.append(offsets[-1] + r.num_units)
    codes = torch.cat([r.codes for r in parts])
    return Roles.from_codes(codes, torch.cat([r.source_map + o for r, o in zip(parts, offsets)]))


def shares(total: int, parts: int, room: list[int] | None = None) -> list[int]:
    """``total`` split over ``parts`` as evenly as it goes, the remainder to the first parts; with ``room``, at most
    ``room[g]`` to part ``g``, one at a time to the part with the most room left (the first among equals)."""
    if room is None:
        q, r = divmod(int(total), parts)
        return [q + (g < r) for g in range(parts)]
    if total > sum(room):
        raise PlanError(f"cannot split {total} over parts with room for {room}")
    # what that one-at-a-time rule leaves is each part's room cut down to a level: find the highest level that
    # takes at least ``total``, take what the level above takes, then one more from the first parts above it
    lo, hi = 0, max(room, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(max(r - mid, 0) for r in room) >= total else (lo, mid - 1)
    out = [max(r - lo - 1, 0) for r in room]
    extra = int(total) - sum(out)
    for g in range(parts):
        if extra and room[g] > lo:
            out[g] += 1
            extra -= 1
    return out


def by_parts(
    parts: int,
    num_units: int,
    leaders: int,
    independents: int,
    fn: Callable[[slice, int, int, Roles | None], Roles],
    current: Roles | None = None,
) -> Roles | None:
    """Roles built part by part: ``fn(units, leaders, independents, current)`` for each of ``parts`` equal runs of
    units (``units``, a slice), with the run's share of the counts (active units and leaders each as even as they
    go, the remainders to the first runs, so no run gets more leaders than active units) and its part of
    ``current`` (:meth:`Roles.split`); joined (:func:`join`). ``None`` where ``current`` does not split. One part
    is one call on the whole layer."""
    if parts == 1:
        return fn(slice(None), leaders, independents, current)
    now = [None] * parts if current is None else current.split(parts)
    if now is None:
        return None
    n = num_units // parts
    active, lead = shares(leaders + independents, parts), shares(leaders, parts)
    return join([fn(slice(g * n, (g + 1) * n), lead[g], active[g] - lead[g], now[g]) for g in range(parts)])
