"""benchmarks/graduation_symmetry.py rebuilds a run's starting roles: a run that never graduates keeps its clones
bit-for-bit copies (cosine 1), one graduated early with noise does not."""

from __future__ import annotations

import pytest
from conftest import load_benchmark

pytest.importorskip("accelerate")
pytest.importorskip("sklearn")

from egg_recipes import train_image  # noqa: E402

FAST = [
    "--dataset", "digits", "--batch-size", "64", "--max-train-samples", "256", "--max-eval-samples", "64",
    "--report-to", "none", "--no-progress", "--scenario", "mild", "--clone-mode", "output", "--epochs", "2",
]  # fmt: skip


def test_symmetry_report_tells_copies_from_units_that_left_their_source(tmp_path, capsys):
    study = load_benchmark("graduation_symmetry")
    fixed, grown = tmp_path / "fixed", tmp_path / "grown"
    train_image.train(train_image.parse_args([*FAST, "--output-dir", str(fixed)]))
    train_image.train(
        train_image.parse_args([*FAST, "--graduate", "1:1", "--graduate-noise", "0.5", "--output-dir", str(grown)])
    )
    kept, left = study.analyse(fixed), study.analyse(grown)
    assert set(kept) == set(left) and kept
    assert all(abs(row["unit"] - 1.0) < 1e-5 for row in kept.values())  # exported clones are their source's rows
    assert all(row["unit"] < 0.99 for name, row in left.items() if name != "layer1.conv1")  # 1 input: 1 weight
    assert all(-1.0 <= row["columns"] <= 1.0 for row in kept.values() if "columns" in row)
    assert study.main([str(fixed)]) == 0 and "mean unit cosine to source: 1.0000" in capsys.readouterr().out
    assert study.main([str(fixed), "--against", str(fixed)]) == 0
    assert "vs_against 0.0000" in capsys.readouterr().out  # a run against itself
