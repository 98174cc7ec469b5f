"""egg_recipes.metrics: an accuracy metric that loads and runs without the Hugging Face Hub."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
from egg_recipes.metrics import METRIC_NAMES, load_metric, metric_path

from egg_optim.errors import ConfigError


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _random_labels(n: int, seed: int):
    rng = np.random.default_rng(seed)
    preds = rng.integers(0, 5, n)
    refs = np.where(rng.random(n) < 0.6, preds, rng.integers(0, 5, n))
    return preds, refs


def test_evaluate_load_by_path_offline(offline):
    metric = evaluate.load(metric_path("accuracy"), keep_in_memory=True)
    assert isinstance(metric, evaluate.Metric)
    preds, refs = _random_labels(200, 0)
    out = metric.compute(predictions=preds, references=refs)
    assert set(out) == {"accuracy"} and isinstance(out["accuracy"], float)
    assert out["accuracy"] == pytest.approx(np.mean(preds == refs))


def test_load_metric_helper_offline_and_batches(offline):
    metric = load_metric("accuracy", keep_in_memory=True)
    assert isinstance(metric, evaluate.Metric)
    assert metric.features["predictions"].dtype == "int32" and metric.features["references"].dtype == "int32"
    preds, refs = _random_labels(300, 1)
    for lo in range(0, 300, 64):  # uneven last batch
        metric.add_batch(predictions=preds[lo : lo + 64], references=refs[lo : lo + 64])
    batched = metric.compute()["accuracy"]
    assert batched == pytest.approx(np.mean(preds == refs))
    # computing again on the same data in one go agrees
    assert load_metric("accuracy", keep_in_memory=True).compute(predictions=preds, references=refs)[
        "accuracy"
    ] == pytest.approx(batched)


def test_accuracy_options(offline):
    metric = load_metric("accuracy", keep_in_memory=True)
    assert metric.compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 0], normalize=False) == {"accuracy": 2.0}
    weighted = metric.compute(predictions=[1, 2, 3], references=[1, 0, 3], sample_weight=[1.0, 2.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(2.0 / 4.0)
    assert metric.compute(predictions=[0, 0], references=[0, 0])["accuracy"] == 1.0


def test_path_and_helper_agree(offline):
    preds, refs = _random_labels(50, 2)
    a = evaluate.load(metric_path("accuracy"), keep_in_memory=True).compute(predictions=preds, references=refs)
    b = load_metric("accuracy", keep_in_memory=True).compute(predictions=preds, references=refs)
    assert a == b


def test_unknown_metric():
    assert "accuracy" in METRIC_NAMES
    with pytest.raises(ConfigError, match="f1"):
        load_metric("f1")
    with pytest.raises(ConfigError):
        metric_path("bleu")
