"""Packed first roles (issue 19, item 2): each layer's active units are its first ones, so between role changes
the step reads and writes parameters, gradients, optimizer state and norm statistics through views and reshaped
broadcasts, with no index op over them, and computes exactly what the gather/scatter path computes."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch
from conftest import TinySeedNet, mlp, train_tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from egg_optim import EggConfig, LeaderCloneOptimizer, RolePlan
from egg_optim.core import axes
from egg_optim.core.roles import Roles
from egg_optim.rewrites.output_cloning import _gather
from egg_optim.utils import DispatchCounter

transformers = pytest.importorskip("transformers")


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _cnn_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


CASES = {
    "cnn": (TinySeedNet, lambda: (torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))), _cnn_loss),
    "llama": (_llama, lambda: torch.randint(0, 96, (2, 12)), _lm_loss),
}


def _run(
    kind, mode, *, preset="mild", first_roles="packed", assign="first", steps=3, fused=False, count=False, storage=None
):
    """Train ``steps`` steps; the last one under a :class:`DispatchCounter` when ``count``."""
    build, batch, loss_fn = CASES[kind]
    torch.manual_seed(0)
    model = build()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None)
    cfg = EggConfig(
        clone_mode=mode, first_roles=first_roles, assign=assign, **({"state_storage": storage} if storage else {})
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = LeaderCloneOptimizer(model, base, RolePlan.preset(preset), config=cfg)
    torch.manual_seed(1)
    batches = [batch() for _ in range(steps)]
    counter = None
    for i, b in enumerate(batches):
        counter = DispatchCounter(model, opt) if count and i == steps - 1 else None
        with counter or nullcontext():
            loss_fn(model, b).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model, opt, counter


def test_the_default_first_roles_are_packed_and_drawn_keeps_the_seed_draw():
    _, packed, _ = _run("cnn", "output", steps=1)
    _, drawn, _ = _run("cnn", "output", steps=1, first_roles="drawn")
    scattered = 0
    for name, roles in packed.roles.items():
        n_active = int(roles.active.numel())
        assert torch.equal(roles.active, torch.arange(n_active)), name
        assert torch.equal(roles.leaders, torch.arange(int(roles.leaders.numel()))), name  # leaders first
        assert roles.active_span == (0, n_active) and (not roles.has_clones or roles.clone_span is not None)
        scattered += drawn.roles[name].has_clones and drawn.roles[name].active_span is None
    assert scattered > 0  # the seed's draw scatters active units


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("mode", ["output", "weight"])
def test_round_robin_sources_need_no_index_traffic_either(kind, mode):
    """Clones cycling over the leaders (the last cycle cut short) fold and copy by reshaped views too
    (``assign="first"``: tests/test_dispatch.py)."""
    assign = "round_robin"
    _, opt, count = _run(kind, mode, assign=assign, count=True)
    assert sum(r.has_clones for r in opt.roles.values()) > 1
    assert count.param_index_total == 0, dict(count.param_index_ops)
    _, _, drawn = _run(kind, mode, assign=assign, first_roles="drawn", count=True)
    assert drawn.param_index_total > 0  # not vacuous: scattered roles still gather
    assert count.launches < drawn.launches


def _patch_scattered(mp: pytest.MonkeyPatch) -> None:
    """Every role looks scattered: the gather/scatter path runs, with the same (packed) roles."""
    for name in ("active_span", "clone_span", "source_cycle"):
        mp.setattr(Roles, name, property(lambda self: None))


@pytest.mark.parametrize(("kind", "mode"), [("cnn", "weight"), ("llama", "weight")])
@pytest.mark.parametrize("assign", ["first", "round_robin"])
def test_views_compute_what_the_gather_path_computes(kind, mode, assign, monkeypatch):
    fast, _, _ = _run(kind, mode, assign=assign)
    _patch_scattered(monkeypatch)
    slow, _, _ = _run(kind, mode, assign=assign)
    for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("assign", ["first", "round_robin"])
def test_folded_clone_gradients_match_the_gather_path_to_rounding(kind, assign, monkeypatch):
    """Output mode sums clone gradients into their sources by reshaped sums instead of an index_add: a layer's
    expansion backward (the CNN's convs) and a transformer's consumers (clone columns of o_proj / down_proj): the
    same terms added in another order, so the loss and every gradient agree to float32 rounding (not bit for bit;
    Adam would then amplify signs of near-zero gradients, so grads are compared)."""
    build, batch, loss_fn = CASES[kind]
    monkeypatch.setattr(_gather, "FOLD_MIN_NUMEL", 0)  # the fold at any size (it starts at 2^24 elements)

    def grads():
        model, _, _ = _run(kind, "output", assign=assign, steps=0)
        torch.manual_seed(5)
        loss = loss_fn(model, batch())
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    loss, fast = grads()
    _patch_scattered(monkeypatch)
    loss_slow, slow = grads()
    torch.testing.assert_close(loss, loss_slow, rtol=1e-6, atol=0)
    assert fast.keys() == slow.keys() and len(fast) > 10
    _assert_grads_close(fast, slow, atol=1e-7 if kind == "llama" else None)


def _assert_grads_close(fast: dict, slow: dict, atol: float | None = None) -> None:
    """Equal to float32 rounding. ``atol=None``: 1e-4 of the largest gradient, for a conv bias before a BatchNorm,
    whose true gradient is zero: what it gets is rounding noise of a sum over the batch, as large in either path."""
    if atol is None:
        atol = 1e-4 * max(float(g.abs().max()) for g in slow.values())
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-5, atol=atol, msg=k)


def test_strided_column_blocks_step_on_copies_so_a_fused_optimizer_stays_exact(monkeypatch):
    """o_proj / down_proj units are columns: a narrowed column block is strided, which a fused optimizer would
    misread as dense memory; the step then uses a contiguous copy. Compared with the gather path."""
    fast, _, _ = _run("llama", "weight", fused=True)
    _patch_scattered(monkeypatch)
    slow, _, _ = _run("llama", "weight", fused=True)
    for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert torch.equal(a, b), k


@settings(max_examples=12, deadline=None)
@given(
    widths=st.lists(st.integers(4, 24), min_size=1, max_size=3),
    leaders=st.floats(0.1, 0.5),
    independents=st.floats(0.0, 0.3),
    mode=st.sampled_from(["output", "weight"]),
    assign=st.sampled_from(["first", "round_robin", "random"]),
)
def test_clone_rows_stay_their_sources_and_views_match_the_gather_path(widths, leaders, independents, mode, assign):
    """A conv/BN/linear net of random widths: after steps on packed roles every clone row equals its source in
    weight mode (clone rows untouched in output mode), and the parameters equal the gather path's bit for bit in
    weight mode; in output mode the first gradients equal its to rounding (clone gradients are folded by sums)."""

    def train():
        model = _conv_net(widths)
        cfg = EggConfig(clone_mode=mode, assign=assign)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = LeaderCloneOptimizer(
                model, torch.optim.Adam(model.parameters(), lr=1e-2), RolePlan(leaders, independents), config=cfg
            )
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        torch.manual_seed(1)
        first = {}
        for _ in range(2):
            x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
            nn.functional.cross_entropy(model(x), y).backward()
            first = first or {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad()
        return model, opt, before, first

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_gather, "FOLD_MIN_NUMEL", 0)  # the fold at any size (it starts at 2^24 elements)
        fast, opt, before, fast_grads = train()
    with pytest.MonkeyPatch.context() as mp:
        _patch_scattered(mp)
        slow, _, _, slow_grads = train()
    if mode == "weight":
        for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
            assert torch.equal(a, b), k
    else:
        _assert_grads_close(fast_grads, slow_grads)
    for name, roles in opt.roles.items():
        if not roles.has_clones:
            continue
        w = fast.get_submodule(name).weight.detach()
        if mode == "weight":
            assert torch.equal(w[roles.clones], w[roles.sources]), name
        else:
            assert torch.equal(w[roles.clones], before[f"{name}.weight"][roles.clones]), name


def _conv_net(widths, channels_last=False) -> nn.Module:
    torch.manual_seed(0)
    layers, cin = [], 3
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 12), nn.ReLU(), nn.Linear(12, 3))
    return net.to(memory_format=torch.channels_last) if channels_last else net


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_channels_last_weights_keep_their_layout_and_need_no_index_ops(mode, monkeypatch):
    """A channels-last conv weight's active rows are a channels-last view (what cuDNN wants), not the contiguous
    copy a gather makes, and the optimizer steps that view in place (a dense block, laid out like its gradient:
    no copy in and out, as the bare optimizer steps the channels-last weight), and the weight gradients come back
    channels-last (no layout copy when they are accumulated). The conv then picks its channels-last kernel, so
    gradients match the gather path to rounding."""

    def grads():
        model = _conv_net((8, 16), channels_last=True)
        opt = LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), "mild", clone_mode=mode)
        x, y = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last), torch.randint(0, 3, (4,))
        step = lambda: (nn.functional.cross_entropy(model(x), y).backward(), opt.step(), opt.zero_grad())  # noqa: E731
        step()
        with DispatchCounter(model, opt) as count:
            nn.functional.cross_entropy(model(x), y).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        with DispatchCounter(model, opt) as in_step:
            opt.step()
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        return count, grads, in_step

    count, fast, in_step = grads()
    assert count.param_index_total == 0, dict(count.param_index_ops)
    assert in_step.ops["copy_"] == 0, dict(in_step.ops)  # the stand-ins are the views themselves
    # no layout copy either: the weights' gradients come back channels_last (AccumulateGrad takes them as they
    # are), so forward and backward copy what the bare step copies (the pooled features' gradient)
    bare = _conv_net((8, 16), channels_last=True)
    x = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last)
    nn.functional.cross_entropy(bare(x), torch.randint(0, 3, (4,))).backward()
    with DispatchCounter(bare) as bare_count:
        nn.functional.cross_entropy(bare(x), torch.randint(0, 3, (4,))).backward()
    assert count.ops["copy_"] == bare_count.ops["copy_"], (dict(count.ops), dict(bare_count.ops))
    _patch_scattered(monkeypatch)
    count_slow, slow, _ = grads()

    assert count_slow.param_index_total > 0
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-6, msg=k)


def test_span_and_cycle_read_runs_and_cycles():
    assert axes.span(torch.tensor([3, 4, 5])) == (3, 3)
    assert axes.span(torch.tensor([0, 2])) is None and axes.span(torch.tensor([], dtype=torch.long)) is None
    assert axes.cycle(torch.tensor([2, 2, 2])) == (2, 1, 0)
    assert axes.cycle(torch.tensor([0, 1, 2, 0, 1, 2])) == (0, 3, 0)
    assert axes.cycle(torch.tensor([0, 1, 2, 0])) == (0, 3, 0)  # the last period may stop short
    assert axes.cycle(torch.tensor([2, 3, 0, 1, 2])) == (0, 4, 2)  # rotated: round robin after a graduation
    assert axes.cycle(torch.tensor([0, 1, 1])) is None and axes.cycle(torch.tensor([0, 2, 1])) is None


@settings(max_examples=60, deadline=None)
@given(q=st.integers(0, 3), m=st.integers(1, 4), r=st.integers(0, 3), n=st.integers(1, 9), axis=st.integers(0, 1))
def test_tiled_and_fold_are_the_gather_and_the_index_add_of_a_cycle(q, m, r, n, axis):
    idx = q + (torch.arange(n) + r % m) % m
    found = axes.cycle(idx)  # may describe a short index by another (q, m, r): any description will do
    assert found is not None
    q, m, r = found
    t = torch.randn(10, 10, dtype=torch.float64)
    assert torch.equal(axes.tiled(t, axis, found, n), t.index_select(axis, idx))
    block = axes.narrow(t, axis, (0, n))
    shape = list(block.shape)
    shape[axis] = m
    folded = torch.zeros(shape, dtype=torch.float64).index_add_(axis, idx - q, block)
    torch.testing.assert_close(axes.fold(block, axis, m, r), folded, rtol=1e-12, atol=1e-12)
    if q + m <= 10 - n:  # a clone event's write (sources and clones apart, as roles keep them): the cycle
        # broadcast into the clones' run in place, the rest of ``t`` untouched
        after = t.clone()
        clones = axes.narrow(after, axis, (10 - n, n))
        for d, src in axes.tile_pieces(clones, axis, axes.narrow(after, axis, (q, m)), r):
            d.copy_(src)
        assert torch.equal(after, t.clone().index_copy_(axis, torch.arange(10 - n, 10), t.index_select(axis, idx)))
        # out of place (a block's tied slice at full width): the clones' run replaced by the cycle, by a cat
        clones = torch.arange(10 - n, 10)
        copied = axes.replaced(t, axis, (10 - n, n), axes.tiled(t, axis, found, n))
        assert torch.equal(copied, axes.copied(t, axis, clones, t.index_select(axis, idx)))


@settings(max_examples=80, deadline=None)
@given(
    parts=st.integers(1, 4), size=st.integers(2, 7), b=st.sampled_from([1, 2]), data=st.data(),
)  # fmt: skip
def test_runs_alike_in_every_part_are_cut_and_written_as_select_and_copy_do(parts, size, b, data):
    """On a pair axis (the (expert, neuron) positions of fused MoE weights), offsets that every part takes alike,
    in at most MAX_RUNS runs, are cut by views into select's layout (or the tensor's own) and written back by
    strided copies; parts that differ give no runs."""
    shape = [parts, 3, 3]
    shape[b] = size
    t = torch.randn(shape, dtype=torch.float64)
    offsets = sorted(data.draw(st.sets(st.integers(0, size - 1), min_size=1)))
    index = torch.tensor([e * size + o for e in range(parts) for o in offsets])
    runs = axes.part_runs(index, t.shape, (0, b))
    if 1 + sum(y != x + 1 for x, y in zip(offsets, offsets[1:])) > axes.MAX_RUNS:
        assert runs is None  # scattered: left to gathers
        return
    assert runs is not None and sum(n for _, n in runs) == len(offsets)
    assert torch.equal(axes.cut(t, (0, b), runs), axes.select(t, (0, b), index))
    own = axes.cut(t, (0, b), runs, layout="tensor")
    assert own.shape[b] == len(offsets) and torch.equal(own, t.index_select(b, torch.tensor(offsets)))
    source = torch.randn(len(index), *(n for k, n in enumerate(shape) if k not in (0, b)), dtype=torch.float64)
    assert torch.equal(axes.write_runs_(t.clone(), (0, b), runs, source), axes.copy_(t.clone(), (0, b), index, source))
    if parts > 1 and len(offsets) < size:  # one part with another offset: no runs
        other = next(o for o in range(size) if o not in offsets)
        moved = index.clone()
        moved[-1] = (parts - 1) * size + other
        assert axes.part_runs(torch.sort(moved).values, t.shape, (0, b)) is None


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), gaps=st.lists(st.integers(1, 5), min_size=4))
def test_a_few_long_runs_along_one_dimension_are_cut_and_written_as_select_and_copy_do(lengths, gaps):
    """Along an ``int`` axis (a fused gate/up or qkv weight under packed roles) at most MAX_RUNS runs of at least
    MIN_RUN positions (one run of any length) are cut and written by views; more or shorter runs are left to
    gathers."""
    starts, at = [], 0
    for n, gap in zip(lengths, gaps):
        starts.append(at + gap)
        at += gap + n
    index = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    t = torch.randn(at + 2, 3, dtype=torch.float64)
    runs = axes.part_runs(index, t.shape, 0)
    if len(lengths) > axes.MAX_RUNS or (len(lengths) > 1 and min(lengths) < axes.MIN_RUN):
        assert runs is None
        return
    assert runs == list(zip(starts, lengths))
    assert torch.equal(axes.cut(t, 0, runs), t.index_select(0, index))
    source = torch.randn(len(index), 3, dtype=torch.float64)
    assert torch.equal(axes.write_runs_(t.clone(), 0, runs, source), t.clone().index_copy_(0, index, source))


def test_mlp_without_norms_packs_too():
    torch.manual_seed(0)
    model = mlp((6, 20, 20, 3))
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mild", clone_mode="output")
    assert all(r.active_span is not None for r in opt.roles.values())


@pytest.mark.parametrize("assign", ["first", "round_robin"])
@pytest.mark.parametrize(("kind", "mode"), [("cnn", "output"), ("cnn", "weight"), ("llama", "output")])
def test_a_graduation_keeps_packed_roles_on_views(kind, mode, assign):
    """Graduating promotes the first clones of packed roles: the active units stay one run and the remaining
    clones' sources a (rotated) cycle, so the steps after it still dispatch no parameter-sized index op."""
    model, opt, _ = _run(kind, mode, assign=assign, steps=1)
    opt.graduate(0.75)
    assert all(r.active_span is not None and r.source_cycle is not None for r in opt.roles.values() if r.has_clones)
    _, batch, loss_fn = CASES[kind]
    b = batch()
    for _ in range(2):
        with DispatchCounter(model, opt) as count:
            loss_fn(model, b).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert any(r.has_clones for r in opt.roles.values())
    assert count.param_index_total == 0, dict(count.param_index_ops)


def test_rotated_cycles_after_a_graduation_compute_what_the_gather_path_computes(monkeypatch):
    """Round-robin sources after a graduation form a rotated cycle: weight-mode clone events broadcast from it,
    bit for bit the gather path's rows (the same graduated roles, spans patched away after graduating)."""

    def run(scattered: bool):
        model, opt, _ = _run("cnn", "weight", assign="round_robin", steps=1)
        opt.graduate(0.75)
        rotated = any(r.source_cycle is not None and r.source_cycle[2] for r in opt.roles.values())
        if scattered:
            _patch_scattered(monkeypatch)
        train_tiny(model, opt, 2, seed=3)
        return model, rotated

    fast, rotated = run(False)
    assert rotated
    slow, _ = run(True)
    for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("mode", ["output", "weight"])
def test_full_storage_holds_packed_clones_by_strided_copies(kind, mode, monkeypatch):
    """``state_storage="full"`` (and FSDP2, which masks each rank's slice alike) saves the clones' rows before the
    base step and writes them back after it: on packed roles by strided copies of their run, no index op, with the
    same result as the index path (roles made to look scattered; weight mode, whose forward pass is the same on
    both paths: output mode's folds would differ by summation order, which Adam blows up in noise gradients)."""
    fast, opt, count = _run(kind, mode, storage="full", count=True)
    assert opt.masked.storage == "full" and opt.masked._mask and all(e.runs for e in opt.masked._mask)
    assert count.param_index_total == 0, dict(count.param_index_ops)
    _patch_scattered(monkeypatch)
    monkeypatch.setattr(axes, "part_runs", lambda *a, **k: None)
    slow, opt, count = _run(kind, mode, storage="full", count=True)
    assert not any(e.runs for e in opt.masked._mask) and count.param_index_total > 0
    if mode == "weight":
        for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
            assert torch.equal(a, b), k
