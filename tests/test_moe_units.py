"""Hidden neurons of each MoE expert as units (transformers 5's fused 3-D expert weights; issue 20).

Unit ``e * I + j`` is neuron ``j`` of expert ``e``: rows ``j`` and ``I + j`` of ``gate_up_proj[e]`` and column ``j`` of
``down_proj[e]``, positions over the expert and neuron dimensions together (``egg_optim.core.axes``). The router
is not a unit and stays trained.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from egg_recipes import tiny_transformers as tiny  # noqa: E402

from egg_optim import LeaderCloneOptimizer, RolePlan  # noqa: E402
from egg_optim.core import axes  # noqa: E402

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


def _experts(opt):
    name = next(n for n, lay in opt.layers.items() if lay.group is not None and lay.group.kind == "experts")
    return name, opt.layers[name], opt.layers[name].module


@pytest.mark.parametrize("family", FAMILIES)
def test_a_unit_is_one_neuron_of_one_expert(family):
    model = tiny.make(family)
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.4, 0.1))
    _, layer, experts = _experts(opt)
    E, two_i, _ = experts.gate_up_proj.shape
    inner = two_i // 2
    assert layer.num_units == E * inner
    up, down = (layer.group.slices[k] for k in (0, 1))
    for unit in (0, inner - 1, inner, E * inner - 1):
        e, j = divmod(unit, inner)
        rows = axes.select(experts.gate_up_proj, up.dim, up.index[unit])
        assert torch.equal(rows, experts.gate_up_proj[e, [j, inner + j]])
        col = axes.select(experts.down_proj, down.dim, down.index[unit])
        assert torch.equal(col[0], experts.down_proj[e, :, j])
    assert up.role == "producer" and down.role == "consumer"
    for name in opt.layers:
        assert not name.endswith(".gate") and "router" not in name  # the router is no unit


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_compact_state_and_cloning_are_exact_per_expert_neuron(family):
    model = tiny.make(family)
    opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), RolePlan(0.4, 0.1),
                               clone_every=None, assign="random")  # fmt: skip
    name, layer, experts = _experts(opt)
    roles = opt.roles[name]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for seed in range(2):
        model(**tiny.inputs(family, seed=seed)).loss.backward()
        opt.step()
        opt.zero_grad()
    for pname, p in layer.params:
        er, dim = layer.roles_of(pname, roles), layer.dim_of(pname)
        assert torch.equal(axes.select(p, dim, er.clones), axes.select(before[pname], dim, er.clones)), pname
        assert not torch.equal(axes.select(p, dim, er.active), axes.select(before[pname], dim, er.active)), pname
        st = opt.state[p]["exp_avg"]  # compact: active positions only, [positions, rest]
        assert tuple(st.shape) == axes.slice_shape(p.shape, dim, er.active.numel())
    router = next(p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
    assert not torch.equal(router, before[next(n for n in before if n.endswith("mlp.gate.weight"))])
    # a weight clone takes its source's gate/up rows (wherever the source is) and keeps its own down column
    down_before = experts.down_proj.detach().clone()
    assert opt.clone_now() == sum(r.num_clones for r in opt.roles.values())
    up, down = layer.group.slices
    inner = experts.down_proj.shape[2]
    for c, s in zip(roles.clones.tolist(), roles.sources.tolist()):
        (ec, jc), (es, js) = divmod(c, inner), divmod(s, inner)
        assert torch.equal(experts.gate_up_proj[ec, [jc, inner + jc]], experts.gate_up_proj[es, [js, inner + js]])
    assert torch.equal(experts.down_proj, down_before)


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_oss"])
@pytest.mark.parametrize(
    ("plan", "first_roles", "assign"),
    [("mild", "packed", "round_robin"), ("aggressive", "packed", "first"), ("mild", "drawn", "random")],
)
def test_output_mode_shrinks_experts_to_their_active_neurons_exactly(family, plan, first_roles, assign):
    """Experts with as many active neurons each compute with ``[E, 2k, H]`` / ``[E, H, k]`` slices (clone columns of
    the down projection folded into their sources'): what the plain model with clones filled computes, to
    rounding; clones get no gradient; a saved model holds the sources' rows in the clones' place. Packed roles cut
    the slices by views (and fold along the sources' cycle), drawn ones gather them."""
    model = tiny.make(family)
    opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), plan, clone_mode="output",
                               first_roles=first_roles, assign=assign)  # fmt: skip
    name, layer, experts = _experts(opt)
    up, down = layer.group.slices[0], next(s for s in layer.group.slices if s.role == "consumer")
    keys = {s.key for s in layer.group.slices}  # GPT-OSS: a gate/up bias too
    assert set(experts._egg_views) == (keys if first_roles == "packed" else set())
    batch = tiny.inputs(family, seed=0)
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    assert opt.coverage().modes[name] == "shrink" and name in opt.block_output.verified
    E = experts.gate_up_proj.shape[0]
    inner, k = layer.num_units // E, (layer.num_units - opt.roles[name].num_clones) // E
    values = experts._egg_values()
    for s in (up, down):  # [E, 2I, H] -> [E, 2k, H] and [E, H, I] -> [E, H, k] (GPT-OSS: transposed)
        shape = list(model.get_parameter(s.param).shape)
        shape[s.dim[1]] = shape[s.dim[1]] // inner * k
        assert list(values[s.key].shape) == shape, s.param
    model.train(False)
    with torch.no_grad():
        got = model(**batch).logits
        want = opt.export_model().train(False)(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model.train(True)
    model(**batch).loss.backward()
    for s in (up, down):
        er = layer.roles_of(s.param, opt.roles[name])
        grad = axes.select(model.get_parameter(s.param).grad, s.dim, er.clones)
        assert torch.all(grad == 0), s.param  # clones get no gradient
        assert grad.numel() and axes.select(model.get_parameter(s.param).grad, s.dim, er.active).abs().sum() > 0
    er = layer.roles_of(up.param, opt.roles[name])
    saved = model.state_dict()[up.param]
    assert torch.equal(axes.select(saved, up.dim, er.clones), axes.select(saved, up.dim, er.sources))


def test_experts_whose_roles_are_uneven_compute_at_full_width_and_are_checked_again():
    """Roles that clone one expert's neuron from another's cannot shrink expert by expert: the experts switch to
    computing at full width (clones taking their sources' rows), checked again at the next forward pass."""
    from egg_optim.core.roles import Roles

    model = tiny.make("mixtral")
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mild", clone_mode="output")
    name, layer, _ = _experts(opt)
    batch = tiny.inputs("mixtral", seed=0)
    model(**batch).loss.backward()
    assert opt.coverage().modes[name] == "shrink" and name in opt.block_output.verified
    n, counts = layer.num_units, opt.roles[name].counts()
    lead, active = counts["leaders"], counts["leaders"] + counts["independents"]
    legacy = Roles(n, torch.arange(lead), torch.arange(lead, active), torch.arange(active, n),
                   torch.zeros(n - active, dtype=torch.long))  # fmt: skip
    opt.controller._set_roles({**opt.roles, name: legacy})
    assert opt.block_output.modes[name] == "expand" and opt.coverage().modes[name] == "unchecked"
    model(**batch).loss.backward()
    assert opt.coverage().modes[name] == "expand"


@pytest.mark.parametrize("mode", ["weight", "output"])
@pytest.mark.parametrize(
    "options",
    [
        {
            "elect_every": 1,
            "election": "weight_norm",
            "election_policy": "stable",
            "max_churn": 0.2,
            "assign": "nearest",
        },
        {"state_storage": "full", "elect_every": 2, "clone_state": "copy", "clone_noise": 0.1, "clone_blend": 0.5},
    ],
    ids=["stable-nearest", "full-copy-noise"],
)
def test_elections_and_resume_are_exact_with_expert_neurons(mode, options):
    """Elections read expert neurons' weights (stable policy, nearest sources), full storage masks them, and a run
    resumed from both state dicts takes the next step to the same weights."""
    import copy

    def build(seed):
        model = tiny.make("mixtral", seed=seed)
        base = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, LeaderCloneOptimizer(model, base, RolePlan(0.4, 0.1), clone_mode=mode, **options)

    model, opt = build(0)
    for seed in range(3):
        model(**tiny.inputs("mixtral", seed=seed)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.elections >= 1
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), model.state_dict()
    plain, resumed = build(1)
    plain.load_state_dict(saved_model)
    resumed.load_state_dict(saved_opt)
    for m, o in ((model, opt), (plain, resumed)):
        torch.manual_seed(5)
        m(**tiny.inputs("mixtral", seed=7)).loss.backward()
        o.step()
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _per_expert(roles, experts: int) -> list[dict[str, int]]:
    """Each expert's role counts, asserting that its clones copy its own neurons."""
    parts = roles.split(experts)
    assert parts is not None, f"a clone copies another expert's neuron: {roles.sources.tolist()}"
    return [r.counts() for r in parts]


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_oss"])
@pytest.mark.parametrize(("first_roles", "policy"), [("packed", "rank"), ("drawn", "stable")])
def test_every_expert_takes_the_same_share_of_every_role(family, first_roles, policy):
    """With the default plan no expert becomes copies of another expert's neuron (packed first roles used to make
    the last experts all clones of expert 0's first neuron): not at the first draw, an election (either policy)
    or a graduation."""
    model = tiny.make(family)
    opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "mild", clone_mode="output",
                               first_roles=first_roles, election="weight_norm", election_policy=policy,
                               max_churn=0.5, assign="round_robin")  # fmt: skip
    name, layer, experts = _experts(opt)
    E = experts.gate_up_proj.shape[0]
    for step in ("first", "elect", "graduate", "elect again"):
        if step.startswith("elect"):
            opt.controller.elect_now()
        elif step == "graduate":
            opt.controller.graduate_now(0.75)
        roles = opt.roles[name]
        counts = _per_expert(roles, E)
        assert all(c == counts[0] for c in counts), (step, counts)
        assert counts[0]["clones"] > 0 and counts[0]["leaders"] > 0, (step, counts)
        total = roles.counts()  # and 16 bytes of float32 neurons per expert (the grouped matmul's strides)
        assert total["leaders"] % (4 * E) == 0 and total["independents"] % (4 * E) == 0, (step, total)
        model(**tiny.inputs(family, seed=0)).loss.backward()
        opt.step()
        opt.zero_grad()


def test_roles_cloned_across_experts_are_elected_over_the_whole_layer_with_a_warning():
    """Roles that clone one expert's neuron from another's (saved before experts took equal shares) cannot be kept
    expert by expert: a stable election keeps them over the whole layer and says so."""
    from egg_optim.core.roles import Roles

    model = tiny.make("mixtral")
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mild",
                               election_policy="stable")  # fmt: skip
    name, layer, _ = _experts(opt)
    n, counts = layer.num_units, opt.roles[name].counts()
    lead, active = counts["leaders"], counts["leaders"] + counts["independents"]
    legacy = Roles(n, torch.arange(lead), torch.arange(lead, active), torch.arange(active, n),
                   torch.zeros(n - active, dtype=torch.long))  # fmt: skip
    opt.controller._set_roles({**opt.roles, name: legacy})
    with pytest.warns(UserWarning, match=f"{name}.*whole layer"):
        opt.controller.elect_now()
    assert torch.equal(opt.roles[name].leaders, legacy.leaders)  # a stable election with nothing to change


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "gpt2", "phi3"])
@pytest.mark.parametrize("assign", ["first", "round_robin"])
def test_weight_mode_clone_events_copy_segments_and_experts_by_views(family, assign):
    """Weight mode's clone event (every step) on packed roles: a fused gate/up or qkv weight is copied segment by
    segment, fused experts along their neuron dimension in every expert at once, by views (no index op on a
    parameter-sized tensor in the step); every clone's rows are then its source's, bit for bit."""
    from egg_optim.utils import DispatchCounter

    model = tiny.make(family)
    opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "mild", clone_mode="weight",
                               assign=assign)  # fmt: skip
    batch = tiny.inputs(family, seed=0)
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    model(**batch).loss.backward()
    with DispatchCounter(model, opt) as counted:
        opt.step()
    if family != "gpt_oss":  # (whose experts' kernel indexes its biases per expert, as in the bare step)
        assert counted.param_index_total == 0, dict(counted.param_index_ops)
    for name, layer in opt.layers.items():
        roles = opt.roles[name]
        assert not roles.has_clones or layer._copy_plan[1] is not None, name  # copied by views
        for pname, p in layer.params:
            if not roles.has_clones or not layer.copied_by_clones(pname):
                continue
            er, dim = layer.roles_of(pname, roles), layer.dim_of(pname)
            assert torch.equal(axes.select(p, dim, er.clones), axes.select(p, dim, er.sources)), pname
