"""egg_recipes.models: the seed's architectures, baselines, factory and FLOP counter."""

from __future__ import annotations

import pytest
import torch
from egg_recipes.models import (
    MLP,
    MODEL_NAMES,
    Bottleneck,
    SeedCIFARNet,
    SeedMNISTNet,
    SmallCNN,
    build_model,
    count_conv_linear_flops,
    narrow_model,
    narrow_widths,
)
from torch import nn

from egg_optim.errors import ConfigError

ROLE_LAYERS = [f"layer{b}.conv{c}" for b in (1, 2, 3) for c in (1, 2, 3)]


@pytest.mark.parametrize(
    ("name", "channels", "classes", "size"),
    [
        ("seed_mnist", 1, 10, 28),
        ("seed_mnist", 1, 10, 8),
        ("seed_cifar", 3, 100, 32),
        ("seed_cifar", 3, 10, 8),
        ("mlp", 1, 10, 8),
        ("mlp", 3, 7, 32),
        ("small_cnn", 1, 10, 8),
        ("small_cnn", 1, 10, 28),
        ("small_cnn", 3, 100, 32),
    ],
)
def test_build_model_output_shapes(name, channels, classes, size):
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, num_classes=classes, image_size=size)
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()


def test_seed_fc_widths_follow_image_size():
    assert SeedMNISTNet().fc1.in_features == 288  # 28 -> 14 -> 7 -> 3; 32 * 3 * 3
    assert SeedMNISTNet(image_size=8).fc1.in_features == 32  # 8 -> 4 -> 2 -> 1
    assert SeedCIFARNet().fc1.in_features == 1024  # 32 -> 16 -> 8 -> 4; 64 * 4 * 4
    m = SeedMNISTNet()
    assert (m.fc1.out_features, m.fc2.in_features, m.fc2.out_features) == (128, 128, 10)
    c = SeedCIFARNet()
    assert (c.fc1.out_features, c.fc2.out_features) == (1024, 100)
    assert m.dropout.p == 0.3 and c.dropout.p == 0.5
    with pytest.raises(ConfigError, match="too small"):
        SeedMNISTNet(image_size=4)


def test_seed_layer_names_and_block_widths():
    m = SeedMNISTNet()
    convs = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}
    assert set(ROLE_LAYERS) <= set(convs)
    blocks = ("layer1", "layer2", "layer3")
    widths = [(convs[f"{b}.conv1"].in_channels, convs[f"{b}.conv1"].out_channels) for b in blocks]
    widths = [(*w, convs[f"{b}.conv3"].out_channels) for w, b in zip(widths, blocks)]
    assert widths == [(1, 32, 64), (64, 32, 64), (64, 16, 32)]
    c = SeedCIFARNet()
    cw = [(c.get_submodule(b).conv1.in_channels, c.get_submodule(b).conv2.out_channels) for b in blocks]
    cw = [(*w, c.get_submodule(b).conv3.out_channels) for w, b in zip(cw, blocks)]
    assert cw == [(3, 128, 256), (256, 128, 128), (128, 32, 64)]
    assert m.layer1.conv2.kernel_size == (3, 3) and m.layer1.conv2.padding == (1, 1)
    assert m.layer1.conv1.kernel_size == (1, 1) and m.layer1.conv3.kernel_size == (1, 1)


def test_bottleneck_registration_order_and_shortcut():
    b = Bottleneck(4, 3, 6)
    assert [n for n, _ in b.named_children()] == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "shortcut"]
    assert isinstance(b.shortcut, nn.Sequential) and len(b.shortcut) == 2
    assert isinstance(b.shortcut[0], nn.Conv2d) and b.shortcut[0].kernel_size == (1, 1)
    assert isinstance(b.shortcut[1], nn.BatchNorm2d) and b.shortcut[1].num_features == 6
    # every conv is immediately followed (in named_modules leaf order) by the BN of its width
    leaves = [(n, m) for n, m in b.named_modules() if not list(m.children())]
    for (n, m), (n2, m2) in zip(leaves, leaves[1:]):
        if isinstance(m, nn.Conv2d):
            assert isinstance(m2, nn.BatchNorm2d) and m2.num_features == m.out_channels, (n, n2)
    same = Bottleneck(5, 2, 5)
    assert len(same.shortcut) == 0 and not list(same.shortcut.parameters())
    # the seed keeps conv biases, zero-initialised
    for conv in (b.conv1, b.conv2, b.conv3):
        assert conv.bias is not None and torch.count_nonzero(conv.bias) == 0


def test_bottleneck_identity_shortcut_is_residual():
    torch.manual_seed(0)
    b = Bottleneck(4, 2, 4).eval()
    for p in (b.conv3.weight, b.conv3.bias, b.bn3.bias):
        nn.init.zeros_(p)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(b(x), torch.relu(x))  # main path is zero -> relu(identity)


def test_mlp_and_small_cnn_layout():
    mlp = MLP(64, hidden=(32, 16), num_classes=5)
    assert [n for n, m in mlp.named_modules() if isinstance(m, nn.Linear)] == ["fc1", "fc2", "head"]
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(mlp(x), mlp(x.flatten(1)))
    cnn = SmallCNN(1, 10, width=8, image_size=8, num_blocks=3)
    assert [n for n, _ in cnn.named_children()][:6] == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3"]
    assert [cnn.conv1.out_channels, cnn.conv2.out_channels, cnn.conv3.out_channels] == [8, 16, 32]
    assert cnn.head.in_features == 32  # 8 -> 4 -> 2 -> 1
    assert build_model("mlp", in_channels=3, num_classes=4, image_size=(4, 6)).fc1.in_features == 72


def test_build_model_unknown_name():
    with pytest.raises(ConfigError) as info:
        build_model("resnet50", in_channels=1, num_classes=10, image_size=28)
    assert "resnet50" in str(info.value) and all(n in str(info.value) for n in MODEL_NAMES)
    assert isinstance(info.value, ValueError)


def test_seed_net_learns_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("seed_mnist", in_channels=1, num_classes=3, image_size=8)
    x, y = torch.randn(24, 1, 8, 8), torch.arange(24) % 3
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("layer1.conv"))


def test_flop_counter_matches_hand_computation():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))
    model.train()
    flops = count_conv_linear_flops(model, (2, 3, 10, 10))
    # conv: 2 images x 8 x 10 x 10 outputs, each 3 x 3 x 3 multiply-adds
    assert flops["0"] == 2 * (2 * 8 * 10 * 10) * (3 * 3 * 3)
    # linear: 2 rows x 5 outputs, each 800 multiply-adds
    assert flops["3"] == 2 * (2 * 5) * 800
    assert set(flops) == {"0", "3"}
    assert model.training  # mode restored
    grouped = nn.Conv2d(4, 8, 3, stride=2, groups=2)
    # output 8 x 4 x 4 (9 -> 4 with stride 2, no padding); each output sees 4/2 channels x 3 x 3
    assert count_conv_linear_flops(grouped, (1, 4, 9, 9))[""] == 2 * (8 * 4 * 4) * (2 * 3 * 3)


def test_flop_counter_on_seed_net():
    flops = count_conv_linear_flops(SeedMNISTNet(), (1, 1, 28, 28))
    assert set(ROLE_LAYERS) <= set(flops) and {"fc1", "fc2"} <= set(flops)
    assert flops["layer1.conv2"] == 2 * (32 * 28 * 28) * (32 * 9)
    assert flops["layer3.conv3"] == 2 * (32 * 7 * 7) * 16
    assert flops["fc1"] == 2 * 128 * 288


# ---------------------------------------------------------------------------- width-matched dense controls
def _plan(scenario, table):
    from egg_optim import RolePlan

    return RolePlan.preset(scenario, table)


@pytest.mark.parametrize(
    ("name", "table", "size"),
    [("seed_mnist", "mnist", 28), ("seed_cifar", "cifar", 8), ("small_cnn", "uniform", 28), ("mlp", "uniform", 8)],
)
@pytest.mark.parametrize("scenario", ["mild", "aggressive"])
def test_narrow_model_has_the_plans_active_widths(name, table, size, scenario):
    ch = 3 if name == "seed_cifar" else 1
    full = build_model(name, in_channels=ch, num_classes=10, image_size=size)
    plan = _plan(scenario, table)
    want = {n: lp.leaders + lp.independents for n, lp in plan.resolve(full).items()}
    assert want == narrow_widths(full, plan) and any(
        want[n] < dict(full.named_modules())[n].weight.shape[0] for n in want
    )
    net = narrow_model(name, plan, in_channels=ch, num_classes=10, image_size=size)
    mods = dict(net.named_modules())
    assert {n: mods[n].weight.shape[0] for n in want} == want
    # downstream widths follow: every layer reads what the layer before it writes
    if name.startswith("seed"):
        cin = ch
        for b in (1, 2, 3):
            blk = mods[f"layer{b}"]
            assert (blk.conv1.in_channels, blk.conv2.in_channels, blk.conv3.in_channels) == (
                cin, want[f"layer{b}.conv1"], want[f"layer{b}.conv2"],
            )  # fmt: skip
            assert blk.bn2.num_features == want[f"layer{b}.conv2"] and blk.bn3.num_features == want[f"layer{b}.conv3"]
            if len(blk.shortcut):
                assert (blk.shortcut[0].in_channels, blk.shortcut[0].out_channels) == (cin, want[f"layer{b}.conv3"])
            else:
                assert cin == want[f"layer{b}.conv3"]
            cin = want[f"layer{b}.conv3"]
        assert net.fc1.in_features == cin * (size // 8) ** 2
    assert net(torch.randn(2, ch, size, size)).shape == (2, 10)


def test_narrow_flops_against_output_cloning():
    """Output cloning computes the active output units but reads every input channel: the width-matched net
    computes about half its FLOPs on the seed net; the FLOP-matched control comes within 10 % below it. The
    ``active=`` count equals what an output-cloned model actually computes (its compact conv outputs)."""
    from egg_optim import LeaderCloneOptimizer

    plan = _plan("mild", "mnist")
    full = SeedMNISTNet()
    active = narrow_widths(full, plan)
    analytic = count_conv_linear_flops(full, (1, 1, 28, 28), active=active)
    lco = LeaderCloneOptimizer(full, torch.optim.Adam(full.parameters()), plan, clone_mode="output")
    full(torch.zeros(2, 1, 28, 28))  # the first forward gives the norm coupling (a counting hook would unfuse it)
    lco.couple_norms()
    assert count_conv_linear_flops(full, (1, 1, 28, 28)) == analytic  # hooks see the compact outputs
    lco.remove_output_cloning()
    out_total = sum(analytic.values())
    assert out_total < sum(count_conv_linear_flops(full, (1, 1, 28, 28)).values())
    shape = {"in_channels": 1, "num_classes": 10, "image_size": 28}
    narrow = sum(count_conv_linear_flops(narrow_model("seed_mnist", plan, **shape), (1, 1, 28, 28)).values())
    matched = narrow_model("seed_mnist", plan, match="flops", **shape)
    matched_total = sum(count_conv_linear_flops(matched, (1, 1, 28, 28)).values())
    assert 0.4 < narrow / out_total < 0.6
    assert 0.9 * out_total < matched_total <= out_total
    widths = {n: m.weight.shape[0] for n, m in matched.named_modules() if n in active}
    assert all(active[n] < widths[n] <= dict(full.named_modules())[n].weight.shape[0] for n in active)


def test_narrow_model_draws_its_init_like_build_model():
    plan = _plan("aggressive", "mnist")
    shape = {"in_channels": 1, "num_classes": 10, "image_size": 8}
    torch.manual_seed(3)
    a = narrow_model("seed_mnist", plan, **shape)
    after_a = torch.rand(1)
    widths = narrow_widths(SeedMNISTNet(image_size=8), plan)
    torch.manual_seed(3)
    b = build_model("seed_mnist", widths=widths, **shape)
    assert torch.equal(torch.rand(1), after_a)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_widths_are_checked():
    with pytest.raises(ConfigError, match="unknown layer 'layer4.conv1'"):
        SeedMNISTNet(widths={"layer4.conv1": 3})
    with pytest.raises(ConfigError, match="positive int, got 0"):
        SmallCNN(widths={"conv1": 0})
    with pytest.raises(ConfigError, match="unknown layer 'head'"):
        MLP(64, widths={"head": 4})
    with pytest.raises(ConfigError, match="match must be one of"):
        narrow_model("mlp", _plan("mild", "uniform"), in_channels=1, num_classes=10, image_size=8, match="params")
    with pytest.raises(ConfigError, match="active names unknown modules"):
        count_conv_linear_flops(SmallCNN(), (1, 1, 28, 28), active={"conv9": 1})
