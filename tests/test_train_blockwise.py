"""recipes/train_blockwise.py (issue 23, item 3): block-wise training launched in 1 process or block-parallel
on 2 processes (torchrun and accelerate launch) computes the same blocks, checkpoints hold one file per block
so a run resumes on another process layout, and bad layouts or checkpoints are refused before anything
changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, load_benchmark
from egg_recipes import train_blockwise as tb

from egg_optim.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_blockwise.py"
TINY = ["--widths", "4,8,8", "--aux-hidden", "8", "--train-samples", "256", "--test-samples", "100",
        "--batch-size", "32", "--lr", "1e-2", "--evals-per-epoch", "2"]  # fmt: skip


def _run_in_process(argv: list[str]) -> dict:
    threads = torch.get_num_threads()
    try:
        return tb.train(tb.parse_args(argv))
    finally:
        torch.set_num_threads(threads)


# failures of the launch itself, not of the recipe, retried (up to 3 attempts): a port picked as free taken before
# the rendezvous; gloo's worker threads aborting the process at interpreter exit after the run finished and its
# process group was destroyed (SIGABRT "terminate called without an active exception", seen under load on 2 cores;
# torch's atexit fix, pytorch/pytorch#179291, was abandoned). Any other failure fails at once.
LAUNCH_FAILURES = ("Address already in use", "EADDRINUSE", "failed to listen", "DistNetworkError",
                   "terminate called without an active exception")  # fmt: skip


def _launch(launcher: str, argv: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    for _ in range(3):  # each attempt on another port
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), str(RECIPE), *argv]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "accelerate_configs" / "cpu_multi.yaml"), "--main_process_port", str(free_port()),
                   str(RECIPE), *argv]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
        if res.returncode == 0 or not any(f in res.stderr for f in LAUNCH_FAILURES):
            break
    if res.returncode != 0:
        raise AssertionError(res.stdout[-2000:] + res.stderr[-3000:])


def _blocks(folder: Path) -> list[dict]:
    return [torch.load(folder / f"block{k}.pt", weights_only=False) for k in (0, 1)]


def _assert_same_blocks(a: list[dict], b: list[dict]) -> None:
    for k, (x, y) in enumerate(zip(a, b)):
        assert (x["step"], x["epoch"]) == (y["step"], y["epoch"])
        for part in ("module", "local"):
            if x[part] is None:
                assert y[part] is None
                continue
            for name, t in x[part].items():
                if isinstance(t, torch.Tensor):
                    assert torch.equal(t, y[part][name]), f"block{k} {part} {name}"
        for pid, s in x["optimizer"]["state"].items():
            for key, t in s.items():
                assert torch.equal(t, y["optimizer"]["state"][pid][key]), f"block{k} Adam {pid} {key}"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lfnn_l", "dgl"])
def test_two_processes_compute_the_one_process_run_and_resume_across_layouts(method, tmp_path):
    """1 process, 2 epochs, saving each epoch = 2 processes from scratch (torchrun) = 2 processes (accelerate
    launch) resumed from the 1-process checkpoint of epoch 1: every block's weights, aux heads, leader
    statistics and Adam state bit for bit, and the same accuracy curve."""
    argv = ["--method", method, "--epochs", "2", "--save", *TINY]
    one = _run_in_process([*argv, "--output-dir", str(tmp_path / "one")])
    launcher = "torchrun" if method == "lfnn_l" else "accelerate"
    _launch(launcher, [*argv, "--output-dir", str(tmp_path / "two")], tmp_path)
    resumed = tmp_path / "one-epoch1"  # a copy: the resumed run writes its own epoch-2 next to it
    shutil.copytree(tmp_path / "one" / "checkpoints" / "epoch-1", resumed)
    _launch("torchrun", [*argv, "--output-dir", str(tmp_path / "resumed"), "--resume-from", str(resumed)], tmp_path)

    ref = _blocks(tmp_path / "one" / "checkpoints" / "epoch-2")
    _assert_same_blocks(ref, _blocks(tmp_path / "two" / "checkpoints" / "epoch-2"))
    _assert_same_blocks(ref, _blocks(tmp_path / "resumed" / "checkpoints" / "epoch-2"))
    first = _blocks(tmp_path / "one" / "checkpoints" / "epoch-1")
    moved = (ref[1]["module"]["head.weight"] - first[1]["module"]["head.weight"]).abs().max()
    assert moved > 1e-4  # epoch 2 trained: the comparison is not between frozen copies

    two = json.loads((tmp_path / "two" / "results.json").read_text())
    resumed_run = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert [c["test_acc"] for c in two["curve"]] == [c["test_acc"] for c in one["curve"]]
    assert [c["test_acc"] for c in resumed_run["curve"]] == [c["test_acc"] for c in one["curve"][2:]]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert len(two["wait_seconds_per_rank"]) == 2 and two["wait_seconds_per_rank"][0] == 0.0
    assert one["final_acc"] > 0.2  # 10 classes (chance 0.1), 16 tiny steps: the blocks learn


def test_one_process_resumes_its_own_checkpoint_exactly(tmp_path):
    """2 epochs straight = 1 epoch, then a resume for the second; the resume reads only complete checkpoints."""
    argv = ["--method", "lfnn_l", "--epochs", "2", "--save", *TINY]
    _run_in_process([*argv, "--output-dir", str(tmp_path / "a")])
    _run_in_process([*argv, "--output-dir", str(tmp_path / "b"), "--max-steps", "8"])  # = 1 epoch of 256 / 32
    assert not (tmp_path / "b" / "checkpoints" / "epoch-2").exists()
    _run_in_process([*argv, "--output-dir", str(tmp_path / "b"), "--resume-from",
                     str(tmp_path / "b" / "checkpoints" / "epoch-1")])  # fmt: skip
    _assert_same_blocks(_blocks(tmp_path / "a/checkpoints/epoch-2"), _blocks(tmp_path / "b/checkpoints/epoch-2"))


def test_bad_checkpoints_are_refused_before_anything_changes(tmp_path):
    default = ["--method", "lfnn_l", "--epochs", "1", "--save", *TINY, "--output-dir", str(tmp_path / "a")]
    argv = [*default, "--aux-pool", "2"]  # the pool of checkpoints saved before --aux-pool existed
    _run_in_process(argv)
    ckpt = tmp_path / "a" / "checkpoints" / "epoch-1"

    args = tb.parse_args([*argv, "--lr", "5e-3"])
    spec = tb.dataset_spec(tb.load_image_dataset("digits", split="train", max_samples=256))
    blocks = tb.build_blocks(args, spec, 8, [0, 1], torch.device("cpu"))
    before = [{k: v.clone() for k, v in b.module.state_dict().items()} for b in blocks]
    with pytest.raises(CheckpointError, match=r"--lr 0\.01 \(now 0\.005\)"):
        tb.load_checkpoint(ckpt, blocks, args)
    with pytest.raises(CheckpointError, match=r"--aux-pool 2 \(now 4\)"):
        tb.load_checkpoint(ckpt, blocks, tb.parse_args([*argv, "--aux-pool", "4"]))

    args = tb.parse_args(argv)
    info = json.loads((ckpt / tb.COMPLETE).read_text())
    del info["settings"]["aux_pool"]  # as saved before --aux-pool existed
    (ckpt / tb.COMPLETE).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"--aux-pool 2 \(now 7\)"):  # today's default pools to 7x7
        tb.load_checkpoint(ckpt, blocks, tb.parse_args(default))
    assert tb.load_checkpoint(ckpt, tb.build_blocks(args, spec, 8, [0, 1], torch.device("cpu")), args) == (8, 1)
    state = torch.load(ckpt / "block1.pt", weights_only=False)
    torch.save({**state, "step": 3}, ckpt / "block1.pt")
    with pytest.raises(CheckpointError, match="another step"):
        tb.load_checkpoint(ckpt, blocks, args)
    (ckpt / tb.COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="not a complete"):
        tb.load_checkpoint(ckpt, blocks, args)
    for b, sd in zip(blocks, before):
        for k, v in b.module.state_dict().items():
            assert torch.equal(v, sd[k]), k


def test_layouts_and_flags_that_cannot_work_are_refused(monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"cuts \[3\]"):
        _run_in_process(["--cuts", "3", *TINY])
    monkeypatch.setattr(tb, "_distributed", lambda device: (3, 0))
    with pytest.raises(ConfigError, match="gives 2 blocks: launch 1 or 2 processes, not 3"):
        _run_in_process(TINY)
    monkeypatch.setattr(tb, "_distributed", lambda device: (2, 0))
    with pytest.raises(ConfigError, match="bp backpropagates through the whole net"):
        _run_in_process(["--method", "bp", *TINY])
    for bad in (["--save"], ["--method", "bp", "--workers", "2"], ["--delta", "1.5"]):
        with pytest.raises(SystemExit) as exc:
            tb.parse_args(bad)
        assert exc.value.code == 2
    assert "--save needs --output-dir" in capsys.readouterr().err


def test_the_study_report_prices_and_measures_time_to_target(tmp_path):
    """The study's report from hand-made results: BP reaches its final minus 1.5 points at 100 s; the pipelined
    LFNN-l run at 40 s (measured) and at step 30, which its 1-process throughput prices at 30 * 128 / 64 s."""
    study = load_benchmark("blockwise_study")
    args = study.parse_args(["--runs-dir", str(tmp_path), "--sizes", "28", "--seeds", "0", "--methods", "bp,lfnn_l"])

    def write(path: Path, results: dict) -> None:
        path.mkdir(parents=True)
        (path / "results.json").write_text(json.dumps(results))

    bp_curve = [{"step": 10, "train_seconds": 50, "test_acc": 0.80},
                {"step": 20, "train_seconds": 100, "test_acc": 0.89},
                {"step": 40, "train_seconds": 200, "test_acc": 0.90}]  # fmt: skip
    lf_curve = [
        {"step": 30, "train_seconds": 40, "test_acc": 0.886},
        {"step": 40, "train_seconds": 53, "test_acc": 0.887},
    ]
    settings = {"batch_size": 128}
    write(tmp_path / "px28" / "bp-s0", {"final_acc": 0.90, "train_seconds": 200, "curve": bp_curve,
                                        "wait_seconds_per_rank": [0.0], "settings": settings})  # fmt: skip
    write(tmp_path / "px28" / "lfnn_l-s0", {"final_acc": 0.887, "train_seconds": 53, "curve": lf_curve,
                                            "wait_seconds_per_rank": [0.0, 5.3], "settings": settings})  # fmt: skip
    for label, sps in (("bp-1p1t", 25.6), ("bp-1p2t", 32.0), ("lfnn_l-1p1t", 64.0), ("lfnn_l-2p1t", 120.0)):
        write(tmp_path / "throughput" / "px28" / label / "r0", {"samples_per_second": sps})
    text = study.report(args, study.collect(args), 0.0)
    assert "| LFNN-l | 2 processes (= 1 process, step for step) | 88.70 ± 0.00 | 88.70 | 0.00 pt | -1.30 pt |" in text
    assert "| LFNN-l, 2 processes x 1 thread | 120 | 1.88x | 4.69x |" in text
    assert "| BP, 1 process x 1 thread | 1 of 1 | 100 | 1.00x | measured |" in text
    assert "| LFNN-l, 2 processes x 1 thread | 1 of 1 | 40 | 0.40x | measured |" in text
    assert "| LFNN-l, 1 process x 1 thread | 1 of 1 | 60 | 0.60x | priced |" in text  # 30 * 128 / 64
    assert "| BP, 1 process x 2 threads | 1 of 1 | 80 | 0.80x | priced |" in text  # 20 * 128 / 32
    assert "| LFNN-l | 0 % | 10 % | 53 |" in text
