import os

# Tests use tiny tensors and start extra processes: one intra-op thread per process avoids oversubscribing
# small CI machines (set OMP_NUM_THREADS to override).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import socket  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class TinyBlock(nn.Module):
    """Same attribute names and registration order as the seed's Bottleneck, tiny widths."""

    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout)) if cin != cout else None

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class TinySeedNet(nn.Module):
    def __init__(self, widths=((1, 10, 20), (20, 10, 20), (20, 10, 10)), num_classes: int = 4) -> None:
        super().__init__()
        self.layer1, self.layer2, self.layer3 = (TinyBlock(*w) for w in widths)
        self.fc1 = nn.Linear(widths[-1][-1], 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x):
        for block in (self.layer1, self.layer2, self.layer3):
            x = block(x)
        return self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3)))))


def train_tiny(model: nn.Module, opt, steps: int, seed: int = 1) -> None:
    """``steps`` cross-entropy steps of a :class:`TinySeedNet` on batches of 6 drawn from a generator seeded
    ``seed`` (the same batches whatever else draws random numbers)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def mlp(sizes=(6, 20, 20, 3), norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers.append(nn.Linear(a, b))
        if b != sizes[-1]:
            if norm:
                layers.append(nn.LayerNorm(b))
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def seed_net():
    torch.manual_seed(0)
    return TinySeedNet()


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as module ``name`` (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A local TCP port free right now (every multi-process test rendezvous on its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _accelerate_environment_kept():
    """``TrainingArguments(torch_compile=True)`` writes ``ACCELERATE_DYNAMO_*`` into the process environment, and
    every later ``Accelerator`` would compile its model: each test gets back the environment it started with."""
    before = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    yield
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        if key not in before:
            del os.environ[key]
    os.environ.update(before)


@pytest.fixture
def reset_accelerate():
    """Accelerate keeps process-wide singletons; tests that build an Accelerator reset them afterwards."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
