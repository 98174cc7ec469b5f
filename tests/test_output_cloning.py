"""Output cloning: clones carry their source leader's output; only leaders and independents are computed."""

from __future__ import annotations

import copy
import io
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from egg_optim.core.roles import Roles
from egg_optim.errors import ConfigError, PlanError
from egg_optim.rewrites.output_cloning import (
    OutputCloning,
    _kernel,
    export_plain,
    export_state_dict,
    is_output_cloned,
    native_kernels_available,
)

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("linear", "conv1d", "conv2d", "conv3d")
NORMS = {"linear": nn.BatchNorm1d, "conv1d": nn.BatchNorm1d, "conv2d": nn.BatchNorm2d, "conv3d": nn.BatchNorm3d}
NO_KERNEL = os.environ.get("EGG_OPTIM_NO_KERNEL", "") not in ("", "0") or not (
    shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
)


# ---------------------------------------------------------------------------------------------- helpers
def random_roles(n: int, gen: torch.Generator, p_clone: float = 0.5) -> Roles:
    """Random roles with at least one leader; each clone copies a random leader."""
    u = torch.rand(n, generator=gen)
    codes = torch.where(u < p_clone, 2, torch.where(u < p_clone + 0.15, 1, 0))
    codes[torch.randint(0, n, (1,), generator=gen)] = 0
    leaders = torch.nonzero(codes == 0).flatten()
    clones = torch.nonzero(codes == 2).flatten()
    sources = leaders[torch.randint(0, leaders.numel(), (clones.numel(),), generator=gen)]
    return Roles(n, leaders, torch.nonzero(codes == 1).flatten(), clones, sources)


@st.composite
def layer_cases(draw, kinds=KINDS):
    kind = draw(st.sampled_from(kinds))
    case = {
        "kind": kind,
        "cin": draw(st.integers(1, 4)),
        "cout": draw(st.integers(1, 9)),
        "batch": draw(st.integers(2, 4)),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
        "p_clone": draw(st.sampled_from([0.0, 0.3, 0.6, 0.9])),
    }
    pointwise = draw(st.booleans())  # 1x1, stride 1, no padding: the batched-matmul path
    if kind != "linear":
        case.update(
            k=1 if pointwise else draw(st.integers(1, 3)),
            stride=1 if pointwise else draw(st.integers(1, 2)),
            padding=0 if pointwise else draw(st.integers(0, 1)),
            dilation=draw(st.integers(1, 2)),
            padding_mode=draw(st.sampled_from(["zeros", "circular"])),
            size=draw(st.integers(5, 7) if kind != "conv3d" else st.integers(4, 5)),
        )
        case["size"] = max(case["size"], case["dilation"] * (case["k"] - 1) + 1)  # kernel fits the input
    return case


def build_layer(case) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(case["seed"])
    kind, cin, cout = case["kind"], case["cin"], case["cout"]
    if kind == "linear":
        return nn.Linear(cin, cout, bias=case["bias"]), torch.randn(case["batch"], cin)
    dims = int(kind[-2])
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](
        cin,
        cout,
        case["k"],
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        bias=case["bias"],
        padding_mode=case["padding_mode"],
    )
    return conv, torch.randn((case["batch"], cin) + (case["size"],) * dims)


def reference_layer(layer: nn.Module, x: torch.Tensor, roles: Roles) -> torch.Tensor:
    """Straightforward output cloning: the full op, then overwrite each clone's channel with its source's."""
    y = type(layer).forward(layer, x).clone()  # the original class's forward, every unit computed
    dim = -1 if isinstance(layer, nn.Linear) else 1
    for c, s in zip(roles.clones.tolist(), roles.sources.tolist()):
        y.select(dim, c).copy_(y.select(dim, s))
    return y


def reference_norm(y: torch.Tensor, norm: nn.Module, roles: Roles, training: bool):
    """BatchNorm over the full (already cloned) tensor where every clone channel uses its source's statistics.

    Returns the output and the expected running statistics (active rows updated, clone rows unchanged)."""
    use_batch = training or norm.running_mean is None
    factor = 0.0 if norm.momentum is None else norm.momentum
    if training and norm.track_running_stats:
        factor = 1.0 / float(norm.num_batches_tracked + 1) if norm.momentum is None else norm.momentum
    if norm.running_mean is None or (training and not norm.track_running_stats):
        out = F.batch_norm(y, None, None, norm.weight, norm.bias, use_batch, factor, norm.eps)
        return out, None, None
    rm = norm.running_mean.detach()[roles.source_map].clone()
    rv = norm.running_var.detach()[roles.source_map].clone()
    out = F.batch_norm(y, rm, rv, norm.weight, norm.bias, use_batch, factor, norm.eps)
    exp_m, exp_v = norm.running_mean.detach().clone(), norm.running_var.detach().clone()
    exp_m[roles.active], exp_v[roles.active] = rm[roles.active], rv[roles.active]
    return out, exp_m, exp_v


def grads(params) -> list[torch.Tensor | None]:
    return [None if p is None or p.grad is None else p.grad.detach().clone() for p in params]


def assert_close_grads(got, want, **tol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None or g is None:
            assert (g is None or not g.any()) and (w is None or not w.any())
        else:
            torch.testing.assert_close(g, w, **tol)


class Block(nn.Module):
    """The seed's Bottleneck shape (conv1 1x1 / conv2 3x3 / conv3 1x1 + BN, conv shortcut), tiny widths."""

    def __init__(self, cin=3, mid=6, cout=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = Block(3, 6, 8)
        self.layer2 = Block(8, 4, 8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 7), nn.ReLU(), nn.Linear(7, 5))

    def forward(self, x):
        x = F.max_pool2d(self.layer1(x), 2)
        return self.head(F.max_pool2d(self.layer2(x), 2))


def net_plan(model: nn.Module, seed: int = 0, p_clone: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    names = [f"layer{b}.conv{i}" for b in (1, 2) for i in (1, 2, 3)] + ["head.1"]
    roles = {n: random_roles(model.get_submodule(n).weight.shape[0], gen, p_clone) for n in names}
    norms = {n: n.replace("conv", "bn") for n in names if "conv" in n}
    return roles, norms


def train_steps(model, opt, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8, generator=gen)
        t = torch.randint(0, 5, (6,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()


def snapshot(model: nn.Module):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        [(n, p) for n, p in model.named_parameters()],
        [(n, b) for n, b in model.named_buffers()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_same_snapshot(a, b):
    assert a[0] == b[0]
    assert [n for n, _ in a[1]] == [n for n, _ in b[1]] and all(p is q for (_, p), (_, q) in zip(a[1], b[1]))
    assert [n for n, _ in a[2]] == [n for n, _ in b[2]] and all(p is q for (_, p), (_, q) in zip(a[2], b[2]))
    assert a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


# ---------------------------------------------------------------------------------------------- layers
@SETTINGS
@given(layer_cases(), st.booleans())
def test_layer_matches_reference_and_clones_copy_exactly(case, pointwise_matmul):
    layer, x = build_layer(case)
    roles = random_roles(case["cout"], torch.Generator().manual_seed(case["seed"]), case["p_clone"])
    ref = copy.deepcopy(layer)
    x.requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    OutputCloning(nn.Sequential(layer), {"0": roles}, pointwise_matmul=pointwise_matmul)
    y = layer(x)
    yr = reference_layer(ref, xr, roles)
    dim = -1 if case["kind"] == "linear" else 1
    for c, s in zip(roles.clones.tolist(), roles.sources.tolist()):  # bit-identical copies
        assert torch.equal(y.select(dim, c), y.select(dim, s))
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    yr.backward(gy)
    assert_close_grads(grads([x, layer.weight, layer.bias]), grads([xr, ref.weight, ref.bias]), rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(layer.weight.grad[roles.clones]) == 0
    if layer.bias is not None:
        assert torch.count_nonzero(layer.bias.grad[roles.clones]) == 0


@SETTINGS
@given(
    layer_cases(),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0.1, None]),
    st.booleans(),
    st.booleans(),
)
def test_fused_norm_matches_reference(case, use_kernel, affine, momentum, track, training):
    """conv (active only) -> fused BN  ==  full conv -> clone channels overwritten -> BN with source stats."""
    torch.set_default_dtype(torch.float64)
    try:
        layer, x = build_layer(case)
        norm = NORMS[case["kind"]](case["cout"], momentum=momentum, affine=affine, track_running_stats=track)
    finally:
        torch.set_default_dtype(torch.float32)
    x = x.double()
    gen = torch.Generator().manual_seed(case["seed"])
    if track:  # non-trivial running statistics
        norm.running_mean.copy_(torch.randn(case["cout"], generator=gen, dtype=torch.float64))
        norm.running_var.copy_(torch.rand(case["cout"], generator=gen, dtype=torch.float64) + 0.5)
        norm.num_batches_tracked.fill_(3)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(case["cout"], generator=gen, dtype=torch.float64))
            norm.bias.copy_(torch.randn(case["cout"], generator=gen, dtype=torch.float64))
    roles = random_roles(case["cout"], gen, case["p_clone"])
    model = nn.Sequential(layer, norm).train(training)
    ref_layer, ref_norm = copy.deepcopy(layer), copy.deepcopy(norm)
    x.requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    yr_full = reference_layer(ref_layer, xr, roles)
    yr, exp_m, exp_v = reference_norm(yr_full, ref_norm, roles, training)

    OutputCloning(model, {"0": roles}, norms={"0": "1"}, native_kernels=use_kernel)
    y = model(x)
    torch.testing.assert_close(y, yr, rtol=1e-9, atol=1e-9)
    gy = torch.randn_like(y)
    y.backward(gy)
    yr.backward(gy)
    params = [x, layer.weight, layer.bias, norm.weight, norm.bias]
    ref_params = [xr, ref_layer.weight, ref_layer.bias, ref_norm.weight, ref_norm.bias]
    assert_close_grads(grads(params), grads(ref_params), rtol=1e-8, atol=1e-9)
    assert torch.count_nonzero(layer.weight.grad[roles.clones]) == 0
    if exp_m is not None:
        torch.testing.assert_close(norm.running_mean, exp_m, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(norm.running_var, exp_v, rtol=1e-9, atol=1e-12)
    if track:
        assert int(norm.num_batches_tracked) == (4 if training else 3)


def test_fused_norm_float32_kernel_and_torch_paths_agree():
    torch.manual_seed(0)
    outs = []
    for use_kernel in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(5, 12, 3, padding=1), nn.BatchNorm2d(12))
        roles = random_roles(12, torch.Generator().manual_seed(1))
        OutputCloning(model, {"0": roles}, norms={"0": "1"}, native_kernels=use_kernel)
        x = torch.randn(16, 5, 9, 9)
        y = model(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        outs.append([y.detach(), model[0].weight.grad, model[1].weight.grad, model[1].running_var.clone()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


@pytest.mark.skipif(NO_KERNEL, reason="no C compiler, or kernels disabled by EGG_OPTIM_NO_KERNEL")
def test_native_kernels_are_built_and_used(monkeypatch):
    assert native_kernels_available(), _kernel.error()
    calls = []
    real = _kernel.run
    monkeypatch.setattr(_kernel, "run", lambda kind, *a, **k: (calls.append(kind), real(kind, *a, **k))[1])
    model = nn.Sequential(nn.Conv2d(2, 6, 1), nn.BatchNorm2d(6))
    OutputCloning(model, {"0": Roles(6, [0, 1], [2], [3, 4, 5], [1, 1, 0])}, norms={"0": "1"})
    model(torch.randn(4, 2, 3, 3)).sum().backward()
    assert sorted(set(calls)) == [0, 1, 2, 3]


def test_pointwise_convs_use_the_batched_matmul(monkeypatch):
    model = nn.Sequential(nn.Conv2d(4, 6, 1), nn.Conv2d(6, 5, 3))
    x = torch.randn(3, 4, 5, 5)
    roles = {"0": Roles(6, [0, 1], [2], [3, 4, 5], [0, 0, 1]), "1": Roles(5, [0], [1], [2, 3, 4], [0, 0, 0])}
    outs = {}
    for pointwise in (True, False):
        oc = OutputCloning(model, roles, pointwise_matmul=pointwise)
        outs[pointwise] = model(x)
        oc.remove()
    torch.testing.assert_close(outs[True], outs[False])
    calls = []
    real = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: (calls.append(a[1].shape), real(*a, **k))[1])
    OutputCloning(model, roles)
    model(x)
    assert calls == [torch.Size([3, 3, 4])]  # only the 1x1 conv, with its 3 active channels


def test_no_clones_runs_the_plain_ops(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4 * 4, 4))
    ref = copy.deepcopy(model)
    OutputCloning(model, {"0": Roles.all_leaders(5), "3": Roles.all_leaders(4)}, norms={"0": "1"})
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **k: pytest.fail("gathered without clones"))
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), ref(x))
    assert torch.equal(model[1].running_mean, ref[1].running_mean)


def test_fused_layer_output_is_compact_and_eval_follows_sources():
    """Eval as_trained: a clone channel is its source's conv output normalised with the source's stats."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4))
    roles = Roles(4, [0, 2], [], [1, 3], [2, 0])
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([1.0, -5.0, 2.0, 7.0]))
        model[1].running_var.copy_(torch.tensor([2.0, 9.0, 0.5, 3.0]))
    OutputCloning(model, {"0": roles}, norms={"0": "1"})
    x = torch.randn(3, 2, 2, 2)
    assert model[0](x).shape[1] == 2  # the layer hands the active channels to its fused norm
    model.eval()
    y = model(x)
    conv = nn.Conv2d.forward(model[0], x)
    bn = model[1]
    for c, s in ((0, 0), (1, 2), (2, 2), (3, 0)):
        want = (conv[:, s] - bn.running_mean[s]) / torch.sqrt(bn.running_var[s] + bn.eps) * bn.weight[c] + bn.bias[c]
        torch.testing.assert_close(y[:, c], want)


# ---------------------------------------------------------------------------------------------- roles
def test_update_roles_mid_run_gives_the_new_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    gen = torch.Generator().manual_seed(3)
    r1 = {"0": random_roles(8, gen), "3": random_roles(4, gen)}
    oc = OutputCloning(model, r1, norms={"0": "1"})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 5, 5)
    model(x).sum().backward()
    opt.step()
    r2 = {"0": Roles(8, [1, 2, 6], [0], [3, 4, 5, 7], [6, 1, 1, 2])}  # former clones now lead, and back
    oc.update_roles(r2)
    assert torch.equal(model[0]._egg_gather, r2["0"].gather_index) and torch.equal(model[1]._egg_active, r2["0"].active)
    assert oc.roles["0"] is r2["0"] and oc.roles["3"] is r1["3"]
    ref_plain = copy.deepcopy(oc).remove()  # a plain copy with the same parameter values
    opt.zero_grad()
    y = model(x)
    y1 = reference_layer(ref_plain[0], x, r2["0"])
    y1, _, _ = reference_norm(y1, ref_plain[1], r2["0"], training=True)
    y2 = reference_layer(ref_plain[3], F.relu(y1), r1["3"])
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert torch.count_nonzero(model[0].weight.grad[r2["0"].clones]) == 0
    assert model[0].weight.grad[r2["0"].active].abs().sum(dim=(1, 2, 3)).gt(0).all()
    # back to no clones: the plain module computation
    oc.update_roles({"0": Roles.all_leaders(8), "3": Roles.all_leaders(4)})
    plain = export_plain(model)
    assert torch.equal(model(x), plain(x))


def test_update_roles_validates_before_changing_anything():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    r = {"0": Roles(4, [0], [], [1, 2, 3], [0, 0, 0]), "1": Roles.all_leaders(2)}
    oc = OutputCloning(model, r)
    before = model[0]._egg_gather.clone()
    with pytest.raises(PlanError, match=r"'1'.*3 units.*2 outputs"):
        oc.update_roles({"0": Roles.all_leaders(4), "1": Roles.all_leaders(3)})
    with pytest.raises(PlanError, match="'nope'"):
        oc.update_roles({"nope": Roles.all_leaders(4)})
    assert oc.roles["0"] is r["0"] and torch.equal(model[0]._egg_gather, before)


# ---------------------------------------------------------------------------------------------- eval / export
def trained_net(seed=0, eval_mode="as_trained"):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    roles, norms = net_plan(model, seed)
    oc = OutputCloning(model, roles, norms, eval_mode=eval_mode)
    train_steps(model, opt)
    return model, oc, opt


def test_export_plain_loads_strictly_and_reproduces_as_trained_eval():
    model, oc, _ = trained_net()
    model.eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    plain = export_plain(oc)
    assert not any(is_output_cloned(m) for m in plain.modules())
    assert not any("_egg" in n for n, _ in plain.named_buffers()) and not any(
        k.startswith("_egg") for m in plain.modules() for k in vars(m)
    )
    fresh = Net()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    fresh.load_state_dict(export_state_dict(oc), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain.eval()(x), want, rtol=1e-5, atol=1e-5)
    # clone rows: source's conv weights and running stats, own BN affine
    r = oc.roles["layer1.conv2"]
    sd = plain.state_dict()
    assert torch.equal(sd["layer1.conv2.weight"][r.clones], sd["layer1.conv2.weight"][r.sources])
    assert torch.equal(sd["layer1.bn2.running_mean"][r.clones], sd["layer1.bn2.running_mean"][r.sources])
    assert torch.equal(sd["layer1.bn2.weight"], model.layer1.bn2.weight)
    # the live model is untouched by a copy export, and still as trained
    assert is_output_cloned(model.layer1.conv2) and not oc.removed
    with torch.no_grad():
        assert torch.equal(model(x), want)
    live = copy.deepcopy(oc)
    export_plain(live.model, inplace=True)  # the model alone: its OutputCloning notices on next use
    with pytest.raises(PlanError, match="removed"):
        live.update_roles(live.roles)
    inplace = export_plain(oc, inplace=True)
    assert inplace is model and oc.removed and not is_output_cloned(model.layer1.conv2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_model_state_dict_is_what_eval_computes():
    """model.state_dict() loads into the plain class and computes what eval() computes: under "as_trained" clone
    rows (layer weight/bias, fused BN running stats) are saved as their sources', under "own_weights" as they
    are; the live tensors never change."""
    model, oc, _ = trained_net()
    x = torch.randn(5, 3, 8, 8)
    live = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    for mode in ("as_trained", "own_weights", "as_trained"):
        oc.eval_mode = mode
        model.eval()
        with torch.no_grad():
            want = model(x)
        fresh = Net().eval()
        fresh.load_state_dict(model.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, model.state_dict(keep_vars=True)[k]) for k, v in live.items())
    r = oc.roles["layer1.conv2"]
    sd = model.state_dict()
    for key in ("layer1.conv2.weight", "layer1.bn2.running_var"):
        assert torch.equal(sd[key][r.clones], sd[key][r.sources])
        assert not torch.equal(live[key][r.clones], live[key][r.sources])


def test_own_weights_eval_is_the_plain_model_and_fill_clones_aligns_it():
    model, oc, _ = trained_net(eval_mode="own_weights")
    model.eval()
    x = torch.randn(5, 3, 8, 8)
    plain = copy.deepcopy(oc).remove()  # the same parameter values with the original classes
    assert not any(is_output_cloned(m) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        oc.eval_mode = "as_trained"
        as_trained = model(x)
        assert not torch.allclose(as_trained, plain(x))
        oc.fill_clones()
        oc.eval_mode = "own_weights"
        torch.testing.assert_close(model(x), as_trained, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="eval_mode"):
        oc.eval_mode = "mixed"


def test_training_ignores_eval_mode():
    torch.manual_seed(0)
    outs = []
    for mode in ("as_trained", "own_weights"):
        torch.manual_seed(0)
        model = Net()
        OutputCloning(model, *net_plan(model), eval_mode=mode)
        outs.append(model(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))))
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------- apply / remove
def test_remove_restores_modules_parameters_and_outputs():
    torch.manual_seed(0)
    model = Net()
    hook_calls = []
    model.layer1.conv1.register_forward_hook(lambda m, i, o: hook_calls.append(o.shape[1]))
    x = torch.randn(4, 3, 8, 8)
    before = snapshot(model)
    with torch.no_grad():
        want_train, want_eval = model(x), model.eval()(x)
    model.train()
    roles, norms = net_plan(model)
    with OutputCloning(model, roles, norms) as oc:
        modules = dict(model.named_modules())
        assert type(model.layer1.conv1) is not nn.Conv2d and isinstance(model.layer1.conv1, nn.Conv2d)
        assert model.state_dict().keys() == before[3].keys()
        model(x)
        assert hook_calls[-1] == roles["layer1.conv1"].active.numel()  # hooks kept; fused: compact output
    assert oc.removed
    assert all(modules[n] is m for n, m in model.named_modules())
    model.load_state_dict(before[3])  # undo the running-stat updates of that step
    assert_same_snapshot(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(x), want_train) and torch.equal(model.eval()(x), want_eval)
    oc.remove()  # idempotent
    with pytest.raises(PlanError, match="removed"):
        oc.update_roles(roles)


def test_optimizer_built_before_apply_updates_the_same_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6)), nn.Flatten(), nn.Linear(6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    params = dict(model.named_parameters())
    roles = {"0.0": Roles(6, [0, 2], [5], [1, 3, 4], [0, 2, 2]), "2": Roles(3, [1], [], [0, 2], [1, 1])}
    OutputCloning(model, roles, norms={"0.0": "0.1"})
    assert dict(model.named_parameters()) == params
    w0, b2 = model[0][0].weight.detach().clone(), model[2].weight.detach().clone()
    x = torch.randn(4, 2, 4, 5)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    w1 = model[0][0].weight.detach()
    assert torch.equal(w1[roles["0.0"].clones], w0[roles["0.0"].clones])  # clones not trained
    assert not torch.equal(w1[roles["0.0"].active], w0[roles["0.0"].active])
    assert torch.equal(model[2].weight[[0, 2]], b2[[0, 2]]) and not torch.equal(model[2].weight[1], b2[1])


def test_deepcopy_and_pickle_keep_output_cloning():
    model, _, _ = trained_net()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x), want)
        assert torch.equal(copy.deepcopy(model)(x), want)
        assert torch.equal(export_plain(loaded)(x), export_plain(model)(x))


# ---------------------------------------------------------------------------------------------- validation
def _bad_cases():
    r4 = Roles(4, [0], [], [1, 2, 3], [0, 0, 0])
    return [
        ({"conv9": r4}, None, r"unknown layer 'conv9'.*'conv'"),
        ({"conv": Roles.all_leaders(5)}, None, r"'conv'.*5 units.*4 outputs"),
        ({"bn": r4}, None, r"'bn' is a BatchNorm2d"),
        ({"tconv": r4}, None, r"'tconv' is a ConvTranspose2d"),
        ({"gconv": r4}, None, r"'gconv'.*groups=2"),
        ({"conv": r4}, {"conv": "bn5"}, r"'bn5' has num_features=5.*'conv' has 4"),
        ({"conv": r4}, {"conv": "bn1d"}, r"'bn1d'.*BatchNorm1d.*Conv2d.*BatchNorm2d"),
        ({"conv": r4}, {"conv": "nonorm"}, r"unknown norm layer 'nonorm'"),
        ({"conv": r4}, {"lin": "bn"}, r"'lin', which has no roles"),
        ({"conv": r4, "conv_b": r4}, {"conv": "bn", "conv_b": "bn"}, r"'bn' is given for two layers"),
        ({"conv": r4, "lin": "not roles"}, None, r"roles\['lin'\] must be a Roles"),
    ]


@pytest.mark.parametrize("roles,norms,match", _bad_cases())
def test_validation_errors_leave_the_model_untouched(roles, norms, match):
    model = nn.Module()
    model.conv, model.bn = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)
    model.conv_b = nn.Conv2d(2, 4, 1)
    model.bn5, model.bn1d = nn.BatchNorm2d(5), nn.BatchNorm1d(4)
    model.tconv, model.gconv = nn.ConvTranspose2d(2, 4, 1), nn.Conv2d(2, 4, 1, groups=2)
    model.lin = nn.Linear(2, 4)
    before = snapshot(model)
    with pytest.raises(PlanError, match=match):
        OutputCloning(model, roles, norms)
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(ConfigError):
        OutputCloning(model, {"conv": Roles.all_leaders(4)}, eval_mode="clones")
    assert_same_snapshot(before, snapshot(model))


def test_applying_twice_is_refused():
    model = nn.Sequential(nn.Linear(2, 3))
    OutputCloning(model, {"0": Roles.all_leaders(3)})
    with pytest.raises(PlanError, match="already under output cloning"):
        OutputCloning(model, {"0": Roles.all_leaders(3)})


@pytest.mark.parametrize("channels_last", [False, True])
def test_unfused_norms_compute_what_fused_ones_do(channels_last):
    """``fuse_norms=False`` (output mode): each managed conv expands its clones first and its coupled BatchNorm runs
    as the plain norm on every channel (a clone's channel equals its source's, so its statistics do too): the same
    training as the fused torch path to float rounding, with the norms still coupled (their entries are the
    units'), and nothing fused. A checkpoint records the choice: loading it under the other one is refused."""
    import warnings

    from egg_optim import LeaderCloneOptimizer, StateDictMismatchError

    def run(fuse):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),  # a bias before a norm:
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),  # Adam amplifies ~0 grads
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
        )  # fmt: skip
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = LeaderCloneOptimizer(
                model, torch.optim.Adam(model.parameters(), lr=1e-2), "mild", clone_mode="output", fuse_norms=fuse
            )
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(8, 3, 6, 6, generator=gen).contiguous(memory_format=fmt)
            F.cross_entropy(model(x), torch.randint(0, 4, (8,), generator=gen)).backward()
            for m in model.modules():
                if hasattr(m, "_egg_kernel"):
                    m._egg_kernel = False  # the fused norm's torch path, as on CUDA
            opt.step()
            opt.zero_grad()
        return model, opt

    fused_model, fused_opt = run(True)
    plain_model, plain_opt = run(False)
    assert plain_opt.coupled_norms == fused_opt.coupled_norms and len(plain_opt.coupled_norms) == 2
    assert not any(hasattr(m, "_egg_kernel") for m in plain_model.modules())
    assert any(hasattr(m, "_egg_kernel") for m in fused_model.modules())  # not vacuous
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    fused_model.eval(), plain_model.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(plain_model(x), fused_model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(StateDictMismatchError, match="fuse_norms"):
        fused_opt.load_state_dict(plain_opt.state_dict())


def test_fuse_norms_auto_fuses_where_the_c_kernels_run(monkeypatch):
    """``fuse_norms=None`` (the default): fused where egg_optim's C kernels run the fused norm (the layer on the CPU
    when norms are coupled, kernels built), unfused elsewhere: on CUDA, or without a C compiler, the fused norm
    would run as torch ops, which take more passes than the plain norm after the expansion
    (``docs/results/bench_norms.md``)."""
    import egg_optim.rewrites.output_cloning as oc
    from egg_optim import LeaderCloneOptimizer
    from egg_optim.optim.controller import _fused_where_kernels_run

    def fused_count(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2)
        )
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = LeaderCloneOptimizer(model, base, "mild", clone_mode="output", **kw)
        opt.couple_norms(torch.randn(2, 3, 5, 5))
        return sum(hasattr(m, "_egg_kernel") for m in model.modules()), len(opt.coupled_norms)

    if oc.native_kernels_available():
        assert fused_count() == (1, 1)
    assert fused_count(fuse_norms=False) == (0, 1) and fused_count(fuse_norms=True) == (1, 1)
    monkeypatch.setattr(oc, "native_kernels_available", lambda: False)
    assert fused_count() == (0, 1)  # no kernels: the torch path would be slower than unfused
    monkeypatch.undo()
    # asked when the norms are coupled, of the layer where it is then (Accelerate moves the model after the
    # optimizer is built): off the CPU (CUDA; here "meta") it stays unfused
    conv, norm = nn.Conv2d(3, 8, 3, device="meta"), nn.BatchNorm2d(8, device="meta")
    assert _fused_where_kernels_run(lambda layer, norm: True, conv, norm) is False
    assert _fused_where_kernels_run(lambda layer, norm: True, conv.to_empty(device="cpu"), norm) is (
        oc.native_kernels_available()
    )
