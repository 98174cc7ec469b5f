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


def test_output_mode_runs_experts_with_clones_as_their_sources_and_saves_that():
    model = tiny.make("mixtral")
    opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), RolePlan(0.4, 0.1),
                               clone_mode="output", assign="random")  # fmt: skip
    name, layer, experts = _experts(opt)
    model(**tiny.inputs("mixtral")).loss.backward()
    er = layer.roles_of(f"{name}.gate_up_proj", opt.roles[name])
    assert torch.all(axes.select(experts.gate_up_proj.grad, (0, 1), er.clones) == 0)  # clones get no gradient
    opt.step()
    assert opt.coverage().modes[name] == "expand" and name in opt.block_output.verified
    saved = model.state_dict()[f"{name}.gate_up_proj"]
    assert torch.equal(axes.select(saved, (0, 1), er.clones), axes.select(saved, (0, 1), er.sources))


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
