"""State dicts written before the architecture refactor (issue 18) load and resume exactly.

``tests/data/state_v0_<case>.pt`` were written by this file's ``__main__`` with the code of main at 11b6116
(``LeaderCloneOptimizer`` built on mixins): a tiny MLP and a tiny conv net, both with BatchNorm, in weight and
output mode, trained 4 steps with an election at step 3. Each file holds the model and optimizer state dicts
after step 4, the batches of steps 5 and 6 (an election at 6), and the model state, roles and statistics
after each. The test rebuilds model and optimizer with today's code, loads both state dicts (as Accelerate and
the Trainer do: model first) and checks that the next two steps give the same roles and statistics, and the same
bits for the MLPs; the conv nets' bits depend on the CPU's conv kernels (see :func:`_conv_atol`).

Do not regenerate the files: they pin the old format. ``python tests/test_state_v0.py OUT_DIR`` writes them
again (e.g. to compare a new format against them).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from egg_optim import LeaderCloneOptimizer, RolePlan
from egg_optim.core.scores import CloneConflictScore

DATA = Path(__file__).parent / "data"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.bn1(self.fc1(x))))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 10, 1)
        self.bn2 = nn.BatchNorm2d(10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.head(y.mean(dim=(2, 3)))


def _mlp_weight():
    model = MLP()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opts = dict(clone_mode="weight", elect_every=3, election="grad_norm", assign="round_robin", clone_noise=0.1)
    return model, base, opts


def _mlp_output():
    model = MLP()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opts = dict(
        clone_mode="output",
        elect_every=3,
        election=CloneConflictScore(probe_every=2),
        election_policy="stable",
        max_churn=0.5,
        leader_scales="1,1.25",
    )
    return model, base, opts


def _conv_weight():
    model = ConvNet()
    base = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    opts = dict(
        clone_mode="weight", elect_every=3, clone_every=2, election="taylor", state_storage="full", clone_state="copy"
    )
    return model, base, opts


def _conv_output():
    model = ConvNet()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opts = dict(clone_mode="output", elect_every=3, election="weight_norm", assign="nearest", clone_state="reset")
    return model, base, opts


CASES = {"mlp_weight": _mlp_weight, "mlp_output": _mlp_output, "conv_weight": _conv_weight, "conv_output": _conv_output}


def _make(case: str, seed: int = 0):
    torch.manual_seed(seed)
    model, base, opts = CASES[case]()
    opt = LeaderCloneOptimizer(model, base, RolePlan.preset("mild"), seed=seed, **opts)
    return model, opt


def _batch(case: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    shape = (8, 6) if case.startswith("mlp") else (4, 2, 5, 5)
    return torch.randn(shape, generator=gen), torch.randint(0, 3, (shape[0],), generator=gen)


def _step(model, opt, x, y) -> None:
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


# stats() keys added after the fixtures were written (issues 19, 22; "runs" and "scattered": repack's stop)
_NEW_STATS = {"align", "graduated_to", "runs", "scattered"}


def _without(stats: dict, keys: set[str]) -> dict:
    """``stats`` without ``keys``, at the top, in its totals and in every layer's entry: what the fixtures' version
    reported."""
    out = {k: v for k, v in stats.items() if k not in keys}
    out["layers"] = {n: {k: v for k, v in e.items() if k not in keys} for n, e in stats["layers"].items()}
    out["total"] = {k: v for k, v in stats["total"].items() if k not in keys}
    return out


def _snapshot(model, opt) -> dict:
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "roles": {n: r.state() for n, r in opt.roles.items()},
        "stats": opt.stats(),
    }


def write(case: str, out: Path) -> None:
    model, opt = _make(case)
    for i in range(4):
        _step(model, opt, *_batch(case, i))
    # copies: both state dicts share the live tensors, which the next steps change
    saved = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()), "next": []}
    for i in (4, 5):
        x, y = _batch(case, i)
        _step(model, opt, x, y)
        saved["next"].append({"x": x, "y": y, **_snapshot(model, opt)})
    assert opt.elections == 2
    torch.save(saved, out / f"state_v0_{case}.pt")


def _conv_atol(case: str, key: str, steps: int) -> float:
    """How far the conv cases may drift from the fixtures' bits on another CPU: a conv bias followed by a
    BatchNorm has a gradient that is zero up to rounding, and the rounding of the conv's bias gradient depends on
    the CPU's kernels (oneDNN). Adam(W) steps such noise by about +-lr whatever its size, so those biases may
    differ by up to 2 lr a step, and the running means that see them by the norm's momentum times that. Every
    other tensor agrees to rounding (the MLP cases, without convs, stay bit for bit)."""
    bound = 2 * 1e-2 * steps if case == "conv_output" else 0.0  # AdamW, lr 1e-2; SGD moves noise by ~lr * noise
    if key.startswith("conv") and key.endswith(".bias"):
        return bound + 1e-7
    if key.endswith("running_mean"):
        return 0.1 * bound + 1e-7
    return 1e-7


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_of_previous_main_resumes_exactly(case):
    saved = torch.load(DATA / f"state_v0_{case}.pt", weights_only=True)
    model, opt = _make(case, seed=7)  # other init, roles and seed: everything must come from the files
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    assert opt.steps == 4 and opt.elections == 1
    for k_step, expected in enumerate(saved["next"], 1):
        _step(model, opt, expected["x"], expected["y"])
        got = _snapshot(model, opt)
        assert got["model"].keys() == expected["model"].keys()
        for k, v in expected["model"].items():
            if case.startswith("mlp"):
                assert torch.equal(got["model"][k], v), k
            else:
                torch.testing.assert_close(got["model"][k], v, rtol=1e-5, atol=_conv_atol(case, k, k_step), msg=k)
        assert got["roles"].keys() == expected["roles"].keys()
        for n, r in expected["roles"].items():
            assert r.keys() == got["roles"][n].keys()
            assert all(torch.equal(torch.as_tensor(got["roles"][n][k]), torch.as_tensor(v)) for k, v in r.items()), n
        assert _without(got["stats"], _NEW_STATS) == expected["stats"]
    # and the state dict it writes now is the format it read: it loads into a third optimizer
    model2, opt2 = _make(case, seed=3)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert opt2.stats() == opt.stats()


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DATA
    out.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        write(name, out)
        print(name, (out / f"state_v0_{name}.pt").stat().st_size, "bytes")
