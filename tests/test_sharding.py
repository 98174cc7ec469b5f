"""egg_optim.core.sharding on ordinary tensors (one process): every helper is the plain operation, importing
egg_optim loads no torch.distributed.tensor, and a carried state-dict entry round-trips or is refused.
Sharded (DTensor) behaviour: tests/test_fsdp.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from egg_optim.core import sharding
from egg_optim.errors import StateDictMismatchError


def test_helpers_are_the_plain_operations_on_ordinary_tensors():
    t = torch.arange(12.0).reshape(4, 3)
    assert not sharding.is_sharded(t) and sharding.local(t) is t and sharding.full(t) is t
    assert sharding.span(t, 0) == (0, 4) and not sharding.splits(t, 1)
    which, where = sharding.localize(t, 0, torch.tensor([3, 1]))
    assert which.tolist() == [0, 1] and where.tolist() == [3, 1]
    copied = sharding.copied_positions(t, 1, torch.tensor([0]), torch.tensor([2]))
    assert torch.equal(copied[:, 0], t[:, 2]) and torch.equal(copied[:, 1:], t[:, 1:])
    sharding.copy_positions_(t, 0, torch.tensor([0, 3]), torch.tensor([1, 1]))
    assert torch.equal(t[0], t[1]) and torch.equal(t[3], t[1])
    assert sharding.like(t, copied) is copied
    sharding.write_full_(t, copied)
    assert torch.equal(t, copied)
    sharding.check_placements("w", t)  # nothing to check


def test_importing_egg_optim_loads_no_dtensor_or_fsdp_module():
    """DTensors exist only once torch.distributed.tensor is imported (seconds on a small machine): the helpers
    look it up when asked and never import it."""
    heavy = ("torch.distributed.tensor", "torch.distributed.fsdp")
    code = f"import sys, egg_optim; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_carried_entry_round_trips_and_bad_ones_are_refused():
    entry = {"version": 2, "layers": {"fc": {"codes": torch.tensor([0, 2]), "units": 2}}}
    sd = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0], "egg_optim": sharding.pack_entry(entry)}]}
    groups = sd["param_groups"]
    got = sharding.take_entry(sd, "egg_optim")
    assert torch.equal(got["layers"]["fc"]["codes"], entry["layers"]["fc"]["codes"]) and got["version"] == 2
    assert "egg_optim" not in sd["param_groups"][0] and "egg_optim" in groups[0]  # the caller's dict is kept
    assert sharding.take_entry(sd, "egg_optim") is None
    bad = {"state": {}, "param_groups": [{"params": [], "egg_optim": b"not a torch file"}]}
    with pytest.raises(StateDictMismatchError, match=r"param_groups\[0\]\['egg_optim'\]"):
        sharding.take_entry(bad, "egg_optim")
