"""Gradient skipping: plain forward, plain input gradient, weight gradients for active rows only."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from egg_optim.core.roles import Roles
from egg_optim.errors import ConfigError, PlanError
from egg_optim.rewrites.grad_skip import GradSkip, is_grad_skipped
from egg_optim.rewrites.output_cloning import OutputCloning

# the plain module warns (once) for padding="same" with an even kernel extent, which the tests cover on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TIGHT = {"rtol": 1e-4, "atol": 1e-5}  # float32 sums in another order (fewer rows, other kernel)


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def poison_uninitialised_memory():
    """Deterministic mode fills ``torch.empty`` with NaN, so a gradient row left unwritten cannot pass as zero."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(was)


def random_roles(n: int, gen: torch.Generator, p_clone: float = 0.5) -> Roles:
    """Random roles with at least one leader and, when ``p_clone > 0`` and ``n > 1``, at least one clone."""
    u = torch.rand(n, generator=gen)
    codes = torch.where(u < p_clone, 2, torch.where(u < p_clone + 0.15, 1, 0))
    first = int(torch.randint(0, n, (1,), generator=gen))
    codes[first] = 0
    if p_clone > 0 and n > 1 and not (codes == 2).any():
        codes[(first + 1) % n] = 2
    leaders = torch.nonzero(codes == 0).flatten()
    clones = torch.nonzero(codes == 2).flatten()
    sources = leaders[torch.randint(0, leaders.numel(), (clones.numel(),), generator=gen)]
    return Roles(n, leaders, torch.nonzero(codes == 1).flatten(), clones, sources)


@st.composite
def layer_cases(draw):
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d", "conv3d"]))
    case = {
        "kind": kind,
        "cin": draw(st.integers(1, 4)),
        "cout": draw(st.integers(1, 9)),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
        "p_clone": draw(st.sampled_from([0.0, 0.3, 0.6, 0.9])),
        "input_grad": draw(st.booleans()),
    }
    if kind == "linear":
        case["lead"] = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))  # () is a 1-D input
        return case
    padding = draw(st.sampled_from([0, 1, 2, "same", "valid"]))
    case.update(
        k=draw(st.integers(1, 3)),
        stride=1 if padding == "same" else draw(st.integers(1, 2)),
        padding=padding,
        dilation=draw(st.integers(1, 2)),
        padding_mode=draw(st.sampled_from(["zeros", "circular", "reflect", "replicate"])),
        batch=draw(st.integers(1, 3)),
        size=draw(st.integers(5, 7) if kind != "conv3d" else st.integers(4, 5)),
    )
    case["size"] = max(case["size"], case["dilation"] * (case["k"] - 1) + 1)  # the kernel fits the input
    return case


def build_layer(case) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(case["seed"])
    if case["kind"] == "linear":
        layer = nn.Linear(case["cin"], case["cout"], bias=case["bias"])
        return layer, torch.randn(*case["lead"], case["cin"])
    dims = int(case["kind"][-2])
    layer = CONVS[dims](
        case["cin"],
        case["cout"],
        case["k"],
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        bias=case["bias"],
        padding_mode=case["padding_mode"],
    )
    return layer, torch.randn((case["batch"], case["cin"]) + (case["size"],) * dims)


def run_layer(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor | None = None, input_grad: bool = True):
    """Output, output gradient used, and the gradients of (input, weight, bias)."""
    x = x.detach().clone().requires_grad_(input_grad)
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) if grad_out is None else grad_out
    y.backward(g)
    grads = [None if t is None or t.grad is None else t.grad.clone() for t in (x, layer.weight, layer.bias)]
    return y.detach(), g, grads


def assert_skipped_grads(got, want, roles: Roles) -> None:
    """Active rows match the plain gradient; clone rows are exactly zero."""
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is None:
            continue
        torch.testing.assert_close(g[roles.active], w[roles.active], **TIGHT)
        assert torch.equal(g[roles.clones], torch.zeros_like(g[roles.clones]))


class OpLog(TorchDispatchMode):
    """Records (op name, args) of every aten op run while active (backward included)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.overloadpacket.__name__, args))
        return func(*args, **(kwargs or {}))

    def named(self, name: str) -> list[tuple]:
        return [a for n, a in self.calls if n == name]


def uses_skip(y: torch.Tensor) -> bool:
    """Whether the graph of ``y`` holds a GradSkip backward node (found by walking ``grad_fn``)."""
    todo, seen = [y.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ in ("_LinearFnBackward", "_ConvFnBackward"):
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


def half_roles(n: int) -> Roles:
    """Even units lead, odd units clone their left neighbour."""
    leaders = torch.arange(0, n, 2)
    clones = torch.arange(1, n, 2)
    return Roles(n, leaders, torch.empty(0, dtype=torch.long), clones, clones - 1)


def snapshot(model: nn.Module):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        [(n, p) for n, p in model.named_parameters()],
        [(n, b) for n, b in model.named_buffers()],
        list(model.state_dict()),
    )


def assert_same_snapshot(a, b) -> None:
    assert a[0] == b[0] and a[3] == b[3]
    for i in (1, 2):
        assert [n for n, _ in a[i]] == [n for n, _ in b[i]] and all(p is q for (_, p), (_, q) in zip(a[i], b[i]))


# ---------------------------------------------------------------------------------------------- layers
@SETTINGS
@given(layer_cases())
def test_layer_forward_and_input_grad_are_plain_weight_grad_skips_clone_rows(case):
    plain, x = build_layer(case)
    skip = copy.deepcopy(plain)
    roles = random_roles(case["cout"], torch.Generator().manual_seed(case["seed"]), case["p_clone"])
    GradSkip(skip, {"": roles}, min_clone_fraction=0.0)
    y_plain, g, want = run_layer(plain, x, input_grad=case["input_grad"])
    y_skip, _, got = run_layer(skip, x, g, input_grad=case["input_grad"])
    assert torch.equal(y_skip, y_plain)  # bit for bit
    if case["input_grad"]:
        assert torch.equal(got[0], want[0])  # the same op on the same tensors as plain autograd
    else:
        assert got[0] is None
    if roles.has_clones:
        assert_skipped_grads(got[1:], want[1:], roles)
    else:  # the plain path: every gradient identical
        assert all(torch.equal(a, b) for a, b in zip(got[1:], want[1:]) if b is not None)


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Linear(5, 6), torch.randn(2, 3, 5)),
        (nn.Conv1d(3, 6, 3, padding=1), torch.randn(3, 7)),  # unbatched conv input
        (nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular"), torch.randn(2, 3, 5, 5)),
    ],
)
def test_custom_backward_runs_only_with_clones_in_grad_mode_training(layer, x):
    skip = copy.deepcopy(layer)
    gs = GradSkip(skip, {"": half_roles(6)}, min_clone_fraction=0.0)
    x = x.requires_grad_()
    assert uses_skip(skip(x)) and not uses_skip(layer(x))
    assert torch.equal(skip(x), layer(x))
    with torch.no_grad():
        assert skip(x).grad_fn is None and torch.equal(skip(x), layer(x))
    skip.eval()
    assert not uses_skip(skip(x))
    skip.train()
    skip.weight.requires_grad_(False)  # frozen weight: plain forward
    assert not uses_skip(skip(x))
    skip.weight.requires_grad_(True)
    assert uses_skip(skip(x))
    gs.update_roles({"": Roles.all_leaders(6)})  # no clones: plain forward
    assert not uses_skip(skip(x))


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Linear(5, 6), torch.randn(2, 3, 5)),
        (nn.Conv1d(3, 6, 3, padding=1), torch.randn(3, 7)),  # unbatched conv input
        (nn.Conv2d(3, 6, 3, padding="same", padding_mode="circular"), torch.randn(2, 3, 5, 5)),
        (nn.Conv2d(3, 6, 2, padding="same"), torch.randn(2, 3, 5, 5)),  # asymmetric "same": pre-padded
        (nn.Conv1d(3, 6, 1), torch.randn(2, 3, 2)),  # pointwise, more active channels than positions: one mm
        (nn.Conv2d(3, 6, 1), torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)),
    ],
)
def test_outputs_and_gradients_of_special_inputs(layer, x):
    skip = copy.deepcopy(layer)
    roles = half_roles(6)
    GradSkip(skip, {"": roles})
    y_plain, g, want = run_layer(layer, x)
    y_skip, _, got = run_layer(skip, x, g)
    assert torch.equal(y_skip, y_plain) and torch.equal(got[0], want[0])
    assert_skipped_grads(got[1:], want[1:], roles)


def test_backward_computes_weight_grads_for_active_channels_only():
    torch.manual_seed(0)
    roles = half_roles(8)  # 4 active
    for layer, x, op in [
        (nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 6, 6), "convolution_backward"),
        (nn.Conv2d(3, 8, 1), torch.randn(2, 3, 6, 6), "bmm"),  # pointwise: batched matmul on CPU
        (nn.Conv1d(3, 8, 1), torch.randn(2, 3, 3), "pointwise mm"),  # 4 active > 3 positions: one matmul
        (nn.Linear(3, 8), torch.randn(4, 3), "mm"),
    ]:
        GradSkip(layer, {"": roles})
        for input_grad in (True, False):
            y = layer(x.clone().requires_grad_(input_grad))
            with OpLog() as log:
                y.backward(torch.ones_like(y))
            if op == "convolution_backward":
                calls = log.named(op)
                masks = [tuple(a[-1]) for a in calls]
                assert masks == ([(True, False, False)] if input_grad else []) + [(False, True, True)]
                assert calls[-1][0].shape[1] == 4 and calls[-1][2].shape[0] == 4  # active grad_out, weight rows
                if input_grad:
                    assert calls[0][0].shape[1] == 8  # the input gradient uses every channel
            elif op == "bmm":
                assert [a[0].shape[1] for a in log.named("bmm")] == [4]
                assert len(log.named("convolution_backward")) == int(input_grad)
            elif op == "pointwise mm":
                assert [tuple(a[0].shape) for a in log.named("mm")] == [(4, 6)] and not log.named("bmm")
                assert len(log.named("convolution_backward")) == int(input_grad)
            else:
                shapes = [(tuple(a[0].shape), tuple(a[1].shape)) for a in log.named("mm")]
                want = [((4, 4), (4, 3))]  # grad_out[:, active].T @ input
                assert shapes == ([((4, 8), (8, 3))] if input_grad else []) + want
            layer.zero_grad()


def test_frozen_bias_gets_no_gradient():
    layer = nn.Conv2d(2, 4, 3)
    layer.bias.requires_grad_(False)
    plain = copy.deepcopy(layer)
    GradSkip(layer, {"": half_roles(4)})
    x = torch.randn(2, 2, 5, 5)
    _, g, want = run_layer(plain, x)
    _, _, got = run_layer(layer, x, g)
    assert got[2] is None and want[2] is None
    torch.testing.assert_close(got[0], want[0], **TIGHT)
    assert_skipped_grads(got[1:2], want[1:2], half_roles(4))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_autocast_bfloat16_matches_plain_autocast(kind):
    torch.manual_seed(0)
    layer, x = (
        (nn.Linear(6, 8), torch.randn(4, 6)) if kind == "linear" else (nn.Conv2d(3, 8, 3), torch.randn(2, 3, 6, 6))
    )
    plain = copy.deepcopy(layer)
    roles = half_roles(8)
    GradSkip(layer, {"": roles})
    outs = []
    for m in (plain, layer):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xi)
        y.float().square().sum().backward()
        outs.append((y, xi.grad, m.weight.grad, m.bias.grad))
    (yp, *gp), (ys, *gs) = outs
    assert ys.dtype == torch.bfloat16 and torch.equal(ys, yp)
    assert [g.dtype for g in gs] == [torch.float32] * 3
    assert torch.equal(gs[0], gp[0])
    assert_skipped_grads(gs[1:], gp[1:], roles)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_double_backward_gives_plain_input_gradient_and_active_weight_rows(kind):
    """A gradient penalty differentiates through the input gradient (full weight: plain) and through the layer's
    forward again (clone rows skipped): active rows match plain autograd, clone rows are unused."""
    torch.manual_seed(0)
    layer, x = (
        (nn.Linear(5, 6), torch.randn(3, 5)) if kind == "linear" else (nn.Conv2d(2, 6, 3), torch.randn(2, 2, 5, 5))
    )
    plain = copy.deepcopy(layer)
    roles = half_roles(6)
    GradSkip(layer, {"": roles})
    results = []
    for m in (plain, layer):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(torch.tanh(m(xi)).sum(), xi, create_graph=True)
        gx.square().sum().backward()
        results.append((gx.detach(), m.weight.grad, m.bias.grad))
    torch.testing.assert_close(results[1][0], results[0][0], **TIGHT)
    for got, want in zip(results[1][1:], results[0][1:]):
        torch.testing.assert_close(got[roles.active], want[roles.active], **TIGHT)


# ---------------------------------------------------------------------------------------------- roles
def test_update_roles_mid_run_gives_the_new_active_set():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 8, 3, padding=1)
    plain = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(3)
    first, second = random_roles(8, gen, 0.5), random_roles(8, gen, 0.5)
    assert not torch.equal(first.active, second.active)
    gs = GradSkip(layer, {"": first}, min_clone_fraction=0.0)
    x = torch.randn(2, 3, 5, 5)
    for roles in (first, second, Roles.all_leaders(8), first):
        gs.update_roles({"": roles})
        plain.zero_grad(), layer.zero_grad()
        _, g, want = run_layer(plain, x)
        _, _, got = run_layer(layer, x, g)
        assert torch.equal(layer._egg_gs_active, roles.active)
        assert_skipped_grads(got[1:], want[1:], roles)
        assert gs.roles[""] is roles


def test_min_clone_fraction_keeps_layers_with_few_clones_plain():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 8, 3)
    plain = copy.deepcopy(layer)
    few = Roles(8, torch.arange(6), torch.empty(0, dtype=torch.long), torch.tensor([6, 7]), torch.tensor([0, 1]))
    gs = GradSkip(layer, {"": few})  # default 0.5: 2 clones of 8 is too few
    x = torch.randn(2, 3, 5, 5)
    assert gs.min_clone_fraction == 0.5 and gs.skipping == {"": False}
    assert not uses_skip(layer(x.requires_grad_()))
    _, g, want = run_layer(plain, x)
    _, _, got = run_layer(layer, x, g)
    assert all(torch.equal(a, b) for a, b in zip(got, want))  # the plain op, clone rows included
    gs.update_roles({"": half_roles(8)})  # exactly half: skipped
    assert gs.skipping == {"": True} and uses_skip(layer(x))
    gs.remove()
    assert gs.skipping == {}
    gs = GradSkip(layer, {"": few}, min_clone_fraction=0.25)
    assert gs.skipping == {"": True} and uses_skip(layer(x))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="min_clone_fraction"):
            GradSkip(nn.Linear(2, 4), {"": half_roles(4)}, min_clone_fraction=bad)


def test_update_roles_rebuilds_indices_only_on_change():
    layer = nn.Linear(4, 6)
    roles = half_roles(6)
    gs = GradSkip(layer, {"": roles})
    buf = layer._egg_gs_active
    gs.update_roles({"": half_roles(6)})  # equal roles, new object
    assert layer._egg_gs_active is buf
    gs.update_roles({"": Roles.all_leaders(6)})
    assert layer._egg_gs_active is not buf and gs.skipping == {"": False}


def test_update_roles_validates_before_changing_anything():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 6))
    gs = GradSkip(model, {"0": half_roles(4), "1": half_roles(6)})
    before = (model[0]._egg_gs_active, model[1]._egg_gs_active)
    for bad, match in [
        ({"0": Roles.all_leaders(4), "9": half_roles(4)}, "'9'"),
        ({"0": Roles.all_leaders(4), "1": half_roles(4)}, "4 units"),
        ({"0": Roles.all_leaders(4), "1": "x"}, "str"),
    ]:
        with pytest.raises(PlanError, match=match):
            gs.update_roles(bad)
        assert (model[0]._egg_gs_active, model[1]._egg_gs_active) == before
        assert gs.roles["0"].has_clones
    gs.remove()
    with pytest.raises(PlanError, match="removed"):
        gs.update_roles({"0": half_roles(4)})


def test_active_index_is_a_non_persistent_buffer_that_follows_the_module():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(4, 6))
    keys = list(model.state_dict())
    GradSkip(model, {"0": half_roles(4), "2": half_roles(6)})
    assert list(model.state_dict()) == keys
    assert "_egg_gs_active" in dict(model[0].named_buffers())
    model.to(torch.float64)  # a dtype move keeps the index a LongTensor
    assert model[0]._egg_gs_active.dtype == torch.long
    y = model(torch.randn(2, 2, 3, dtype=torch.float64))
    y.sum().backward()
    assert model[2].weight.grad.dtype == torch.float64 and not model[2].weight.grad[1::2].any()
    twin = copy.deepcopy(model)  # a copy keeps the rewrite and its own indices
    assert is_grad_skipped(twin[0]) and twin[0]._egg_gs_active is not model[0]._egg_gs_active
    twin.to("meta")  # a device move takes the indices along
    assert twin[0]._egg_gs_active.device.type == "meta" and twin[2]._egg_gs_clones.device.type == "meta"


# ---------------------------------------------------------------------------------------------- lifecycle
def test_remove_restores_classes_and_plain_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 6))
    before = snapshot(model)
    calls = []
    model[3].register_forward_hook(lambda m, i, o: calls.append(1))
    with GradSkip(model, {"0": half_roles(4), "3": half_roles(6)}) as gs:
        assert is_grad_skipped(model[0]) and is_grad_skipped(model[3]) and not is_grad_skipped(model[1])
        assert isinstance(model[0], nn.Conv2d) and isinstance(model[3], nn.Linear)
        model(torch.randn(2, 2, 5, 5)).sum().backward()
        assert len(calls) == 1  # hooks registered before still run
        assert not model[0].weight.grad[1::2].any() and not model[3].weight.grad[1::2].any()
    assert gs.removed and gs.remove() is model  # idempotent
    assert_same_snapshot(snapshot(model), before)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert not any(n.startswith("_egg") for m in model.modules() for n in vars(m))
    assert not any("_egg" in n for n, _ in model.named_buffers())
    model.zero_grad()
    model(torch.randn(2, 2, 5, 5)).sum().backward()
    assert model[0].weight.grad[1::2].any() and model[3].weight.grad[1::2].any()


def test_module_and_parameter_objects_are_kept():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6))
    before = snapshot(model)
    modules = list(model.modules())
    GradSkip(model, {"0": half_roles(4), "2": Roles.all_leaders(6)})
    after = snapshot(model)
    assert all(a is b for a, b in zip(model.modules(), modules))
    assert [n for n, _ in after[0]] == [n for n, _ in before[0]] and after[3] == before[3]  # state_dict keys
    assert [n for n, _ in after[1]] == [n for n, _ in before[1]]
    assert all(p is q for (_, p), (_, q) in zip(after[1], before[1]))


def _validation_model() -> nn.Module:
    shared = nn.Linear(4, 4)
    return nn.ModuleDict(
        {
            "fc": nn.Linear(3, 4),
            "conv": nn.Conv2d(4, 6, 3),
            "grouped": nn.Conv2d(4, 6, 3, groups=2),
            "bn": nn.BatchNorm1d(4),
            "lazy": nn.LazyLinear(4),
            "a": shared,
            "b": shared,
            "oc": nn.Linear(4, 4),
        }
    )


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"nope": half_roles(4)}, "'nope'"),
        ({"bn": half_roles(4)}, "'bn' is a BatchNorm1d"),
        ({"conv": half_roles(4)}, "'conv'.*4 units.*6 outputs"),
        ({"lazy": half_roles(4)}, "'lazy'.*lazy"),
        ({"grouped": half_roles(6)}, "'grouped'.*groups=2"),
        ({"a": half_roles(4), "b": half_roles(4)}, "'a' and 'b'"),
        ({"conv": [0, 1]}, "roles\\['conv'\\].*list"),
        ({"oc": half_roles(4)}, "'oc'.*output cloning"),
    ],
)
def test_validation_errors_name_the_value_and_leave_the_model_untouched(bad, match):
    model = _validation_model()
    OutputCloning(model, {"oc": half_roles(4)})
    before = snapshot(model)
    roles = {"fc": half_roles(4), **bad}  # a valid layer first: it must not be rewritten either
    with pytest.raises(PlanError, match=match):
        GradSkip(model, roles)
    assert_same_snapshot(snapshot(model), before)
    assert not any(is_grad_skipped(m) for m in model.modules())


def test_applying_twice_and_non_module_are_refused():
    model = nn.Sequential(nn.Linear(3, 4))
    GradSkip(model, {"0": half_roles(4)})
    with pytest.raises(PlanError, match="'0' is already under GradSkip"):
        GradSkip(model, {"0": half_roles(4)})
    with pytest.raises(PlanError, match="list"):
        GradSkip([model], {})


# ---------------------------------------------------------------------------------------------- training
def test_training_equals_plain_training_with_clone_rows_zeroed():
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 10),
        nn.ReLU(),
        nn.Linear(10, 4),
    )
    skip = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(1)
    names = ["0", "2", "6"]

    def draw():
        return {n: random_roles(plain.get_submodule(n).weight.shape[0], gen, 0.5) for n in names}

    roles = draw()
    gs = GradSkip(skip, roles, min_clone_fraction=0.0)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, skip)]
    data = torch.Generator().manual_seed(2)
    for step in range(6):
        if step == 3:  # an election mid-run
            roles = draw()
            gs.update_roles(roles)
        x, t = torch.randn(8, 1, 6, 6, generator=data), torch.randint(0, 4, (8,), generator=data)
        for m, opt in zip((plain, skip), opts):
            opt.zero_grad()
            F.cross_entropy(m(x), t).backward()
        for n in names:  # the reference zeroes clone rows by hand
            layer = plain.get_submodule(n)
            for p in (layer.weight, layer.bias):
                p.grad[roles[n].clones] = 0
            got = skip.get_submodule(n)
            assert not got.weight.grad[roles[n].clones].any() and not got.bias.grad[roles[n].clones].any()
        for opt in opts:
            opt.step()
    for (name, a), b in zip(plain.named_parameters(), skip.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- in the optimizer
def _wrapped(seed: int = 0, **kwargs):
    from conftest import TinySeedNet

    from egg_optim import LeaderCloneOptimizer, RolePlan

    torch.manual_seed(seed)
    model = TinySeedNet()
    opt = LeaderCloneOptimizer(
        model, torch.optim.Adam(model.parameters(), lr=1e-2), RolePlan.preset("aggressive", table="mnist"), **kwargs
    )
    return model, opt


def _one_step(model, opt, gen):
    model(torch.randn(4, 1, 6, 6, generator=gen)).logsumexp(1).mean().backward()


def test_weight_mode_turns_it_on_unless_the_score_reads_gradients():
    _, opt = _wrapped()
    assert opt.grad_skip is not None and set(opt.grad_skip.layers) == set(opt.layers)
    _, opt = _wrapped(election="grad_norm")
    assert opt.grad_skip is None
    _, opt = _wrapped(election="grad_norm", skip_clone_grads=True)
    assert opt.grad_skip is not None
    _, opt = _wrapped(skip_clone_grads=False)
    assert opt.grad_skip is None
    model, opt = _wrapped(clone_mode="output")
    assert opt.grad_skip is None and not any(is_grad_skipped(m) for m in model.modules())
    with pytest.raises(ConfigError, match="skip_clone_grads"):
        _wrapped(skip_clone_grads="yes")


def test_training_with_skip_matches_plain_autograd_and_follows_elections():
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ma, a = _wrapped(clone_every=2, elect_every=3)
    mb, b = _wrapped(clone_every=2, elect_every=3, skip_clone_grads=False)
    assert any(a.grad_skip.skipping.values())
    for _ in range(7):
        mb.load_state_dict(ma.state_dict())  # compare gradients at the same weights
        _one_step(ma, a, gen_a)
        _one_step(mb, b, gen_b)
        for name, roles in a.roles.items():
            assert roles.same_as(b.roles[name])
            grad = a.layers[name].weight.grad
            if a.grad_skip.skipping[name]:
                assert torch.all(grad[roles.clones] == 0)
            assert torch.allclose(grad[roles.active], b.layers[name].weight.grad[roles.active], **TIGHT)
        a.step(), b.step()
        a.zero_grad(), b.zero_grad()
    assert a.elections == 2
    for name, roles in a.roles.items():  # the rewritten layers follow the elected roles
        assert a.grad_skip.roles[name].same_as(roles)


def test_export_and_remove_give_plain_modules():
    model, opt = _wrapped()
    plain = opt.export_model()
    assert not any(is_grad_skipped(m) for m in plain.modules())
    assert any(is_grad_skipped(m) for m in model.modules())
    opt.remove_grad_skip()
    assert opt.grad_skip is None and not any(is_grad_skipped(m) for m in model.modules())
    opt.elect_now()  # no listener left behind


def test_egg_config_keeps_plain_autograd_for_lfnn_runs():
    from conftest import mlp

    from egg_optim import EggConfig, LeaderCloneOptimizer

    model = mlp((6, 20, 20, 3))
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    assert LeaderCloneOptimizer(model, base, config=EggConfig(plan="mild")).grad_skip is not None
    model = mlp((6, 20, 20, 3))
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = EggConfig(plan="mild", local_losses={"layers": ["0"], "num_classes": 3, "worker_size": 5})
    assert LeaderCloneOptimizer(model, base, config=cfg).grad_skip is None


# ---------------------------------------------------------------------------------------------- blocks
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out_f=st.integers(1, 6),
    units=st.integers(2, 6),
    width=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    packed=st.booleans(),
    bias=st.booleans(),
)
def test_a_consumers_weight_gradient_skips_its_clone_columns(out_f, units, width, seed, packed, bias):
    """The columns variant (a block's consumer, whose units are its input columns): the input and bias gradients
    are plain autograd's, the weight gradient's active columns are plain autograd's and its clone columns exact
    zeros, whether the roles are runs (padding) or scattered (index ops)."""
    from egg_optim.rewrites.grad_skip import _LinearFn

    gen = torch.Generator().manual_seed(seed)
    n_active = int(torch.randint(1, units, (1,), generator=gen))
    order = torch.arange(units) if packed else torch.randperm(units, generator=gen)
    roles = Roles(units, order[:n_active], torch.tensor([], dtype=torch.long), order[n_active:],
                  order[:1].repeat(units - n_active))  # fmt: skip
    er = roles.expand(torch.arange(units * width).view(units, width))
    spans = (er.active_span, er.clone_span) if None not in (er.active_span, er.clone_span) else None
    x = torch.randn(3, 2, units * width, generator=gen, requires_grad=True)
    w = torch.randn(out_f, units * width, generator=gen, requires_grad=True)
    b = torch.randn(out_f, generator=gen, requires_grad=True) if bias else None
    g = torch.randn(3, 2, out_f, generator=gen)
    want = torch.autograd.grad(F.linear(x, w, b), [x, w, *([b] if bias else [])], g)
    got = torch.autograd.grad(
        _LinearFn.apply(x, w, b, (er.active, er.clones, spans, True)), [x, w, *([b] if bias else [])], g
    )
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1][:, er.active], want[1][:, er.active])
    assert torch.equal(got[1][:, er.clones], torch.zeros_like(got[1][:, er.clones]))
    if bias:
        torch.testing.assert_close(got[2], want[2])


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("first_roles", ["packed", "drawn"])
def test_weight_mode_skips_the_clone_rows_and_columns_of_transformer_blocks(family, first_roles):
    """Weight mode rewrites each block's producers (rows) and consumer (input columns): while a member's clones are
    one run (packed roles) its clone rows or columns get exact zeros after a backward pass, the active ones what plain
    autograd computes; with scattered roles (drawn, or after an election) it computes as it is, with no index op
    over its gradient; training follows the unskipped run throughout."""
    tiny = pytest.importorskip("egg_recipes.tiny_transformers")
    from egg_optim import LeaderCloneOptimizer, RolePlan

    def build(skip):
        torch.manual_seed(0)
        model = tiny.make(family)
        base = torch.optim.AdamW(model.parameters(), lr=1e-3)
        plan, options = RolePlan(0.4, 0.1), {"first_roles": first_roles, "skip_clone_grads": skip, "seed": 1}
        return model, LeaderCloneOptimizer(model, base, plan, clone_mode="weight", **options)

    (model, opt), (plain, plain_opt) = build(True), build(False)
    skipping = [rw for rw in opt.controller.rewrites if type(rw).__name__ == "BlockGradSkip"]
    assert skipping and set(skipping[0].layers) == {n for n, lay in opt.layers.items() if lay.group is not None}
    for step in range(3):
        for m in (model, plain):
            m.train()
            torch.manual_seed(step)
            m(**tiny.inputs(family, seed=step)).loss.backward()
        for name, rows in skipping[0]._parts.items():
            group = opt.layers[name].group  # every producer and the consumer are rewritten
            assert {m for m, _, cols in rows if cols} == {group.consumer}
            assert {m for m, _, cols in rows if not cols} == set(group.producers)
            roles = opt.roles[name]
            for member, index, cols in rows:
                got, want = (dict(m.named_parameters())[f"{member}.weight"].grad for m in (model, plain))
                er = roles.expand(index)
                runs = None not in (er.active_span, er.clone_span)
                assert skipping[0]._layers[member]._egg_gs_skip == runs
                assert runs or first_roles == "drawn" or step == 2  # packed until the election
                dim = 1 if cols else 0
                clones = got.index_select(dim, er.clones)
                assert torch.equal(clones, torch.zeros_like(clones)) == runs
                torch.testing.assert_close(got.index_select(dim, er.active), want.index_select(dim, er.active))
        for o in (opt, plain_opt):
            o.step()
            o.zero_grad()
        if step == 1:  # new roles (random scores), in both runs alike
            before = dict(opt.roles)
            for o in (opt, plain_opt):
                o.elect_now()
            assert any(not opt.roles[n].same_as(r) for n, r in before.items())
    for a, b in zip(model.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_block_members_holding_other_unit_slices_compute_as_they_are():
    """Only plain ``nn.Linear`` members whose unit slices are their weight rows (and bias) or input columns take the
    split backward; a member holding another unit slice (a per-head table, here a made-up one) is left as it is."""
    from egg_optim.core.blocks import UnitGroup, UnitSlice
    from egg_optim.rewrites.grad_skip import block_linears

    model = nn.ModuleDict({"up": nn.Linear(4, 6), "down": nn.Linear(6, 4, bias=False)})
    model["up"].register_parameter("table", nn.Parameter(torch.zeros(6)))
    rows = torch.arange(6).view(3, 2)
    slices = [
        UnitSlice("up.weight", 0, rows),
        UnitSlice("up.bias", 0, rows),
        UnitSlice("down.weight", 1, rows, "consumer"),
    ]
    group = UnitGroup("mlp", "mlp", 3, slices, ["up"], "down")
    assert [(m, cols) for m, _, cols in block_linears(model, {"mlp": group})["mlp"]] == [("up", False), ("down", True)]
    for held in ([slices[0]], slices[:2]):  # a table beside the weight rows (with or without the bias's)
        group.slices = [*held, UnitSlice("up.table", 0, rows), slices[2]]
        assert [(m, cols) for m, _, cols in block_linears(model, {"mlp": group})["mlp"]] == [("down", True)]


def test_the_direct_entry_point_computes_what_function_apply_does_and_defers_to_it_under_transforms():
    """``direct_apply`` calls an autograd function's C entry point (no Python wrapper on the host path): outputs
    and gradients bit for bit ``Function.apply``'s; under a ``torch.func`` transform it goes through
    ``Function.apply`` (the C entry point alone fails under ``vmap``)."""
    from egg_optim.rewrites import grad_skip
    from egg_optim.rewrites.output_cloning import _gather

    roles = Roles(6, torch.arange(3), torch.empty(0, dtype=torch.long), torch.arange(3, 6), torch.arange(3))
    args = (roles.active, roles.clones, (roles.active_span, roles.clone_span), False)  # packed: runs
    grads = []
    for apply in (grad_skip._LinearFn.apply, grad_skip._linear_fn):
        torch.manual_seed(1)
        x = torch.randn(5, 4, requires_grad=True)
        w = torch.randn(6, 4, requires_grad=True)
        y = apply(x, w, None, args)
        y.backward(torch.randn_like(y))
        grads.append((y, x.grad, w.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert grads[0][2][roles.clones].eq(0).all() and grads[0][2][roles.active].ne(0).all()  # the function ran
    y, gather = torch.randn(3, 4, 2), torch.tensor([0, 1, 0, 1, 0])
    batched = torch.func.vmap(lambda v: _gather._expand_packed(v, 0, gather, None))(y)
    assert torch.equal(batched, y[:, gather])


def test_a_skipping_layers_output_can_be_written_in_place():
    """With a bias and a batched input ``F.linear`` returns a view of its 2-D product: the split backward's function
    hands it on as a tensor of its own, so an in-place op after the layer (``ReLU(inplace=True)``, Swin V2's position
    MLP) runs as on the plain layer, with the plain layer's output and input gradient."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(2, 6), nn.ReLU(inplace=True), nn.Linear(6, 4))
    skip = copy.deepcopy(plain)
    GradSkip(skip, {"0": half_roles(6)}, min_clone_fraction=0.0)
    x = torch.randn(1, 3, 3, 2)
    outs = []
    for model in (plain, skip):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert skip[0].weight.grad[half_roles(6).clones].eq(0).all()


def test_a_skipping_layer_compiles_without_a_graph_break_and_trains_as_in_eager():
    """Dynamo traces the split backward's function (``fullgraph``: no break at its entry point); the compiled layer's
    gradients equal eager's, clone rows zero."""
    import torch._dynamo.testing

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
        packed = Roles(6, torch.arange(3), torch.empty(0, dtype=torch.long), torch.arange(3, 6), torch.arange(3))
        GradSkip(model, {"0": packed}, min_clone_fraction=0.0)
        return model

    x = torch.randn(5, 8)
    eager, compiled = build(), build()
    eager(x).sum().backward()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch.compile(compiled, backend=counter, fullgraph=True)(x).sum().backward()
    assert counter.frame_count == 1
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert compiled[0].weight.grad[3:].eq(0).all() and compiled[0].weight.grad[:3].ne(0).any()


def test_a_device_listed_in_min_work_splits_only_calls_with_enough_weight_gradient_work(monkeypatch):
    """On a device type in ``MIN_WORK`` (CUDA by default; the CPU here, for the test) a call takes the split backward
    only from that much work (tokens x weight elements): below it the plain op computes every row's gradient (no
    host time for the function), from it the clones' rows are exact zeros. Decided per call, from shapes only."""
    from egg_optim.rewrites import grad_skip

    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    packed = Roles(6, torch.arange(3), torch.empty(0, dtype=torch.long), torch.arange(3, 6), torch.arange(3))
    GradSkip(layer, {"": packed}, min_clone_fraction=0.0)
    work = 5 * 8 * 6  # 5 tokens x 48 weight elements
    for floor, split in ((work + 1, False), (work, True), (0, True)):
        monkeypatch.setitem(grad_skip.MIN_WORK, "cpu", floor)
        layer.weight.grad = None
        layer(torch.randn(5, 8)).sum().backward()
        assert bool(layer.weight.grad[3:].eq(0).all()) == split, floor
