"""Per-layer unit roles: leaders (trained, cloned from), clones (not trained, copy a leader), independents.

A :class:`Roles` is an immutable value. Everything that depends on roles (masking indices, output-cloning
gather indices) is derived from it once, when roles change, never per step.
"""

from __future__ import annotations

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

    def __repr__(self) -> str:
        c = self.counts()
        return (
            f"Roles(units={self.num_units}, leaders={c['leaders']}, independents={c['independents']}, "
            f"clones={c['clones']})"
        )
