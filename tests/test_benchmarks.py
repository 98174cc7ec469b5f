"""Smoke tests of the step-time benchmarks: they run on tiny inputs and their counted quantities mean what the
results docs say (timings themselves are not asserted: the machine is noisy)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_bench_transformers_counts_fewer_flops_and_activations_in_output_mode(capsys):
    pytest.importorskip("transformers")
    bench = _load("bench_transformers")
    argv = ["--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "16", "--no-profile", "--models", "llama"]
    result = bench.main([*argv, "--scenarios", "mild", "aggressive"])
    assert all(math.isfinite(v) and v > 0 for v in result.values()), result
    # weight mode computes every unit; output mode only the active neurons and heads (block units), and the
    # aggressive plan fewer than the mild one
    assert result["llama_weight_mild_flops_vs_baseline"] == pytest.approx(1.0)
    mild = result["llama_output_mild_flops_vs_baseline"]
    aggressive = result["llama_output_aggressive_flops_vs_baseline"]
    assert aggressive < mild < 0.6
    assert result["llama_weight_mild_activations_vs_baseline"] == pytest.approx(1.0)
    assert "| llama/output/aggressive |" in capsys.readouterr().out


def test_bench_compile_runs_without_graph_breaks():
    bench = _load("bench_compile")
    argv = ["--steps", "1", "--warmup", "0", "--batch", "4", "--backend", "aot_eager", "--variants", "output", "weight"]
    result = bench.main(argv)
    assert result["output_graph_breaks"] == 0 and result["weight_graph_breaks"] == 0
    assert all(math.isfinite(v) for v in result.values()), result
