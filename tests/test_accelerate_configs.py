"""accelerate_configs/*.yaml: every config parses with accelerate's own loader; the CPU ones really launch
the number of processes they promise (cpu_multi.yaml: 2, which `--cpu --num_processes 2` would not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

from accelerate.commands.config.config_args import load_config_from_file  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from conftest import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
EXPECTED = {
    "cpu.yaml": (DistributedType.NO, 1, True),
    "cpu_multi.yaml": (DistributedType.MULTI_GPU, 2, False),
    "single_gpu.yaml": (DistributedType.NO, 1, False),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 2, False),
    "multi_node.yaml": (DistributedType.MULTI_GPU, 16, False),
    "fsdp.yaml": (DistributedType.FSDP, 2, False),
}

PROBE = """
import json, os, sys, torch
from accelerate import Accelerator
acc = Accelerator(cpu=not torch.cuda.is_available())
total = acc.reduce(torch.tensor([float(acc.process_index + 1)]), "sum").item()
with open(os.path.join(sys.argv[1], f"rank_{acc.process_index}.json"), "w") as f:
    json.dump({"rank": acc.process_index, "world": acc.num_processes, "pid": os.getpid(),
               "type": str(acc.distributed_type), "sum": total}, f)
acc.end_training()  # without it a rank can abort at exit (a c10d thread still joinable): SIGABRT, rc != 0
"""


def test_the_expected_configs_exist():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_and_says_when_to_use_it(name):
    path = CONFIGS / name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# When to use:") and len(first) > 30, first
    cfg = load_config_from_file(str(path))
    kind, nproc, use_cpu = EXPECTED[name]
    assert cfg.distributed_type == kind
    assert cfg.num_processes == nproc
    assert cfg.use_cpu is use_cpu
    if kind == DistributedType.FSDP:
        assert cfg.fsdp_config["fsdp_version"] == 2


def launch(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` on a fresh free port. One retry on another port when the launch itself fails
    (the machine is shared: a port picked as free can be taken before the rendezvous binds it); the
    assertions always run on a complete launch."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for _ in range(2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
        if res.returncode == 0:
            break
    return res


@pytest.mark.slow
@pytest.mark.parametrize("name, world", [("cpu.yaml", 1), ("cpu_multi.yaml", 2)])
def test_cpu_configs_launch(name, world, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    res = launch(["--config_file", str(CONFIGS / name), str(probe), str(tmp_path)], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[:2000] + res.stderr[-2000:]
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank_*.json"))]
    assert [r["rank"] for r in ranks] == list(range(world))
    assert all(r["world"] == world for r in ranks)
    assert len({r["pid"] for r in ranks}) == world  # separate processes
    assert all(r["sum"] == world * (world + 1) / 2 for r in ranks)  # and they talk to each other
    if world > 1:
        assert all(r["type"] == "DistributedType.MULTI_CPU" for r in ranks)
