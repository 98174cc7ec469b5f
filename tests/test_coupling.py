"""Norm coupling from evidence (egg_optim.core.coupling): a norm is coupled to a layer only when the first forward
pass shows it normalises that layer's output, and fused by output cloning only when nothing else reads it."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import TinySeedNet
from egg_recipes.models import SeedMNISTNet
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from egg_optim import LeaderCloneOptimizer, RolePlan, StateDictMismatchError

# How block i wires conv_i and bn_i (registered as conv_i, bn_i, side_i: the order a registration heuristic reads as
# "conv_i -> bn_i"). Expected: (coupled, fused in output mode).
WIRINGS = {
    "direct": (True, True),  # relu(bn(conv(h)))
    "norm_after_relu": (False, False),  # bn(relu(conv(h))): the norm's input is not the layer's output
    "post_add": (False, False),  # bn(conv(h) + h): BERT's post-add LayerNorm
    "extra_use": (True, False),  # relu(bn(y)) + y: the output is read outside the norm
    "other_branch": (False, False),  # relu(conv(h)) + bn(side(h)): the norm is on another (unmanaged) conv
    "called_twice": (True, False),  # relu(bn(conv(h))) + relu(conv(h)): second call not normalised
}


class Wired(nn.Module):
    def __init__(self, kinds: list[str], width: int = 6) -> None:
        super().__init__()
        self.kinds = list(kinds)
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.sides = nn.ModuleList()
        for _ in kinds:
            self.convs.append(nn.Conv2d(width, width, 3, padding=1))
            self.bns.append(nn.BatchNorm2d(width))
            self.sides.append(nn.Conv2d(width, width, 1))
        self.head = nn.Linear(width, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for kind, conv, bn, side in zip(self.kinds, self.convs, self.bns, self.sides):
            if kind == "direct":
                h = F.relu(bn(conv(h)))
            elif kind == "norm_after_relu":
                h = bn(F.relu(conv(h)))
            elif kind == "post_add":
                h = bn(conv(h) + h)
            elif kind == "extra_use":
                y = conv(h)
                h = F.relu(bn(y)) + y
            elif kind == "other_branch":
                h = F.relu(conv(h)) + bn(side(h))
            else:  # called_twice
                h = F.relu(bn(conv(h))) + F.relu(conv(h))
        return self.head(h.mean(dim=(2, 3)))


def _run(model, opt, steps=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    channels = 1 if isinstance(model, TinySeedNet) else 6
    for _ in range(steps):
        model(torch.randn(4, channels, 5, 5, generator=gen)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()


@settings(max_examples=25, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(sorted(WIRINGS)), min_size=1, max_size=3),
    mode=st.sampled_from(["weight", "output"]),
    seed=st.integers(0, 100),
)
def test_coupling_follows_the_dataflow_and_output_mode_computes_right(kinds, mode, seed):
    """Whatever the wiring: the forward pass runs (no channel mismatch), exactly the norms fed the layer's output
    are coupled, only exclusively fed ones are fused, and the trained model reloads into the plain class."""
    torch.manual_seed(seed)
    model = Wired(kinds)
    plan = RolePlan(0.5, 0.0, layers=["convs.*"])
    opt = LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), plan, clone_mode=mode, seed=seed)
    assert opt.coupling_pending and opt.coupled_norms == {}
    _run(model, opt)
    assert not opt.coupling_pending
    want_coupled = {f"convs.{i}": f"bns.{i}" for i, k in enumerate(kinds) if WIRINGS[k][0]}
    assert opt.coupled_norms == want_coupled
    for i, _ in enumerate(kinds):
        names = {n for n, _ in opt.layers[f"convs.{i}"].params}
        assert ({f"bns.{i}.weight", f"bns.{i}.bias"} <= names) == (f"convs.{i}" in want_coupled)
    if mode == "output":
        want_fused = {f"convs.{i}": f"bns.{i}" for i, k in enumerate(kinds) if WIRINGS[k][1]}
        assert opt.output_cloning.norms == want_fused
    x = torch.randn(3, 6, 5, 5)
    model.eval()
    with torch.no_grad():
        y = model(x)
        fresh = Wired(kinds).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)


def test_seed_cnns_keep_their_conv_bn_pairs(caplog):
    for net, plan in ((TinySeedNet(), RolePlan.preset("mild", table="mnist")), (SeedMNISTNet(), RolePlan(0.5, 0.1))):
        opt = LeaderCloneOptimizer(net, torch.optim.SGD(net.parameters(), lr=0.1), plan, clone_mode="output")
        with caplog.at_level(logging.INFO, logger="egg_optim"):
            net(torch.randn(2, 1, 28, 28) if isinstance(net, SeedMNISTNet) else torch.randn(2, 1, 6, 6))
            assert opt.coupling_pending and opt.coupled_norms == {}  # the forward pass only records evidence
            opt.couple_norms()  # the named point (or the next step)
        pairs = {f"layer{b}.conv{c}": f"layer{b}.bn{c}" for b in (1, 2, 3) for c in (1, 2, 3)}
        if isinstance(net, SeedMNISTNet):  # every conv except the last Linear is managed, shortcuts included
            pairs.update({f"layer{b}.shortcut.0": f"layer{b}.shortcut.1" for b in (1, 3)})
        assert opt.coupled_norms == pairs
        assert opt.output_cloning.norms == pairs
        assert "layer1.conv1 -> layer1.bn1" in caplog.text


def test_explicit_norms_win():
    torch.manual_seed(0)
    model = Wired(["direct", "norm_after_relu"])
    explicit = {"convs.0": None, "convs.1": "bns.1"}
    plan = RolePlan(0.5, layers=["convs.*"])
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), plan, norms=explicit)
    assert opt.coupled_norms == {"convs.1": "bns.1"}  # explicit couplings hold from construction
    _run(model, opt, 1)
    assert opt.coupled_norms == {"convs.1": "bns.1"}


def test_step_without_a_forward_pass_couples_only_explicit_norms(caplog):
    model = TinySeedNet()
    opt = LeaderCloneOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5), norms={"layer1.conv1": "layer1.bn1"}
    )
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with caplog.at_level(logging.WARNING, logger="egg_optim"):
        opt.step()
    assert "no complete eager forward pass" in caplog.text
    assert opt.coupled_norms == {"layer1.conv1": "layer1.bn1"} and not opt.coupling_pending
    model(torch.randn(2, 1, 6, 6))  # decided once: a later forward changes nothing
    assert opt.coupled_norms == {"layer1.conv1": "layer1.bn1"}


@pytest.mark.parametrize("mode", ["weight", "output"])
def test_a_resumed_optimizer_adopts_the_saved_coupling(mode):
    def make(**kw):
        torch.manual_seed(0)
        model = TinySeedNet()
        base = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, LeaderCloneOptimizer(model, base, RolePlan.preset("mild", table="mnist"), clone_mode=mode, **kw)

    model_a, a = make()
    saved_pending = a.state_dict()
    _run(model_a, a, 2, seed=1)
    model_b, b = make()
    b.load_state_dict(saved_pending)  # saved before any forward pass: nothing to adopt
    assert b.coupling_pending
    model_b, b = make()
    b.load_state_dict(a.state_dict())
    assert not b.coupling_pending and b.coupled_norms == a.coupled_norms and len(b.coupled_norms) == 9
    if mode == "output":
        assert b.output_cloning.norms == a.output_cloning.norms
    for name, layer in a.layers.items():  # compact state of the norm parameters too
        for (_, p), (_, q) in zip(layer.params, b.layers[name].params):
            assert all(torch.equal(v, b.state[q][k]) for k, v in a.state[p].items()), name

    # an optimizer that decided otherwise refuses the state dict and keeps its own
    model_c, c = make(norms={"layer1.conv1": None})
    _run(model_c, c, 1)
    before = copy.deepcopy(c.state_dict())
    with pytest.raises(StateDictMismatchError, match="norm coupling"):
        c.load_state_dict(a.state_dict())
    after = c.state_dict()
    assert after["egg_optim"]["coupling"] == before["egg_optim"]["coupling"]
    assert all(torch.equal(v, after["state"][i][k]) for i, st_ in before["state"].items() for k, v in st_.items())


def test_deep_copies_carry_inert_hooks():
    model = TinySeedNet()
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5))
    twin = copy.deepcopy(model)  # before the decision: the copy's hooks must not decide for the original
    twin(torch.randn(2, 1, 6, 6))
    model(torch.randn(2, 1, 6, 6))
    assert opt.coupling_pending
    opt.couple_norms()
    assert len(opt.coupled_norms) == 9 + 2  # block convs and the two shortcut convs


@pytest.mark.parametrize("mode", ["weight", "output"])
def test_the_forward_pass_only_records_and_the_next_step_couples(mode):
    """Nothing changes inside the first forward pass: the coupling (new unit tensors, fused norm classes) is
    applied at the start of the next step, before its update, so that step already holds clone norm entries."""
    torch.manual_seed(0)
    model = TinySeedNet()
    plan = RolePlan.preset("mild", table="mnist")
    opt = LeaderCloneOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), plan, clone_mode=mode, clone_every=None
    )
    classes = {n: type(m) for n, m in model.named_modules()}
    model(torch.randn(2, 1, 6, 6)).logsumexp(1).mean().backward()
    assert opt.coupling_pending and opt.coupled_norms == {}
    assert {n: type(m) for n, m in model.named_modules()} == classes
    bn = model.layer1.bn1
    before = bn.weight.detach().clone()
    opt.step()
    assert not opt.coupling_pending and opt.coupled_norms["layer1.conv1"] == "layer1.bn1"
    if mode == "output":
        assert opt.output_cloning.norms["layer1.conv1"] == "layer1.bn1"
    clones = opt.roles["layer1.conv1"].clones
    assert torch.equal(bn.weight.detach()[clones], before[clones])  # frozen in the very step that coupled them


@pytest.mark.parametrize("mode", ["weight", "output"])
def test_couple_norms_with_an_example_decides_from_one_eager_pass_that_changes_nothing(mode, caplog):
    """``opt.couple_norms(x)`` before ``torch.compile``: one eager forward pass of ``x`` in eval mode without
    gradients gives the evidence (a compiled pass gives none), so the compiled model trains with the coupling an
    eager first step decides; nothing trains, no running statistic moves, the mode is restored; once decided the
    example is not run again."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6)
    plan = RolePlan.preset("mild", table="mnist")
    model = TinySeedNet()
    twin = copy.deepcopy(model)
    ref = LeaderCloneOptimizer(twin, torch.optim.SGD(twin.parameters(), lr=0.1), plan, clone_mode=mode)
    twin(x).logsumexp(1).mean().backward()
    ref.step()  # the eager way: the first training step decides

    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), plan, clone_mode=mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    hook = model.register_forward_hook(lambda m, i, o: calls.append((m.training, torch.is_grad_enabled())))
    coupled = opt.couple_norms(x)
    assert calls == [(False, False)] and model.training
    assert coupled == ref.coupled_norms and len(coupled) == 9  # every conv with its BatchNorm
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.couple_norms(x) == coupled and len(calls) == 1  # decided: the example is not run again
    hook.remove()
    compiled = torch.compile(model, backend="eager")
    with caplog.at_level(logging.WARNING, logger="egg_optim"):
        compiled(x).logsumexp(1).mean().backward()
        opt.step()
    assert "no complete eager forward pass" not in caplog.text and opt.coupled_norms == coupled
