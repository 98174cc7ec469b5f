"""Utilities around training with egg_optim that are not part of the optimizer (profiling: what a step
dispatches, calls, saves and allocates)."""

from .profiling import INDEX_OPS, DispatchCounter, PythonCallCounter, peak_bytes_above, saved_tensor_bytes

__all__ = ["INDEX_OPS", "DispatchCounter", "PythonCallCounter", "peak_bytes_above", "saved_tensor_bytes"]
