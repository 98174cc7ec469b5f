"""Units that span modules (transformer MLP neurons, attention heads): detection, element roles, output mode."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from egg_optim.core.blocks import find_unit_groups
from egg_optim.core.election import elect
from egg_optim.core.roles import Roles
from egg_optim.errors import ConfigError, PlanError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def tiny(kind: str):
    """Tiny random-init models of each family, with inputs."""
    torch.manual_seed(0)
    ids = {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))}
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=50,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(cfg), ids
    if kind == "qwen":
        cfg = transformers.Qwen2Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
            vocab_size=50,
        )  # fmt: skip
        return transformers.Qwen2ForCausalLM(cfg), ids
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg), ids
    if kind == "bert":
        cfg = transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                      vocab_size=50)  # fmt: skip
        return transformers.BertForSequenceClassification(cfg), ids
    if kind == "vit":
        cfg = transformers.ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=8, patch_size=4)  # fmt: skip
        return transformers.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 8, 8)}
    raise ValueError(kind)


EXPECTED = {  # group kind -> units per block
    "llama": {"attention": 2, "mlp": 48},  # GQA: a unit is one key/value head with its 2 query heads
    "qwen": {"attention": 1, "mlp": 48},
    "gpt2": {"attention": 4, "mlp": 128},
    "bert": {"attention": 4, "mlp": 48},
    "vit": {"attention": 4, "mlp": 48},
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_every_block_is_found_and_its_slices_partition_the_tensors(kind):
    model, _ = tiny(kind)
    groups = find_unit_groups(model)
    layers = 2 if kind == "llama" else 1
    assert sorted(g.kind for g in groups.values()) == sorted(["attention", "mlp"] * layers)
    params = dict(model.named_parameters())
    for g in groups.values():
        assert g.num_units == EXPECTED[kind][g.kind]
        for s in g.slices:
            size = params[s.param].shape[s.dim]
            assert s.index.shape[0] == g.num_units
            assert torch.equal(torch.sort(s.index.flatten()).values, torch.arange(size)), s.param  # each position once
    # every projection of a block belongs to its group: q/k/v/o or up/gate/down
    owned = {s.param for g in groups.values() for s in g.slices}
    for name in params:
        if any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_fc", "c_attn", "query")):
            assert name in owned, name


def test_shapes_that_do_not_add_up_are_refused_naming_the_module():
    model, _ = tiny("llama")
    model.model.layers[0].self_attn.config.num_attention_heads = 3  # 32 query rows are not 3 heads of 8
    with pytest.raises(PlanError, match=r"model\.layers\.0\.self_attn"):
        find_unit_groups(model)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.data())
def test_expanded_roles_pair_every_clone_element_with_its_source_element(units, k, data):
    n_lead = data.draw(st.integers(1, units))
    n_ind = data.draw(st.integers(0, units - n_lead))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    roles = elect(torch.rand(units, generator=gen), n_lead, n_ind, assign="random", generator=gen)
    index = torch.randperm(units * k, generator=gen).reshape(units, k)
    er = roles.expand(index)
    assert er.num_units == units * k and er.counts()["clones"] == roles.num_clones * k
    m = er.source_map
    for c, s in zip(roles.clones.tolist(), roles.sources.tolist()):
        assert torch.equal(m[index[c]], index[s])  # element i of the clone copies element i of its source
    assert torch.equal(torch.sort(er.active).values, torch.sort(index[roles.active].flatten()).values)


# ---------------------------------------------------------------------------------------------- output mode
def _roles(groups, gen):
    out = {}
    for name, g in groups.items():
        n = g.num_units
        lead = max(1, (n + 1) // 3)
        out[name] = elect(torch.rand(n, generator=gen), lead, min(1, n - lead), assign="random", generator=gen)
    return out


def _with_clones_as_sources(model, groups, roles):
    """The plain model in which every clone unit computes what its source computes: producer slices copied."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, g in groups.items():
            for s in g.slices:
                if s.param.rpartition(".")[0] in g.producers:
                    er = roles[name].expand(s.index)
                    p = params[s.param]
                    p.index_copy_(s.dim, er.clones, p.index_select(s.dim, er.sources))
    return ref


@pytest.mark.parametrize("kind", ["llama", "qwen", "gpt2", "bert", "vit"])
def test_block_output_mode_computes_clones_as_their_sources_and_saves_a_plain_model(kind):
    from egg_optim.rewrites.block_output import BlockOutputCloning

    model, inputs = tiny(kind)
    model.eval()
    groups = find_unit_groups(model)
    roles = _roles(groups, torch.Generator().manual_seed(0))
    ref = _with_clones_as_sources(model, groups, roles)
    rewrite = BlockOutputCloning(model, groups, roles)
    out = model(**inputs).logits
    torch.testing.assert_close(out, ref(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert rewrite.verified == {n for n, r in roles.items() if r.has_clones}  # checked at its first forward pass
    # every block computes its active units only; GPT-2 splits its fused qkv at a stored width (``split_size``),
    # which is set to the active heads' for the forward pass
    assert set(rewrite.modes.values()) == {"shrink"}
    assert {n for n in groups if rewrite.resized(n)} == {
        n for n, g in groups.items() if kind == "gpt2" and g.kind == "attention" and roles[n].has_clones
    }
    # the producers compute active units only, and clone weights get no gradient
    out.square().sum().backward()
    for name, g in groups.items():
        for s in g.slices:
            p = dict(model.named_parameters())[s.param]
            er = roles[name].expand(s.index)
            assert torch.all(p.grad.index_select(s.dim, er.clones) == 0), s.param
    saved = model.state_dict()
    rewrite.remove()
    plain = type(model)(model.config).eval()
    plain.load_state_dict(saved)
    torch.testing.assert_close(plain(**inputs).logits, out.detach(), rtol=1e-5, atol=1e-5)
    assert type(model.get_submodule(next(iter(groups.values())).consumer)).__name__ in ("Linear", "Conv1D")


@pytest.mark.parametrize("kind", ["llama", "bert"])
@settings(max_examples=6, deadline=None)
@given(leaders=st.sampled_from([0.2, 0.4, 0.7]), seed=st.integers(0, 2**16))
def test_weight_clones_take_producer_rows_only_and_compute_what_output_mode_computes(kind, leaders, seed):
    """A weight clone of a neuron or head takes its source's producer rows (so it computes its source's
    activation) and keeps its own consumer column: the model then computes exactly what output mode computes
    with the same roles. Copying the column too would double the source's contribution."""
    from egg_optim import LeaderCloneOptimizer, RolePlan

    model, inputs = tiny(kind)
    twin = copy.deepcopy(model)
    plan = RolePlan(leaders, 0.1)
    weight = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), plan, clone_every=None,
                                  assign="random", seed=seed)  # fmt: skip
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert weight.clone_now() > 0
    output = LeaderCloneOptimizer(twin, torch.optim.SGD(twin.parameters(), lr=0.1), plan, clone_mode="output",
                                  assign="random", seed=seed)  # fmt: skip
    assert any(layer.group is not None for layer in weight.layers.values())
    for name, layer in weight.layers.items():
        assert output.roles[name].same_as(weight.roles[name])
        for pname, p in layer.params:
            er, dim = layer.roles_of(pname, weight.roles[name]), layer.dim_of(pname)
            clones = p.index_select(dim, er.clones)
            if layer.copied_by_clones(pname):
                assert torch.equal(clones, p.index_select(dim, er.sources)), pname
            else:  # the consumer's columns: untouched
                assert pname.startswith(layer.group.consumer) and torch.equal(
                    clones, before[pname].index_select(dim, er.clones)
                )
    model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, twin(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_block_output_mode_follows_role_updates():
    from egg_optim.rewrites.block_output import BlockOutputCloning

    model, inputs = tiny("llama")
    model.eval()
    groups = find_unit_groups(model)
    gen = torch.Generator().manual_seed(3)
    first, second = _roles(groups, gen), _roles(groups, gen)
    rewrite = BlockOutputCloning(model, groups, first)
    rewrite.update_roles(second)
    ref = _with_clones_as_sources(model, groups, second)
    torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(PlanError):
        rewrite.update_roles({"nope": next(iter(second.values()))})
    rewrite.remove()
    with pytest.raises(PlanError, match="removed"):
        rewrite.update_roles(second)


def test_roles_expand_refuses_a_wrong_index():
    r = Roles.all_leaders(3)
    with pytest.raises(PlanError, match=r"\[3, k\]"):
        r.expand(torch.arange(4).reshape(2, 2))


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_optimizer_manages_blocks_exactly_and_exports_a_plain_model(mode):
    """Through LeaderCloneOptimizer: every slice a clone owns stays frozen (compact storage), active ones train,
    and export_model() is the plain class computing the same."""
    from egg_optim import LeaderCloneOptimizer, RolePlan

    model, inputs = tiny("llama")
    opt = LeaderCloneOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), RolePlan(0.4, 0.1), clone_mode=mode, clone_every=None
    )
    assert {n for n, lay in opt.layers.items() if lay.group is not None} == {
        f"model.layers.{i}.{b}" for i in (0, 1) for b in ("mlp", "self_attn")
    }
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for _ in range(2):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, layer in opt.layers.items():
        roles = opt.roles[name]
        for pname, p in layer.params:
            er, dim = layer.roles_of(pname, roles), layer.dim_of(pname)
            assert torch.equal(p.index_select(dim, er.clones), before[pname].index_select(dim, er.clones)), pname
            assert not torch.equal(p.index_select(dim, er.active), before[pname].index_select(dim, er.active))
    model.eval()
    with torch.no_grad():
        want = model(**inputs).logits
    plain = opt.export_model().eval()
    assert not any(type(m).__module__.startswith("egg_optim") for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def test_block_units_get_exactly_the_bare_update_on_one_step():
    from egg_optim import LeaderCloneOptimizer, RolePlan

    model, inputs = tiny("llama")
    bare_model = copy.deepcopy(model)
    opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                               RolePlan(0.4, 0.1), clone_every=None)  # fmt: skip
    bare = torch.optim.AdamW(bare_model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for m, o in ((model, opt), (bare_model, bare)):  # weight mode: the same forward, the same gradients
        m(**inputs, labels=inputs["input_ids"]).loss.backward()
        o.step()
    after_bare = dict(bare_model.named_parameters())
    for name, layer in opt.layers.items():
        for pname, p in layer.params:
            er, dim = layer.roles_of(pname, opt.roles[name]), layer.dim_of(pname)
            assert torch.equal(p.index_select(dim, er.active), after_bare[pname].index_select(dim, er.active)), pname
            assert torch.equal(p.index_select(dim, er.clones), before[pname].index_select(dim, er.clones)), pname


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_block_units_compile_without_graph_breaks_and_match_eager(mode):
    from egg_optim import LeaderCloneOptimizer, RolePlan

    model, inputs = tiny("llama")
    LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters()), RolePlan(0.4, 0.1), clone_mode=mode)
    model(**inputs)  # one eager forward decides norm coupling
    explained = torch._dynamo.explain(lambda ids: model(input_ids=ids).logits)(inputs["input_ids"])
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_clone_gradient_probe_scores_are_refused_for_blocks_in_output_mode():
    """The output-mode probe records plain layers only: a block would score nothing and elect on zeros."""
    from egg_optim import LeaderCloneOptimizer, RolePlan

    model, _ = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ConfigError, match="clone_conflict.*transformer blocks"):
        LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.4, 0.1),
                             clone_mode="output", election="clone_conflict", election_policy="stable",
                             elect_every="epoch")  # fmt: skip
    assert {n: type(m) for n, m in model.named_modules()} == types  # nothing rewritten
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_blocks_are_found_by_structure_whatever_their_children_are_called():
    """A transformer layer with no name any family uses: attention (a head count, three projections from the
    hidden states, one back), a fused-qkv attention and a gated MLP are found from shapes and the config alone."""
    from types import SimpleNamespace

    from torch import nn

    class Attn(nn.Module):
        def __init__(self, fused: bool) -> None:
            super().__init__()
            self.n_heads = 4
            if fused:
                self.mix = nn.Linear(16, 48)
            else:
                self.alpha, self.beta, self.gamma = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.back = nn.Linear(16, 16)

    class Ffn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.left, self.right, self.merge = nn.Linear(16, 40), nn.Linear(16, 40), nn.Linear(40, 16)
            self.nonlin = nn.GELU()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(hidden_size=16)
            self.one, self.two, self.ffn = Attn(False), Attn(True), Ffn()
            self.head = nn.Linear(16, 3)

    found = find_unit_groups(Net())
    assert {n: (g.kind, g.num_units, g.consumer) for n, g in found.items()} == {
        "one": ("attention", 4, "one.back"),
        "two": ("attention", 4, "two.back"),
        "ffn": ("mlp", 40, "ffn.merge"),
    }
    assert found["ffn"].producers == ["ffn.left", "ffn.right"]
    assert found["two"].layout == "blocked (assumed)"  # no dummy inputs to settle it: the common layout


def _mixing_net(couple_heads: bool, couple_neurons: bool, dummy: bool = True):
    """A transformer layer found by structure whose attention normalises q over every head at once (a weightless
    norm: no parameter shows it) and whose MLP normalises its hidden width, each only when asked."""
    from types import SimpleNamespace

    from torch import nn
    from torch.nn import functional as F

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n_heads = 4
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            q = F.layer_norm(self.q(x), (16,)) if couple_heads else self.q(x)
            b, t, _ = x.shape
            q, k, v = (y.view(b, t, 4, 4).transpose(1, 2) for y in (q, self.k(x), self.v(x)))
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 16)
            return self.o(y)

    class Ffn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down, self.act = nn.Linear(16, 40), nn.Linear(40, 16), nn.GELU()

        def forward(self, x):
            h = self.act(self.up(x))
            return self.down(F.layer_norm(h, (40,)) if couple_neurons else h)

    class Net(nn.Module):
        main_input_name = "input_ids"

        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(hidden_size=16)
            self.embed, self.attn, self.ffn, self.head = nn.Embedding(20, 16), Attn(), Ffn(), nn.Linear(16, 20)
            if dummy:
                self.dummy_inputs = {"input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])}

        def forward(self, input_ids):
            x = self.embed(input_ids)
            return self.head(x + self.ffn(x + self.attn(x)))

    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize(("heads", "neurons"), [(True, False), (False, True), (True, True), (False, False)])
def test_units_that_are_not_computed_apart_are_found_by_dataflow_and_left_alone(heads, neurons):
    """Nothing in the structure shows a weightless norm across heads or neurons; one forward pass on the model's
    dummy inputs does: changing one unit's rows changes other units' inputs of the consumer. Such a block is not
    decomposed (its layers are left alone, with the reason); a block that computes its units apart is."""
    import warnings

    from egg_optim import LeaderCloneOptimizer, RolePlan
    from egg_optim.core.blocks import discover

    model = _mixing_net(heads, neurons)
    found = discover(model)
    coupled = {"attn"} if heads else set()
    coupled |= {"ffn"} if neurons else set()
    assert set(found.skipped) == coupled
    assert set(found.groups) == {"attn", "ffn"} - coupled
    assert all(g.probed for g in found.groups.values())
    for name in coupled:
        assert "not computed apart" in found.skipped[name].reason and f"{name}." in found.skipped[name].reason
    assert model.training  # the probe ran in eval mode and put the model back
    make = lambda: LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.4, 0.1))  # noqa: E731
    if coupled == {"attn", "ffn"}:
        with pytest.raises(PlanError, match="left alone by default.*not computed apart"):  # nothing to manage, said so
            make()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = make()
    assert set(opt.coverage().not_decomposed) == coupled
    assert bool(coupled) == any("not decomposed" in str(w.message) for w in caught)


def test_without_dummy_inputs_the_structure_decides():
    """A model with no dummy inputs cannot be probed: its blocks are decomposed by structure alone (the layers'
    positions), and its coverage says so."""
    from egg_optim import LeaderCloneOptimizer, RolePlan
    from egg_optim.core.blocks import discover

    model = _mixing_net(True, True, dummy=False)
    groups = discover(model).groups
    assert set(groups) == {"attn", "ffn"} and not any(g.probed for g in groups.values())
    with pytest.warns(UserWarning, match=r"by their structure alone.*\(attn, ffn\).*example_inputs=batch"):
        opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.4, 0.1))
    cov = opt.coverage()
    assert set(cov.by_structure) == {"attn", "ffn"} and "by structure alone" in cov.line()  # said, not hidden


def test_example_inputs_check_the_blocks_of_a_model_without_dummy_inputs():
    """A batch passed as example_inputs stands for the dummy inputs the model lacks: the attention whose heads mix
    is found and left alone, the MLP is checked; inputs the model cannot take are refused, naming them, before
    anything is built."""
    import warnings

    from egg_optim import LeaderCloneOptimizer, RolePlan
    from egg_optim.errors import ConfigError

    model = _mixing_net(True, False, dummy=False)
    make = lambda **kw: LeaderCloneOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.4, 0.1), **kw
    )  # noqa: E731
    with pytest.raises(ConfigError, match="example_inputs: Net could not run on them"):
        make(example_inputs={"tokens": torch.tensor([[1, 2]])})
    assert model.training and not any(type(m).__module__.startswith("egg_optim") for m in model.modules())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cov = make(example_inputs=torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])).coverage()
    assert set(cov.not_decomposed) == {"attn"} and "not computed apart" in cov.not_decomposed["attn"]
    assert set(cov.managed_blocks) == {"ffn"} and cov.by_structure == ()
    assert not any("structure alone" in str(w.message) for w in caught)


def test_a_model_of_flattened_patches_with_their_grids_gets_dummy_inputs_of_that_form():
    """A vision model that takes each image's patches flattened with its grid (``spatial_shapes``: SigLIP 2's
    NaFlex) gets dummy images of that form, a square grid of its config's ``num_patches`` with a mask of ones (not
    images of 3 x H x W it cannot run on): every block is checked by dataflow."""
    from egg_optim.core.blocks import discover
    from egg_optim.core.probe import _dummy_inputs

    if not hasattr(transformers, "Siglip2VisionModel"):
        pytest.skip(f"transformers {transformers.__version__} has no SigLIP 2")
    cfg = transformers.Siglip2VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=4, num_patches=16, patch_size=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Siglip2VisionModel(cfg)
    dummy = _dummy_inputs(model)
    assert dummy["pixel_values"].shape == (2, 16, 3 * 2 * 2)
    assert dummy["spatial_shapes"].tolist() == [[4, 4]] * 2 and dummy["pixel_attention_mask"].bool().all()
    found = discover(model)
    assert {"encoder.layers.0.self_attn", "encoder.layers.0.mlp"} <= set(found.groups)
    assert all(g.probed for g in found.groups.values())


def test_a_model_of_projected_feature_frames_gets_dummy_frames():
    """A speech model that reads frames of features through a projection (``feature_projection_input_dim`` wide:
    wav2vec 2.0-BERT's conformer, no spectrogram of mel bins) gets 16 dummy frames of that width: every block, its
    two half-step MLPs and its attention, is checked by dataflow."""
    from egg_optim.core.blocks import discover
    from egg_optim.core.probe import _dummy_inputs

    cfg = transformers.Wav2Vec2BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=4, feature_projection_input_dim=16,
                                          conv_depthwise_kernel_size=3)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Wav2Vec2BertModel(cfg)
    assert _dummy_inputs(model)["input_features"].shape == (2, 16, 16)
    found = discover(model)
    assert {g.kind for g in found.groups.values()} == {"attention", "mlp"} and len(found.groups) == 3
    assert all(g.probed for g in found.groups.values())


def test_a_waveform_model_whose_config_does_not_size_its_convolutions_gets_a_second_of_speech():
    """A model of a raw waveform whose convolutions its code sizes (Moonshine: no ``conv_kernel`` / ``conv_stride``
    in its config) gets a second of dummy speech at 16 kHz: its encoder's and decoder's blocks are checked by
    dataflow."""
    from egg_optim.core.blocks import discover
    from egg_optim.core.probe import _dummy_inputs

    cfg = transformers.MoonshineConfig(vocab_size=50, hidden_size=32, intermediate_size=48, encoder_num_hidden_layers=1,
                                       decoder_num_hidden_layers=1, encoder_num_attention_heads=4,
                                       decoder_num_attention_heads=4, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MoonshineForConditionalGeneration(cfg)
    assert _dummy_inputs(model)["input_values"].shape == (2, 16000)
    found = discover(model)
    assert len(found.groups) == 5 and all(g.probed for g in found.groups.values())


def test_a_video_model_gets_dummy_videos_of_its_frames():
    """A video model (its config's ``num_frames``: VideoMAE) gets dummy videos of that many frames, not images it
    cannot run on: its blocks are checked by dataflow."""
    from egg_optim.core.blocks import discover
    from egg_optim.core.probe import _dummy_inputs

    cfg = transformers.VideoMAEConfig(image_size=8, patch_size=4, num_frames=4, tubelet_size=2, hidden_size=32,
                                      intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.VideoMAEForVideoClassification(cfg)
    assert _dummy_inputs(model)["pixel_values"].shape == (2, 4, 3, 8, 8)
    found = discover(model)
    assert len(found.groups) == 2 and all(g.probed for g in found.groups.values())


def test_an_attention_around_a_look_alike_keeps_its_projections_left_alone():
    """Kimi-Linear's linear attention holds, beside its own projections, a gate module carrying a head count and
    two Linears (an attention look-alike of its own). Neither decomposes; both are left alone with their reasons,
    and the outer module's projections do not become rows."""
    from torch import nn

    from egg_optim import LeaderCloneOptimizer, RolePlan

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads, self.head_dim = 4, 4
            self.down, self.up = nn.Linear(16, 4), nn.Linear(4, 16)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads = 4
            self.q, self.k, self.v, self.beta, self.o = (nn.Linear(16, n) for n in (16, 16, 16, 4, 16))
            self.gate = Gate()

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down, self.act = nn.Linear(16, 40), nn.Linear(40, 16), nn.GELU()

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.mlp = Attn(), Mlp()

    model = nn.Sequential(Layer(), nn.Linear(16, 3))
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.4, 0.1))
    cov = opt.coverage()
    assert set(cov.not_decomposed) == {"0.attn", "0.attn.gate"}
    assert set(cov.row_layers) == {"0.mlp.up", "0.mlp.down"}  # no projection of the attention


def test_a_faint_mix_between_units_of_a_block_with_small_outputs_is_found():
    """The dataflow probe judges a change relative to the block's own values: a freshly initialised block whose
    outputs are about 1e-4 and whose heads leak 1e-7 into each other (a state-space mixer whose shared rows looked
    like heads) is coupled, not apart; the same block without the leak is apart."""
    from torch import nn
    from torch.nn import functional as F

    from egg_optim.core.blocks import discover

    class Attn(nn.Module):
        def __init__(self, leak: float) -> None:
            super().__init__()
            self.n_heads, self.leak = 4, leak
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16, bias=False) for _ in range(4))
            for lin in (self.q, self.k, self.v, self.o):
                nn.init.normal_(lin.weight, std=1e-2)

        def forward(self, x):
            b, t, _ = x.shape
            v = self.v(x)
            v = v + self.leak * v.sum(-1, keepdim=True)  # every head reads a little of every other
            q, k, v = (y.view(b, t, 4, 4).transpose(1, 2) for y in (self.q(x), self.k(x), v))
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 16))

    class Net(nn.Module):
        main_input_name = "input_ids"

        def __init__(self, leak: float) -> None:
            super().__init__()
            self.embed, self.attn, self.head = nn.Embedding(20, 16), Attn(leak), nn.Linear(16, 20)
            nn.init.normal_(self.embed.weight, std=1e-4)
            self.dummy_inputs = {"input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])}

        def forward(self, input_ids):
            return self.head(self.attn(self.embed(input_ids)))

    torch.manual_seed(0)
    leaky, clean = discover(Net(1e-3)), discover(Net(0.0))
    assert "attn" in leaky.skipped and "not computed apart" in leaky.skipped["attn"].reason
    assert clean.groups["attn"].probed


def test_an_attentions_width_attributes_are_found_by_name_never_by_value_alone():
    """Only attributes named as head counts or widths are set to the active units' in output mode: a layer index or
    a window equal to a multiple of the heads is left as it is."""
    from types import SimpleNamespace

    from egg_optim.core.blocks import _stored_widths

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads, self.num_key_value_heads, self.head_dim = 8, 4, 16
            self.embed_dim, self.kv_dim, self.split_size = 128, 64, 128
            self.layer_idx, self.sliding_window, self.max_position_embeddings = 4, 8, 2048
            self.rotary_ndims, self.num_key_value_groups, self.is_causal = 8, 2, True
            self.inner = torch.nn.Module()  # a module inside (DeBERTa's ``self``): its attributes too
            self.inner.num_attention_heads, self.inner.all_head_size, self.inner.layer_idx = 8, 128, 4
            self.q_proj = torch.nn.Linear(16, 128)  # a projection's widths are its own
            # its config: head counts only (the model's hidden size is no width of this attention's)
            self.config = SimpleNamespace(num_attention_heads=8, hidden_size=128, num_hidden_layers=4)

    # 4 units (key/value heads), 2 query heads each, head_dim 16
    assert _stored_widths(Attn(), 4, 2, 16) == {
        "num_heads": 2, "num_key_value_heads": 1, "embed_dim": 32, "kv_dim": 16, "split_size": 32,
        "inner.num_attention_heads": 2, "inner.all_head_size": 32, "config.num_attention_heads": 2,
    }  # fmt: skip


@pytest.mark.parametrize("mode", ["weight", "output"])
def test_layers_of_a_container_called_one_by_one_are_no_block(mode):
    """Three Linears of one width in a ModuleList look like an MLP by structure (two producers, a consumer); Gemma 3n
    calls its ``altup_projections`` one by one, each on the hidden states. The probe's pass shows their layers ran
    outside the container (never called): no block, each layer managed by its rows; output mode trains (it computed
    the 'consumer' on the producers' active width: a shape error at the first step)."""
    import types

    from egg_optim import LeaderCloneOptimizer, RolePlan
    from egg_optim.core.blocks import discover

    class Parallel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(hidden_size=16)
            self.projections = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.head(sum(torch.tanh(p(x)) for p in self.projections))

    torch.manual_seed(0)
    model, x = Parallel(), torch.randn(6, 16)
    assert "projections" in discover(model).groups  # by structure alone, without inputs: the look-alike
    assert "projections" not in discover(model, inputs=x).groups
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.4, 0.1),
                               clone_mode=mode, example_inputs=x)  # fmt: skip
    assert {f"projections.{i}" for i in range(3)} <= set(opt.layers)
    for _ in range(2):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()


def test_an_mlp_found_from_its_parent_is_named_by_the_module_holding_its_layers():
    """Mistral 3's projector holds a patch merger's Linear beside its MLP, so the MLP is matched from the module above;
    its layers all sit in the projector, which names it (a made-up ``<parent>.mlp`` only where they sit in several
    children: BERT's intermediate and output)."""
    import types

    from egg_optim.core.blocks import discover

    class Merger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.merging_layer = torch.nn.Linear(64, 16)

    class Projector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.merger = Merger()
            self.linear_1, self.act, self.linear_2 = torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(hidden_size=16)
            self.projector = Projector()

    groups = discover(Model(), probe=False).groups
    assert list(groups) == ["projector"] and groups["projector"].consumer == "projector.linear_2"
