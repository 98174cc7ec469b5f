"""``EggConfig.repack``: elections scatter a layer's roles; a block's units are then reordered (every slice at once)
so the roles are runs again, which keeps the model's function, the run's trajectory and the checkpoints, and takes
the step's parameter index traffic back to none (issue 19 item 2)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from egg_optim import EggConfig, LeaderCloneOptimizer, RolePlan
from egg_optim.core import axes, repack
from egg_optim.core.election import elect
from egg_optim.core.roles import Roles, by_parts
from egg_optim.errors import ConfigError
from egg_optim.utils import DispatchCounter

transformers = pytest.importorskip("transformers")

from egg_recipes import tiny_transformers as tiny  # noqa: E402


def _roles(data, parts: int, assign: str) -> Roles:
    n = parts * data.draw(st.integers(2, 6))
    leaders = parts * data.draw(st.integers(1, n // parts - 1))
    independents = parts * data.draw(st.integers(0, (n - leaders) // parts - 1))
    scores = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.float32)

    def draw(units, lead, ind, now):
        return elect(scores[units], lead, ind, assign=assign)

    return by_parts(parts, n, leaders, independents, draw)


@settings(max_examples=80, deadline=None)
@given(parts=st.integers(1, 3), assign=st.sampled_from(["first", "round_robin", "random"]), data=st.data())
def test_packed_order_lays_elected_roles_out_as_runs_and_moves_slices_with_their_units(parts, assign, data):
    roles = _roles(data, parts, assign)
    order = repack.packed_order(roles, parts)
    packed = repack.permuted(roles, order)
    # the same roles, relabelled: unit order[j] now sits at j, its source moved with it
    assert torch.equal(packed.codes, roles.codes[order])
    assert torch.equal(order[packed.source_map], roles.source_map[order])
    assert torch.equal(repack.inverse(order)[order], torch.arange(roles.num_units))
    # every part: leaders, independents, then clones, in runs at the same offsets; a cycle of sources when the
    # clones take the leaders in turn (or all the first)
    for r in packed.split(parts):
        k = int(r.active.numel())
        assert r.active_span == (0, k) and (not r.has_clones or r.clone_span == (k, r.num_units - k))
        assert torch.equal(r.leaders, torch.arange(int(r.leaders.numel())))
        if r.has_clones and assign != "random":
            assert r.source_cycle is not None
    assert torch.equal(repack.packed_order(packed, parts), torch.arange(roles.num_units))  # packed stays put
    # a tensor whose unit u owns positions index[u]: moving positions moves the units' roles along
    width = data.draw(st.integers(1, 3))
    index = torch.randperm(roles.num_units * width).view(roles.num_units, width)
    moves = repack.positions(order, index)
    expanded = roles.expand(index)
    assert torch.equal(packed.expand(index).codes, expanded.codes[moves])
    t = torch.arange(float(roles.num_units * width))
    repack.permute_(t, 0, moves)
    assert torch.equal(t, moves.float())


def _model(family: str):
    torch.manual_seed(0)
    model = tiny.make(family)
    for m in model.modules():  # dropout masks fall on other units once they move: trajectories would differ
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _opt(model, mode: str, *, repack_: bool, **options) -> LeaderCloneOptimizer:
    cfg = EggConfig(clone_mode=mode, repack=repack_, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LeaderCloneOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "mild", config=cfg
        )


def _logits(model, family: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = tiny.logits(model(**tiny.inputs(family, batch=3, seed=99)))
    model.train()
    return out


# families whose drawn roles repack does not reorder, each layer kept with its reason: a Mamba mixer's projections
# feed a scan that reads every channel; ConvNeXt V2 has no block (a norm across its MLPs' neurons) and its other layers
# feed depthwise convolutions; Zamba2's layers feed its Mamba-2 mixers' convolutions, whose two groups of heads (its
# units) the mild plan leaves without clones
UNMOVED = {
    "mamba": "backbone.layers.0.mixer.in_proj",
    "convnextv2": "convnextv2.embeddings.patch_embeddings",
    "zamba2": "model.layers.0.linear",
    "falcon_mamba": "backbone.layers.0.mixer.in_proj",  # (Mamba's)
    "jetmoe": "model.layers.0.self_attention.kv_proj",  # its one managed layer feeds its attention's experts
}
# families whose only managed block has two units (DBRX's attention: two key/value heads): any roles drawn there are
# runs already, so their steps gather nothing that repacking could remove
TWO_UNITS = {"dbrx"}


@pytest.mark.parametrize("family", UNMOVED)
def test_families_whose_units_stay_say_why(family):
    b = _opt(_model(family), "output", repack_=True, first_roles="drawn")
    kept = b.controller._order_kept
    assert not b.unit_order() and UNMOVED[family] in kept and all(kept.values())


@pytest.mark.parametrize("family", [f for f in tiny.FAMILIES if f not in UNMOVED])
def test_scattered_first_roles_repacked_keep_the_model_and_step_without_index_ops(family):
    """The seed's drawn (scattered) first roles, repacked at construction: every block that may move its units has
    its roles in runs, the model computes what the unmoved one does, and a step's parameter index ops are only the
    bare model's own (output mode, which gathers most on scattered roles)."""
    plain = _model(family)
    moved = _model(family)
    a = _opt(plain, "output", repack_=False, first_roles="drawn")
    b = _opt(moved, "output", repack_=True, first_roles="drawn")
    reordered = b.unit_order()
    assert reordered, "no block was reordered: the test would prove nothing"
    kept, follow = b.controller._order_kept, b.controller._followers  # (plain layers move with their followers)
    movable = [n for n, layer in b.layers.items() if (layer.group is not None or n in follow) and n not in kept]
    assert set(reordered) <= set(movable)
    for name in movable:  # reordered, or drawn in order already
        assert torch.equal(
            repack.packed_order(b.roles[name], b.layers[name].parts), torch.arange(b.roles[name].num_units)
        )
    torch.testing.assert_close(_logits(moved, family), _logits(plain, family), rtol=1e-5, atol=1e-5)
    for model, opt in ((plain, a), (moved, b)):  # one step each, then count the next
        model(**tiny.inputs(family, batch=3, seed=0)).loss.backward()
        opt.step()
        opt.zero_grad()
    bare_model = _model(family)
    bare = torch.optim.SGD(bare_model.parameters(), lr=0.1, momentum=0.9)
    counts = []
    for model, opt in ((bare_model, bare), (moved, b), (plain, a)):
        with DispatchCounter(model, opt) as counted:
            model(**tiny.inputs(family, batch=3, seed=1)).loss.backward()
            opt.step()
            opt.zero_grad()
        counts.append(dict(counted.param_index_ops))
    extra = {op: n - counts[0].get(op, 0) for op, n in counts[1].items() if n > counts[0].get(op, 0)}
    # (layers that keep their order gather)
    gathering = kept or any(n not in movable for n in b.layers)
    assert not extra or gathering, (extra, counts[0])
    if family not in TWO_UNITS:
        assert sum(counts[2].values()) > sum(counts[1].values())  # not vacuous: unmoved scattered roles gather


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen3_next", "gpt2"])
@pytest.mark.parametrize(("mode", "state"), [("output", "keep"), ("weight", "keep"), ("weight", "copy")])
def test_elections_with_repack_train_the_same_model_in_another_order(family, mode, state):
    """Elections every 2 steps (weight-norm scores, every clone following the top leader: decisions that do not
    depend on where a unit sits): with repack the run trains the same weights, SGD momentum included (compact
    state through full size and back; parked slices of demoted units moved with them), which
    ``export_model(original_order=True)`` puts back in the original order (``unit_order()``); and its steps after
    an election gather nothing."""
    options = dict(elect_every=2, election="weight_norm", assign="first", clone_state=state)
    runs = []
    for flag in (False, True):
        model = _model(family)
        opt = _opt(model, mode, repack_=flag, **options)
        for step in range(5):
            with DispatchCounter(model, opt) as counted:
                model(**tiny.inputs(family, batch=3, seed=step)).loss.backward()
                opt.step()
                opt.zero_grad()
        runs.append((model, opt, counted))
    (plain, a, count_a), (moved, b, count_b) = runs
    assert b.controller.book.elections == 2 and b.unit_order(), "no election reordered anything"
    assert count_b.param_index_total == 0 < count_a.param_index_total  # the 5th step: after the 2nd election
    ref, got = a.export_model().state_dict(), b.export_model(original_order=True).state_dict()
    assert not all(torch.equal(v, moved.state_dict()[k]) for k, v in got.items())  # put back: not the live order
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    led_a, led_b = a.controller.leadership_counts(), b.controller.leadership_counts()
    for name, order in b.unit_order().items():  # the per-unit records moved with their units
        assert torch.equal(led_b[name], led_a[name][order]), name


def test_a_checkpoint_taken_after_a_repack_resumes_exactly():
    family = "mixtral"
    options = dict(elect_every=2, election="weight_norm", assign="first")
    model = _model(family)
    opt = _opt(model, "output", repack_=True, **options)
    for step in range(3):
        model(**tiny.inputs(family, batch=3, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))  # as written to disk
    order = opt.unit_order()
    assert order
    fresh = _model(family)
    resumed = _opt(fresh, "output", repack_=True, **options)
    fresh.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    assert {n: o.tolist() for n, o in resumed.unit_order().items()} == {n: o.tolist() for n, o in order.items()}
    for step in range(3, 6):  # through the next election
        for m, o in ((model, opt), (fresh, resumed)):
            m(**tiny.inputs(family, batch=3, seed=step)).loss.backward()
            o.step()
            o.zero_grad()
    for (k, v), w in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(v, w), k


def test_a_block_whose_heads_reach_later_blocks_keeps_its_order_and_says_so():
    """T5's first attention block computes a per-head position bias that every later block reads by head index:
    moving its heads (or a later self-attention block's) changes the model, which the check at construction
    finds; its cross-attention blocks read no such bias and move."""
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg)
    with pytest.warns(UserWarning, match="repack leaves the units of these layers in their order") as record:
        opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mild", repack=True,
                                   first_roles="drawn")  # fmt: skip
    kept = opt.controller._order_kept
    assert {n for n in kept if "SelfAttention" in n} == {n for n in opt.layers if "SelfAttention" in n}
    assert "changes the model's output" in kept["encoder.block.0.layer.0.SelfAttention"]  # its own clones are exact
    # a later block's own clones are not exact either (the bias of their head index): said naming its own consumer
    assert "'decoder.block.1.layer.0.SelfAttention.o'" in kept["decoder.block.1.layer.0.SelfAttention"]
    said = [str(w.message) for w in record if "repack leaves" in str(w.message)]
    assert len(said) == 1 and "encoder.block.0.layer.0.SelfAttention: moving its units changes" in said[0]
    assert any("DenseReluDense" in n for n in opt.unit_order())  # the MLPs moved
    # cross-attention (the same class and shapes as the later self-attention blocks, called with the encoder's
    # states and no per-head bias) is probed on its own call: its clones are exact and its heads move
    selfs = {n for n in opt.layers if "SelfAttention" in n and ".block.0." not in n}
    assert set(opt.coverage().inexact) == selfs
    assert {n for n in opt.unit_order() if "EncDecAttention" in n} == {n for n in opt.layers if "EncDecAttention" in n}


def test_repack_is_validated():
    with pytest.raises(ConfigError, match="repack"):
        EggConfig(repack="yes")
    with pytest.raises(ConfigError, match="repack reorders units"):
        EggConfig(repack=True, local_losses={"num_classes": 3})


def test_unit_order_is_validated_on_load():
    family = "llama"
    model = _model(family)
    opt = _opt(model, "output", repack_=True, first_roles="drawn")
    sd = opt.state_dict()
    name = next(iter(opt.unit_order()))
    sd["egg_optim"]["layers"][name]["unit_order"] = torch.zeros_like(sd["egg_optim"]["layers"][name]["unit_order"])
    with pytest.raises(Exception, match="permutation"):
        opt.load_state_dict(sd)
    assert axes.span(opt.roles[name].active) is not None  # nothing changed by the refused load


# ---------------------------------------------------------------------------------------------- plain layers
class _FlatNet(torch.nn.Module):
    """conv -> BatchNorm -> ReLU -> conv -> ReLU -> flatten -> Linear: the second conv's channels are read by 16
    columns each of the Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(1, 12, 3), torch.nn.BatchNorm2d(12)
        self.conv2, self.fc = torch.nn.Conv2d(12, 8, 3), torch.nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.flatten(1))


def _plain(kind: str) -> tuple[torch.nn.Module, torch.Tensor, int]:
    """A model of plain layers, an input batch shape's example and the number of classes (float64: trajectories
    compared to rounding, where a LayerNorm over copied units amplifies float32's summation order)."""
    from conftest import TinySeedNet, mlp

    torch.manual_seed(0)
    model = {"seed": TinySeedNet, "mlp": lambda: mlp((6, 20, 20, 3), norm=True), "flat": _FlatNet}[kind]()
    shape = {"seed": (1, 8, 8), "mlp": (6,), "flat": (1, 8, 8)}[kind]
    return model.double(), torch.randn(4, *shape, dtype=torch.float64), {"seed": 4, "mlp": 3, "flat": 5}[kind]


def _plain_run(kind: str, repack_: bool, mode: str, election: str, steps: int = 7, **options):
    model, example, classes = _plain(kind)
    cfg = EggConfig(clone_mode=mode, repack=repack_, elect_every=2, election=election, assign="first", **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), "mild",
                                   config=cfg, example_inputs=example)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, *example.shape[1:], generator=gen, dtype=torch.float64)
        y = torch.randint(0, classes, (6,), generator=gen)
        with DispatchCounter(model, opt) as counted:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return model, opt, counted, [str(w.message) for w in caught]


@pytest.mark.parametrize("kind", ["seed", "mlp", "flat"])
@pytest.mark.parametrize(("mode", "election", "state"), [("output", "grad_norm", "keep"),
                                                         ("weight", "grad_norm", "keep"),
                                                         ("weight", "taylor", "copy")])  # fmt: skip
def test_plain_layers_move_with_their_norm_and_reader_and_train_the_same_model(kind, mode, election, state):
    """A plain Linear or conv moves with the per-unit norm after it and the input columns of the layer that reads
    it (16 per channel after a flatten), gradients and state included: with elections every 2 steps the run trains
    the same weights as without repack, and its steps gather only in the layers that keep their order (residual
    outputs). The scores are gradients: a clone holds its source's weights (weight mode; output mode once
    promoted), a tie in weight norm that the units' positions would break."""
    plain, a, count_a, _ = _plain_run(kind, False, mode, election, clone_state=state)
    moved, b, count_b, _ = _plain_run(kind, True, mode, election, clone_state=state)
    assert b.controller.book.elections == 3 and b.unit_order(), "nothing was reordered: the test would prove nothing"
    ref, got = a.export_model().state_dict(), b.export_model(original_order=True).state_dict()
    assert not all(torch.equal(v, moved.state_dict()[k]) for k, v in got.items())  # put back: not the live order
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-12, atol=1e-12, msg=k)
    kept = b.controller._order_kept
    assert set(b.unit_order()) == set(b.layers) - set(kept)
    assert count_b.param_index_total <= count_a.param_index_total
    if not kept:  # every layer in runs: no index op over parameters at all
        assert count_b.param_index_total == 0
    if mode == "weight":  # (output mode's active units stay a run when only leaders and independents swap)
        assert count_b.param_index_total < count_a.param_index_total


def test_the_followers_of_a_plain_layer_are_found_and_checked():
    """Found in registration order and checked on the model: the seed block's first two convs move with their
    BatchNorm and the next conv's columns; its last conv, summed with the shortcut, keeps its order, said with
    why; the flattened reader takes 16 columns per channel."""
    model, example, _ = _plain("seed")
    with pytest.warns(UserWarning, match="repack leaves the units of these layers in their order") as record:
        opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mild", repack=True,
                                   first_roles="drawn", example_inputs=example)  # fmt: skip
    followers, kept = opt.controller._followers, opt.controller._order_kept
    assert [(f.name, f.dim, f.k) for f in followers["layer1.conv1"]] == [
        ("layer1.bn1.weight", 0, 1), ("layer1.bn1.bias", 0, 1), ("layer1.bn1.running_mean", 0, 1),
        ("layer1.bn1.running_var", 0, 1), ("layer1.conv2.weight", 1, 1),
    ]  # fmt: skip
    assert "does not read its 20 outputs" in kept["layer1.conv3"]  # the next conv is the shortcut's
    assert "changes the model's output" in kept["layer2.conv3"]  # the next conv reads it, with the residual
    said = [str(w.message) for w in record if "repack leaves" in str(w.message)]
    assert len(said) == 1 and "layer2.conv3: moving its units changes" in said[0]
    flat, example, _ = _plain("flat")
    opt = LeaderCloneOptimizer(flat, torch.optim.SGD(flat.parameters(), lr=0.1), "mild", repack=True,
                               first_roles="drawn", example_inputs=example)  # fmt: skip
    assert [(f.name, f.dim, f.k) for f in opt.controller._followers["conv2"]] == [("fc.weight", 1, 16)]
    assert set(opt.unit_order()) <= {"conv1", "conv2"} and "conv2" not in opt.controller._order_kept


def test_plain_layers_without_inputs_to_check_on_keep_their_order_and_say_so():
    from conftest import TinySeedNet

    model = TinySeedNet()
    with pytest.warns(UserWarning, match="no inputs to check on") as record:
        opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mild", repack=True,
                                   first_roles="drawn")  # fmt: skip
    assert opt.unit_order() == {}
    assert any("pass example_inputs" in str(w.message) for w in record)


def test_a_checkpoint_of_repacked_plain_layers_resumes_exactly():
    """Plain layers' unit orders and followers' state (moved SGD momentum of the reader's columns) resume bit for
    bit through the next elections."""
    model, opt, _, _ = _plain_run("seed", True, "output", "weight_norm", steps=3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    fresh, example, _ = _plain("seed")
    cfg = EggConfig(clone_mode="output", repack=True, elect_every=2, election="weight_norm", assign="first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = LeaderCloneOptimizer(fresh, torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9), "mild",
                                       config=cfg, example_inputs=example)  # fmt: skip
    fresh.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):  # through two more elections
        x, y = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 4, (6,), generator=gen)
        for m, o in ((model, opt), (fresh, resumed)):
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            o.zero_grad()
    assert {n: o.tolist() for n, o in resumed.unit_order().items()} == {
        n: o.tolist() for n, o in opt.unit_order().items()
    }
    for (k, v), w in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_a_compiled_model_trains_through_repacks_as_the_eager_one(mode):
    """Units moved in place under ``torch.compile`` (the eager backend: the same ops): the compiled run takes the
    eager run's losses and unit orders through three elections."""

    def run(compiled: bool):
        model = _model("llama")
        opt = _opt(model, mode, repack_=True, elect_every=2, election="grad_norm")
        with torch.no_grad():
            model(**tiny.inputs("llama", batch=3, seed=0))  # (norm coupling's eager pass)
        torch._dynamo.reset()
        net = torch.compile(model, backend="eager") if compiled else model
        losses = []
        for step in range(7):
            loss = net(**tiny.inputs("llama", batch=3, seed=step)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, {n: o.tolist() for n, o in opt.unit_order().items()}

    eager, compiled = run(False), run(True)
    assert eager[1] and compiled == eager


def test_stats_count_the_layers_an_election_scattered_and_the_log_says_what_keeps_them_on_views(caplog):
    """``stats()`` says per layer whether its roles are runs (views) and counts the scattered ones; without repack
    the first election that scatters blocks logs it once, naming ``repack``."""
    totals = {}
    for flag in (False, True):
        model = _model("llama")
        opt = _opt(model, "output", repack_=flag, elect_every=2, election="random")  # (the seed's redraw)
        assert opt.stats()["total"]["scattered"] == 0  # the packed first roles
        with caplog.at_level("INFO", logger="egg_optim"):
            caplog.clear()
            for step in range(5):  # elections at steps 2 and 4
                model(**tiny.inputs("llama", batch=3, seed=step)).loss.backward()
                opt.step()
                opt.zero_grad()
        said = [r.getMessage() for r in caplog.records if "scattered the roles" in r.getMessage()]
        stats = opt.stats()
        totals[flag] = stats["total"]["scattered"]
        assert totals[flag] == sum(not e["runs"] for e in stats["layers"].values())
        assert len(said) == (0 if flag else 1) and (flag or "repack=True" in said[0])
    assert totals[False] > 0 and totals[True] == 0


@pytest.mark.parametrize("family", ["gemma3", "t5", "mixtral", "gemma3n"])
def test_the_check_by_groups_refuses_what_a_check_per_layer_does_in_two_passes_when_all_move(family):
    """The check swaps every layer's units at once and halves a group whose output changed: it refuses exactly the
    layers a check of each layer alone refuses (T5's blocks reading the first block's per-head bias, BLOOM's
    ALiBi heads, Gemma 3n's layers), and where every layer may move it runs the model once, then once with every
    block swapped and once with every plain layer swapped, where the check per layer ran it once per layer, plus
    one; where most are refused, about as often."""
    from egg_optim.core.probe import example_call
    from egg_optim.core.units import build_managed_layers

    model = _model(family)
    plan = RolePlan.preset("mild")
    blocks = {n: c for n, c in plan.candidates(model).items() if hasattr(c, "slices")}
    layers = build_managed_layers(model, list(plan.resolve(model)), None, groups=blocks)
    followers, kept = repack.plain_followers(model, layers)
    call = example_call(model, None)
    passes = []
    handle = model.register_forward_pre_hook(lambda *_: passes.append(1))
    grouped = repack.orders_that_change_the_model(model, layers, call, followers)
    n_grouped, passes[:] = len(passes), []
    alone = {}
    for name in layers:
        alone |= repack.orders_that_change_the_model(model, {name: layers[name]}, call, followers)
    handle.remove()
    assert set(grouped) == set(alone) and all(grouped.values())
    checked = [n for n, layer in layers.items() if layer.group is not None or n in followers]
    assert len(checked) >= 2
    per_layer = len(checked) + 1  # what a pass per layer cost (and the reference)
    kinds = {layers[n].group is None for n in checked}  # blocks, plain layers: a pass each
    assert n_grouped == 1 + len(kinds) < per_layer if not grouped else n_grouped <= per_layer * 1.3, n_grouped
