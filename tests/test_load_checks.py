"""What a LeaderCloneOptimizer state dict depends on, and the values it carries, are checked on load (issue 21,
cases 4-6): a refused state dict raises StateDictMismatchError naming the key and value, and the model, the
optimizer (state, hyperparameters, roles, counters, scores) and the RNG are exactly as before, and train on."""

from __future__ import annotations

import copy

import pytest
import torch
from _digests import state_digest
from conftest import TinySeedNet, mlp

from egg_optim import LeaderCloneOptimizer, RolePlan, StateDictMismatchError

PLAN = RolePlan(per_layer={"layer*.conv*": (0.4, 0.2)}, only_listed=True)


def _make(seed=0, base=torch.optim.Adam, **kw):
    torch.manual_seed(seed)
    model = TinySeedNet()
    return model, LeaderCloneOptimizer(model, base(model.parameters(), lr=1e-2), PLAN, **kw)


def _train(model, opt, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(4, 1, 6, 6, generator=g)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()


def _refused(model, opt, sd, match):
    """Loading ``sd`` is refused naming ``match``; nothing changed; the optimizer trains on."""
    before = state_digest(model, opt)
    with pytest.raises(StateDictMismatchError, match=match):
        opt.load_state_dict(sd)
    assert state_digest(model, opt) == before
    _train(model, opt, 1, seed=7)


# ---------------------------------------------------------------------------------------------- 4. clone rows
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_clone_rows_refused_and_the_model_untouched(bad):
    model, opt = _make(clone_mode="output")
    _train(model, opt)
    sd = copy.deepcopy(opt.state_dict())
    key = next(iter(sd["egg_optim"]["clone_rows"]))
    sd["egg_optim"]["clone_rows"][key][0].fill_(bad)
    model2, opt2 = _make(seed=1, clone_mode="output")
    _train(model2, opt2, 3, seed=4)
    _refused(model2, opt2, sd, rf"clone_rows\[{key!r}\] holds 1\d* (NaN|inf)")
    assert all(bool(torch.isfinite(p).all()) for p in model2.parameters())


# ---------------------------------------------------------------------------------------------- 5. dependencies
@pytest.mark.parametrize(
    "saved, loading, named",
    [
        ({"clone_mode": "weight"}, {"clone_mode": "output"}, "clone_mode='weight' (this optimizer: 'output')"),
        ({"clone_mode": "output"}, {"clone_mode": "weight"}, "clone_mode='output' (this optimizer: 'weight')"),
        ({"election": "grad_norm"}, {"election": "weight_norm"}, "election='grad_norm' (this optimizer: "),
        ({"elect_every": 3}, {"elect_every": 5}, "elect_every='3' (this optimizer: '5')"),
        ({"clone_noise": 0.0}, {"clone_noise": 0.1}, "clone_noise=0.0 (this optimizer: 0.1)"),
        ({"assign": "first"}, {"assign": "round_robin"}, "assign='first' (this optimizer: 'round_robin')"),
    ],
)
def test_state_dict_of_other_options_refused(saved, loading, named):
    model, opt = _make(**saved)
    _train(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["egg_optim"]["depends"]["clone_mode"] == opt.clone_mode
    model2, opt2 = _make(seed=1, **loading)
    _train(model2, opt2, 2, seed=4)
    _refused(model2, opt2, sd, named.replace("(", r"\(").replace(")", r"\)"))


def test_running_scores_of_another_election_are_not_averaged_in():
    """The issue's case: grad_norm sums (score_count > 0) loading into a weight_norm optimizer."""
    model, opt = _make(election="grad_norm", elect_every=100)
    _train(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert any(e["score_count"] for e in sd["egg_optim"]["layers"].values())
    model2, opt2 = _make(seed=1, election="weight_norm", elect_every=100)
    _refused(model2, opt2, sd, "election='grad_norm'")


def test_same_options_load_and_auto_clone_schedule_matches_its_resolution():
    model, opt = _make(clone_every="auto")  # weight mode: every step
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    model2, opt2 = _make(seed=1, clone_every=1)  # the same schedule, spelled out
    opt2.load_state_dict(sd)
    assert opt2.steps == 2


def test_old_state_dict_without_dependencies_still_loads():
    """State dicts written before the options were recorded load as before (the check is skipped)."""
    model, opt = _make(clone_mode="weight")
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    del sd["egg_optim"]["depends"]
    model2, opt2 = _make(seed=1, clone_mode="weight", assign="round_robin")
    opt2.load_state_dict(sd)
    assert opt2.steps == 2 and all(opt2.roles[n].same_as(opt.roles[n]) for n in opt.roles)


# ---------------------------------------------------------------------------------------------- 6. values
def _group(sd, key, value):
    sd["param_groups"][0][key] = value


def _state(sd, key, value):
    st = next(st for st in sd["state"].values() if key in st)
    st[key] = value(st[key])


BAD_VALUES = [
    ("lr nan", lambda sd: _group(sd, "lr", float("nan")), r"\['lr'\] is nan: expected a finite number"),
    ("lr inf", lambda sd: _group(sd, "lr", float("inf")), r"\['lr'\] is inf"),
    ("lr str", lambda sd: _group(sd, "lr", "0.01"), r"\['lr'\] is '0.01': expected a number"),
    ("lr negative", lambda sd: _group(sd, "lr", -0.1), r"holds \{'lr': -0.1\}, which Adam refuses"),
    ("betas", lambda sd: _group(sd, "betas", (0.9, 1.5)), r"holds \{'betas': \(0.9, 1.5\)\}, which Adam refuses"),
    ("betas len", lambda sd: _group(sd, "betas", (0.9,)), r"\['betas'\] is \(0.9,\): expected 2 numbers"),
    ("amsgrad", lambda sd: _group(sd, "amsgrad", "yes"), r"\['amsgrad'\] is 'yes': expected True or False"),
    ("exp_avg_sq nan", lambda sd: _state(sd, "exp_avg_sq", lambda v: v.index_fill(0, torch.tensor([0]), float("nan"))),
     r"'exp_avg_sq' of .* holds \d+ NaN"),
    ("exp_avg_sq negative", lambda sd: _state(sd, "exp_avg_sq", lambda v: v - 1.0), "'exp_avg_sq' .* negative"),
    ("exp_avg inf", lambda sd: _state(sd, "exp_avg", lambda v: v.index_fill(0, torch.tensor([0]), float("inf"))),
     r"'exp_avg' of .* holds \d+ inf"),
    ("step", lambda sd: _state(sd, "step", lambda v: torch.full_like(v, -3.0)), "'step' of .* is -3"),
]  # fmt: skip


@pytest.mark.parametrize("storage", ["compact", "full"])
@pytest.mark.parametrize("name, corrupt, match", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_hyperparameters_and_state_values_refused(name, corrupt, match, storage):
    model, opt = _make(state_storage=storage)
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    model2, opt2 = _make(seed=1, state_storage=storage)
    _train(model2, opt2, 3, seed=4)
    _refused(model2, opt2, sd, match)


def test_other_valid_hyperparameters_are_adopted_as_torch_does():
    model, opt = _make()
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0].update(lr=0.05, betas=(0.8, 0.99), weight_decay=0.1)
    model2, opt2 = _make(seed=1)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.05 and opt2.param_groups[0]["betas"] == (0.8, 0.99)


def test_sgd_nan_lr_refused_although_sgd_itself_would_take_it():
    model = mlp()
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), RolePlan(0.5))
    x = torch.randn(4, 6)
    model(x).sum().backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = float("nan")
    before = state_digest(model, opt)
    with pytest.raises(StateDictMismatchError, match="'lr'.* nan"):
        opt.load_state_dict(sd)
    assert state_digest(model, opt) == before
