"""The seed's bottleneck CNNs and two small baselines, their width-matched dense controls, and a FLOP counter.

Module names and registration order are part of the API: role presets address ``layer1.conv1`` ...
``layer3.conv3``; each conv's BN is coupled to it because the forward pass feeds it the conv's output
(:mod:`egg_optim.core.coupling`). Blocks register ``conv1, bn1, conv2, bn2, conv3, bn3, shortcut`` in that order.

Like the seed, block convolutions keep their bias and use Kaiming-normal (ReLU) weights with zero bias; the
first fully connected layer's width is computed from ``image_size`` (288 for 28x28 MNIST, 1024 for 32x32
CIFAR) so the same nets also run on 8x8 digits.

Every model takes ``widths={layer name: output width}`` to narrow (or widen) named layers, and downstream
widths follow (a block's conv3 sets the block output, its shortcut and the next block's input; the last conv
sets the classifier input). :func:`narrow_model` uses it to build the *width-matched control* of a role plan:
the dense network whose managed layers have exactly the plan's active widths (leaders + independents, with the
plan's rounding), the comparison a reviewer asks of any cloning result.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from egg_optim.errors import ConfigError

__all__ = [
    "Bottleneck",
    "SeedMNISTNet",
    "SeedCIFARNet",
    "MLP",
    "SmallCNN",
    "MODEL_NAMES",
    "build_model",
    "narrow_widths",
    "narrow_model",
    "NARROW_MATCHES",
    "count_conv_linear_flops",
    "BasicBlock",
    "BlockResNet",
    "GlobalAvgPool",
]

ImageSize = int | Sequence[int]
Widths = Mapping[str, int]


def _check_widths(widths: Widths | None, allowed: Sequence[str], what: str) -> dict[str, int]:
    """``widths`` as a dict, refusing unknown layer names and widths that are not positive ints."""
    out = dict(widths or {})
    for name, w in out.items():
        if name not in allowed:
            raise ConfigError(f"{what}: widths names unknown layer {name!r}; layers are {list(allowed)}")
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ConfigError(f"{what}: width of {name!r} must be a positive int, got {w!r}")
    return out


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
    (identity). It gets no roles in the seed. ``conv2_ch`` (default ``mid_ch``) sets conv2's width apart from
    conv1's (a narrowed block whose two middle convs have different active widths).
    """

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, *, conv2_ch: int | None = None) -> None:
        super().__init__()
        c2 = mid_ch if conv2_ch is None else conv2_ch
        self.conv1 = nn.Conv2d(in_ch, mid_ch, kernel_size=1, bias=True)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, c2, kernel_size=3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, out_ch, kernel_size=1, bias=True)
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


_SEED_LAYERS = tuple(f"layer{b}.conv{c}" for b in (1, 2, 3) for c in (1, 2, 3)) + ("fc1",)


class _SeedNet(nn.Module):
    """Three bottleneck blocks, each followed by MaxPool 2x2, then dropout-regularised FC -> FC.

    ``blocks`` are the nominal ``(in, mid, out)`` widths; ``widths`` overrides ``layer{b}.conv{c}`` and
    ``fc1`` output widths, and each block's input is the previous block's (possibly narrowed) conv3 width."""

    def __init__(
        self,
        blocks: Sequence[tuple[int, int, int]],
        hidden: int,
        num_classes: int,
        dropout: float,
        image_size: ImageSize,
        widths: Widths | None = None,
    ) -> None:
        super().__init__()
        w = _check_widths(widths, _SEED_LAYERS, type(self).__name__)
        cin = blocks[0][0]
        for b, (_, mid, out) in enumerate(blocks, start=1):
            c1, c2, c3 = (w.get(f"layer{b}.conv{c}", d) for c, d in ((1, mid), (2, mid), (3, out)))
            setattr(self, f"layer{b}", Bottleneck(cin, c1, c3, conv2_ch=c2))
            setattr(self, f"pool{b}", nn.MaxPool2d(2, 2))
            cin = c3
        hidden = w.get("fc1", hidden)
        self.dropout = nn.Dropout(dropout)
        oh, ow = _pooled(image_size, 3, type(self).__name__)
        self.image_size = _size_pair(image_size)
        self.fc1 = nn.Linear(cin * oh * ow, hidden)
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
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        image_size: ImageSize = 28,
        dropout: float = 0.3,
        widths: Widths | None = None,
    ) -> None:
        blocks = [(in_channels, 32, 64), (64, 32, 64), (64, 16, 32)]
        super().__init__(blocks, 128, num_classes, dropout, image_size, widths)


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
        widths: Widths | None = None,
    ) -> None:
        blocks = [(in_channels, 128, 256), (256, 128, 128), (128, 32, 64)]
        super().__init__(blocks, 1024, num_classes, dropout, image_size, widths)


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) per hidden width -> Linear ``head``. Layers are ``fc1, fc2, ..., head``;
    ``widths={"fc2": 64}`` overrides hidden widths by layer name."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256, 256),
        num_classes: int = 10,
        dropout: float = 0.0,
        widths: Widths | None = None,
    ) -> None:
        super().__init__()
        w = _check_widths(widths, [f"fc{i}" for i in range(1, len(hidden) + 1)], "MLP")
        hidden = [w.get(f"fc{i}", int(h)) for i, h in enumerate(hidden, start=1)]
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

    Convs are ``conv1, conv2, ...`` each followed by ``bn1, bn2, ...`` (no conv bias: BN follows);
    ``widths={"conv1": 12}`` overrides conv widths by layer name.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        *,
        image_size: ImageSize = 28,
        num_blocks: int = 2,
        widths: Widths | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= num_blocks <= 3:
            raise ConfigError(f"SmallCNN num_blocks must be 1, 2 or 3, got {num_blocks}")
        w = _check_widths(widths, [f"conv{i}" for i in range(1, num_blocks + 1)], "SmallCNN")
        self.num_blocks = num_blocks
        cin = in_channels
        for i in range(1, num_blocks + 1):
            cout = w.get(f"conv{i}", width * 2 ** (i - 1))
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


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions: ``[N, C, H, W] -> [N, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class BlockResNet(nn.Module):
    """A small ResNet for block-wise training (DGL, block-wise LFNN-l): ``stem`` (conv3x3-BN-ReLU), one basic
    block ``stage{k}`` per width (stride 2 from the second on), ``pool`` (global average) and ``head``
    (Linear). :meth:`blocks` cuts it into gradient-isolated blocks; :meth:`local_blocks` names the K = stages
    blocks of the LFNN study (every stage its own block, the stem with the first)."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        if not widths or any(int(w) < 1 for w in widths):
            raise ConfigError(f"BlockResNet widths must be positive, got {tuple(widths)}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        self.stages = len(widths)
        cin = widths[0]
        for k, w in enumerate(widths, start=1):
            setattr(self, f"stage{k}", BasicBlock(cin, w, stride=1 if k == 1 else 2))
            cin = w
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for k in range(1, self.stages + 1):
            x = getattr(self, f"stage{k}")(x)
        return self.head(self.pool(x))

    def local_blocks(self) -> dict[str, list[str]]:
        blocks = {"b1": ["stem", "stage1"]}
        blocks.update({f"b{k}": [f"stage{k}"] for k in range(2, self.stages)})
        return blocks

    def blocks(self, cuts: Sequence[int]) -> list[nn.Sequential]:
        """The network as ``len(cuts) + 1`` consecutive blocks sharing this model's modules (same names):
        a new block starts after ``stage{c}`` for each ``c`` in ``cuts``; the last block ends with ``head``.
        Chained, the blocks compute :meth:`forward`."""
        cuts = [int(c) for c in cuts]
        if any(not 1 <= c < self.stages for c in cuts) or cuts != sorted(set(cuts)):
            raise ConfigError(
                f"cuts {cuts} must be increasing stage indices in 1..{self.stages - 1} (a block starts after "
                f"stage c); this BlockResNet has {self.stages} stages"
            )
        names = ["stem", *(f"stage{k}" for k in range(1, self.stages + 1)), "pool", "head"]
        bounds = [0, *(c + 1 for c in cuts), len(names)]  # names[c + 1] is stage{c + 1}
        return [
            nn.Sequential(OrderedDict((n, getattr(self, n)) for n in names[a:b])) for a, b in zip(bounds, bounds[1:])
        ]


MODEL_NAMES = ("seed_mnist", "seed_cifar", "mlp", "small_cnn")


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: ImageSize, **kwargs) -> nn.Module:
    """Build a model by name (``seed_mnist``, ``seed_cifar``, ``mlp``, ``small_cnn``) for the given input.

    ``kwargs`` go to the model's constructor (e.g. ``dropout=``, ``hidden=``, ``width=``). Pair with
    :func:`egg_recipes.data.dataset_spec`: ``build_model(n, in_channels=s.channels, num_classes=s.num_classes,
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


NARROW_MATCHES = ("widths", "flops")


def narrow_widths(model: nn.Module, plan) -> dict[str, int]:
    """``{layer: leaders + independents}`` of ``plan`` (a :class:`~egg_optim.RolePlan`) resolved on ``model``:
    the widths at which a dense network computes, per layer, as many output units as output cloning."""
    return {name: lp.leaders + lp.independents for name, lp in plan.resolve(model).items()}


def _flops(model: nn.Module, image_size: ImageSize, in_channels: int, active: Mapping[str, int] | None = None) -> int:
    h, w = _size_pair(image_size)
    return sum(count_conv_linear_flops(model, (1, in_channels, h, w), active).values())


def narrow_model(
    name: str,
    plan,
    *,
    in_channels: int,
    num_classes: int,
    image_size: ImageSize,
    match: str = "widths",
    **kwargs,
) -> nn.Module:
    """The dense control of ``plan`` (a :class:`~egg_optim.RolePlan`) for model ``name``: nothing is cloned and
    every layer the plan manages is narrowed; downstream widths follow.

    ``match="widths"``: each managed layer gets its active width (leaders + independents, the plan's rounding).
    That net computes about half the FLOPs of output cloning under the same plan, whose layers still read every
    input channel (clones carry copies). ``match="flops"``: the active widths scaled by the largest common factor
    (each capped at the full width) whose counted forward FLOPs (:func:`count_conv_linear_flops`) do not exceed
    output cloning's: the equal-compute control. The model's initialisation draws from the global RNG as a
    direct ``build_model`` call would (the helper builds run under a forked RNG)."""
    if match not in NARROW_MATCHES:
        raise ConfigError(f"narrow_model: match must be one of {NARROW_MATCHES}, got {match!r}")
    common = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size, **kwargs}
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # shapes only: no weights drawn or stored
        full = build_model(name, **common)
        active = narrow_widths(full, plan)
        widths = dict(active)
        if match == "flops":
            budget = _flops(full, image_size, in_channels, active)
            units = {n: m.weight.shape[0] for n, m in full.named_modules() if n in active}

            def scaled(f: float) -> dict[str, int]:
                return {n: min(units[n], max(1, round(f * k))) for n, k in active.items()}

            lo, hi = 1.0, max(units[n] / k for n, k in active.items())
            for _ in range(24):  # FLOPs grow with f: the largest f within budget
                mid = (lo + hi) / 2
                if _flops(build_model(name, widths=scaled(mid), **common), image_size, in_channels) <= budget:
                    lo = mid
                else:
                    hi = mid
            widths = scaled(lo)
    return build_model(name, widths=widths, **common)


@torch.no_grad()
def count_conv_linear_flops(
    model: nn.Module, input_shape: Sequence[int], active: Mapping[str, int] | None = None
) -> dict[str, int]:
    """FLOPs (2 x multiply-adds, bias adds not counted) of every Conv/Linear in one forward of a zero input.

    ``input_shape`` includes the batch dimension, e.g. ``(1, 1, 28, 28)``; counts scale with it. Returns
    ``{module name: flops}`` for the modules that ran, in call order. The model is run in eval mode and its
    train/eval state is restored. ``active={name: k}`` counts layer ``name`` as computing only ``k`` of its
    output units (what output cloning computes: leaders + independents, every input channel read); the model
    itself should then be the plain one.
    """
    counts: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}
    active = dict(active or {})
    unknown = set(active) - set(names.values())
    if unknown:
        raise ConfigError(f"count_conv_linear_flops: active names unknown modules {sorted(unknown)}")

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            macs = output.numel() * module.in_features
            units = module.out_features
        else:
            macs = output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
            units = module.out_channels
        name = names[module]
        if name in active:
            macs = macs // units * min(int(active[name]), units)
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
