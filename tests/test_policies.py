"""Stable elections, grow/shrink plans (leader_scales), the output-cloning probe and the clone-conflict score."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from conftest import TinySeedNet

from egg_optim import ConfigError, EggConfig, LeaderCloneOptimizer, PlanError, RolePlan, Roles
from egg_optim.core.policies import parse_leader_scales, ramp, scaled_counts, stable_elect
from egg_optim.core.scores import CloneConflictScore
from egg_optim.rewrites.output_cloning import export_plain, take_probe

PLAN = RolePlan(0.4, 0.1)


def _roles(n, leaders, independents, clones, sources):
    return Roles(n, torch.tensor(leaders), torch.tensor(independents), torch.tensor(clones), torch.tensor(sources))


# ---------------------------------------------------------------------------- leader scales
def test_leader_scales_forms_and_errors():
    assert parse_leader_scales("ramp:0.5:1.5:4") == ramp(0.5, 1.5, 4) == (0.625, 0.875, 1.125, 1.375)
    assert sum(ramp(0.2, 1.8, 5)) == pytest.approx(5.0)  # midpoints: the mean is (start + end) / 2
    assert parse_leader_scales("0.5, 1,2") == (0.5, 1.0, 2.0) and parse_leader_scales("") == ()
    assert parse_leader_scales([1, 0.5]) == (1.0, 0.5)
    for bad, match in (("ramp:1:2", "cannot read 'ramp:1:2'"), ("1,x", "cannot read"), ("1,-1", "got -1.0")):
        with pytest.raises(ConfigError, match=match):
            parse_leader_scales(bad)
    with pytest.raises(ConfigError, match="elect_every is 'never'"):
        EggConfig(leader_scales="0.5,1.5")
    cfg = EggConfig(leader_scales="ramp:0.5:1.5:2", elect_every="epoch")
    assert cfg.scales == (0.75, 1.25) and cfg.signature()["leader_scales"] == "0.75,1.25"
    with pytest.raises(ConfigError, match="only the stable policy"):
        EggConfig(election="clone_conflict")
    with pytest.raises(ConfigError, match="max_churn must be a number in"):
        EggConfig(max_churn=1.5)
    with pytest.raises(ConfigError, match="election_policy must be one of"):
        EggConfig(election_policy="vote")


def test_scaled_counts_and_impossible_scales():
    model = TinySeedNet()
    base = PLAN.resolve(model)
    grown = scaled_counts(PLAN, base, 1.5)
    assert {n: lp.leaders for n, lp in grown.items()} == {n: round(1.5 * 0.4 * lp.units) for n, lp in base.items()}
    assert all(grown[n].independents == base[n].independents for n in base)
    assert scaled_counts(PLAN, base, 1.0) == base
    with pytest.raises(PlanError, match=r"leader scale 2.5 gives layer 'layer1.conv1' 10 leaders \+ 1"):
        scaled_counts(PLAN, base, 2.5)
    with pytest.raises(PlanError, match="rounds layer 'layer1.conv1' to 0 leaders"):
        scaled_counts(PLAN, base, 0.1)
    with pytest.raises(PlanError, match="leader scale 2.5"):  # checked when the optimizer is built
        LeaderCloneOptimizer(
            model, torch.optim.SGD(model.parameters(), 0.1), PLAN, elect_every=1, leader_scales="1,2.5"
        )


# ---------------------------------------------------------------------------- stable_elect
def test_stable_grow_keeps_every_role_and_splits_groups():
    # 10 units: leaders 0, 1; independent 2; clones 3..9 (sources 0,1,0,1,0,1,0)
    cur = _roles(10, [0, 1], [2], [3, 4, 5, 6, 7, 8, 9], [0, 1, 0, 1, 0, 1, 0])
    scores = torch.tensor([0.0, 0, 0, 5, 1, 2, 9, 0, 0, 0])
    new = stable_elect(cur, scores, 4, 1)
    assert new.leaders.tolist() == [0, 1, 3, 6] and new.independents.tolist() == [2]  # best clones: 6, 3
    src = dict(zip(new.clones.tolist(), new.sources.tolist()))
    # every clone keeps a source that computes what its old source computed: 0's group is 0 and 3, 1's is 1 and 6
    old = cur.source_map
    for c, s in src.items():
        assert int(old[s]) == int(old[c])
    assert src == {4: 1, 5: 0, 7: 3, 8: 6, 9: 0}  # dealt round-robin per function, the sitting carrier first


def test_stable_shrink_merges_into_the_nearest_leader():
    cur = _roles(8, [0, 1, 2], [3], [4, 5, 6, 7], [0, 1, 2, 2])
    weight = torch.eye(8)
    weight[2] = weight[1] + 0.1 * weight[0]  # leader 2 is nearest to leader 1
    new = stable_elect(cur, torch.tensor([3.0, 2, 1, 0, 0, 0, 0, 0]), 2, 1, weight=weight)
    assert new.leaders.tolist() == [0, 1] and new.independents.tolist() == [3]
    assert dict(zip(new.clones.tolist(), new.sources.tolist())) == {2: 1, 4: 0, 5: 1, 6: 1, 7: 1}


def test_stable_swaps_need_the_hysteresis_margin_and_respect_max_churn():
    cur = _roles(8, [0, 1, 2, 3], [], [4, 5, 6, 7], [0, 1, 2, 3])
    scores = torch.tensor([5.0, 4, 3, 1, 2.5, 0, 0, 0])  # clone 4 (2.5) beats leader 3 (1)
    assert stable_elect(cur, scores, 4, 0, max_churn=0.25).leaders.tolist() == [0, 1, 2, 4]
    assert stable_elect(cur, scores, 4, 0, max_churn=0.25, hysteresis=2.0).same_as(cur)  # needs > 1 + 2 * 1
    assert stable_elect(cur, scores, 4, 0).same_as(cur)  # default max_churn 0: only count changes move roles
    many = torch.tensor([5.0, 4, 0, 1, 9, 8, 7, 6])
    assert stable_elect(cur, many, 4, 0, max_churn=0.25).leaders.tolist() == [0, 1, 3, 4]  # one swap: 25% of 4
    assert stable_elect(cur, many, 4, 0, max_churn=0.5).leaders.tolist() == [0, 1, 4, 5]
    with pytest.raises(PlanError, match="cannot seat 9 leaders"):
        stable_elect(cur, scores, 9, 0)


# ---------------------------------------------------------------------------- the optimizer
def _net_and_opt(seed=0, **options):
    torch.manual_seed(seed)
    model = TinySeedNet()
    opt = LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), PLAN, seed=seed, **options)
    return model, opt


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("election", ["random", "clone_conflict"])
def test_growing_in_output_mode_keeps_the_function(election):
    """A stable election that promotes clones changes nothing the network computes (train-mode batch statistics
    and eval), unlike re-ranking, which abandons trained leaders."""
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(99))
    outs = {}
    for policy in ("stable", "rank"):
        model, opt = _net_and_opt(
            clone_mode="output", elect_every="epoch", election=election if policy == "stable" else "random",
            election_policy=policy, leader_scales="0.5,1.5",
        )  # fmt: skip
        _train(model, opt, 12)
        before = [model.train()(x).detach(), model.eval()(x).detach()]
        counts = {n: r.counts()["leaders"] for n, r in opt.roles.items()}
        assert opt.epoch_begin(1)
        assert all(opt.roles[n].counts()["leaders"] > counts[n] for n in counts)
        after = [model.eval()(x).detach(), model.train()(x).detach()][::-1]
        outs[policy] = max(float((a - b).abs().max()) for a, b in zip(before, after))
    assert outs["stable"] < 1e-5 and outs["rank"] > 1e-2


def test_probe_gives_every_units_own_gradient_without_changing_training():
    """The probed forward keeps the gradient at clone positions: from it, the weight gradient each clone would
    get if it computed its own output (export_plain: clone rows filled with the source's), while the
    parameter gradients the optimizer steps with stay those of the unprobed forward."""
    # drawn roles: with packed ones every clone of fc1 copies unit 0, whose ReLU happens to be dead on this batch
    model, opt = _net_and_opt(clone_mode="output", first_roles="drawn")
    _train(model, opt, 3)
    opt.output_cloning.fill_clones()
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 4, (16,))
    plain = export_plain(opt.output_cloning)
    F.cross_entropy(plain(x), y).backward()
    grads = {}
    for probed in (False, True):
        opt.zero_grad()
        if probed:
            opt.output_cloning.probe()
        F.cross_entropy(model(x), y).backward()
        grads[probed] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, p in grads[True].items():
        torch.testing.assert_close(p, grads[False][name], rtol=1e-4, atol=1e-6)
    probed = dict(plain.named_modules())
    for name, layer in opt.layers.items():
        want = probed[name].weight.grad
        got = take_probe(layer.module)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        clones = opt.roles[name].clones
        assert float(got[clones].abs().sum()) > 0 and float(layer.weight.grad[clones].abs().sum()) == 0
        assert take_probe(layer.module) is None  # taken once


def test_clone_conflict_score_signs():
    # 5 units: leaders 0, 1; clones 2 (of 0, its gradient opposes its group), 3 (of 0, aligned), 4 (of 1)
    roles = _roles(5, [0, 1], [], [2, 3, 4], [0, 0, 1])
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.5, 0.2], [1.0, 0.0], [0.0, 2.0]])
    s = CloneConflictScore().observe_grads(g, roles)
    total0 = g[0] + g[2] + g[3]
    assert s[2] == pytest.approx(-float(g[2] @ (total0 - g[2]))) and s[2] > 0 > s[3]
    assert s[4] == pytest.approx(-float(g[4] @ g[1]))
    total1 = g[1] + g[4]
    assert s[0] == s[1] == pytest.approx(-float(total0 @ total1))
    with pytest.raises(ConfigError, match="positive int"):
        CloneConflictScore(probe_every=0)


def test_clone_conflict_observes_probed_steps_and_promotes_by_score():
    """In output mode the score is fed only on probe steps (every ``probe_every``), clones get non-zero scores
    (a weight-gradient score gives them none), and a growing election promotes the best-scored clones."""
    model, opt = _net_and_opt(
        clone_mode="output", elect_every="epoch", election="clone_conflict", election_policy="stable",
        leader_scales="1,1.5",
    )  # fmt: skip
    _train(model, opt, 21)
    lb = opt.book.layers["layer2.conv1"]
    assert lb.score_count == 2  # steps 10 and 20
    roles = opt.roles["layer2.conv1"]
    scores = lb.score_sum / lb.score_count
    assert float(scores[roles.clones].abs().min()) > 0
    n_new = opt._counts(1)["layer2.conv1"].leaders - roles.leaders.numel()
    want = roles.clones[torch.argsort(scores[roles.clones], descending=True)[:n_new]]
    opt.epoch_begin(1)
    new = opt.roles["layer2.conv1"]
    assert set(want.tolist()) <= set(new.leaders.tolist()) and n_new > 0


def test_growing_plan_resumes_exactly():
    def make(seed=0):
        return _net_and_opt(
            seed, clone_mode="output", elect_every=4, election="clone_conflict", election_policy="stable",
            leader_scales="ramp:0.5:1.5:3",
        )  # fmt: skip

    model_a, opt_a = make()
    _train(model_a, opt_a, 12)
    model_b, opt_b = make()
    _train(model_b, opt_b, 6)
    buf = io.BytesIO()
    torch.save({"m": model_b.state_dict(), "o": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_c, opt_c = make(seed=5)
    model_c.load_state_dict(saved["m"])
    opt_c.load_state_dict(saved["o"])
    assert opt_c.layer_plans == opt_b.layer_plans != opt_c._counts(0)
    _train(model_c, opt_c, 6, start=6)
    assert all(opt_a.roles[n].same_as(opt_c.roles[n]) for n in opt_a.roles)
    assert all(torch.equal(a, c) for a, c in zip(model_a.state_dict().values(), model_c.state_dict().values()))
