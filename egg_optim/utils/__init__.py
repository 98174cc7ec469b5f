"""Utilities around training with egg_optim that are not part of the optimizer (profiling)."""

from .profiling import INDEX_OPS, DispatchCounter, peak_bytes_above, saved_tensor_bytes

__all__ = ["INDEX_OPS", "DispatchCounter", "peak_bytes_above", "saved_tensor_bytes"]
