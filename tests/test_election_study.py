"""Smoke test of benchmarks/election_study.py on a few digits: runs, summary, and skipping finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

pytest.importorskip("accelerate")
pytest.importorskip("sklearn")


def test_study_runs_summarises_and_skips_finished_runs(tmp_path, capsys):
    study = load_benchmark("election_study")
    argv = [
        "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--max-train-samples", "128",
        "--max-eval-samples", "64", "--seeds", "0", "--policies", "fixed", "grow-random",
        "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path), "--name", "s",
    ]  # fmt: skip
    assert study.main([*argv, "--time-steps", "1", "--time-rounds", "1"]) == 0
    times = json.loads((tmp_path / "s_timing.json").read_text())
    assert set(times) == {"mild@0.75", "mild@1", "mild@1.25"}  # every epoch's network, timed
    assert "est. train time (s)" in (tmp_path / "s.md").read_text()
    table = (tmp_path / "s.md").read_text()
    rows = {
        line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line
    }
    assert set(rows) == {"policy", "fixed", "grow-random"}
    assert "--leader-scales ramp:0.5:1.5:2" in table and "python benchmarks/election_study.py" in table
    grown = json.loads((tmp_path / "runs" / "grow-random-s0" / "metrics.json").read_text())
    fixed = json.loads((tmp_path / "runs" / "fixed-s0" / "metrics.json").read_text())
    # grown 0.75x then 1.25x: more FLOPs in the second epoch than fixed roles, fewer in the first
    assert grown["epochs"][0]["flops"] < fixed["epochs"][0]["flops"] < grown["epochs"][1]["flops"]
    assert grown["elections"] == 1 and fixed["elections"] == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert study.main(argv) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 2


def test_graduation_and_growth_policies_time_the_network_each_epoch_trains():
    """graduate trains the plan, then 0.75 active, then dense; net2net the narrow net grown to the same widths:
    each epoch's configuration is timed as built (a graduated LCO, a wider dense net)."""
    study = load_benchmark("election_study")
    args = study.build_parser().parse_args(["--dataset", "digits", "--epochs", "3", "--batch-size", "8"])
    assert study.graduation_points(3) == ("epoch1:0.75,epoch2:1", "epoch2:1")
    assert study.epoch_configs(args, "graduate") == ["mild@1", "mild+grad0.75", "mild+grad1"]
    assert study.epoch_configs(args, "graduate-late") == ["mild@1", "mild@1", "mild+grad1"]
    assert study.epoch_configs(args, "net2net") == ["narrow", "narrow+grow0.75", "narrow+grow1"]
    assert "--grow-net2net epoch1:0.75,epoch2:1" in " ".join(study.run_argv(args, "net2net", 0, Path("x")))
    from egg_recipes.data import dataset_spec, load_image_dataset

    spec = dataset_spec(load_image_dataset("digits", split="train", max_samples=16, seed=0))
    params, clones = {}, {}
    for config in ("narrow", "narrow+grow0.75", "narrow+grow1", "baseline", "mild@1", "mild+grad1"):
        case = study._timing_case(args, config, spec)
        case(0)  # one training step of that network
        params[config] = sum(p.numel() for p in case.optimizer.model.parameters())
        clones[config] = sum(r.counts()["clones"] for r in case.optimizer.roles.values())
    assert params["narrow"] < params["narrow+grow0.75"] < params["narrow+grow1"] == params["baseline"]
    assert clones["mild@1"] > 0 and clones["mild+grad1"] == 0 and params["mild+grad1"] == params["baseline"]
