"""Utilities around training with egg_optim that are not part of the optimizer (profiling: what a step
dispatches, calls, saves, allocates and computes)."""

from .profiling import (
    INDEX_OPS,
    DispatchCounter,
    PythonCallCounter,
    flop_counter,
    peak_bytes_above,
    saved_tensor_bytes,
)

__all__ = [
    "INDEX_OPS",
    "DispatchCounter",
    "PythonCallCounter",
    "flop_counter",
    "peak_bytes_above",
    "saved_tensor_bytes",
]
