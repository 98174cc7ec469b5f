"""Smoke test of benchmarks/lm_study.py: every policy's command line parses, a tiny study runs, summarises
against the baseline and skips finished runs."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_lm_study_runs_summarises_and_skips(tmp_path, capsys):
    study = load_benchmark("lm_study")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}." for i in range(400)]
    (corpus / "train.txt").write_text("\n".join(lines[:360]) + "\n")
    (corpus / "validation.txt").write_text("\n".join(lines[360:]) + "\n")
    argv = [
        "--dataset", str(corpus), "--max-steps", "6", "--eval-every", "3", "--seeds", "0",
        "--hidden-size", "32", "--intermediate-size", "64", "--extra", "--block-size 32 --batch-size 4",
        "--policies", "baseline", "graduate", "half-width",
        "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path), "--name", "lm",
    ]  # fmt: skip
    assert study.main(argv) == 0
    table = (tmp_path / "lm.md").read_text()
    assert "--graduate 2:0.75,4:1" in table and "--hidden-size 16 --intermediate-size 32" in table
    graduated = json.loads((tmp_path / "runs" / "graduate-s0" / "metrics.json").read_text())
    assert graduated["roles"]["clones"] == 0 and [h["step"] for h in graduated["history"]] == [3, 6]
    assert (tmp_path / "lm.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert study.main(argv) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 3
