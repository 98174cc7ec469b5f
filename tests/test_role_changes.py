"""Role changes where they used to break or spread damage (issue 21, cases 3, 7, 8, 10 and 11): elections and
clone events inside ``torch.inference_mode()``, layers frozen after the optimizer was built, leaders with
non-finite rows, scores fed to an election that does not read them, scores of the wrong type, and a model moved
to the meta device. Each either works as documented or is refused with a typed error and nothing changed."""

from __future__ import annotations

import warnings

import pytest
import torch
from _digests import state_digest
from conftest import TinySeedNet, mlp

from egg_optim import ConfigError, ElectionError, LeaderCloneOptimizer, PlanError, RolePlan

PLAN = RolePlan(per_layer={"layer*.conv*": (0.4, 0.2)}, only_listed=True)


def _seed_net(seed=0, **kw):
    torch.manual_seed(seed)
    model = TinySeedNet()
    return model, LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), PLAN, **kw)


def _train(model, opt, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(4, 1, 6, 6, generator=g)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------------------------------- 3. inference mode
@pytest.mark.parametrize("storage", ["compact", "full"])
@pytest.mark.parametrize("mode", ["weight", "output"])
def test_role_changes_inside_inference_mode_work_as_outside(mode, storage):
    """elect_now()/clone_now() in an evaluation block under inference_mode(): the next training steps work and
    the run is bit-identical to one that changed roles outside inference mode."""
    kw = dict(clone_mode=mode, state_storage=storage, election="weight_norm", assign="nearest")
    runs = []
    for inference in (True, False):
        model, opt = _seed_net(**kw)
        _train(model, opt, 2)
        x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(3))
        model.eval()
        with torch.inference_mode() if inference else torch.no_grad():
            model(x)
            opt.elect_now()
            opt.clone_now()
        model.train()
        _train(model, opt, 2, seed=1)  # failed with "Inplace update to inference tensor" before
        runs.append(state_digest(model, opt))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("mode", ["weight", "output"])
def test_first_forward_inside_inference_mode_then_training(mode):
    """An evaluation before the first training step decides the norm coupling (output mode re-lays out its state
    then): that happens outside inference mode, so training works and matches a no_grad evaluation."""
    runs = []
    for inference in (True, False):
        model, opt = _seed_net(clone_mode=mode)
        model.eval()
        with torch.inference_mode() if inference else torch.no_grad():
            model(torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(5)))
        model.train()
        _train(model, opt, 3)
        runs.append(state_digest(model, opt))
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------- 7. frozen layers
@pytest.mark.parametrize("mode", ["weight", "output"])
def test_layer_frozen_after_construction_keeps_rows_and_roles_with_one_warning(mode):
    torch.manual_seed(0)
    model = mlp((6, 20, 20, 3))
    opt = LeaderCloneOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5), clone_mode=mode, clone_every=1,
        elect_every=1, election="weight_norm",
    )  # fmt: skip
    x = torch.randn(8, 6)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    model[0].requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    roles0, roles2 = opt.roles["0"], opt.roles["2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # scheduled elections and clone events
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        opt.clone_now()
        opt.elect_now()
    assert all(torch.equal(p, frozen[n]) for n, p in model[0].named_parameters())
    assert opt.roles["0"] is roles0  # kept
    assert not opt.roles["2"].same_as(roles2) or opt.elections == 5  # the other layer is still elected
    said = {str(w.message) for w in caught if "frozen after the optimizer was built" in str(w.message)}
    assert len(said) == 1 and "0: '0.weight' has requires_grad=False" in said.pop()


def test_frozen_layer_whose_counts_the_plan_changes_is_refused_unchanged():
    torch.manual_seed(0)
    model = mlp((6, 20, 20, 3))
    opt = LeaderCloneOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.4, 0.1), elect_every=1,
        leader_scales="1,1.5",
    )  # fmt: skip
    model[0].requires_grad_(False)
    before = state_digest(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PlanError, match="layer '0' is frozen"):
            opt.elect_now()
    assert state_digest(model, opt) == before


# ---------------------------------------------------------------------------------------------- 8. non-finite
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_leader_rows_do_not_spread_to_clones(bad):
    """A non-finite gradient in one leader row: the step makes that leader non-finite (as a bare optimizer
    would). The step's clone event checks on the device, per layer, reading nothing on the host: that layer keeps
    all its clones' rows, the other layer is cloned as usual, and the next host read (``stats()``) warns and
    takes the kept clones off ``cloned_units``. An explicit ``clone_now()`` checks per clone unit: it copies the
    finite leaders and keeps the diverged one's clones, with a warning at once."""
    import warnings

    torch.manual_seed(0)
    model = mlp((6, 20, 20, 3))
    opt = LeaderCloneOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.25, 0.0), clone_every=1, assign="round_robin"
    )
    roles = opt.roles["0"]
    leader = int(roles.sources[0])
    its_clones = roles.clones[roles.sources == leader]
    others = roles.clones[roles.sources != leader]
    assert its_clones.numel() and others.numel()
    x = torch.randn(8, 6)
    model(x).sum().backward()
    model[0].weight.grad[leader, 0] = bad
    before = model[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is said at the step: it would need a host read
        opt.step()
    w = model[0].weight.detach()
    assert not bool(torch.isfinite(w[leader]).all())
    assert torch.equal(w[roles.clones], before[roles.clones])  # the whole layer's clones kept
    assert bool(torch.isfinite(model[2].weight).all())  # the other layer is cloned as usual
    clones2 = opt.roles["2"]
    assert torch.equal(model[2].weight[clones2.clones], model[2].weight[clones2.sources])
    with pytest.warns(RuntimeWarning, match=rf"'0' \(1 event\(s\), {roles.num_clones} clone unit\(s\)\)"):
        by_layer = {n: s["cloned_units"] for n, s in opt.stats()["layers"].items()}
    assert by_layer == {"0": 0, "2": clones2.num_clones}
    with pytest.warns(RuntimeWarning, match=rf"layer '0': {its_clones.numel()} of {roles.num_clones} clone\(s\)"):
        written = opt.clone_now()
    assert written == roles.num_clones - its_clones.numel() + clones2.num_clones
    w = model[0].weight.detach()
    assert torch.equal(w[its_clones], before[its_clones]) and bool(torch.isfinite(w[its_clones]).all())
    assert torch.equal(w[others], w[roles.sources[roles.sources != leader]])


def test_non_finite_source_is_skipped_in_a_transformer_block_unit_by_unit():
    """Block units own several rows in several tensors: a clone unit is kept whole or copied whole."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.25, 0.0))
    name = next(n for n, lay in opt.layers.items() if lay.group is not None and lay.num_units == 32)
    layer, roles = opt.layers[name], opt.roles[name]
    leader = int(roles.sources[0])  # a leader with clones
    up = dict(layer.params)[next(p for p, _ in layer.params if p.endswith("up_proj.weight"))]
    with torch.no_grad():
        up[leader, 0] = float("nan")
    before = {p: t.detach().clone() for p, t in layer.params}
    with pytest.warns(RuntimeWarning, match="keep their rows"):
        written = opt.clone_now()
    bad = roles.clones[roles.sources == leader]
    assert written == sum(lay_roles.num_clones for lay_roles in opt.roles.values()) - bad.numel()
    for pname, t in layer.params:
        if not layer.copied_by_clones(pname):
            continue
        pos = layer.roles_of(pname, roles)
        dim = layer.dim_of(pname)
        keep = torch.isin(pos.sources, layer.index[pname][leader]) if pname in layer.index else pos.sources == leader
        assert torch.equal(t.detach().index_select(dim, pos.clones[keep]),
                           before[pname].index_select(dim, pos.clones[keep])), pname  # fmt: skip
        assert bool(torch.isfinite(t.detach().index_select(dim, pos.clones)).all()), pname


# ---------------------------------------------------------------------------------------------- 10. observed scores
def test_observed_scores_refused_by_an_election_that_does_not_read_them():
    model = mlp()
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5), election="grad_norm")
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    before = state_digest(model, opt)
    with pytest.raises(ConfigError, match="election 'grad_norm' does not read observed scores"):
        opt.observe_scores({"0": torch.ones(20)})
    assert state_digest(model, opt) == before


def test_local_loss_callback_refused_with_an_election_that_does_not_read_it():
    pytest.importorskip("egg_optim.lfnn")
    from egg_optim.callbacks import CallbackRunner, LocalLossCallback
    from egg_optim.lfnn import LeaderFollowerLoss

    model = mlp((6, 12, 12, 3))
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5), election="taylor")
    lf = LeaderFollowerLoss(model, ["0", "2"], num_classes=3, delta=0.5)
    with pytest.raises(ConfigError, match="election 'taylor'"):
        CallbackRunner([LocalLossCallback(lf)], model=model, optimizer=opt).train_begin()


# ---------------------------------------------------------------------------------------------- 11. typed errors
@pytest.mark.parametrize(
    "returned, match",
    [
        (lambda layer: [0.0] * layer.num_units, r"returned a list for layer '0'; a score returns a tensor of 20"),
        (lambda layer: None, "returned a NoneType"),
        (lambda layer: torch.zeros(3), "returned 3 values for layer '0' with 20 units"),
    ],
)
def test_election_returning_no_tensor_is_an_election_error(returned, match):
    model = mlp()
    calls = []

    def score(layer):
        return returned(layer) if calls else torch.arange(layer.num_units, dtype=torch.float)

    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5), election=score)
    calls.append(1)
    before = state_digest(model, opt)
    with pytest.raises(ElectionError, match=match):
        opt.elect_now()
    assert state_digest(model, opt) == before


@pytest.mark.parametrize("bad", ["fc1", ["0"], None, 3])
def test_observe_scores_needs_a_mapping(bad):
    model = mlp()
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5), election="local_loss")
    before = state_digest(model, opt)
    with pytest.raises(ConfigError, match=r"expects a \{layer name: tensor of per-unit scores\} mapping, got"):
        opt.observe_scores(bad)
    assert state_digest(model, opt) == before


def test_model_moved_to_meta_is_named_as_such_not_as_fully_shard():
    model = mlp()
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5))
    roles = dict(opt.roles)
    model.to("meta")
    with pytest.raises(PlanError) as info:
        opt.elect_now()
    assert "meta device (model.to('meta')?)" in str(info.value) and "fully_shard" not in str(info.value)
    assert opt.elections == 0 and all(opt.roles[n] is r for n, r in roles.items())
