"""Offline ``evaluate`` metrics.

``evaluate.load("accuracy")`` needs the Hugging Face Hub. The modules here are plain metric scripts that work
offline, either through :func:`load_metric` (no network, no file copying) or through ``evaluate.load`` on the
path that :func:`metric_path` returns (``evaluate.load(metric_path("accuracy"))``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from egg_optim.errors import ConfigError

__all__ = ["METRIC_NAMES", "load_metric", "metric_path"]

METRIC_NAMES = ("accuracy",)
_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """Path of the bundled metric module ``name``, for ``evaluate.load(path)``."""
    key = str(name).strip().lower()
    if key not in METRIC_NAMES:
        raise ConfigError(f"unknown metric {name!r}; bundled metrics: {', '.join(METRIC_NAMES)}")
    return str(_DIR / f"{key}.py")


def load_metric(name: str, **kwargs: Any):
    """An instance of the bundled metric ``name`` (an ``evaluate.Metric``), without touching the network.

    ``kwargs`` go to ``evaluate.Metric.__init__`` (e.g. ``keep_in_memory=True``, ``num_process``,
    ``process_id``, ``experiment_id`` for distributed evaluation).
    """
    metric_path(name)  # validates the name
    from .accuracy import Accuracy

    return {"accuracy": Accuracy}[name.strip().lower()](**kwargs)
