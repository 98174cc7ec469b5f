"""Output cloning on channels-innermost (channels_last) tensors: the layout inductor gives convs, and the one
cuDNN is fastest with in bf16 (the issue 19 GPU cases ``bf16 channels-last``)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from egg_optim.core.roles import Roles
from egg_optim.rewrites.output_cloning import OutputCloning, _kernel, native_kernels_available

needs_kernels = pytest.mark.skipif(not native_kernels_available(), reason="no C compiler, or EGG_OPTIM_NO_KERNEL")

CONV = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}


def _channels_innermost(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


@needs_kernels
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([1, 2, 3]),
    st.integers(3, 9),
    st.integers(1, 3),
    st.booleans(),
    st.booleans(),
    st.sampled_from([torch.float64, torch.float32]),
    st.integers(0, 2**16),
)
def test_channels_last_input_matches_contiguous_and_keeps_its_layout(dims, cout, batch, affine, training, dtype, seed):
    """The fused norm on a channels-innermost copy of the compact conv output: the same values, gradients and
    running statistics as on the contiguous one, computed by the rows kernels (no conversion), in that layout."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv_cls, norm_cls = CONV[dims]
    model = nn.Sequential(conv_cls(3, cout, 1), norm_cls(cout, affine=affine)).to(dtype)
    with torch.no_grad():
        model[1].running_mean.normal_(generator=gen)
        model[1].running_var.uniform_(0.5, 2.0, generator=gen)
        if affine:
            model[1].weight.normal_(generator=gen)
            model[1].bias.normal_(generator=gen)
    other = copy.deepcopy(model)
    codes = torch.randint(0, 3, (cout,), generator=gen)
    codes[0], codes[1], codes[-1] = 0, 1, 2  # a leader, an independent (2 active channels) and a clone
    leaders, indep, clones = (torch.nonzero(codes == k).flatten() for k in range(3))
    sources = leaders[torch.randint(0, leaders.numel(), (clones.numel(),), generator=gen)]
    roles = Roles(cout, leaders, indep, clones, sources)
    for m in (model, other):
        OutputCloning(m, {"0": roles}, norms={"0": "1"})
        m.train(training)
    with torch.no_grad():  # the layer's compact output: the active channels only
        z = model[0](torch.randn((batch + 1, 3) + (4,) * dims, generator=gen, dtype=dtype))
    a = z.clone().requires_grad_(True)
    b = _channels_innermost(z).requires_grad_(True)
    assert not b.is_contiguous()
    ya = model[1](a)
    gy = torch.randn(ya.shape, generator=gen, dtype=dtype)
    ya.backward(gy)
    calls = []
    real = _kernel.run
    _kernel.run = lambda kind, *args, **kw: (calls.append(kind), real(kind, *args, **kw))[1]
    try:
        yb = other[1](b)
        yb.backward(_channels_innermost(gy))
    finally:
        _kernel.run = real
    assert yb.movedim(1, -1).is_contiguous()
    assert set(calls) <= {4, 5, 6, 7} and 4 in calls and 6 in calls, calls  # the rows kernels, no converted copy
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(yb, ya, **tol)
    torch.testing.assert_close(b.grad, a.grad, **tol)
    for pa, pb in zip(model[1].parameters(), other[1].parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, **tol)
    torch.testing.assert_close(other[1].running_mean, model[1].running_mean, **tol)
    torch.testing.assert_close(other[1].running_var, model[1].running_var, **tol)


def _innermost(t: torch.Tensor) -> bool:
    return t.movedim(1, -1).is_contiguous() and not t.is_contiguous()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dims=st.sampled_from([1, 2, 3]), cout=st.integers(3, 9), fused=st.booleans(), seed=st.integers(0, 2**16))
def test_the_torch_path_keeps_channels_innermost_tensors_in_their_layout(dims, cout, fused, seed):
    """The torch-ops path (what CUDA runs): a managed conv on a channels-innermost input, its clones expanded
    with or without a fused BatchNorm, gives a channels-innermost output and input gradient, as the plain conv
    and norm do (``index_select`` along dim 1 returned a contiguous tensor, so every managed conv switched the
    network to the other layout, and the convolutions around it converted back, forward and backward), with
    the values and gradients of the contiguous run."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv_cls, norm_cls = CONV[dims]
    model = nn.Sequential(conv_cls(3, cout, 1), norm_cls(cout)) if fused else nn.Sequential(conv_cls(3, cout, 1))
    codes = torch.randint(0, 3, (cout,), generator=gen)
    codes[0], codes[-1] = 0, 2  # a leader and a clone
    leaders, indep, clones = (torch.nonzero(codes == k).flatten() for k in range(3))
    sources = leaders[torch.randint(0, leaders.numel(), (clones.numel(),), generator=gen)]
    roles = Roles(cout, leaders, indep, clones, sources)
    other, plain = copy.deepcopy(model), copy.deepcopy(model)
    for m in (model, other):
        OutputCloning(m, {"0": roles}, norms={"0": "1"} if fused else None, native_kernels=False)
    x = torch.randn((4, 3) + (5,) * dims, generator=gen)
    a, b, c = x.clone().requires_grad_(True), _channels_innermost(x).requires_grad_(True), _channels_innermost(x)
    ya, yb, yc = model(a), other(b), plain(c.requires_grad_(True))
    gy = torch.randn(ya.shape, generator=gen)
    ya.backward(gy)
    yb.backward(_channels_innermost(gy))
    yc.backward(_channels_innermost(gy))
    assert (_innermost(yb), _innermost(b.grad)) == (_innermost(yc), _innermost(c.grad)), (yb.stride(), yc.stride())
    assert dims != 2 or _innermost(yb)  # not vacuous: a Conv2d keeps the layout (here Conv1d / Conv3d do not)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4)
    # a conv bias before BN has a zero gradient, in float32 cancellation noise that grows with the elements summed
    # per channel (~5e-4 over 500); a wrong one would be of the order of the output gradient's sums (~1-10)
    noise = 4e-6 * ya[:, 0].numel()
    for (name, pa), pb in zip(model.named_parameters(), other.parameters()):
        atol = noise if fused and name == "0.bias" else 1e-4
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=needs_kernels)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dims", [1, 2])
def test_an_in_place_activation_after_a_managed_conv_trains_as_an_out_of_place_one(dims, affine, fused, kernels):
    """A ``ReLU(inplace=True)`` after a managed conv and its norm (torchvision's ResNets), channels innermost: the
    outputs of output mode's autograd functions there are views of their channels-innermost buffers, which autograd
    refuses to modify in place (a raw RuntimeError before); they are tensors of their own, and two steps train what
    an out-of-place ReLU does."""
    if kernels and not fused:
        pytest.skip("the kernels run fused norms only")
    from egg_optim import LeaderCloneOptimizer, RolePlan

    conv_cls, norm_cls = CONV[dims]
    runs = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(conv_cls(3, 8, 3), norm_cls(8, affine=affine), nn.ReLU(inplace=inplace),
                              conv_cls(8, 6, 1), nn.Flatten(), nn.LazyLinear(4))  # fmt: skip
        x = _channels_innermost(torch.randn((2, 3) + (6,) * dims))
        model(x)  # (the lazy head)
        opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5, 0.0),
                                   clone_mode="output", fuse_norms=fused)  # fmt: skip
        for m in model.modules():
            if hasattr(m, "_egg_kernel"):
                m._egg_kernel = kernels
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        runs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k, v in runs[0].items():
        torch.testing.assert_close(runs[1][k], v, msg=k)
