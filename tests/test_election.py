import pytest
import torch
import torch.nn.functional as F
from conftest import mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from egg_optim import (
    ConfigError,
    LeaderCloneOptimizer,
    RolePlan,
    Roles,
    Score,
    bully_ranking,
    elect,
    register_score,
)
from egg_optim.core.roles import by_parts, join, shares
from egg_optim.core.scores import RandomScore


@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40))
def test_bully_rule_ties_go_to_higher_index(values):
    scores = torch.tensor(values, dtype=torch.float32)
    expected = sorted(range(len(values)), key=lambda i: (values[i], i), reverse=True)
    assert bully_ranking(scores).tolist() == expected


@given(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=40),
    st.data(),
)
def test_elect_partitions_and_picks_top(values, data):
    n = len(values)
    k_lead = data.draw(st.integers(1, n))
    k_ind = data.draw(st.integers(0, n - k_lead))
    assign = data.draw(st.sampled_from(["first", "random", "round_robin", "nearest"]))
    scores = torch.tensor(values)
    weight = torch.randn(n, 5)
    roles = elect(scores, k_lead, k_ind, assign=assign, weight=weight, generator=torch.Generator().manual_seed(0))
    ranking = bully_ranking(scores)
    assert set(roles.leaders.tolist()) == set(ranking[:k_lead].tolist())
    assert set(roles.independents.tolist()) == set(ranking[k_lead : k_lead + k_ind].tolist())
    assert roles.num_clones == n - k_lead - k_ind
    assert bool(torch.isin(roles.sources, roles.leaders).all())


@given(st.integers(1, 6), st.integers(1, 12), st.data())
def test_roles_by_parts_split_and_join_back(parts, n, data):
    """by_parts gives every run of units its share of each count, clones copying their own run's leaders;
    split undoes join; roles that clone across runs do not split."""
    total = parts * n
    lead = data.draw(st.integers(parts, total))  # at least one leader in each run
    ind = data.draw(st.integers(0, total - lead))
    scores = torch.tensor(data.draw(st.lists(st.floats(-5, 5), min_size=total, max_size=total)))
    gen = torch.Generator().manual_seed(0)
    roles = by_parts(parts, total, lead, ind, lambda u, k, i, _: elect(scores[u], k, i, assign="random", generator=gen))
    split = roles.split(parts)
    assert split is not None and torch.equal(join(split).source_map, roles.source_map)
    assert torch.equal(join(split).codes, roles.codes)
    assert [r.counts()["leaders"] for r in split] == shares(lead, parts)
    assert [r.num_units - r.num_clones for r in split] == shares(lead + ind, parts)
    if parts > 1 and roles.has_clones:
        codes, smap = roles.codes.clone(), roles.source_map.clone()
        c = int(roles.clones[-1])
        other = int(roles.leaders[0]) if c >= n else int(roles.leaders[-1])  # a leader of another run
        if other // n != c // n:
            smap[c] = other
            assert Roles.from_codes(codes, smap).split(parts) is None


@given(st.lists(st.integers(0, 9), min_size=1, max_size=8), st.data())
def test_shares_with_room_are_as_even_as_the_room_allows(room, data):
    total = data.draw(st.integers(0, sum(room)))
    out = shares(total, len(room), room)
    assert sum(out) == total and all(0 <= o <= r for o, r in zip(out, room))
    left = [r - o for r, o in zip(room, out)]
    for g, o in enumerate(out):  # no part took one that a part with more room left could have taken
        assert o == 0 or all(left[h] <= left[g] + 1 for h in range(len(room)))


def test_assign_strategies():
    scores = torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0, 2.0])  # ranking 0, 2, 4, 5, 1, 3
    first = elect(scores, 2, 0, assign="first")
    assert first.leaders.tolist() == [0, 2] and first.sources.tolist() == [0, 0, 0, 0]
    rr = elect(scores, 2, 0, assign="round_robin")
    assert rr.clones.tolist() == [1, 3, 4, 5] and rr.sources.tolist() == [0, 2, 0, 2]
    weight = torch.randn(6, 4)
    near = elect(scores, 2, 0, assign="nearest", weight=weight)
    sim = F.normalize(weight[near.clones], dim=1) @ F.normalize(weight[[0, 2]], dim=1).T
    assert near.sources.tolist() == torch.tensor([0, 2])[sim.argmax(1)].tolist()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(
        elect(scores, 2, 0, assign="random", generator=g1).sources,
        elect(scores, 2, 0, assign="random", generator=g2).sources,
    )


def test_hysteresis_keeps_seat_unless_beaten_by_margin():
    current = Roles(3, [0], [], [1, 2], [0, 0])
    close = torch.tensor([1.0, 1.05, 0.0])
    assert elect(close, 1, 0, current=current, hysteresis=0.1).leaders.tolist() == [0]
    assert elect(close, 1, 0, current=current, hysteresis=0.0).leaders.tolist() == [1]
    clear = torch.tensor([1.0, 1.2, 0.0])
    assert elect(clear, 1, 0, current=current, hysteresis=0.1).leaders.tolist() == [1]


def _train(opt, model, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, model[0].in_features, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("score", ["grad_norm", "taylor"])
def test_gradient_scores_are_running_means(score):
    torch.manual_seed(0)
    model = mlp((5, 12, 3))
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), RolePlan(0.25, 0.25), election=score)
    g = torch.Generator().manual_seed(1)
    total = torch.zeros(12)
    for _ in range(3):
        model(torch.randn(8, 5, generator=g)).square().mean().backward()
        w, gr = model[0].weight, model[0].weight.grad
        total += gr.norm(dim=1) if score == "grad_norm" else (w * gr).abs().sum(dim=1)
        opt.step()  # lr 0: nothing moves, scores are pure statistics
        opt.zero_grad()
    opt.elect_now()
    expected = elect(total / 3, 3, 3).leaders
    assert opt.roles["0"].leaders.tolist() == expected.tolist()
    assert opt.elections == 1 and opt.book.layers["0"].score_count == 0  # accumulators reset


def test_weight_norm_and_custom_scores():
    torch.manual_seed(0)
    model = mlp((5, 10, 3))
    opt = LeaderCloneOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.3), election="weight_norm"
    )
    top = bully_ranking(model[0].weight.norm(dim=1))[:3]
    assert sorted(opt.roles["0"].leaders.tolist()) == sorted(top.tolist())
    custom = LeaderCloneOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        RolePlan(0.3),
        election=lambda layer: torch.arange(layer.num_units, dtype=torch.float),
    )
    assert custom.roles["0"].leaders.tolist() == [7, 8, 9]


def test_observed_local_loss_score_and_registry():
    model = mlp((5, 10, 3))
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.2), election="local_loss")
    opt.observe_scores({"0": torch.tensor([0, 9, 0, 0, 0, 0, 0, 0, 8, 0.0])})
    opt.observe_scores({"0": torch.tensor([0, 7, 0, 0, 0, 0, 0, 0, 8, 0.0])})
    opt.elect_now()
    assert opt.roles["0"].leaders.tolist() == [1, 8]
    with pytest.raises(ConfigError, match="units"):
        opt.observe_scores({"0": torch.zeros(3)})
    with pytest.raises(ConfigError, match="managed"):
        opt.observe_scores({"nope": torch.zeros(3)})

    class NegIndex(Score):
        name = "neg_index"

        def __call__(self, layer, generator):
            return -torch.arange(layer.num_units).float()

    register_score(NegIndex(), overwrite=True)
    opt2 = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.2), election="neg_index")
    assert opt2.roles["0"].leaders.tolist() == [0, 1]
    dup = Score()
    dup.name = "grad_norm"
    with pytest.raises(ConfigError, match="already registered"):
        register_score(dup)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from(["random", "grad_norm", "taylor", "weight_norm"]))
def test_same_seed_same_roles_and_weights(seed, election):
    runs = []
    for _ in range(2):
        torch.manual_seed(seed)
        model = mlp((5, 16, 16, 3))
        opt = LeaderCloneOptimizer(
            model,
            torch.optim.Adam(model.parameters(), lr=1e-2),
            RolePlan(0.25, 0.25),
            clone_every=2,
            elect_every=3,
            election=election,
            assign="random",
            seed=seed,
        )
        _train(opt, model, 7, seed)
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert all(o1.roles[n].same_as(o2.roles[n]) for n in o1.roles)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_different_seeds_give_different_random_roles():
    model = mlp((5, 32, 3))
    a = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.25), seed=1)
    b = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.25), seed=2)
    assert a.roles["0"].same_as(b.roles["0"])  # packed first roles: the seed draws nothing
    opts = dict(first_roles="drawn")
    a = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.25), seed=1, **opts)
    b = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.25), seed=2, **opts)
    assert not a.roles["0"].same_as(b.roles["0"])


def test_churn_and_tenure_stats():
    model = mlp((5, 10, 3))
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.3, 0.1), elect_every=4)
    old = set(opt.roles["0"].leaders.tolist())
    _train(opt, model, 4)
    new = set(opt.roles["0"].leaders.tolist())
    s = opt.stats()
    assert s["elections"] == 1 and s["layers"]["0"]["churn"] == len(new - old)
    assert opt.leadership_counts()["0"].sum() == 4 * 3  # 4 steps x 3 leaders
    stayed = old & new
    assert s["layers"]["0"]["mean_tenure"] == pytest.approx((4 * len(stayed) + 0 * len(new - old)) / 3)


def test_first_random_election_draws_new_roles():
    model = mlp((5, 64, 3))
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.25), seed=0)
    initial = opt.roles["0"]
    opt.elect_now()
    assert not opt.roles["0"].same_as(initial)


class _CloneGradNorm(Score):
    """A score defined outside the package that needs clone gradients: it implements the score protocol
    directly (no UnitGradScore), so only its declaration tells the controller to probe."""

    name = "test_clone_grad_norm"
    needs = frozenset({"clone_grads"})
    probe_every = 1

    def initial(self):
        return RandomScore()

    def observe_step(self, layer, data):
        return None if data.clone_grads is None else data.clone_grads.flatten(1).norm(dim=1)

    def unit_scores(self, layer, generator, average):
        return average if average is not None else torch.zeros(layer.num_units)


@pytest.mark.parametrize("mode", ["weight", "output"])
def test_a_custom_score_that_needs_clone_gradients_gets_them(mode):
    torch.manual_seed(0)
    model = mlp((5, 16, 16, 3))
    score = _CloneGradNorm()
    opt = LeaderCloneOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.25, 0.0), election=score, clone_mode=mode
    )
    assert opt.grad_skip is None  # needing clone gradients keeps weight-mode gradient skipping off
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(4, 5, generator=gen)).square().mean().backward()
        grad = model[0].weight.grad.clone()
        opt.step()
        opt.zero_grad()
    clones = opt.roles["0"].clones
    if mode == "output":
        assert torch.equal(grad[clones], torch.zeros_like(grad[clones]))  # clones get no weight gradient ...
    book = opt.book.layers["0"]
    probed = 3 if mode == "weight" else 2  # output mode probes from the step after the first on
    assert book.score_count == probed and bool((book.score_sum[clones] > 0).all())  # ... the score saw theirs
    opt.elect_now()
    assert opt.elections == 1
