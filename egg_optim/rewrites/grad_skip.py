"""Gradient skipping: in weight-cloning mode, compute weight gradients for active rows only.

With ``clone_mode="weight"`` every unit is computed with its own weights, but the optimizer wrapper masks the
clones' weight-gradient rows (clones are refreshed from their leaders at clone events). Plain autograd still
computes them. :class:`GradSkip` rewrites ``nn.Linear`` / ``nn.Conv1d/2d/3d`` layers in place (class swap, like
:class:`~egg_optim.rewrites.output_cloning.OutputCloning`: same module, parameter and buffer objects, names,
``state_dict`` keys and hooks; :meth:`GradSkip.remove` swaps back) so that a layer with enough clones, in
training with grad enabled, runs a custom autograd function:

* forward: the plain op with the full weight (output bit-for-bit the plain module's);
* backward: the input gradient with the full weight, by the op plain autograd uses (skipped when the input
  needs none, e.g. the first layer); the weight and bias gradients only for active rows (leaders and
  independents) from the active channels of the output gradient, written into full-size tensors whose clone
  rows are exactly zero. On CPU a pointwise conv (1x1, stride 1, no padding) takes them as matmuls.

Anything else that reads clone rows of ``weight.grad`` sees zeros: notably the per-step election scores
``"grad_norm"`` and ``"taylor"`` (as in output-cloning mode).

The index buffers are rebuilt only in :meth:`GradSkip.update_roles`: no per-step host/device sync. A layer
without clones (or fewer than ``min_clone_fraction``), in ``eval()``, under ``torch.no_grad()``, with a frozen
weight or, on a GPU, with less weight-gradient work per call than :data:`MIN_WORK` says pays for the function's
host time runs the plain forward (``super().forward``).

Conv layers with ``padding_mode != "zeros"`` or string padding (``"same"`` / ``"valid"``) are supported: the
input is padded before the function by the op the plain module (or ATen, for an asymmetric ``"same"``) uses,
and the function's conv gets the remaining numeric padding, so outputs stay bit-for-bit equal. Grouped convs are
refused.

Under autocast the backward casts the saved input/weight to the output gradient's dtype and the gradients back,
as autograd does through autocast's casts. With ``create_graph=True`` the backward is recorded: a gradient
penalty differentiates the input gradient exactly; what reaches the weight through the forward again has clone
rows zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.axes import Span
from ..core.blocks import UnitGroup
from ..core.roles import Roles
from ..errors import ConfigError, PlanError
from . import base as rewrite

__all__ = ["BlockGradSkip", "GradSkip", "block_linears", "is_grad_skipped", "restore_plain", "supports"]

_ATTRS = (
    "_egg_gs_roles",
    "_egg_gs_skip",
    "_egg_gs_padding",
    "_egg_gs_prepad",
    "_egg_gs_prepad_mode",
    "_egg_gs_pointwise",
    "_egg_gs_spans",
    "_egg_gs_cols",
)
_BUFFERS = ("_egg_gs_active", "_egg_gs_clones")


# ---------------------------------------------------------------------------------------------- autograd
Spans = tuple[Span, Span] | None  # (active, clones) as runs of rows, when both are (packed roles)


def _scatter_rows(
    like: torch.Tensor, active: torch.Tensor, clones: torch.Tensor, rows: torch.Tensor, spans: Spans
) -> torch.Tensor:
    """A full-size gradient (rows, dtype, device of ``like``) holding ``rows`` at ``active`` and exact zeros at
    ``clones`` (the two partition the rows, so every element is written: no separate zero fill). When both are
    runs of rows the clones' zeros are padding before or after the active rows: one op, no index (the aten op: the
    Python wrapper ``F.pad`` costs host calls on every step)."""
    if spans is not None:
        n_clones = spans[1][1]
        before, after = (n_clones, 0) if spans[1][0] == 0 else (0, n_clones)
        rows = rows if rows.dtype == like.dtype else rows.to(like.dtype)  # (a no-op .to() costs a host call too)
        return torch.constant_pad_nd(rows, [0, 0] * (rows.dim() - 1) + [before, after])
    out = torch.empty((like.shape[0], *rows.shape[1:]), dtype=like.dtype, device=like.device)
    return out.index_copy_(0, active, rows.to(like.dtype)).index_fill_(0, clones, 0)


def _scatter_cols(
    like: torch.Tensor, active: torch.Tensor, clones: torch.Tensor, cols: torch.Tensor, spans: Spans
) -> torch.Tensor:
    """:func:`_scatter_rows` along the last dimension: a full-size weight gradient holding ``cols`` at the ``active``
    input columns and exact zeros at the ``clones``' (padding where both are runs)."""
    if spans is not None:
        n_clones = spans[1][1]
        cols = cols if cols.dtype == like.dtype else cols.to(like.dtype)
        return torch.constant_pad_nd(cols, [n_clones, 0] if spans[1][0] == 0 else [0, n_clones])
    out = torch.empty((*cols.shape[:-1], like.shape[-1]), dtype=like.dtype, device=like.device)
    return out.index_copy_(-1, active, cols.to(like.dtype)).index_fill_(-1, clones, 0)


def _active_channels(grad_out: torch.Tensor, active: torch.Tensor, spans: Spans) -> torch.Tensor:
    """The active output channels (dim 1) of ``grad_out``: a view when they are one run (packed roles; compiled,
    a gather there would be the one index op of the step), else gathered."""
    if spans is not None:
        return grad_out.narrow(1, *spans[0])
    return grad_out.index_select(1, active)


def _cast(input: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and weight in the output gradient's dtype: under autocast the forward op ran on casts of them, and
    plain autograd differentiates that op in the cast dtype (then casts the gradients back)."""
    if input.dtype != dtype:
        input = input.to(dtype)
    if weight.dtype != dtype:
        weight = weight.to(dtype)
    return input, weight


class _LinearFn(torch.autograd.Function):
    """``F.linear`` whose weight/bias gradients are computed for the ``active`` rows only; with ``cols``, its weight
    gradient for the ``active`` input columns only (a block's consumer: its units are its input columns), its bias
    gradient whole."""

    @staticmethod
    def forward(ctx, input, weight, bias, roles):
        # roles: (active, clones, spans, cols), one argument: each tensor argument costs Function.apply host work
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        ctx.active, ctx.clones, ctx.spans, ctx.cols = roles
        out = F.linear(input, weight, bias)
        # with a bias and a batched input, F.linear returns a view of its 2-D addmm: an output of a custom Function
        # that is a view cannot be written in place (a ReLU(inplace=True) after the layer, Swin V2's position MLP);
        # detached, it is a tensor of its own (told without a call: Dynamo does not trace Tensor._is_view, and each
        # call is host time)
        return out.detach() if bias is not None and input.ndim > 2 else out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight = ctx.saved_tensors
        active, clones = ctx.active, ctx.clones
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        input_c, weight_c = _cast(input, weight, grad_out.dtype)
        grad_x = grad_w = grad_b = None
        if need_x:
            if input.dim() == 1:
                # an unbatched input: plain autograd differentiates mm(x[None], W.t()), whose input-gradient
                # formula picks a layout from the size-1 dimension's strides; reuse it for bit-equality
                with torch.enable_grad():
                    x1 = input_c.detach().requires_grad_()
                    (grad_x,) = torch.autograd.grad(F.linear(x1, weight_c.detach()), x1, grad_out)
            else:
                grad_x = grad_out.matmul(weight_c)
            if grad_x.dtype != input.dtype:
                grad_x = grad_x.to(input.dtype)
        if ctx.cols and (need_w or need_b):
            g = grad_out.reshape(-1, grad_out.shape[-1])
            if need_w:
                x = _active_channels(input_c.reshape(-1, input_c.shape[-1]), active, ctx.spans)
                grad_w = _scatter_cols(weight, active, clones, g.t().mm(x), ctx.spans)
            if need_b and ctx.has_bias:
                grad_b = g.sum(0).to(weight.dtype)
        elif need_w or need_b:
            g = _active_channels(grad_out.reshape(-1, grad_out.shape[-1]), active, ctx.spans)
            if need_w:
                x = input_c.reshape(-1, input_c.shape[-1])
                grad_w = _scatter_rows(weight, active, clones, g.t().mm(x), ctx.spans)
            if need_b and ctx.has_bias:
                grad_b = _scatter_rows(weight, active, clones, g.sum(0), ctx.spans)
        return grad_x, grad_w, grad_b, None


def _pointwise_weight_grad(
    grad_out: torch.Tensor, input: torch.Tensor, need_w: bool, need_b: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight/bias gradient of a 1x1, stride-1, unpadded conv as matmuls on the NC(spatial) layout.

    On CPU this is several times faster than oneDNN's weight backward at the seed nets' shapes (which works in
    blocks of 8/16 output channels and reorders NCHW tensors in and out), and its cost follows the number of
    active channels. A batched matmul summed over the batch is fastest, but its (batch, active, in) intermediate
    may be large: when it would exceed the input, one matmul over (batch x spatial) is used instead.
    """
    n, c, a = input.shape[0], input.shape[1], grad_out.shape[1]
    g = grad_out.reshape(n, a, -1)
    x = input.reshape(n, c, -1)
    gw = None
    if need_w:
        if a <= x.shape[2]:  # n*a*c <= n*c*spatial: the intermediate is no larger than the input
            gw = torch.bmm(g, x.transpose(1, 2)).sum(0)
        else:
            gw = g.transpose(0, 1).reshape(a, -1).mm(x.transpose(0, 1).reshape(c, -1).t())
    gb = g.sum((0, 2)) if need_b else None
    return gw, gb


class _ConvFn(torch.autograd.Function):
    """A ConvNd (``groups=1``, numeric padding) whose weight/bias gradients are computed for ``active`` rows only."""

    @staticmethod
    def forward(ctx, input, weight, bias, active, clones, spans, conv, stride, padding, dilation, pointwise):
        ctx.save_for_backward(input, weight, active, clones)
        ctx.has_bias = bias is not None
        ctx.spans = spans
        ctx.geometry = (stride, padding, dilation, pointwise)
        return conv(input, weight, bias, stride, padding, dilation, 1)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, active, clones = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        stride, padding, dilation, pointwise = ctx.geometry
        input_c, weight_c = _cast(input, weight, grad_out.dtype)
        out_pad = [0] * (weight.dim() - 2)
        conv_bwd = torch.ops.aten.convolution_backward.default
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = conv_bwd(
                grad_out, input_c, weight_c, None, stride, padding, dilation, False, out_pad, 1, [True, False, False]
            )[0]
            if grad_x.dtype != input.dtype:
                grad_x = grad_x.to(input.dtype)
        if need_w or need_b:
            g = _active_channels(grad_out, active, ctx.spans)
            if pointwise and input_c.device.type == "cpu" and input_c.is_contiguous():
                gw, gb = _pointwise_weight_grad(g, input_c, need_w, need_b)
                if gw is not None:
                    gw = gw.view((gw.shape[0], gw.shape[1]) + (1,) * len(out_pad))
            else:
                # the weight gradient does not read the weight's values: a view of the right shape will do
                w_active = weight_c.narrow(0, 0, active.shape[0])
                _, gw, gb = conv_bwd(
                    g,
                    input_c,
                    w_active,
                    [w_active.shape[0]] if need_b else None,
                    stride,
                    padding,
                    dilation,
                    False,
                    out_pad,
                    1,
                    [False, need_w, need_b],
                )
            if need_w:
                grad_w = _scatter_rows(weight, active, clones, gw, ctx.spans)
            if need_b:
                grad_b = _scatter_rows(weight, active, clones, gb, ctx.spans)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


_linear_fn, _conv_fn = rewrite.direct_apply(_LinearFn), rewrite.direct_apply(_ConvFn)


# ---------------------------------------------------------------------------------------------- layers
class _GradSkipLayer:
    """Mixin placed before the original layer class. Attributes are set by :func:`_set_roles`."""

    _egg_gs_roles: Roles
    _egg_gs_skip: bool
    _egg_gs_active: torch.Tensor
    _egg_gs_clones: torch.Tensor
    _egg_gs_spans: Spans
    _egg_gs_cols = False  # the roles are of its input columns (a block's consumer), not of its rows


# Weight-gradient work (tokens x weight elements: a Linear's multiply-adds; a conv's, stride 1, per input position)
# from which a layer takes the split backward on a device type listed here. Its autograd function costs host time
# (about 20 Python calls per layer and step, 10-20 us: bench_host.md) and saves the clones' share of that work. On a
# CPU the work dominates at every size measured (a Llama of hidden 256: 0.94x of the bare step, 1.03x without,
# bench_transformers.md). On a GPU a small layer's saving is a few microseconds of device time while a launch-bound
# step waits for the host: from 2^30 (about 2 GFLOP of weight gradient, 20 us at 100 TFLOP/s; half of it the clones'
# at the mild plan) the saving is estimated to match that cost. Not measured: ``bench_gpu.py`` times the split on
# every layer (``weight/mild-skipall``) and on none (``weight/mild-noskip``) beside this default.
MIN_WORK: dict[str, int] = {"cuda": 1 << 30}


def _splits(layer: _GradSkipLayer, input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``layer`` takes the split backward on this call: enough clones (decided when roles change), training
    with grad, and on a device listed in :data:`MIN_WORK` enough weight-gradient work."""
    if not (layer._egg_gs_skip and layer.training and weight.requires_grad and torch.is_grad_enabled()):
        return False
    floor = MIN_WORK.get(weight.device.type)
    return not floor or input.numel() // weight.shape[1] * weight.numel() >= floor


class _GSLinear(_GradSkipLayer, nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # registries read directly: each ``self.<parameter or buffer>`` is a Python call (Module.__getattr__)
        params, buffers = self._parameters, self._buffers
        weight, bias = params["weight"], params["bias"]
        if not _splits(self, input, weight):
            return F.linear(input, weight, bias)
        roles = (buffers["_egg_gs_active"], buffers["_egg_gs_clones"], self._egg_gs_spans, self._egg_gs_cols)
        return _linear_fn(input, weight, bias, roles)


class _GSConvMixin(_GradSkipLayer):
    _egg_gs_padding: tuple[int, ...]
    _egg_gs_prepad: tuple[int, ...] | None
    _egg_gs_prepad_mode: str
    _egg_gs_pointwise: bool
    _egg_gs_conv = None  # F.conv1d/2d/3d, set on the subclasses

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        params, buffers = self._parameters, self._buffers
        weight = params["weight"]
        if not _splits(self, input, weight):
            return super().forward(input)
        unbatched = input.dim() == weight.dim() - 1
        x = input.unsqueeze(0) if unbatched else input  # as F.convNd does for unbatched input
        if self._egg_gs_prepad is not None:
            x = F.pad(x, self._egg_gs_prepad, mode=self._egg_gs_prepad_mode)
        y = _conv_fn(
            x,
            weight,
            params["bias"],
            buffers["_egg_gs_active"],
            buffers["_egg_gs_clones"],
            self._egg_gs_spans,
            type(self)._egg_gs_conv,
            self.stride,
            self._egg_gs_padding,
            self.dilation,
            self._egg_gs_pointwise,
        )
        return y.squeeze(0) if unbatched else y


class _GSConv1d(_GSConvMixin, nn.Conv1d):
    _egg_gs_conv = staticmethod(F.conv1d)


class _GSConv2d(_GSConvMixin, nn.Conv2d):
    _egg_gs_conv = staticmethod(F.conv2d)


class _GSConv3d(_GSConvMixin, nn.Conv3d):
    _egg_gs_conv = staticmethod(F.conv3d)


_LAYER_CLASSES: dict[type, type] = {
    nn.Linear: _GSLinear,
    nn.Conv1d: _GSConv1d,
    nn.Conv2d: _GSConv2d,
    nn.Conv3d: _GSConv3d,
}
_OWNER = "GradSkip"
_ORIGINAL_CLASS = rewrite.register(_OWNER, _LAYER_CLASSES)


# ---------------------------------------------------------------------------------------------- helpers
def is_grad_skipped(module: nn.Module) -> bool:
    """True when ``module`` is currently a layer rewritten by :class:`GradSkip`."""
    return type(module) in _ORIGINAL_CLASS


def supports(module: nn.Module) -> bool:
    """Whether :class:`GradSkip` can rewrite ``module`` (exactly ``nn.Linear`` / ``nn.Conv1d/2d/3d``, groups=1,
    initialised, not already rewritten)."""
    return rewrite.layer_problem(module, _LAYER_CLASSES, _OWNER) is None


def restore_plain(model: nn.Module) -> nn.Module:
    """Give every rewritten layer of ``model`` its original class back, in place (for a ``deepcopy`` of a model
    under :class:`GradSkip`, which copies the rewritten classes). Returns ``model``."""
    for m in model.modules():
        if is_grad_skipped(m):
            rewrite.restore(m, _ATTRS, _BUFFERS)
    return model


def _conv_geometry(conv: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...] | None, str]:
    """(numeric conv padding, F.pad amounts or None, F.pad mode) reproducing the module's own forward.

    ``padding_mode != "zeros"``: the module pads with ``_reversed_padding_repeated_twice`` and convolves with no
    padding. ``"same"``: ATen pads symmetrically by the left amount and zero-pads the extra right element (even
    kernel extent) first. ``"valid"``: no padding.
    """
    d = len(conv.kernel_size)
    if conv.padding_mode != "zeros":
        return (0,) * d, tuple(conv._reversed_padding_repeated_twice), conv.padding_mode
    if conv.padding == "valid":
        return (0,) * d, None, "constant"
    if conv.padding == "same":
        rev = conv._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
        left = tuple(rev[2 * (d - 1 - i)] for i in range(d))
        extra: list[int] = []
        for i in reversed(range(d)):
            extra += [0, rev[2 * (d - 1 - i) + 1] - left[i]]
        return left, (tuple(extra) if any(extra) else None), "constant"
    return tuple(conv.padding), None, "constant"


def _set_roles(layer: nn.Module, roles: Roles, min_clone_fraction: float) -> None:
    layer._egg_gs_roles = roles
    layer._egg_gs_skip = roles.has_clones and roles.num_clones >= min_clone_fraction * roles.num_units
    device = layer.weight.device
    rewrite.set_buffer(layer, "_egg_gs_active", roles.active.to(device, copy=True))
    rewrite.set_buffer(layer, "_egg_gs_clones", roles.clones.to(device, copy=True))
    spans = roles.active_span, roles.clone_span
    layer._egg_gs_spans = spans if None not in spans else None


# ---------------------------------------------------------------------------------------------- public
class GradSkip(rewrite.LayerRewrite):
    """Skip clone rows' weight-gradient work in ``model``, in place (reversible with :meth:`remove`).

    Args:
        model: any ``nn.Module``; managed submodules keep their objects, parameters, names and hooks.
        roles: qualified layer name -> :class:`~egg_optim.core.roles.Roles` (``nn.Linear`` / ``nn.Conv1d/2d/3d``
            with ``groups == 1``; ``num_units`` must equal the layer's output features/channels). Typically
            ``LeaderCloneOptimizer.roles``; keep them current with
            ``optimizer.add_roles_listener(grad_skip.update_roles)``.
        min_clone_fraction: a layer takes the split backward only while at least this fraction of its units are
            clones; below it, it runs the plain op (its clone rows then get gradients, which weight-mode training
            ignores anyway). The split costs a fixed overhead: on CPU the input gradient and the weight gradient
            become two ``convolution_backward`` calls instead of one (oneDNN shares work between them; a 3x3 conv
            32->32 at 14x14, batch 256, costs ~15% more split with a quarter of its units cloned and ~10% less
            with half), plus the gather/scatter of rows. The default 0.5 keeps only layers measured to gain;
            ``0.0`` skips in every layer with clones. Decided when roles change, never per step.

    Raises:
        PlanError: unknown layer names, unsupported module types, size mismatches, lazy parameters, or a layer
            already rewritten (by ``GradSkip`` or output cloning); raised before any module is changed.
        ConfigError: ``min_clone_fraction`` outside ``[0, 1]``.
    """

    owner = _OWNER
    option = "skip_clone_grads (set it to False)"

    def __init__(self, model: nn.Module, roles: Mapping[str, Roles], *, min_clone_fraction: float = 0.5) -> None:
        if not 0.0 <= min_clone_fraction <= 1.0:
            raise ConfigError(f"min_clone_fraction must be in [0, 1], got {min_clone_fraction!r}")
        layers = rewrite.validate_layers(model, roles, _LAYER_CLASSES, _OWNER)
        # ---- everything checked: change modules
        self.model = model
        self._layers: dict[str, nn.Module] = layers
        self._roles: dict[str, Roles] = dict(roles)
        self._min_clone_fraction = float(min_clone_fraction)
        self._removed = False
        for name, layer in layers.items():
            layer.__class__ = _LAYER_CLASSES[type(layer)]
            if not isinstance(layer, nn.Linear):
                (layer._egg_gs_padding, layer._egg_gs_prepad, layer._egg_gs_prepad_mode) = _conv_geometry(layer)
                layer._egg_gs_pointwise = (
                    all(k == 1 for k in layer.kernel_size)
                    and all(s == 1 for s in layer.stride)
                    and not any(layer._egg_gs_padding)
                )
            _set_roles(layer, roles[name], self._min_clone_fraction)

    @property
    def min_clone_fraction(self) -> float:
        return self._min_clone_fraction

    @property
    def skipping(self) -> dict[str, bool]:
        """Per managed layer: whether it currently takes the split backward in training (clones, and enough; on a GPU,
        per call, also enough work: :data:`MIN_WORK`)."""
        return {name: bool(layer._egg_gs_skip) for name, layer in self._layers.items() if is_grad_skipped(layer)}

    def _apply_roles(self, name: str, roles: Roles) -> None:
        _set_roles(self._layers[name], roles, self._min_clone_fraction)

    def _restore_all(self) -> None:
        for m in self._layers.values():
            rewrite.restore(m, _ATTRS, _BUFFERS)

    def export(self, model: nn.Module) -> nn.Module:
        return restore_plain(model)

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._layers)} layers"
        return f"GradSkip({state})"


class BlockGradSkip(GradSkip):
    """:class:`GradSkip` for transformer blocks (weight mode): a block's ``nn.Linear`` producers (q/k/v, up and gate
    projections) take the roles of their rows, its consumer (down or output projection) those of its input columns,
    each its units' element roles (:meth:`Roles.expand` of its weight slice), so the clones' rows and columns get no
    weight-gradient work, as a plain layer's clone rows get none. Roles come and go by block name.

    Args:
        model: the model.
        groups: ``{block name: UnitGroup}``; members that are no plain ``nn.Linear`` (GPT-2's ``Conv1D``, MoE
            experts' 3-D weights, a subclass) or hold other unit slices (a per-head table) compute as they are.
        roles: ``{block name: Roles}`` over each block's units.
        min_clone_fraction: as for :class:`GradSkip`.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Mapping[str, UnitGroup],
        roles: Mapping[str, Roles],
        *,
        min_clone_fraction: float = 0.5,
    ) -> None:
        if not 0.0 <= min_clone_fraction <= 1.0:
            raise ConfigError(f"min_clone_fraction must be in [0, 1], got {min_clone_fraction!r}")
        self._parts = block_linears(model, groups)
        element_roles = self._expanded({n: r for n, r in roles.items() if n in self._parts})
        modules = dict(model.named_modules())
        # ---- everything checked: change modules
        self.model = model
        self._layers = {m: modules[m] for rows in self._parts.values() for m, _, _ in rows}
        self._roles = {}
        self._min_clone_fraction = float(min_clone_fraction)
        self._removed = False
        for rows in self._parts.values():
            for m, _, cols in rows:
                layer = self._layers[m]
                layer.__class__ = _LAYER_CLASSES[type(layer)]
                layer._egg_gs_cols = cols
                self._roles[m] = element_roles[m]
                self._apply_roles(m, element_roles[m])

    def _apply_roles(self, name: str, roles: Roles) -> None:
        """As :class:`GradSkip`, and only while the member's active rows (columns) and its clones' are one run each
        (packed roles): its split backward then cuts and pads by views, with no index op over its gradient; with
        scattered roles (a fused projection's ``[q | k | v]`` rows, the seed's drawn roles) it computes as it is."""
        layer = self._layers[name]
        _set_roles(layer, roles, self._min_clone_fraction)
        layer._egg_gs_skip = layer._egg_gs_skip and layer._egg_gs_spans is not None

    def _expanded(self, roles: Mapping[str, Roles]) -> dict[str, Roles]:
        """Each member's element roles under the blocks' ``roles`` (validated: a block it does not manage, roles
        over another number of units raise :class:`PlanError`)."""
        for name in roles:
            if name not in self._parts:
                raise PlanError(f"block {name!r} is not managed by this {type(self).__name__}")
        return {m: roles[name].expand(index) for name in roles for m, index, _ in self._parts[name]}

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The blocks whose roles it takes (their first rewritten member each)."""
        return {name: self._layers[rows[0][0]] for name, rows in self._parts.items()}

    def update_roles(self, new_roles: Mapping[str, Roles]) -> None:
        self._check_live()
        for m, r in self._expanded(new_roles).items():
            old, self._roles[m] = self._roles[m], r
            if not r.same_as(old):
                self._apply_roles(m, r)


def block_linears(model: nn.Module, groups: Mapping[str, UnitGroup]) -> dict[str, list[tuple[str, torch.Tensor, bool]]]:
    """Per block, the members :class:`BlockGradSkip` can rewrite, each with its units' positions and whether they
    are its input columns (the consumer) or its rows (a producer, its bias along the same rows): plain ``nn.Linear``
    layers whose only unit slices are those."""
    modules = dict(model.named_modules())
    out: dict[str, list[tuple[str, torch.Tensor, bool]]] = {}
    for name, g in groups.items():
        found = []
        for m in [*g.producers, *([g.consumer] if g.consumer else [])]:
            slices = {s.key: s for s in g.slices if s.module == m}
            w, b = slices.get("weight"), slices.get("bias")
            if w is None or not supports(modules[m]) or not set(slices) <= {"weight", "bias"}:
                continue
            if w.role == "producer" and w.dim == 0 and (b is None or torch.equal(b.index, w.index)):
                found.append((m, w.index, False))
            elif w.role == "consumer" and w.dim == 1 and b is None:
                found.append((m, w.index, True))
        if found:
            out[name] = found
    return out
