"""egg_optim.kit.models: the seed's architectures, baselines, factory and FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from egg_optim.errors import ConfigError
from egg_optim.kit.models import (
    MLP,
    MODEL_NAMES,
    Bottleneck,
    SeedCIFARNet,
    SeedMNISTNet,
    SmallCNN,
    build_model,
    count_conv_linear_flops,
)

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
