"""clone_mode="output" through LeaderCloneOptimizer: the rewritten modules follow elections and checkpoints."""

import pytest
import torch
from conftest import TinySeedNet
from torch import nn

from egg_optim import LeaderCloneOptimizer, RolePlan

pytest.importorskip("egg_optim.rewrites.output_cloning")
from egg_optim.rewrites.output_cloning import is_output_cloned  # noqa: E402


def _make(**kw):
    kw = {"election": "grad_norm", **kw}
    torch.manual_seed(0)
    model = TinySeedNet()
    opt = LeaderCloneOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        RolePlan.preset("mild", table="mnist"),
        clone_mode="output",
        assign="random",
        **kw,
    )
    return model, opt


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(i)
        model(torch.randn(4, 1, 6, 6, generator=gen)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()


def _bn_out(model, x, bn):
    out = {}
    h = bn.register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    model(x)
    h.remove()
    return out["y"]


def test_clones_carry_leader_outputs_after_elections():
    model, opt = _make(elect_every=2)
    _train(model, opt, 5)
    assert opt.elections == 2
    assert all(is_output_cloned(layer.module) for layer in opt.layers.values())
    opt.clone_now()  # clone BN affine = leader's, so whole channels must match exactly
    model.train()
    y = _bn_out(model, torch.randn(3, 1, 6, 6), model.layer2.bn2)
    r = opt.roles["layer2.conv2"]
    assert torch.equal(y[:, r.clones], y[:, r.sources])


def test_clone_weight_gradients_are_zero():
    model, opt = _make()
    model(torch.randn(4, 1, 6, 6)).logsumexp(1).mean().backward()
    for name, layer in opt.layers.items():
        g = layer.module.weight.grad
        assert torch.count_nonzero(g[opt.roles[name].clones]) == 0, name
        assert torch.count_nonzero(g[opt.roles[name].active]) > 0, name


def test_export_and_state_roundtrip():
    model, opt = _make(elect_every=3)
    _train(model, opt, 4)
    x = torch.randn(5, 1, 6, 6)
    model.eval()
    expected = model(x)
    plain = opt.export_model()
    assert not any(is_output_cloned(m) for m in plain.modules())
    fresh = TinySeedNet()
    fresh.load_state_dict(plain.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)

    # a second optimizer restored from the first's state: modules follow the restored roles
    model2, opt2 = _make(elect_every=3, seed=99)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    model2.eval()
    torch.testing.assert_close(model2(x), expected, rtol=0, atol=0)


def test_remove_output_cloning_restores_plain_modules():
    torch.manual_seed(0)
    model = TinySeedNet()
    classes = {n: type(m) for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.3), clone_mode="output")
    assert type(model.layer1.conv2) is not nn.Conv2d and is_output_cloned(model.layer1.conv2)
    opt.remove_output_cloning()
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(p is params[n] for n, p in model.named_parameters())
    _train(model, opt, 2)  # weight mode from here on
    assert opt.clone_mode == "weight"


def test_election_keeps_outputs_of_clones_that_become_active():
    model, opt = _make(election="random")
    _train(model, opt, 3)
    old = opt.roles["layer1.conv1"]  # the first managed layer: its input does not depend on other roles
    x = torch.randn(5, 1, 6, 6)
    model.eval()
    before = _bn_out(model, x, model.layer1.bn1)
    opt.elect_now()
    new = opt.roles["layer1.conv1"]
    promoted = new.active[torch.isin(new.active, old.clones)]
    assert promoted.numel() > 0
    after = _bn_out(model, x, model.layer1.bn1)
    torch.testing.assert_close(after[:, promoted], before[:, promoted], rtol=1e-5, atol=1e-6)
