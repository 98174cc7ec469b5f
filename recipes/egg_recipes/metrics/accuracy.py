"""Accuracy as an offline ``evaluate`` metric module.

``evaluate.load("accuracy")`` fetches a script from the Hugging Face Hub, which our machines cannot reach, and
metric scripts are not shipped in the ``evaluate`` wheel. This file is a self-contained metric module (it
imports only ``evaluate``, ``datasets`` and ``numpy``, because ``evaluate.load(path)`` copies it out of the
package), so both ``evaluate.load("<path to this file>")`` and ``egg_recipes.metrics.load_metric("accuracy")``
work offline and give the same results as the Hub's ``accuracy``.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their references, (TP + TN) / N."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    normalize (bool): return the fraction (default) instead of the count of correct predictions.
    sample_weight (list of float): per-sample weights (default: all 1).
Returns:
    accuracy (float): in [0, 1] when normalize is True, else the (weighted) number of correct predictions.
Examples:
    >>> metric = evaluate.load("egg_optim/metrics/accuracy.py")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""
_CITATION = ""


class Accuracy(evaluate.Metric):
    """Top-1 accuracy over integer class predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        preds = np.asarray(predictions).reshape(-1)
        refs = np.asarray(references).reshape(-1)
        if preds.shape != refs.shape:
            raise ValueError(f"{preds.size} predictions but {refs.size} references")
        correct = (preds == refs).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"{weights.size} sample weights for {correct.size} predictions")
        total = float(np.sum(correct * weights))
        if normalize:
            denom = float(np.sum(weights))
            return {"accuracy": total / denom if denom else float("nan")}
        return {"accuracy": total}
