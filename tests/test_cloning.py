import warnings

import pytest
import torch
from conftest import TinySeedNet, mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from egg_optim import ConfigError, LeaderCloneOptimizer, RolePlan


def _trained(model, opt, steps=2):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model(torch.randn(4, 1, 6, 6, generator=gen)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()


@settings(max_examples=10, deadline=None)
@given(assign=st.sampled_from(["first", "random", "round_robin", "nearest"]), seed=st.integers(0, 100))
def test_clone_copies_every_coupled_entry(assign, seed):
    torch.manual_seed(seed)
    model = TinySeedNet()
    opt = LeaderCloneOptimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=0.05),
        RolePlan.preset("aggressive", table="mnist"),
        assign=assign,
        seed=seed,
    )
    _trained(model, opt)
    model.train()
    written = opt.clone_now()
    assert written == sum(r.num_clones for r in opt.roles.values())
    for name, layer in opt.layers.items():
        roles = opt.roles[name]
        tensors = layer.params + layer.buffers
        assert {n.rsplit(".", 1)[1] for n, _ in tensors} >= {"weight", "bias", "running_mean", "running_var"}
        for tname, t in tensors:
            assert torch.equal(t[roles.clones], t[roles.sources]), tname
    # after cloning, a clone's output equals its leader's output
    x = torch.randn(2, 1, 6, 6)
    model.eval()
    out = {}
    hook = model.layer1.bn2.register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    model(x)
    hook.remove()
    r = opt.roles["layer1.conv2"]
    assert torch.allclose(out["y"][:, r.clones], out["y"][:, r.sources])


def test_blend_and_noise():
    torch.manual_seed(0)
    model = mlp((5, 10, 3))
    w0 = model[0].weight.detach().clone()
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.3), clone_blend=0.25)
    r = opt.roles["0"]
    opt.clone_now()
    assert torch.allclose(model[0].weight[r.clones], 0.75 * w0[r.clones] + 0.25 * w0[r.sources])

    def noisy(seed):
        torch.manual_seed(0)
        m = mlp((5, 10, 3))
        o = LeaderCloneOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), RolePlan(0.3), clone_noise=0.1, seed=seed)
        o.clone_now()
        return m, o

    m1, o1 = noisy(0)
    m2, _ = noisy(0)
    r = o1.roles["0"]
    w = m1[0].weight.detach()
    diff = w[r.clones] - w[r.sources]
    assert diff.abs().max() > 0 and torch.equal(m1[0].weight, m2[0].weight)  # noisy, and seeded
    rms = w[r.sources].pow(2).mean(1).sqrt()
    assert float((diff.pow(2).mean(1).sqrt() / rms).mean()) == pytest.approx(0.1, rel=0.6)


@pytest.mark.parametrize("policy", ["keep", "reset", "copy"])
def test_optimizer_state_policies(policy):
    torch.manual_seed(0)
    model = mlp((5, 10, 3))
    base = torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.3)
    opt = LeaderCloneOptimizer(model, base, RolePlan(0.3), clone_state=policy, state_storage="full")
    for _ in range(2):
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    r = opt.roles["0"]
    state = opt.state[model[0].weight]["sum"]
    before = state.clone()
    opt.clone_now()
    if policy == "keep":
        assert torch.equal(state, before)
    elif policy == "reset":
        assert torch.all(state[r.clones] == 0.3)  # Adagrad's fresh value, not zero
    else:
        assert torch.equal(state[r.clones], before[r.sources])
    keep = torch.ones(10, dtype=torch.bool)
    keep[r.clones] = False
    assert torch.equal(state[keep], before[keep])


def test_periodic_cloning_schedule():
    torch.manual_seed(0)
    model = mlp((5, 10, 3))
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.3), clone_every=3)
    r = opt.roles["0"]
    for step in range(1, 7):
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        same = torch.equal(model[0].weight[r.clones], model[0].weight[r.sources])
        assert same == (step % 3 == 0)
    assert opt.clone_events == 2 and opt.stats()["total"]["cloned_units"] == 2 * r.num_clones


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clone_blend": 1.5},
        {"clone_noise": -1},
        {"clone_state": "zero"},
        {"clone_every": 0},
        {"elect_every": 1.5},
        {"assign": "best"},
        {"election": "loss"},
        {"hysteresis": -0.1},
    ],
)
def test_bad_options(kwargs):
    model = mlp()
    with pytest.raises(ConfigError):
        LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5), **kwargs)


@pytest.mark.parametrize("bad_unit", [1, 2])
def test_a_clone_event_on_packed_roles_checks_the_rows_it_copies(bad_unit):
    """Packed roles: the clones (3, 4) copy sources cycling over the run 0..2 from 2 (sources 2, 0), so unit 1 is
    in the run but copied by no clone. A clone event checks the run at once; a non-finite run is looked at unit
    by unit: a NaN in unit 1 stops nothing (no warning), a NaN in unit 2 keeps clone 3's rows (with a warning)
    and clone 4 still copies unit 0."""
    import warnings

    from egg_optim.core.cloning import clone_layers, copy_plan
    from egg_optim.core.roles import Roles
    from egg_optim.core.units import ManagedLayer

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 5)
    layer = ManagedLayer("lin", lin, params=[("lin.weight", lin.weight), ("lin.bias", lin.bias)])
    roles = Roles(5, torch.tensor([0, 1, 2]), torch.tensor([], dtype=torch.long), torch.tensor([3, 4]),
                  torch.tensor([2, 0]))  # fmt: skip
    assert roles.clone_span == (3, 2) and roles.source_cycle == (0, 3, 2)
    assert copy_plan(layer, roles) is not None and copy_plan(layer, roles) is copy_plan(layer, roles)  # kept
    with torch.no_grad():
        lin.weight[bad_unit, 1] = float("nan")
    before = lin.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (written,) = clone_layers([(layer, roles)])
    w = lin.weight.detach()
    said = [str(c.message) for c in caught if "keep their rows" in str(c.message)]
    if bad_unit == 1:
        assert written == 2 and not said
        assert torch.equal(w[3], w[2]) and torch.equal(w[4], w[0])
    else:
        assert written == 1 and len(said) == 1 and "1 of 2 clone(s)" in said[0]
        assert torch.equal(w[3], before[3]) and torch.equal(w[4], w[0])
    assert torch.equal(w[:3].nan_to_num(), before[:3].nan_to_num())  # sources untouched


@pytest.mark.parametrize("on_device", [False, True])
def test_a_kept_copy_plan_follows_a_tensor_whose_storage_changed(on_device):
    """The copy plan keeps the views a clone event reads and writes (weight mode clones at every step); a tensor
    given new storage in place (``p.data = ...``, as ``model.to(...)`` does) gets new views, so the event
    writes into what the layer computes with, not into the storage it was cut from."""
    from egg_optim.core.cloning import clone_layers, clone_layers_on_device, copy_plan
    from egg_optim.core.roles import Roles
    from egg_optim.core.units import ManagedLayer

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 5)
    layer = ManagedLayer("lin", lin, params=[("lin.weight", lin.weight), ("lin.bias", lin.bias)])
    roles = Roles(5, torch.tensor([0, 1]), torch.tensor([], dtype=torch.long), torch.tensor([2, 3, 4]),
                  torch.tensor([0, 1, 0]))  # fmt: skip
    event = clone_layers_on_device if on_device else clone_layers
    event([(layer, roles)])
    first = copy_plan(layer, roles)
    with torch.no_grad():
        lin.weight.data = lin.weight.data.clone()  # new storage, same Parameter object
        lin.weight[0].add_(1.0)
        lin.weight[1].sub_(1.0)
    event([(layer, roles)])
    assert copy_plan(layer, roles) is not first
    w = lin.weight.detach()
    assert torch.equal(w[2], w[0]) and torch.equal(w[3], w[1]) and torch.equal(w[4], w[0])


def _roles(n, leaders, packed, gen):
    """Roles of ``n`` units with ``leaders`` leaders and the rest clones: packed (leaders first, clones
    cycling over them) or drawn at random."""
    from egg_optim.core.roles import Roles

    order = torch.arange(n) if packed else torch.randperm(n, generator=gen)
    lead, clones = order[:leaders].sort().values, order[leaders:].sort().values
    sources = (
        lead[torch.arange(clones.numel()) % leaders]
        if packed
        else lead[torch.randint(leaders, (clones.numel(),), generator=gen)]
    )
    return Roles(n, lead, torch.tensor([], dtype=torch.long), clones, sources)


@settings(max_examples=25, deadline=None)
@given(
    packed=st.booleans(),
    blend=st.sampled_from([1.0, 0.5]),
    bad=st.sampled_from([None, "leader", "unused"]),
    seed=st.integers(0, 1000),
)
def test_the_device_checked_clone_event_matches_the_host_one_and_reads_nothing(packed, blend, bad, seed):
    """Issue 19 (no host read at a step): ``clone_layers_on_device`` writes what ``clone_layers`` writes,
    bit for bit, when every source is finite; a NaN in a source a clone copies keeps that layer's clones whole
    (the other layer is cloned as usual); a NaN in a row no clone reads (packed: a leader past the cycle, or an
    independent) changes nothing. It never reads a value on the host."""
    from egg_optim.core.cloning import clone_layers, clone_layers_on_device
    from egg_optim.core.units import ManagedLayer
    from egg_optim.utils import DispatchCounter

    gen = torch.Generator().manual_seed(seed)
    lins = [torch.nn.Linear(3, 7), torch.nn.Linear(3, 9)]
    layers = [
        ManagedLayer(f"l{i}", m, params=[(f"l{i}.weight", m.weight), (f"l{i}.bias", m.bias)])
        for i, m in enumerate(lins)
    ]
    roles = [_roles(7, 3, packed, gen), _roles(9, 2, packed, gen)]
    if bad is not None:
        r = roles[0]
        used = r.sources.unique()
        target = int(used[0]) if bad == "leader" else None
        if bad == "unused":
            spare = r.leaders[~torch.isin(r.leaders, used)]
            target = int(spare[0]) if spare.numel() else None
        if target is not None:
            with torch.no_grad():
                lins[0].weight[target, 1] = float("nan")
    else:
        target = None
    twins = [[p.detach().clone() for p in m.parameters()] for m in lins]
    items = list(zip(layers, roles))
    for r in roles:  # found once per role change (reads of the host-side role indices), not per event
        _ = r.clone_span, r.source_cycle
    with DispatchCounter(params=[p for m in lins for p in m.parameters()]) as count:
        which, kept = clone_layers_on_device(items, blend=blend)
    assert count.ops["_local_scalar_dense"] == 0
    assert which == [0, 1]
    layer0_kept = bad == "leader"
    assert kept.tolist() == [layer0_kept, False]
    # the host-checked event on twins of the starting tensors, for comparison
    twin_lins = [torch.nn.Linear(3, 7), torch.nn.Linear(3, 9)]
    with torch.no_grad():
        for m, saved in zip(twin_lins, twins):
            for p, v in zip(m.parameters(), saved):
                p.copy_(v)
    twin_layers = [
        ManagedLayer(f"l{i}", m, params=[(f"l{i}.weight", m.weight), (f"l{i}.bias", m.bias)])
        for i, m in enumerate(twin_lins)
    ]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clone_layers(list(zip(twin_layers, roles)), blend=blend)
    for i, (m, t) in enumerate(zip(lins, twin_lins)):
        for p, q, saved in zip(m.parameters(), t.parameters(), twins[i]):
            if i == 0 and layer0_kept:
                assert torch.equal(p.detach().nan_to_num(), saved.nan_to_num())  # nothing written in that layer
            else:
                assert torch.equal(p.detach().nan_to_num(), q.detach().nan_to_num())
    if target is not None and not layer0_kept:  # not vacuous: a NaN no clone reads, and the clones were written
        assert torch.equal(lins[0].weight[roles[0].clones], lins[0].weight[roles[0].sources]) or blend != 1.0


@pytest.mark.parametrize("on_device", [True, False])
def test_a_float64_model_clones_values_beyond_float32s_range(on_device):
    """The finiteness check reads float64 rows in float64: a leader row of 1e300 (finite) is copied, not taken for
    an inf and kept back (nor refused as a narrowing, which torch raises for a float32 max-abs of float64)."""
    torch.manual_seed(0)
    model = mlp((5, 10, 3)).double()
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), RolePlan(0.3), clone_mode="weight")
    roles = opt.roles["0"]
    with torch.no_grad():
        model[0].weight[roles.sources] = 1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "keep their rows" warning
        if on_device:
            opt.controller._clone(on_device=True)
            assert opt.controller.settle_clone_checks() == 0
        else:
            assert opt.clone_now() == roles.num_clones
    assert torch.equal(model[0].weight[roles.clones], model[0].weight[roles.sources])
