"""Net2Net widening, the growth control of the graduation study: the widened seed net computes what the narrow
one did (train and eval mode), Adam continues as if the copies had always been there, noise breaks the copies'
symmetry, and train_image's --grow-net2net grows at its points and refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from egg_optim import RolePlan
from egg_optim.errors import ConfigError

pytest.importorskip("accelerate")

from egg_recipes import train_image  # noqa: E402
from egg_recipes.models import MLP, build_model, narrow_model  # noqa: E402
from egg_recipes.net2net import carry_optimizer_state, seed_net_widths, widen_seed_net  # noqa: E402

SHAPE = {"in_channels": 1, "num_classes": 10, "image_size": 28}


def _narrow(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = narrow_model("seed_mnist", RolePlan.preset("mild", table="mnist"), **SHAPE)
    for m in net.modules():  # a trained-looking net: BatchNorm statistics and affine parameters away from init
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1.0, 0.2)
            m.bias.data.normal_()
    return net


FULL = seed_net_widths(build_model("seed_mnist", **SHAPE))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("widths", [FULL, {k: v * 3 // 4 for k, v in FULL.items()} | {"fc1": 200}])
def test_widening_keeps_the_function(mode, widths):
    net = _narrow()
    wide, _ = widen_seed_net(net, "seed_mnist", widths, generator=torch.Generator().manual_seed(1), **SHAPE)
    assert seed_net_widths(wide) == {**seed_net_widths(net), **widths} != seed_net_widths(net)
    x = torch.randn(8, 1, 28, 28)
    for m in (net, wide):
        getattr(m, mode)()
        m.dropout.p = 0.0  # dropout draws per unit: the wider net would draw other masks
    with torch.no_grad():
        torch.testing.assert_close(wide(x), net(x), rtol=1e-4, atol=1e-5)


def test_noise_moves_only_the_copies_and_breaks_their_symmetry():
    net = _narrow()
    gen = torch.Generator().manual_seed(1)
    clean, _ = widen_seed_net(net, "seed_mnist", FULL, generator=torch.Generator().manual_seed(1), **SHAPE)
    noisy, _ = widen_seed_net(net, "seed_mnist", FULL, generator=gen, noise=0.05, **SHAPE)
    old = net.layer1.conv1.out_channels
    a, b = clean.layer1.conv1.weight, noisy.layer1.conv1.weight
    assert torch.equal(a[:old], b[:old]) and not torch.equal(a[old:], b[old:])
    rel = (a[old:] - b[old:]).norm() / a[old:].norm()
    assert 0.01 < rel < 0.2
    x = torch.randn(8, 1, 28, 28)
    clean.eval(), noisy.eval()
    with torch.no_grad():
        assert not torch.equal(clean(x), noisy(x))


def test_adam_state_is_mapped_like_the_weights():
    """Copied rows take their source's moments; split columns the first moment divided by the copy count and the
    second by its square; the step count is kept (a copy, not the same tensor)."""
    net = _narrow()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    net.train()
    net.dropout.p = 0.0
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    wide, mapping = widen_seed_net(net, "seed_mnist", FULL, generator=torch.Generator().manual_seed(1), **SHAPE)
    wide_opt = torch.optim.Adam(wide.parameters(), lr=1e-3)
    carry_optimizer_state(net, wide, mapping, opt, wide_opt)
    assert len(wide_opt.state) == len(list(wide.parameters()))
    rows, _ = mapping["layer1.conv1.weight"]
    new_state = wide_opt.state[wide.layer1.conv1.weight]
    old_state = opt.state[net.layer1.conv1.weight]
    torch.testing.assert_close(new_state["exp_avg"], old_state["exp_avg"][rows.index])
    rows2, (index, count) = mapping["layer1.conv2.weight"]
    torch.testing.assert_close(
        wide_opt.state[wide.layer1.conv2.weight]["exp_avg_sq"],
        opt.state[net.layer1.conv2.weight]["exp_avg_sq"][rows2.index][:, index] / count.pow(2).view(1, -1, 1, 1),
    )
    assert (count > 1).any()
    assert new_state["step"] == old_state["step"] and new_state["step"] is not old_state["step"]


def test_identity_shortcuts_keep_one_mapping_and_narrowing_is_refused():
    net = _narrow()
    wide, _ = widen_seed_net(net, "seed_mnist", FULL, generator=torch.Generator().manual_seed(3), **SHAPE)
    assert len(wide.layer2.shortcut) == 0  # still an identity: layer1.conv3 and layer2.conv3 grew alike
    with pytest.raises(ConfigError, match="identity shortcut"):
        widen_seed_net(net, "seed_mnist", {"layer2.conv3": 40}, generator=torch.Generator(), **SHAPE)
    with pytest.raises(ConfigError, match="cannot narrow"):
        widen_seed_net(net, "seed_mnist", {"fc1": 8}, generator=torch.Generator(), **SHAPE)
    with pytest.raises(ConfigError, match="seed nets"):
        widen_seed_net(MLP(64), "mlp", {}, generator=torch.Generator(), **SHAPE)


FAST = [
    "--dataset", "digits", "--batch-size", "64", "--max-train-samples", "256", "--max-eval-samples", "64",
    "--report-to", "none", "--no-progress", "--scenario", "narrow-mild",
]  # fmt: skip


def test_train_image_grows_at_its_points_and_counts_the_wider_flops(tmp_path):
    argv = [*FAST, "--epochs", "3", "--grow-net2net", "epoch1:0.75,epoch2:1", "--output-dir", str(tmp_path / "g")]
    m = train_image.train(train_image.parse_args(argv))
    flops = [e["flops"] for e in m["epochs"]]
    updates = [e["updates"] for e in m["epochs"]]
    assert flops[0] < flops[1] < flops[2] and updates[0] < updates[1] < updates[2]
    full = train_image.train(
        train_image.parse_args([*FAST, "--epochs", "1", "--scenario", "baseline", "--output-dir", str(tmp_path / "b")])
    )
    assert flops[2] == full["epochs"][0]["flops"]  # dense at the last point: the bare net's FLOPs
    assert updates[2] == full["epochs"][0]["updates"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--scenario", "mild", "--grow-net2net", "epoch1:1"], "grows a narrow-* dense control"),
        (["--grow-net2net", "epoch2:0.5,epoch1:1"], "cannot read 'epoch2:0.5,epoch1:1' (graduation points must have"),
        (["--grow-net2net", "never"], "give epoch points"),
        (["--grow-net2net", "600:1"], "--grow-net2net 600:1: give epoch points"),
        (["--grow-net2net", "epoch1:1", "--model", "mlp"], "handles the seed nets (seed_mnist, seed_cifar), not"),
        (["--grow-net2net", "epoch1:1", "--save-every", "5"], "no --resume-from/--save-every"),
        (["--grow-net2net", "epoch1:1", "--grow-noise", "-1"], "--grow-noise: must be >= 0"),
    ],
)
def test_grow_flags_are_refused_in_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        train_image.main([*FAST, *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err
