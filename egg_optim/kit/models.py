"""The seed's bottleneck CNNs and two small baselines, plus a Conv/Linear FLOP counter.

Module names and registration order are part of the API: role presets address ``layer1.conv1`` ...
``layer3.conv3``; each conv's BN is coupled to it because the forward pass feeds it the conv's output
(:mod:`egg_optim.core.coupling`). Blocks register ``conv1, bn1, conv2, bn2, conv3, bn3, shortcut`` in that order.

Like the seed, block convolutions keep their bias and use Kaiming-normal (ReLU) weights with zero bias; the
first fully connected layer's width is computed from ``image_size`` (288 for 28x28 MNIST, 1024 for 32x32
CIFAR) so the same nets also run on 8x8 digits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = [
    "Bottleneck",
    "SeedMNISTNet",
    "SeedCIFARNet",
    "MLP",
    "SmallCNN",
    "MODEL_NAMES",
    "build_model",
    "count_conv_linear_flops",
]

ImageSize = int | Sequence[int]


def _size_pair(image_size: ImageSize) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = (int(v) for v in image_size)
    return (h, w)


def _pooled(image_size: ImageSize, times: int, what: str) -> tuple[int, int]:
    """Spatial size after ``times`` MaxPool2d(2, 2) (floor), refusing sizes that pool down to nothing."""
    h, w = _size_pair(image_size)
    oh, ow = h // 2**times, w // 2**times
    if oh < 1 or ow < 1:
        raise ConfigError(
            f"{what}: image_size {h}x{w} is too small for {times} 2x2 poolings (needs at least {2**times}x{2**times})"
        )
    return oh, ow


class Bottleneck(nn.Module):
    """The seed's block: conv1 1x1-BN-ReLU, conv2 3x3-BN-ReLU, conv3 1x1-BN, plus shortcut, then ReLU.

    The shortcut is a 1x1 conv + BN when the channel count changes, else an empty ``nn.Sequential``
    (identity). It gets no roles in the seed.
    """

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, kernel_size=1, bias=True)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, kernel_size=3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, kernel_size=1, bias=True)
        self.bn3 = nn.BatchNorm2d(out_ch)
        if in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=True), nn.BatchNorm2d(out_ch))
        else:
            self.shortcut = nn.Sequential()
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class _SeedNet(nn.Module):
    """Three bottleneck blocks, each followed by MaxPool 2x2, then dropout-regularised FC -> FC."""

    def __init__(
        self,
        blocks: Sequence[tuple[int, int, int]],
        hidden: int,
        num_classes: int,
        dropout: float,
        image_size: ImageSize,
    ) -> None:
        super().__init__()
        (b1, b2, b3) = blocks
        self.layer1 = Bottleneck(*b1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.layer2 = Bottleneck(*b2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.layer3 = Bottleneck(*b3)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout(dropout)
        oh, ow = _pooled(image_size, 3, type(self).__name__)
        self.image_size = _size_pair(image_size)
        self.fc1 = nn.Linear(b3[2] * oh * ow, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.layer1(x))
        x = self.pool2(self.layer2(x))
        return self.pool3(self.layer3(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.forward_features(x), 1)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)


class SeedMNISTNet(_SeedNet):
    """The seed's MNIST net: blocks (in,32,64), (64,32,64), (64,16,32); dropout 0.3; FC 288 -> 128 -> 10."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, *, image_size: ImageSize = 28, dropout: float = 0.3
    ) -> None:
        super().__init__([(in_channels, 32, 64), (64, 32, 64), (64, 16, 32)], 128, num_classes, dropout, image_size)


class SeedCIFARNet(_SeedNet):
    """The seed's CIFAR-100 net: blocks (in,128,256), (256,128,128), (128,32,64); dropout 0.5;
    FC 1024 -> 1024 -> classes (also the seed's Fashion-MNIST net, fed 32x32x3)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 100,
        *,
        image_size: ImageSize = 32,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(
            [(in_channels, 128, 256), (256, 128, 128), (128, 32, 64)], 1024, num_classes, dropout, image_size
        )


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) per hidden width -> Linear ``head``. Layers are ``fc1, fc2, ..., head``."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256, 256),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        width = self.in_features
        self.hidden_names: list[str] = []
        for i, h in enumerate(hidden, start=1):
            setattr(self, f"fc{i}", nn.Linear(width, int(h)))
            self.hidden_names.append(f"fc{i}")
            width = int(h)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for name in self.hidden_names:
            x = self.dropout(F.relu(getattr(self, name)(x)))
        return self.head(x)


class SmallCNN(nn.Module):
    """``num_blocks`` x (conv3x3 -> BN -> ReLU -> MaxPool 2x2), widths ``width * 2**i``, then Linear ``head``.

    Convs are ``conv1, conv2, ...`` each followed by ``bn1, bn2, ...`` (no conv bias: BN follows).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        *,
        image_size: ImageSize = 28,
        num_blocks: int = 2,
    ) -> None:
        super().__init__()
        if not 1 <= num_blocks <= 3:
            raise ConfigError(f"SmallCNN num_blocks must be 1, 2 or 3, got {num_blocks}")
        self.num_blocks = num_blocks
        cin = in_channels
        for i in range(1, num_blocks + 1):
            cout = width * 2 ** (i - 1)
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
            cin = cout
        self.pool = nn.MaxPool2d(2, 2)
        oh, ow = _pooled(image_size, num_blocks, "SmallCNN")
        self.head = nn.Linear(cin * oh * ow, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_blocks + 1):
            x = self.pool(F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x))))
        return self.head(torch.flatten(x, 1))


MODEL_NAMES = ("seed_mnist", "seed_cifar", "mlp", "small_cnn")


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: ImageSize, **kwargs) -> nn.Module:
    """Build a model by name (``seed_mnist``, ``seed_cifar``, ``mlp``, ``small_cnn``) for the given input.

    ``kwargs`` go to the model's constructor (e.g. ``dropout=``, ``hidden=``, ``width=``). Pair with
    :func:`egg_optim.kit.data.dataset_spec`: ``build_model(n, in_channels=s.channels, num_classes=s.num_classes,
    image_size=s.image_size)``.
    """
    key = str(name).strip().lower()
    if key == "seed_mnist":
        return SeedMNISTNet(in_channels, num_classes, image_size=image_size, **kwargs)
    if key == "seed_cifar":
        return SeedCIFARNet(in_channels, num_classes, image_size=image_size, **kwargs)
    if key == "mlp":
        h, w = _size_pair(image_size)
        return MLP(in_channels * h * w, num_classes=num_classes, **kwargs)
    if key == "small_cnn":
        return SmallCNN(in_channels, num_classes, image_size=image_size, **kwargs)
    raise ConfigError(f"unknown model {name!r}; choices: {', '.join(MODEL_NAMES)}")


@torch.no_grad()
def count_conv_linear_flops(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """FLOPs (2 x multiply-adds, bias adds not counted) of every Conv/Linear in one forward of a zero input.

    ``input_shape`` includes the batch dimension, e.g. ``(1, 1, 28, 28)``; counts scale with it. Returns
    ``{module name: flops}`` for the modules that ran, in call order. The model is run in eval mode and its
    train/eval state is restored.
    """
    counts: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            macs = output.numel() * module.in_features
        else:
            macs = output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        name = names[module]
        counts[name] = counts.get(name, 0) + 2 * int(macs)

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(tuple(int(s) for s in input_shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counts
