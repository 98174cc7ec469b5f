"""Output cloning on [batch, tokens, features] activations: the expansion to all units and its fast path."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from egg_optim.core.roles import Roles
from egg_optim.rewrites.output_cloning import OutputCloning
from egg_optim.rewrites.output_cloning._gather import expand_units

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _roles(n: int, gen: torch.Generator) -> Roles:
    """Random roles with at least one leader; each clone copies a random leader."""
    codes = torch.randint(0, 3, (n,), generator=gen)
    codes[torch.randint(0, n, (1,), generator=gen)] = 0
    leaders, indep, clones = (torch.nonzero(codes == k).flatten() for k in range(3))
    sources = leaders[torch.randint(0, leaders.numel(), (clones.numel(),), generator=gen)]
    return Roles(n, leaders, indep, clones, sources)


@SETTINGS
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.data(),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_expand_units_is_index_select(shape, data, transposed, seed):
    """Same values and gradients as ``index_select`` for every dim (either sign), contiguous or not."""
    gen = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    dim = data.draw(st.integers(-ndim, ndim - 1))
    y = torch.randn(shape, generator=gen, dtype=torch.float64)
    if transposed and ndim > 1:
        y = y.transpose(0, -1).contiguous().transpose(0, -1)  # same shape, not contiguous
    index = torch.randint(0, shape[dim], (data.draw(st.integers(0, 7)),), generator=gen)
    a = y.clone().requires_grad_(True)
    b = y.clone().requires_grad_(True)
    out, ref = expand_units(a, dim, index), b.index_select(dim, index)
    assert out.shape == ref.shape and torch.equal(out, ref)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(
    st.lists(st.integers(1, 3), min_size=0, max_size=3),
    st.integers(1, 5),
    st.integers(1, 9),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_linear_on_token_activations_matches_reference(lead, cin, cout, bias, seed):
    """An output-cloned Linear on (*, in) inputs == the full Linear with each clone's column replaced by its
    source's; gradients reach the sources and clone weight rows get exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(cin, cout, bias=bias).double()
    ref_w, ref_b = layer.weight.detach().clone().requires_grad_(), None
    if bias:
        ref_b = layer.bias.detach().clone().requires_grad_()
    roles = _roles(cout, gen)
    OutputCloning(nn.Sequential(layer), {"0": roles})
    x = torch.randn(*lead, 2, cin, generator=gen, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y = layer(x)
    source = roles.active[roles.gather_index]  # unit -> the unit that computes it (itself, or a clone's source)
    yr = F.linear(xr, ref_w, ref_b).index_select(-1, source)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(gy)
    yr.backward(gy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    active = roles.active
    torch.testing.assert_close(layer.weight.grad[active], ref_w.grad[active], rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(layer.weight.grad[roles.clones]) == 0
    if bias:
        torch.testing.assert_close(layer.bias.grad[active], ref_b.grad[active], rtol=1e-10, atol=1e-12)
        assert torch.count_nonzero(layer.bias.grad[roles.clones]) == 0


def test_token_activations_are_gathered_through_a_2d_view(monkeypatch):
    """torch's CPU index_select on the last dim of a 3-D tensor is ~14x slower than on its 2-D view (issue 13:
    output mode slower than the baseline on BERT and Llama): the expansion must never call it that way."""
    layer = nn.Linear(6, 8)
    roles = Roles(8, [0, 1, 2], [3], [4, 5, 6, 7], [0, 1, 2, 0])
    OutputCloning(nn.Sequential(layer), {"0": roles})
    calls = []
    real = torch.Tensor.index_select

    def spy(self, dim, index):
        calls.append((self.dim(), dim % self.dim()))
        return real(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    layer(torch.randn(2, 5, 6)).sum().backward()
    expansions = [c for c in calls if c[1] != 0]  # the other calls pick weight rows (dim 0)
    assert expansions == [(2, 1)]


@SETTINGS
@given(
    n=st.integers(2, 12),
    data=st.data(),
    active_first=st.booleans(),
    lead=st.lists(st.integers(1, 3), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_the_tiled_expansion_of_packed_roles_is_the_gather(n, data, active_first, lead, seed):
    """``expand_tiled`` (compiled output mode on packed roles: a ``cat`` of broadcast views) and ``expand_packed``
    (eager: the gather, and a backward folding clone gradients by reshaped sums) compute the ``index_select`` and,
    in backward, the ``index_add`` of the gather path, on any dimension: active units first or last, sources
    cycling over a run of leaders from any rotation."""
    from egg_optim.rewrites.output_cloning._gather import expand_packed, expand_tiled, tile_of

    active = data.draw(st.integers(1, n - 1))
    leaders = data.draw(st.integers(1, active))
    q = data.draw(st.integers(0, leaders - 1))
    m = data.draw(st.integers(1, leaders - q))
    r = data.draw(st.integers(0, m - 1))
    a0 = 0 if active_first else n - active
    units = torch.arange(n)
    clones = units[active:] if active_first else units[: n - active]
    sources = a0 + q + (torch.arange(clones.numel()) + r) % m
    roles = Roles(n, units[a0 : a0 + leaders], units[a0 + leaders : a0 + active], clones, sources)
    tile = tile_of(roles)
    assert tile is not None and tile[0] == active_first
    dim = data.draw(st.integers(0, len(lead)))
    gen = torch.Generator().manual_seed(seed)
    shape = [*lead[:dim], active, *lead[dim:]]
    y = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn([*lead[:dim], n, *lead[dim:]], generator=gen, dtype=torch.float64)
    dims = [dim, dim - len(shape)]  # a Linear's expansion names the last dim -1
    expansions = [lambda d: expand_tiled(y, d, tile), lambda d: expand_packed(y, d, roles.gather_index, tile, 0)]
    for d, expand in itertools.product(dims, expansions):
        out = expand(d)
        want = y.index_select(dim, roles.gather_index)
        assert torch.equal(out, want)
        (got,) = torch.autograd.grad(out, y, g)
        (ref,) = torch.autograd.grad(want, y, g)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)  # sums in another order


def test_the_eager_packed_expansion_keeps_the_layout_and_folds_deterministically():
    """The gradient of ``expand_packed`` comes back in the activations' layout (a ``channels_last`` conv output
    stays so), is the gather's to rounding, is the same bit for bit on every run (no scatter), and is itself
    differentiable (double backward, as through the gather) and transformable (``torch.func``)."""
    from egg_optim.rewrites.output_cloning._gather import expand_packed, tile_of

    roles = Roles(12, [0, 1, 2], [3, 4], list(range(5, 12)), [0] * 7)  # assign="first": every clone, one source
    tile = tile_of(roles)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(4, 5, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(4, 12, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = expand_packed(y, 1, roles.gather_index, tile, min_numel=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    (got,) = torch.autograd.grad(out, y, g, create_graph=True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    (ref,) = torch.autograd.grad(y.index_select(1, roles.gather_index), y, g)
    torch.testing.assert_close(got, ref)
    again = [torch.autograd.grad(expand_packed(y, 1, roles.gather_index, tile, 0), y, g)[0] for _ in range(3)]
    assert all(torch.equal(a, again[0]) for a in again)
    (second,) = torch.autograd.grad(got.sum(), g)  # each entry of g is summed into exactly one unit
    assert torch.equal(second, torch.ones_like(g))
    # torch.func transforms (per-sample gradients) go through it as through the gather
    per_sample = torch.func.vmap(
        torch.func.grad(lambda yi, gi: (expand_packed(yi[None], 1, roles.gather_index, tile, 0) * gi).sum())
    )(y.detach(), g.detach())
    torch.testing.assert_close(per_sample, ref)


def test_a_folding_expansion_can_be_written_in_place():
    """The folding expansion's output (a view of its 2-D gather, for a [batch, tokens, features] or channels_last
    output) is a tensor of its own: an in-place op after the layer (``ReLU(inplace=True)``) runs, and its gradient
    is the gather's."""
    from egg_optim.rewrites.output_cloning._gather import expand_packed, tile_of

    roles = Roles(6, [0, 1], [2], [3, 4, 5], [0, 0, 0])
    gen = torch.Generator().manual_seed(0)
    for y in (torch.randn(2, 3, 3, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)):
        y = y.requires_grad_()
        dim = y.dim() - 1 if y.dim() == 3 else 1
        out = torch.relu_(expand_packed(y * 1, dim, roles.gather_index, tile_of(roles), min_numel=0))
        want = torch.relu(y.index_select(dim, roles.gather_index))
        assert torch.equal(out, want)
        g = torch.randn(out.shape, generator=gen)
        torch.testing.assert_close(torch.autograd.grad(out, y, g)[0], torch.autograd.grad(want, y, g)[0])


def test_eager_packed_expansions_fold_from_the_threshold_on():
    """Small expansions keep the gather's ``index_add`` backward (less host work per step: a small model on a GPU
    waits for the host), large ones fold; the threshold counts the expanded output's elements."""
    from egg_optim.rewrites.output_cloning._gather import expand_packed, tile_of

    roles = Roles(6, [0, 1], [2], [3, 4, 5], [0, 0, 0])
    y = torch.randn(2, 3, 4, requires_grad=True)
    kinds = {t: type(expand_packed(y, 1, roles.gather_index, tile_of(roles), t).grad_fn).__name__ for t in (48, 49)}
    assert kinds == {48: "_ExpandPackedBackward", 49: "IndexSelectBackward0"}, kinds
