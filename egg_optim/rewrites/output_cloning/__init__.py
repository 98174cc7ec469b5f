"""Output cloning: clones reproduce their source leader's *output*; only leaders and independents are computed.

:class:`OutputCloning` applies it to an unmodified model by swapping, in place, the class of each managed
module (``nn.Linear``, ``nn.Conv1d/2d/3d``; optionally the ``BatchNorm1d/2d/3d`` that directly follows one) for
a subclass with a different ``forward``. Module objects, their ``nn.Parameter`` and buffer objects, qualified
names, ``state_dict`` keys and hooks all stay the same, so an optimizer built before keeps working, and
:meth:`OutputCloning.remove` swaps the classes back.

A managed layer with clones computes, in training and in ``"as_trained"`` evaluation::

    y_active = layer(x, weight[active], bias[active])    # leaders + independents only
    y = y_active.index_select(channel_dim, gather_index)  # clone positions carry their source's output

``index_select``'s backward adds a clone position's gradient into its source leader, and the weight-gradient
rows of clones are exactly zero. The indices are device buffers, rebuilt only in
:meth:`OutputCloning.update_roles`. A layer without clones runs the plain op.

With a fused norm (``norms={"conv": "bn"}``) the layer returns ``y_active`` (the active channels only) and the
norm takes batch statistics over those channels (a clone's equal its source's: its input is a copy), expands
them to all channels and applies every channel's *own* affine weight and bias, in one pass on CPU (see
:mod:`._fused`). Only active channels' running statistics are updated; a clone channel is normalised with its
source's statistics. Whatever runs between the two modules (hooks on the layer, user code) sees the compact
active-channel tensor.

Both paths trace under ``torch.compile`` without graph breaks (the CPU kernels are registered custom ops), and
a compiled model follows role changes without recompiling: the index buffers are graph inputs, not constants.
A change in a layer's number of active units (or whether it has clones) recompiles.

:func:`export_plain` gives a plain model (original classes) in which clone rows hold their source's conv
weights, bias and norm running statistics (and their own norm affine, which they used), so the unmodified
architecture reproduces ``"as_trained"`` evaluation. ``model.state_dict()`` gives the same values (the rewritten
classes save clone rows filled from their sources, without changing the live tensors; with
``eval_mode="own_weights"`` they save the units' own rows, which is what that mode evaluates), so every save
path built on it (``torch.save(model.state_dict())``, ``save_pretrained``, ``Trainer.save_model`` and its
checkpoints, ``accelerator.save_model``, safetensors' ``save_model``) loads into the plain architecture and
computes what the model computes in ``eval()``.
"""

from __future__ import annotations

from ._core import (
    EVAL_MODES,
    OutputCloning,
    can_fuse,
    export_plain,
    export_state_dict,
    is_output_cloned,
    take_probe,
)
from ._kernel import error as native_kernel_error
from ._kernel import load as _load_kernel


def native_kernels_available() -> bool:
    """Whether the compiled CPU kernels for fused norms can be used (builds them on first call)."""
    return _load_kernel() is not None


__all__ = [
    "EVAL_MODES",
    "OutputCloning",
    "can_fuse",
    "export_plain",
    "export_state_dict",
    "is_output_cloned",
    "native_kernel_error",
    "native_kernels_available",
    "take_probe",
]
