import pytest
import torch
from conftest import TinySeedNet, mlp, model_state
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from egg_optim import LeaderCloneOptimizer, PlanError, RolePlan


def test_counts_follow_seed_rounding():
    plan = RolePlan(leaders=0.3, independents=0.1).resolve(mlp((6, 25, 15, 3)))
    # round() is Python's (half to even), as in the seed: 0.3 * 25 = 7.5 -> 8, 0.1 * 25 = 2.5 -> 2
    assert (plan["0"].leaders, plan["0"].independents, plan["0"].clones) == (8, 2, 15)
    assert (plan["2"].leaders, plan["2"].independents, plan["2"].clones) == (
        round(4.5),
        round(1.5),
        15 - 4 - 2,
    )
    assert "4" not in plan  # the classifier (last Linear) is not managed by default


@given(st.integers(3, 64), st.floats(0.05, 1.0), st.floats(0.0, 1.0))
def test_counts_partition_units(units, lead, ind):
    ind = min(ind, 1.0 - lead)
    model = mlp((4, units, 2))
    try:
        lp = RolePlan(lead, ind).resolve(model)["0"]
    except PlanError as e:
        assert "0" in str(e)
        return
    assert lp.independents == round(ind * units)
    # the seed's rounding, but never 0 leaders for a positive fraction that leaves clones
    rounded = round(lead * units)
    assert lp.leaders == (1 if rounded == 0 and units - lp.independents > 0 else rounded)
    assert lp.leaders + lp.independents + lp.clones == units and lp.clones >= 0
    assert lp.leaders > 0 or lp.clones == 0


def test_a_small_positive_leader_fraction_still_gives_clones_a_source():
    assert RolePlan(0.01).resolve(mlp((4, 20, 2)))["0"].leaders == 1


def test_presets_default_to_the_uniform_table_and_fit_any_model():
    """The default table works on a model without the seed's layer names; the seed tables are opt-in."""
    model = mlp((6, 10, 20, 3))
    assert RolePlan.preset("mild") == RolePlan.preset("mild", table="uniform") == RolePlan(0.40, 0.10)
    mild = RolePlan.preset("mild").resolve(model)
    assert sorted(mild) == ["0", "2"] and mild["2"].leaders == round(0.40 * 20)
    assert RolePlan.preset("aggressive").resolve(model)["2"].leaders == round(0.25 * 20)
    with pytest.raises(PlanError, match="layer1.conv1"):
        RolePlan.preset("mild", table="mnist").resolve(model)


def test_seed_presets_use_tables():
    net = TinySeedNet()
    mild = RolePlan.preset("mild", table="mnist").resolve(net)
    assert sorted(mild) == sorted(f"layer{b}.conv{c}" for b in (1, 2, 3) for c in (1, 2, 3))
    assert mild["layer1.conv1"].leaders == round(0.40 * 10)
    assert mild["layer1.conv3"].leaders == round(0.35 * 20)
    aggressive = RolePlan.preset("aggressive", table="cifar").resolve(net)
    assert aggressive["layer3.conv3"].leaders == round(0.22 * 10)
    assert not any("shortcut" in n or n.startswith("fc") for n in mild)
    base = RolePlan.preset("baseline").resolve(net)
    assert all(lp.clones == 0 for lp in base.values())


def test_per_layer_first_match_and_suffix_patterns():
    plan = RolePlan(0.5, 0.0, per_layer={"layer1.*": (0.2, 0.1), "layer1.conv1": (0.9, 0.1)})
    res = plan.resolve(TinySeedNet())
    assert res["layer1.conv1"].leaders == round(0.2 * 10)  # first pattern wins
    assert res["layer2.conv1"].leaders == round(0.5 * 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"leaders": 1.2}, "outside"),
        ({"leaders": -0.1}, "outside"),
        ({"leaders": 0.7, "independents": 0.5}, "> 1"),
        ({"per_layer": {"nope.*": (0.5, 0.1)}}, "matches no"),
        ({"layers": ["missing"]}, "matches no"),
        ({"leaders": 0.0, "independents": 0.5}, "0 leaders"),
        ({"per_layer": {"0": (0.5, 0.5)}}, "too few units"),
        ({"per_layer": {"0": (0.5,)}}, "pair"),
    ],
)
def test_bad_plans_raise_and_change_nothing(kwargs, match):
    torch.manual_seed(0)
    model = mlp((4, 3, 5, 2))
    opt = torch.optim.Adam(model.parameters())
    before, before_opt = model_state(model), opt.state_dict()
    with pytest.raises(PlanError, match=match):
        LeaderCloneOptimizer(model, opt, RolePlan(**kwargs), clone_every=1)
    after = model_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert opt.state_dict() == before_opt


def test_error_names_layer_and_numbers():
    with pytest.raises(PlanError) as info:
        RolePlan(0.5, 0.5).resolve(mlp((4, 3, 2)))
    assert "'0'" in str(info.value) and "3" in str(info.value)


def test_unknown_preset():
    with pytest.raises(PlanError, match="preset"):
        RolePlan.preset("medium")
    with pytest.raises(PlanError, match="table"):
        RolePlan.preset("mild", table="imagenet")


def test_layer_selection_and_exclude():
    model = mlp((4, 8, 8, 8, 2))
    assert list(RolePlan(0.5, layers=["0", "4"]).resolve(model)) == ["0", "4"]
    assert list(RolePlan(0.5, exclude=["2"]).resolve(model)) == ["0", "4"]


class _HeadFirst(nn.Module):
    """A transformers-style model whose task head is registered before its base model (as XLM-RoBERTa's
    classification model is): ``base_model`` names the body, the head is what lies outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))

    @property
    def base_model(self) -> nn.Module:
        return self.body

    def forward(self, x):
        return self.head(self.body(x))


def test_the_output_head_is_found_outside_the_base_model_whatever_the_registration_order():
    plan = RolePlan(0.5, 0.0)
    chosen, why = plan.selection(_HeadFirst())
    assert chosen == ["body.0", "body.2"] and "output head" in why["head"]
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # no base model: the last one registered
    chosen, why = plan.selection(plain)
    assert chosen == ["0"] and "output head" in why["2"]


class _EncoderNamedAsThePrefix(nn.Module):
    """A transformers base model whose encoder is named by its ``base_model_prefix`` (as DINOv3-ViT's ``model``):
    transformers' ``base_model`` gives the encoder, a plain module, not a base model beneath a task head."""

    base_model_prefix = "model"

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)  # the input: a patch embedding
        self.model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    def forward(self, x):
        return self.model(self.embed(x))


def test_a_base_model_whose_encoder_is_named_as_its_prefix_has_its_last_layer_as_output_head():
    chosen, why = RolePlan(0.5, 0.0).selection(_EncoderNamedAsThePrefix())
    assert chosen == ["embed", "model.0"] and "output head" in why["model.2"]


class _HeadRegisteredFirst(nn.Module):
    """A model that defines its classifier before its body, and has no ``base_model`` to tell them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 10)
        self.features = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())

    def forward(self, x):
        return self.fc(self.features(x))


@pytest.mark.parametrize("mode", ["weight", "output"])
def test_a_managed_layer_producing_the_models_output_is_refused_at_the_first_forward_pass(mode):
    def first_forward(plan):
        model = _HeadRegisteredFirst()
        LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters()), plan, clone_mode=mode)
        model(torch.randn(2, 8))
        return model

    with pytest.raises(PlanError, match=r"\['fc'\] produce the model's output.*exclude=\['fc'\]"):
        first_forward(RolePlan(0.4, 0.1))
    first_forward(RolePlan(0.4, 0.1, exclude=["fc"]))  # the fix the error names
    first_forward(RolePlan(0.4, 0.1, layers=["fc", "features.0"]))  # a plan naming its layers is taken as meant


class _ReadsAWeight(nn.Module):
    """A model that computes with ``mix``'s weight without calling ``mix`` (as Mamba does with ``dt_proj``)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x @ self.mix.weight.t())))


def test_output_mode_leaves_alone_a_layer_whose_weight_the_model_reads_without_calling_it():
    """Seen on the example inputs: a default plan in output mode leaves ``mix`` alone and says why (its clones could
    not take their sources' outputs), weight mode manages it; a plan naming it, or leaving nothing else, is refused
    at construction (at the first step where the probe did not run)."""
    from egg_optim.errors import RewriteCheckError

    x = torch.randn(4, 8)

    def opt(mode, plan=None, **kw):
        plan = plan or RolePlan(0.5, 0.0)
        model = _ReadsAWeight()
        return model, LeaderCloneOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), plan, clone_mode=mode, **kw
        )

    with pytest.warns(UserWarning, match=r"output mode leaves alone \['mix'\]"):
        model, o = opt("output", example_inputs=x)
    assert set(o.layers) == {"body"} and "without calling it" in o.coverage().left_alone["mix"]
    model(x).sum().backward()
    o.step()
    assert set(opt("weight", example_inputs=x)[1].layers) == {"mix", "body"}
    named = RolePlan(0.5, 0.0, layers=["mix", "body"])
    with pytest.raises(RewriteCheckError, match=r"\['mix'\].*without calling these layers"):
        opt("output", named, example_inputs=x)
    with pytest.raises(RewriteCheckError, match=r"\['mix'\].*without calling these layers"):
        opt("output", RolePlan(0.5, 0.0, exclude=["body"]), example_inputs=x)  # nothing else left
    model, o = opt("output", named)  # no inputs, no probe: the first step refuses it
    model(x).sum().backward()
    with pytest.raises(RewriteCheckError, match="without calling these layers"):
        o.step()


class _ReadsAWeightInTraining(nn.Module):
    """Calls ``mix`` in eval mode and computes with its weight (clamped) in training, as Gemma 3n does with its
    ``correction_coefs``; clamps ``body``'s weight in place in training, has a BatchNorm and a dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.body, self.norm, self.drop = nn.Linear(8, 8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        if self.training:
            self.body.weight.data.clamp_(-0.01, 0.01)
            x = x @ self.mix.weight.clamp(-1, 1).t() + self.mix.bias
        else:
            x = self.mix(x)
        return self.head(self.drop(self.norm(torch.relu(self.body(x)))))


def test_reads_a_training_forward_pass_makes_are_seen_and_the_pass_changes_nothing():
    """The probe runs a training-mode pass too: output mode's default plan leaves ``mix`` alone (its weight is read
    without calling it in training only). That pass changes nothing: the in-place clamp of ``body``'s weight, the
    BatchNorm's running statistics and batch count, the random state and each module's training flag are as
    before."""
    torch.manual_seed(0)
    model = _ReadsAWeightInTraining()
    model.norm.eval()  # a flag of the user's, kept
    before = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    x, rng = torch.randn(4, 8), torch.get_rng_state()
    with pytest.warns(UserWarning, match=r"output mode leaves alone \['mix'\]"):
        opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5, 0.0),
                                   clone_mode="output", example_inputs=x)  # fmt: skip
    assert set(opt.layers) == {"body"}
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, dict([*model.named_parameters(), *model.named_buffers()])[k]) for k, v in before.items())
    assert model.training and not model.norm.training and model.drop.training


def test_a_default_plan_leaves_every_layer_the_model_returns_alone():
    """A model of two towers returns two projections (CLIP's image and text embeddings): the default plan leaves
    both alone as output heads, found on the model's dummy inputs, where it left only the last one registered."""
    transformers = pytest.importorskip("transformers")
    from egg_recipes import tiny_transformers as tiny

    model = tiny.make("clip")
    o = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5, 0.0))
    left = o.coverage().left_alone
    assert "output head" in left["visual_projection"] and "output head" in left["text_projection"]
    model(**tiny.inputs("clip")).loss.backward()  # the output-head check at the first forward pass finds none
    o.step()
    assert transformers is not None
