"""End-to-end tests of recipes/train_image.py and recipes/sweep.py on scikit-learn's digits (seconds each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

from egg_recipes import sweep, train_image  # noqa: E402

from egg_optim.errors import EggOptimError  # noqa: E402

# tiny, fast runs: 256 training digits -> 4 batches of 64 per epoch
FAST = [
    "--batch-size", "64", "--max-train-samples", "256", "--max-eval-samples", "64",
    "--report-to", "none", "--no-progress",
]  # fmt: skip


FAST_TRAINER = [a for a in FAST if a != "--no-progress"]  # flags both recipes know


def _trainer():
    pytest.importorskip("transformers")
    from egg_recipes import train_trainer

    return train_trainer


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="offline", **extra)
    env.pop("PYTHONWARNINGS", None)
    return env


def _run(argv, tmp_path, name="run"):
    out = tmp_path / name
    metrics = train_image.train(train_image.parse_args([*FAST, "--output-dir", str(out), *argv]))
    return metrics, out


# ---------------------------------------------------------------------------- command line
def test_help_lists_every_flag():
    res = subprocess.run(
        [sys.executable, str(RECIPES / "train_image.py"), "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    for flag in (
        "--model", "--dataset", "--scenario", "--leaders", "--independents", "--clone-mode", "--election",
        "--assign", "--clone-every", "--elect-every", "--optimizer", "--lr", "--weight-decay", "--lr-schedule",
        "--batch-size", "--epochs", "--max-steps", "--seed", "--output-dir", "--resume-from", "--save-every",
        "--report-to", "--augment", "--max-train-samples", "--eval-every", "--dump-rank-state",
    ):  # fmt: skip
        assert flag in res.stdout, flag
    assert "seed_cifar" in res.stdout and "fashion_mnist" in res.stdout and "taylor" in res.stdout


def test_recipe_defaults_are_the_best_measured_policy():
    args = train_image.parse_args([])
    assert (args.clone_mode, args.assign, args.elect_every, args.election_policy) == (
        "output", "round_robin", "never", "rank",
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--scenario", "bogus"], "invalid choice: 'bogus'"),
        (["--lr", "-1"], "expected a positive number"),
        (["--elect-every", "sometimes"], "cannot read 'sometimes'"),
        (["--clone-noise", "inf"], "finite number"),
        (["--skip-clone-grads", "1"], "invalid value '1'"),
        (["--leaders", "1.5"], "in [0, 1]"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--state-storage", "sparse"], "invalid choice: 'sparse'"),
        (["--clone-state", "forget"], "invalid choice: 'forget'"),
        (["--seed", str(2**32)], "argument --seed: expected an integer in [0, 4294967295], got '4294967296'"),
        (["--seed", "-1"], "expected an integer in [0, 4294967295]"),
        (["--test-split-fraction", "1"], "expected a number in (0, 1)"),
        (["--compile", "fast"], "invalid choice: 'fast'"),
        (["--compile-backend", "eager"], "--compile-backend: chooses how --compile compiles; give --compile too"),
        (["--compile", "default", "--scenario", "narrow-mild", "--grow-net2net", "epoch1:1"], "run the growth eagerly"),
    ],
)
def test_bad_flag_exits_2_with_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        train_image.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--dataset", "/no/such/dataset/folder"], "does not exist"),
        (["--model", "small_cnn", "--leaders", "0.9", "--independents", "0.5"], "> 1"),
    ],
)
def test_bad_values_exit_2_without_traceback(argv, fragment, tmp_path, capsys):
    assert train_image.main([*FAST, "--output-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------- single process
def test_seed_updates_match_the_seed_tables(tmp_path):
    """Updates per batch over the 9 block convs: 320 (baseline), 157 (mild), 126 (aggressive) for the
    MNIST net, i.e. the seed's 75,200 / 36,895 / 29,610 per epoch over 235 batches."""
    per_batch = {}
    for scenario in ("baseline", "mild", "aggressive"):
        m, out = _run(["--scenario", scenario, "--max-steps", "2"], tmp_path, scenario)
        per_batch[scenario] = m["updates_per_batch"]
        assert m["steps"] == 2 and m["epochs"][0]["updates"] == 2 * m["updates_per_batch"]
    assert per_batch == {"baseline": 320, "mild": 157, "aggressive": 126}
    assert [round(v * 235) for v in per_batch.values()] == [75_200, 36_895, 29_610]


def test_narrow_scenarios_train_the_dense_control(tmp_path):
    """narrow-*: a dense net with the plan's active widths and no roles; same updates as the plan, about half
    output cloning's counted FLOPs; --width-match flops scales it up to (just under) output cloning's FLOPs."""
    from egg_recipes.models import count_conv_linear_flops, narrow_model

    flops = {}
    for argv in (["--scenario", "mild", "--clone-mode", "output"], ["--scenario", "narrow-mild"],
                 ["--scenario", "narrow-mild", "--width-match", "flops"]):  # fmt: skip
        m, _ = _run([*argv, "--max-steps", "2"], tmp_path, "-".join(argv))
        flops[" ".join(argv)] = m["forward_flops_per_sample"]
        assert m["train_flops"] == m["epochs"][0]["flops"] == 2 * 64 * m["forward_flops_per_sample"]
        if "narrow-mild" in argv:
            assert m["roles"]["clones"] == 0
        if argv == ["--scenario", "narrow-mild"]:
            assert m["updates_per_batch"] == 157  # the mild plan's active units over the 9 block convs
    out, narrow, matched = flops.values()
    plan = train_image.RolePlan.preset("mild", table="mnist")
    net = narrow_model("seed_mnist", plan, in_channels=1, num_classes=10, image_size=8)
    assert narrow == sum(count_conv_linear_flops(net, (1, 1, 8, 8)).values())
    assert narrow < 0.6 * out and 0.9 * out < matched <= out


def test_train_end_to_end_learns_and_writes_outputs(tmp_path):
    m, out = _run(
        ["--model", "small_cnn", "--scenario", "mild", "--epochs", "3", "--lr", "1e-2", "--max-train-samples", "1437",
         "--max-eval-samples", "360", "--eval-every", "10", "--elect-every", "epoch", "--clone-mode", "weight"],
        tmp_path,
    )  # fmt: skip
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test_accuracy"] == m["test_accuracy"] > 0.6  # chance is 0.1
    assert m["steps"] == 3 * 23 and m["epochs_completed"] == 3
    assert m["elections"] == 2  # --elect-every epoch: at the start of epochs 2 and 3
    assert m["roles"]["clones"] > 0 and m["roles"]["cloned_units"] > 0
    assert len(m["epochs"]) == 3 and all(e["train_time"] > 0 for e in m["epochs"])
    assert m["updates_per_epoch"] == 23 * m["updates_per_batch"]
    assert [h["step"] for h in m["history"]][:2] == [10, 20]
    assert (out / "model.safetensors").is_file()


def test_output_clone_mode_runs(tmp_path):
    m, out = _run(["--clone-mode", "output", "--scenario", "aggressive", "--epochs", "2", "--max-steps", "5",
                   "--elect-every", "epoch"], tmp_path)  # fmt: skip
    assert m["steps"] == 5 and m["elections"] == 1 and m["roles"]["clones"] > 0
    assert m["roles"]["cloned_units"] == 0  # no weight copies in output mode
    # the saved weights load into the plain, unmodified network
    from egg_recipes.models import build_model
    from safetensors.torch import load_model

    plain = build_model("seed_mnist", in_channels=1, num_classes=10, image_size=8)
    missing, unexpected = load_model(plain, str(out / "model.safetensors"))
    assert not missing and not unexpected


def test_compile_decides_the_norm_coupling_first_and_trains_what_eager_trains(tmp_path):
    """--compile runs one eager forward pass (eval mode, a zero batch: nothing trains) so the optimizer couples the
    norms from evidence, as an eager run's first step does, then compiles. With the eager backend (the same ops)
    weight mode trains bit-identically; output mode the same coupling (its compiled 1x1 convs are convs, not the
    eager CPU matmul, so its rounding differs) and it trains."""
    import argparse

    from egg_recipes.common import compile_model
    from egg_recipes.data import dataset_spec

    from egg_optim import LeaderCloneOptimizer

    compiled = ["--compile", "default", "--compile-backend", "eager"]
    common = ["--clone-mode", "weight", "--max-steps", "6", "--epochs", "2"]
    eager, out = _run([*common, "--save-every", "3"], tmp_path, "eager")
    graph, _ = _run([*common, *compiled], tmp_path, "compiled")
    resumed, _ = _run([*common, *compiled, "--resume-from", str(out / "checkpoints" / "checkpoint-3")], tmp_path, "r")
    for key in ("param_sha256", "buffer_sha256", "roles_sha256", "steps"):
        assert graph[key] == eager[key] == resumed[key], key
    out, _ = _run(["--clone-mode", "output", "--max-steps", "6", "--epochs", "2", *compiled], tmp_path, "output")
    assert out["steps"] == 6 and 0 <= out["test_accuracy"] <= 1

    args = train_image.parse_args([*FAST, "--output-dir", str(tmp_path / "x"), "--clone-mode", "output"])
    spec = dataset_spec(train_image.load_image_splits(args)[0], resize_to=args.resize_to, channels=args.channels)
    couplings = []
    for probe in (True, False):
        torch.manual_seed(0)
        model, plan = train_image.build_network(args, spec)
        lco = LeaderCloneOptimizer(model, train_image.make_optimizer(args, model.parameters()),
                                   config=train_image.egg_config(args, plan))  # fmt: skip
        if probe:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            zeros = torch.zeros(2, spec.channels, *train_image._pair(spec.image_size))
            compile_model(model, lco, zeros, argparse.Namespace(compile="default", compile_backend="eager"))
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing moved
        else:  # an eager run: the first training step decides
            x = torch.randn(4, spec.channels, *train_image._pair(spec.image_size))
            torch.nn.functional.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
            lco.step()
        couplings.append(lco.coupled_norms)
    assert couplings[0] == couplings[1] and len(couplings[0]) == 9  # the seed net's convs with their norms


@pytest.mark.parametrize("repack", [[], ["--repack"]])
def test_resume_is_bit_identical(tmp_path, repack):
    """N steps straight == N/2, checkpoint, resume in a fresh Accelerator/model, N/2 more: weights, BN
    statistics and roles identical. Crosses an epoch boundary (new election) with dropout, augmentation, a
    cosine schedule and the checkpoint taken mid-epoch; with ``--repack`` the seed net's convs move their units
    (checked on random images of the dataset's shape) at the elections, on both sides of the checkpoint."""
    common = ["--max-steps", "10", "--augment", "--lr", "3e-3", "--lr-schedule", "cosine", "--election", "grad_norm",
              "--elect-every", "epoch", *repack]  # fmt: skip
    straight, out = _run([*common, "--save-every", "3", "--keep-checkpoints", "0"], tmp_path, "straight")
    checkpoint = out / "checkpoints" / "checkpoint-6"  # epoch 2 of 4 batches, 2 batches in
    progress = json.loads((checkpoint / "egg_optim_checkpoint.json").read_text())["metadata"]["progress"]
    assert (progress["epoch"], progress["batch_in_epoch"]) == (1, 2)
    resumed, _ = _run([*common, "--resume-from", str(checkpoint)], tmp_path, "resumed")
    assert resumed["resumed_from"] == str(checkpoint)
    for key in ("param_sha256", "buffer_sha256", "roles_sha256", "steps", "elections", "test_accuracy"):
        assert resumed[key] == straight[key], key
    assert straight["elections"] == 2
    if repack:  # units moved: the checkpoint holds their order
        saved = torch.load(checkpoint / "optimizer.bin", weights_only=False)
        orders = [e["unit_order"] for e in saved["egg_optim"]["layers"].values() if e.get("unit_order") is not None]
        assert orders and any(not torch.equal(o, torch.arange(o.numel())) for o in orders)
    # without the checkpoint the run differs (the comparison above is not vacuous)
    other, _ = _run([*common, "--seed", "1"], tmp_path, "other")
    assert other["param_sha256"] != straight["param_sha256"]


def test_resume_latest_and_refusals(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", str(out), "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "1"]
    assert train_image.main(args) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4"]
    # leftovers of a killed save (its files may all be there: moved aside) and an emptied folder (removed)
    shutil.copytree(out / "checkpoints" / "checkpoint-4", out / "checkpoints" / "checkpoint-6.tmp-0123abcd")
    (out / "checkpoints" / "checkpoint-6.tmp-0123abcd" / "egg_optim_checkpoint.json").unlink()
    (out / "checkpoints" / "checkpoint-2").mkdir()
    capsys.readouterr()
    assert train_image.main([*args, "--max-steps", "5", "--resume-from", "latest", "--eval-every", "1"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6.quarantine-1"]
    said = capsys.readouterr().out
    assert "resumed from" in said and "matches this run's model, dataset" in said and "lr, " in said
    assert "--epochs, --max-steps and the evaluation, logging, saving and output flags" in said
    # another seed, another optimizer and lr: refused before anything is loaded, every difference named
    assert train_image.main([*args, "--seed", "7", "--resume-from", "latest"]) == 2
    assert "seed=0 (this run: 7)" in capsys.readouterr().err
    assert train_image.main([*args, "--lr", "0.01", "--optimizer", "sgd", "--resume-from", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr=0.0003 (this run: 0.01)" in err and "optimizer='adam' (this run: 'sgd')" in err
    # a damaged checkpoint: refused
    (out / "checkpoints" / "checkpoint-4" / "optimizer.bin").write_bytes(b"junk")
    assert train_image.main([*args, "--resume-from", str(out / "checkpoints" / "checkpoint-4")]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_resume_refuses_another_schedule_length(tmp_path, capsys):
    """A cosine schedule is built for the planned steps: resuming with more would restart the cosine."""
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", str(out), "--max-steps", "2", "--save-every", "2", "--lr-schedule", "cosine"]
    assert train_image.main(args) == 0
    capsys.readouterr()
    assert train_image.main([*args, "--max-steps", "3", "--resume-from", "latest"]) == 2
    assert "lr_schedule_steps=2 (this run: 3)" in capsys.readouterr().err


# ---------------------------------------------------------------------------- storage failures
@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the recipe gets as far as loading data."""
    from egg_recipes import data

    def loaded(*args, **kwargs):
        raise AssertionError("the recipe loaded data before checking its output folder")

    monkeypatch.setattr(data, "load_image_dataset", loaded)


def _one_line_error(capsys) -> str:
    """The recipe's error line (datasets' progress bars may come before it on stderr)."""
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n") and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("recipe", ["image", "trainer"])
def test_output_dir_under_a_file_fails_up_front(tmp_path, capsys, no_training, recipe):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "run"
    main = train_image.main if recipe == "image" else _trainer().main
    assert main([*FAST_TRAINER, "--output-dir", str(target)]) == 2
    assert _one_line_error(capsys) == (
        f"error: cannot create output folder {target}: {tmp_path / 'file'} is a file, not a folder"
    )


def test_read_only_output_dir_fails_up_front(tmp_path, monkeypatch, capsys, no_training):
    import errno

    from egg_recipes import storage

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(storage.tempfile, "mkstemp", read_only)
    assert train_image.main([*FAST, "--output-dir", str(tmp_path / "run")]) == 2
    assert _one_line_error(capsys) == f"error: cannot write to {tmp_path / 'run'}: read-only file system"


@pytest.mark.parametrize("where", ["checkpoint", "model"])
def test_full_disk_is_one_line_and_leaves_no_partial_files(tmp_path, monkeypatch, capsys, where):
    from collections import namedtuple

    import safetensors.torch
    from egg_recipes import storage

    out = tmp_path / "run"
    if where == "checkpoint":  # torch.save (optimizer.bin) on a full disk: no errno, only "unexpected pos"
        real = torch.save

        def full(obj, f, *args, **kwargs):
            real(obj, f, *args, **kwargs)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(torch, "save", full)
        monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0))
        expected = out / "checkpoints" / "checkpoint-1"
    else:  # safetensors says it in its own words

        def full(model, filename, *args, **kwargs):
            Path(filename).write_bytes(b"partial")
            raise safetensors.SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )

        monkeypatch.setattr(safetensors.torch, "save_model", full)
        expected = out / "model.safetensors"
    save = ["--save-every", "1"] if where == "checkpoint" else []
    assert train_image.main([*FAST, "--output-dir", str(out), "--max-steps", "1", *save]) == 2
    assert _one_line_error(capsys) == f"error: no space left on device while writing {expected}"
    # no partial checkpoint folder or model file (a failed save removes its temporary files)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == (["checkpoints"] if save else [])
    assert not (out / "metrics.json").exists()


# ---------------------------------------------------------------------------- data checks
def _write_local_dataset(path: Path, labels) -> Path:
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in labels]
    datasets.Dataset.from_dict({"image": images, "label": list(labels)}).to_parquet(str(path))
    return path


def test_single_data_file_needs_a_test_split(tmp_path, capsys):
    data_file = _write_local_dataset(tmp_path / "data.parquet", [i % 3 for i in range(40)])
    common = [*FAST, "--dataset", str(data_file), "--model", "mlp", "--max-steps", "1"]
    capsys.readouterr()
    assert train_image.main([*common, "--output-dir", str(tmp_path / "a")]) == 2
    err = _one_line_error(capsys)
    assert "a single data file" in err and "--test-split-fraction" in err
    m, _ = _run(["--dataset", str(data_file), "--model", "mlp", "--max-steps", "1", "--test-split-fraction", "0.25"],
                tmp_path, "b")  # fmt: skip
    assert m["steps"] == 1 and m["args"]["test_split_fraction"] == 0.25


def test_one_class_dataset_is_refused(tmp_path, capsys):
    data_dir = tmp_path / "one_class"
    data_dir.mkdir()
    _write_local_dataset(data_dir / "train.parquet", [0] * 20)
    _write_local_dataset(data_dir / "test.parquet", [0] * 8)
    args = [*FAST, "--dataset", str(data_dir), "--model", "mlp", "--output-dir", str(tmp_path / "run")]
    capsys.readouterr()
    assert train_image.main(args) == 2
    assert "only label 0 in its 20 rows; a classifier needs at least 2 classes" in _one_line_error(capsys)


# ---------------------------------------------------------------------------- W&B offline
def test_wandb_offline_logs_role_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    m, _ = _run(
        ["--report-to", "wandb", "--model", "small_cnn", "--epochs", "2", "--max-steps", "6", "--log-every", "2"],
        tmp_path,
    )
    from egg_recipes.tracking import history_keys, read_wandb_offline_history

    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    rows = read_wandb_offline_history(runs[0], timeout=60)  # the W&B service writes asynchronously
    keys = history_keys(rows)
    for key in ("roles/conv1/leaders", "roles/conv1/updated_fraction", "roles/conv1/cloned_units",
                "roles/conv1/churn", "roles/conv1/mean_tenure", "roles/total/clones", "train/loss",
                "eval/accuracy", "updates/epoch", "time/epoch"):  # fmt: skip
        assert key in keys, key
    by_step = {r["_step"]: r for r in rows}
    assert by_step[6]["roles/steps"] == 6
    assert by_step[2]["roles/conv1/leaders"] == round(0.4 * 32)  # uniform mild plan on small_cnn's 32 filters
    images = [r for r in rows if r.get("roles/leadership/_type") == "image-file"]
    assert len(images) == 2  # one heat map per epoch end


# ---------------------------------------------------------------------------- two processes
@pytest.mark.slow
@pytest.mark.distributed
def test_two_cpu_processes_agree(tmp_path):
    out = tmp_path / "ddp"
    from test_accelerate_configs import launch

    res = launch(
        ["--config_file", str(ROOT / "accelerate_configs" / "cpu_multi.yaml"), str(RECIPES / "train_image.py"),
         *FAST, "--output-dir", str(out), "--max-steps", "6", "--election", "grad_norm", "--elect-every", "2",
         "--augment", "--dump-rank-state"],
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    states = [json.loads((out / f"rank_state_{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in states] == [0, 1]
    assert all(s["world_size"] == 2 for s in states)
    assert states[0]["pid"] != states[1]["pid"]  # two real processes
    for key in ("param_sha256", "roles_sha256", "steps"):
        assert states[0][key] == states[1][key], key
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["elections"] == 3 and metrics["steps"] == 6


# ---------------------------------------------------------------------------- sweep
def test_sweep_writes_table_and_plot(tmp_path, capsys):
    code = sweep.main(
        ["--output-dir", str(tmp_path / "sweep"), "--name", "t", "--scenarios", "baseline", "aggressive",
         "--clone-modes", "weight", "output", "--epochs", "1", "--batch-size", "64", "--max-steps", "2",
         "--max-train-samples", "256", "--max-eval-samples", "64", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    table = (tmp_path / "sweep" / "t.md").read_text()
    assert "python recipes/sweep.py --output-dir" in table and "(in progress)" not in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 3  # header, baseline once, aggressive x 2 clone modes
    assert "| baseline | - |" in rows[1] and "| 640 |" in rows[1]  # 320 updates x 2 batches
    assert "fwd GFLOPs/epoch" in rows[0]
    assert "| aggressive | output |" in rows[3]
    png = (tmp_path / "sweep" / "t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "sweep" / "t.json").read_text())
    assert [r["scenario"] for r in summary["runs"]] == ["baseline", "aggressive", "aggressive"]


def test_sweep_rejects_unknown_flags_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        sweep.main(["--output-dir", str(tmp_path), "--not-a-flag"])
    assert info.value.code == 2
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- transformers Trainer route
def test_trainer_route_logs_roles_and_resumes_exactly(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("egg_optim.integrations.transformers")
    from egg_recipes import train_trainer

    common = ["--max-steps", "6", "--batch-size", "64", "--max-train-samples", "256", "--max-eval-samples", "64",
              "--report-to", "none", "--log-every", "2", "--election", "grad_norm",
              "--elect-every", "epoch"]  # fmt: skip
    parse = train_trainer.build_parser().parse_args
    straight = train_trainer.train(parse([*common, "--output-dir", str(tmp_path / "a"), "--save-every", "3"]))
    assert straight["steps"] == 6 and straight["elections"] == 1  # 4 batches/epoch: roles redrawn at epoch 2
    logged = [h for h in straight["log_history"] if "loss" in h]
    assert logged and all("roles/total/clones" in h and "roles/total/updated_fraction" in h for h in logged)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["test_accuracy"] == straight["test_accuracy"]
    resumed = train_trainer.train(
        parse([*common, "--output-dir", str(tmp_path / "b"), "--resume-from", str(tmp_path / "a" / "checkpoint-3")])
    )
    for key in ("param_sha256", "roles_sha256", "steps", "elections"):
        assert resumed[key] == straight[key], key
    # other settings: refused, each difference named
    refused = [*common, "--output-dir", str(tmp_path / "c"), "--resume-from", str(tmp_path / "a" / "checkpoint-3")]
    with pytest.raises(EggOptimError) as info:
        train_trainer.train(parse([*refused, "--lr", "0.01", "--optim", "sgd"]))
    assert "lr=0.0003 (this run: 0.01)" in str(info.value) and "optim='adamw_torch' (this run: 'sgd')" in str(
        info.value
    )
    with pytest.raises(EggOptimError, match="no checkpoint-N folder"):
        train_trainer.train(parse([*common, "--output-dir", str(tmp_path / "d"), "--resume-from", "latest"]))


def test_trainer_route_compiles_after_coupling_and_keeps_the_random_streams(tmp_path, reset_accelerate):
    """--compile through the Trainer (TrainingArguments(torch_compile=True)): EggTrainer collates the first two
    training examples (with augmentation, which draws random numbers) and runs them through the eager model
    before the Trainer compiles, with every random stream put back: with the eager backend weight mode ends
    bit-identical to the eager run, and the compiled run couples the seed net's norms."""
    pytest.importorskip("transformers")
    from egg_recipes import train_trainer

    common = ["--max-steps", "4", "--batch-size", "64", "--max-train-samples", "256", "--max-eval-samples", "64",
              "--report-to", "none", "--clone-mode", "weight", "--augment"]  # fmt: skip
    parse = train_trainer.parse_args
    eager = train_trainer.train(parse([*common, "--output-dir", str(tmp_path / "a")]))
    compiled = ["--compile", "default", "--compile-backend", "eager"]
    graph = train_trainer.train(parse([*common, *compiled, "--output-dir", str(tmp_path / "b")]))
    for key in ("param_sha256", "roles_sha256", "steps"):
        assert graph[key] == eager[key], key


def test_graduation_by_steps_recounts_flops_and_updates_inside_the_epoch(tmp_path):
    """Graduation at step 2 of 4 in one epoch: the last two batches are priced at full width, not the plan's."""
    m, _ = _run(["--scenario", "mild", "--clone-mode", "output", "--graduate", "2:1", "--max-steps", "4"], tmp_path)
    full, _ = _run(["--scenario", "baseline", "--max-steps", "1"], tmp_path, "full")
    fixed, _ = _run(["--scenario", "mild", "--clone-mode", "output", "--max-steps", "1"], tmp_path, "fixed")
    per_batch = 64 * fixed["forward_flops_per_sample"], 64 * full["forward_flops_per_sample"]
    assert per_batch[0] < per_batch[1]
    assert m["train_flops"] == 2 * per_batch[0] + 2 * per_batch[1]
    assert m["updates_per_batch"] == full["updates_per_batch"] and m["roles"]["clones"] == 0
