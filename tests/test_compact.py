"""Compact optimizer storage: clones hold no optimizer state and take no part in the base step."""

import copy

import pytest
import torch
from conftest import TinySeedNet, mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from egg_optim import ConfigError, LeaderCloneOptimizer, RolePlan, StateDictMismatchError

ADAM = (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.01})


def _train(opt, model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(5, 1, 6, 6, generator=gen)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()


def _make(storage, plan=None, opt_spec=ADAM, **kw):
    torch.manual_seed(0)
    model = TinySeedNet()
    cls, okw = opt_spec
    kw.setdefault("clone_every", None)
    opt = LeaderCloneOptimizer(
        model,
        cls(model.parameters(), **okw),
        plan or RolePlan.preset("mild", table="mnist"),
        state_storage=storage,
        **kw,
    )
    return model, opt


def _index(opt, p) -> int:
    """Position of ``p`` in the optimizer's state-dict numbering."""
    return next(i for i, q in enumerate(q for g in opt.param_groups for q in g["params"]) if q is p)


def _state_numel(opt) -> int:
    return sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())


@settings(max_examples=12, deadline=None)
@given(
    opt_spec=st.sampled_from(
        [
            (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
            (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "foreach": False}),
            (torch.optim.Rprop, {"lr": 1e-2}),
            (torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.2}),
            (torch.optim.Adadelta, {"lr": 1.0, "foreach": True}),
        ]
    ),
    seed=st.integers(0, 100),
)
def test_compact_and_full_train_identically(opt_spec, seed):
    """Storage is a performance choice: with the default clone_state="keep", across clone events and elections
    (where a clone's parked state rows come back), both storages give the same parameters and state.

    One documented difference is left out here: a unit that has never been active holds, in full storage, what
    the first step left in its rows with a zero gradient, which L2 weight decay (Adam's ``weight_decay``) and
    ASGD's averaging move; compact storage starts it from the fresh value."""
    runs = []
    for storage in ("compact", "full"):
        model, opt = _make(storage, opt_spec=opt_spec, clone_every=3, elect_every=2)
        _train(opt, model, 7, seed)
        runs.append((model, opt))
    (mc, oc), (mf, of) = runs
    for a, b in zip(mc.state_dict().values(), mf.state_dict().values()):
        assert torch.equal(a, b)
    # same active-row state, and the compact one is smaller by the clones' share
    full_c = oc.export_optimizer_state()["state"]
    full_f = of.optimizer.state_dict()["state"]
    for name, roles in oc.roles.items():
        for pname, p in oc.layers[name].params:
            i = _index(oc, p)
            for key, v in full_f[i].items():
                if torch.is_tensor(v) and v.dim():
                    assert torch.equal(full_c[i][key][roles.active], v[roles.active]), (pname, key)
    assert _state_numel(oc) < _state_numel(of)


def test_state_bytes_follow_the_active_fraction():
    model, opt = _make("compact")
    _train(opt, model, 1)
    for name, roles in opt.roles.items():
        for _, p in opt.layers[name].params:
            for key in ("exp_avg", "exp_avg_sq"):
                assert opt.state[p][key].shape[0] == roles.active.numel()
    assert opt.param_groups[0]["params"][0] is next(model.parameters())  # real parameters outside step()
    bare = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert opt.state_bytes() == bare  # nothing parked before an election
    opt.elect_now()  # clone_state="keep": demoted units park their rows
    assert opt.state_bytes() > sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
    )


def test_state_bytes_count_the_kept_step_buffers_of_column_blocks():
    """A Llama's o_proj / down_proj active units are a block of columns, stepped on a buffer kept between steps:
    memory the optimizer holds, so state_bytes() counts it (the active block's size, once per such weight)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters()), RolePlan.preset("mild"))
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    columns = [e for e in opt.masked._compact if not e.select(e.param).is_contiguous()]
    held = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    blocks = sum(e.select(e.param).numel() * e.param.element_size() for e in columns)
    assert len(columns) == 2 and blocks > 0  # o_proj and down_proj
    assert opt.state_bytes() == held + blocks


@pytest.mark.parametrize("policy", ["keep", "copy", "reset"])
def test_election_moves_state_with_the_units(policy):
    model, opt = _make("compact", election="random", clone_state=policy)
    _train(opt, model, 3)
    before = copy.deepcopy(opt.export_optimizer_state()["state"])
    old = dict(opt.roles)
    opt.elect_now()
    after = opt.export_optimizer_state()["state"]
    promoted_seen = False
    for name, new in opt.roles.items():
        o = old[name]
        stay = new.active[torch.isin(new.active, o.active)]
        promoted = new.active[~torch.isin(new.active, o.active)]
        promoted_seen |= promoted.numel() > 0
        for _, p in opt.layers[name].params:
            i = _index(opt, p)
            assert opt.state[p]["exp_avg"].shape[0] == new.active.numel()
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(after[i][key][stay], before[i][key][stay])
                # keep: a unit's own rows (none yet for units cloned from the start: fresh zeros, as in full
                # storage); copy: its former source's; reset: fresh
                want = {
                    "keep": before[i][key][promoted],
                    "copy": before[i][key][o.source_map[promoted]],
                    "reset": torch.zeros(1),
                }[policy]
                got = after[i][key][promoted]
                assert torch.equal(got, want.expand_as(got)), (name, key)
    assert promoted_seen


def test_checkpoints_load_across_storages():
    for src, dst in (("full", "compact"), ("compact", "full")):
        model_a, a = _make(src)
        _train(a, model_a, 3)
        model_b, b = _make(dst)
        b.load_state_dict(copy.deepcopy(a.state_dict()))  # as from a file: torch would share Adam's `step`
        model_b.load_state_dict(model_a.state_dict())
        ea, eb = a.export_optimizer_state()["state"], b.export_optimizer_state()["state"]
        for name, roles in a.roles.items():
            for _, p in a.layers[name].params:
                i = _index(a, p)
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(ea[i][key][roles.active], eb[i][key][roles.active])
        _train(a, model_a, 2, seed=1)
        _train(b, model_b, 2, seed=1)
        for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()):
            assert torch.equal(x, y), (src, dst)


def test_wrong_state_rows_refused_and_nothing_changes():
    model, opt = _make("compact")
    _train(opt, model, 2)
    sd = opt.state_dict()
    p = opt.layers["layer2.conv2"].weight
    i = _index(opt, p)
    sd["state"][i]["exp_avg"] = sd["state"][i]["exp_avg"][:-1].clone()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(StateDictMismatchError, match="layer2.conv2.weight"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["egg_optim"]["steps"] == before["egg_optim"]["steps"]
    for k, st_ in before["state"].items():
        for key, v in st_.items():
            assert torch.equal(after["state"][k][key], v)


def test_exception_in_base_step_puts_real_parameters_back():
    model, opt = _make("compact")
    _train(opt, model, 1)
    params = [list(g["params"]) for g in opt.param_groups]
    keys = set(map(id, opt.state))

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    opt.optimizer.step = boom
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert all(a is b for g, ps in zip(opt.param_groups, params) for a, b in zip(g["params"], ps))
    assert set(map(id, opt.state)) == keys


def test_unmanaged_and_clone_free_layers_keep_full_state():
    torch.manual_seed(0)
    model = mlp((6, 20, 20, 3))  # layers "0" and "2" managed, "4" (the classifier) not
    plan = RolePlan(0.5, per_layer={"2": (0.5, 0.5)})  # layer "2": no clones
    opt = LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters(), lr=0.1), plan)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["exp_avg"].shape[0] == opt.roles["0"].active.numel() < 20
    assert opt.state[model[2].weight]["exp_avg"].shape == model[2].weight.shape
    assert opt.state[model[4].weight]["exp_avg"].shape == model[4].weight.shape


def test_unknown_storage_refused():
    model = mlp()
    with pytest.raises(ConfigError, match="'sparse'"):
        LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5), state_storage="sparse")


def test_state_dict_with_active_rows_only_loads():
    """A state dict whose per-row state holds the active rows only (the compact layout) is accepted too."""
    model_a, a = _make("compact")
    _train(a, model_a, 3)
    sd = copy.deepcopy(a.state_dict())
    for name, roles in a.roles.items():
        for _, p in a.layers[name].params:
            st = sd["state"][_index(a, p)]
            for key in ("exp_avg", "exp_avg_sq"):
                st[key] = st[key][roles.active].clone()
    model_b, b = _make("full")
    b.load_state_dict(sd)
    ea, eb = a.export_optimizer_state()["state"], b.export_optimizer_state()["state"]
    for name, roles in a.roles.items():
        for _, p in a.layers[name].params:
            i = _index(a, p)
            for key in ("exp_avg", "exp_avg_sq"):
                assert eb[i][key].shape == p.shape
                assert torch.equal(ea[i][key][roles.active], eb[i][key][roles.active])
