"""Implementation of :mod:`egg_optim.rewrites.output_cloning` (see the package docstring)."""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...core.axes import Span, select
from ...core.roles import Roles
from ...core.sharding import copied_positions, copy_positions_, is_sharded
from ...errors import PlanError, RewriteCheckError
from .. import base as rewrite
from ..base import EVAL_MODES, check_eval_mode, known_names, set_buffer
from . import _kernel
from ._fused import AFFINE_EPS, fused_norm_expand
from ._gather import Tile, expand_packed, expand_tiled, expand_units, tile_of

__all__ = [
    "EVAL_MODES",
    "OutputCloning",
    "can_fuse",
    "export_plain",
    "export_state_dict",
    "is_output_cloned",
    "take_probe",
]

_LAYER_ATTRS = (
    "_egg_roles", "_egg_has_clones", "_egg_fused", "_egg_own_weights", "_egg_dim", "_egg_pointwise",
    "_egg_probe", "_egg_probe_data", "_egg_span", "_egg_tile", "_egg_watch", "_egg_called",
)  # fmt: skip
_LAYER_BUFFERS = ("_egg_active", "_egg_gather")
_NORM_ATTRS = ("_egg_roles", "_egg_has_clones", "_egg_num_active", "_egg_kernel", "_egg_own_weights", "_egg_span")
_NORM_BUFFERS = ("_egg_active", "_egg_gather", "_egg_zero", "_egg_one")


# ---------------------------------------------------------------------------------------------- layers
class _OutputClonedLayer:
    """Mixin placed before the original layer class. Attributes are set by :func:`_set_layer_roles`."""

    _egg_roles: Roles
    _egg_has_clones: bool
    _egg_fused: bool
    _egg_own_weights: bool
    _egg_dim: int
    _egg_active: torch.Tensor
    _egg_gather: torch.Tensor
    _egg_span: Span | None  # the active units as one run of rows: weights taken as views
    _egg_tile: Tile | None  # packed roles as the expansion sees them (compiled: no index op)
    _egg_probe: bool = False
    _egg_watch: bool = False  # note that the forward ran (:meth:`OutputCloning.check_called`); never read compiled

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self._egg_watch:
            self.__dict__["_egg_called"] = True
        if not self._egg_has_clones or (self._egg_own_weights and not self.training):
            return super().forward(input)  # plain op, the unit's own weights
        weight, bias = self.weight, self.bias
        span = self._egg_span
        if span is not None:  # per step, on the host of a launch-bound GPU: direct views
            cl = weight.stride(1) == 1 and not weight.is_contiguous()  # channels_last (a Linear's: 1, contiguous)
            weight = _rows(weight, span) if cl else weight.narrow(0, *span)
            bias = None if bias is None else bias.narrow(0, *span)
        else:
            weight = select(weight, 0, self._egg_active)
            bias = None if bias is None else select(bias, 0, self._egg_active)
        y = self._egg_compute(input, weight, bias)
        if self._egg_probe and self.training and torch.is_grad_enabled():
            # one probed forward: full width (a fused norm then runs as the plain norm, the same function), and
            # the gradient at every output position, clones' included, is kept before it is summed into sources
            self._egg_probe = False
            full = y.index_select(self._egg_dim, self._egg_gather)
            if full.requires_grad:
                x = input.detach()
                full.register_hook(lambda g: setattr(self, "_egg_probe_data", (x, g.detach())))
            return full
        if self._egg_fused:
            return y  # the fused norm expands
        if self._egg_tile is None:
            return expand_units(y, self._egg_dim, self._egg_gather)
        if torch.compiler.is_compiling():
            return expand_tiled(y, self._egg_dim, self._egg_tile)
        return expand_packed(y, self._egg_dim, self._egg_gather, self._egg_tile)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        _save_filled(self, destination, prefix, keep_vars, ("weight", "bias"))


def _rows(weight: torch.Tensor, span: Span) -> torch.Tensor:
    """``weight.narrow(0, *span)`` for a ``channels_last`` weight, taken so that its gradient comes back in that
    layout: autograd's slice backward allocates contiguous zeros of what was narrowed, so the narrow runs on the
    channels-innermost permutation (views both ways); narrowed directly, the gradient came back contiguous and
    ``AccumulateGrad`` copied it into the weight's layout at every step."""
    n = weight.dim()
    if n < 3:
        return weight.narrow(0, *span)
    rows = weight.permute(0, *range(2, n), 1).narrow(0, *span)
    return rows.permute(0, n - 1, *range(1, n - 1))


class _OCLinear(_OutputClonedLayer, nn.Linear):
    def _egg_compute(self, input, weight, bias):
        return F.linear(input, weight, bias)


class _OCConvMixin(_OutputClonedLayer):
    _egg_pointwise: bool

    def _egg_compute(self, input, weight, bias):
        if (
            self._egg_pointwise
            and input.device.type == "cpu"
            and input.dim() == weight.dim()
            and input.is_contiguous()
            and not torch.compiler.is_compiling()
        ):
            # 1x1 conv, stride 1, no padding: a batched matmul on the NC(spatial) layout. On CPU it scales with
            # the number of active channels, while mkldnn works in blocks of 8/16 output channels and reorders
            # NCHW tensors in and out. Not under torch.compile: inductor lays convs out channels-last, and an
            # NCHW matmul among them costs a layout conversion each way.
            n, cin = input.shape[0], input.shape[1]
            a = weight.shape[0]
            w = weight.view(1, a, cin).expand(n, a, cin)
            x = input.view(n, cin, -1)
            y = torch.bmm(w, x) if bias is None else torch.baddbmm(bias.view(1, a, 1), w, x)
            return y.view((n, a) + tuple(input.shape[2:]))
        return self._conv_forward(input, weight, bias)


class _OCConv1d(_OCConvMixin, nn.Conv1d):
    pass


class _OCConv2d(_OCConvMixin, nn.Conv2d):
    pass


class _OCConv3d(_OCConvMixin, nn.Conv3d):
    pass


_LAYER_CLASSES: dict[type, type] = {
    nn.Linear: _OCLinear,
    nn.Conv1d: _OCConv1d,
    nn.Conv2d: _OCConv2d,
    nn.Conv3d: _OCConv3d,
}


# ---------------------------------------------------------------------------------------------- norms
class _FusedNorm:
    """Mixin placed before a BatchNorm class whose input is the compact output of an output-cloned layer."""

    _egg_roles: Roles
    _egg_has_clones: bool
    _egg_num_active: int
    _egg_kernel: bool
    _egg_active: torch.Tensor
    _egg_gather: torch.Tensor
    _egg_zero: torch.Tensor
    _egg_one: torch.Tensor
    _egg_span: Span | None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._egg_has_clones or input.dim() < 2 or input.shape[1] != self._egg_num_active:
            # full-width input (no clones, or the layer ran with its own weights): the plain norm
            return super().forward(input)
        self._check_input_dim(input)
        return fused_norm_expand(self, input)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        _save_filled(self, destination, prefix, keep_vars, ("running_mean", "running_var"))


class _FusedBatchNorm1d(_FusedNorm, nn.BatchNorm1d):
    pass


class _FusedBatchNorm2d(_FusedNorm, nn.BatchNorm2d):
    pass


class _FusedBatchNorm3d(_FusedNorm, nn.BatchNorm3d):
    pass


_NORM_CLASSES: dict[type, type] = {
    nn.BatchNorm1d: _FusedBatchNorm1d,
    nn.BatchNorm2d: _FusedBatchNorm2d,
    nn.BatchNorm3d: _FusedBatchNorm3d,
}
# which norm may follow which layer
_NORM_FOR_LAYER: dict[type, tuple[type, ...]] = {
    nn.Linear: (nn.BatchNorm1d,),
    nn.Conv1d: (nn.BatchNorm1d,),
    nn.Conv2d: (nn.BatchNorm2d,),
    nn.Conv3d: (nn.BatchNorm3d,),
}
_OWNER = "output cloning"
_ORIGINAL_CLASS = rewrite.register(_OWNER, {**_LAYER_CLASSES, **_NORM_CLASSES})


# ---------------------------------------------------------------------------------------------- helpers
def _save_filled(module: nn.Module, destination, prefix: str, keep_vars: bool, attrs: tuple[str, ...]) -> None:
    """Saved state is what the model computes in ``eval()``: under ``"as_trained"`` a clone's rows of ``attrs``
    are saved as its source's (the clone carried its source's output, its own rows were never used), so the
    state dict loads into the plain architecture and reproduces the model. Live tensors are not changed.
    ``keep_vars=True`` asks for the live tensors themselves (identity, not values): given unchanged."""
    if keep_vars or not module._egg_has_clones or module._egg_own_weights:
        return
    roles: Roles = module._egg_roles
    for attr in attrs:
        t = destination.get(prefix + attr)
        if t is None:
            continue
        destination[prefix + attr] = copied_positions(t, 0, roles.clones, roles.sources)  # DTensors stay sharded


def can_fuse(layer: nn.Module, norm: nn.Module) -> bool:
    """Whether output cloning can fuse ``norm`` into ``layer`` (types and sizes; not whether ``norm`` does take
    ``layer``'s output alone, which :mod:`egg_optim.core.coupling` establishes)."""
    original = _ORIGINAL_CLASS.get(type(layer), type(layer))
    allowed = _NORM_FOR_LAYER.get(original, ())
    units = layer.out_features if isinstance(layer, nn.Linear) else getattr(layer, "out_channels", None)
    return type(norm) in allowed and getattr(norm, "num_features", None) == units


def is_output_cloned(module: nn.Module) -> bool:
    """True when ``module`` is currently a layer or norm managed by output cloning."""
    return type(module) in _ORIGINAL_CLASS


def _is_pointwise(conv: nn.Module) -> bool:
    """A 1x1 conv with stride 1, no padding and no dilation: a matmul over channels at every position."""
    return (
        all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and (conv.padding == "valid" or all(p == 0 for p in conv.padding))
        and conv.groups == 1
    )


def _set_layer_roles(layer: nn.Module, roles: Roles) -> None:
    device = layer.weight.device
    layer._egg_roles = roles
    layer._egg_has_clones = roles.has_clones
    layer._egg_span = roles.active_span
    layer._egg_tile = tile_of(roles)
    set_buffer(layer, "_egg_active", roles.active.to(device, copy=True))
    set_buffer(layer, "_egg_gather", roles.gather_index.to(device, copy=True))


def _set_norm_roles(norm: nn.Module, roles: Roles) -> None:
    ref = norm.weight if norm.weight is not None else norm.running_mean
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    norm._egg_roles = roles
    norm._egg_has_clones = roles.has_clones
    norm._egg_num_active = int(roles.active.numel())
    norm._egg_span = roles.active_span
    set_buffer(norm, "_egg_active", roles.active.to(device, copy=True))
    set_buffer(norm, "_egg_gather", roles.gather_index.to(device, copy=True))
    n = roles.num_units
    set_buffer(norm, "_egg_zero", torch.zeros(n, device=device, dtype=dtype))
    set_buffer(norm, "_egg_one", torch.full((n,), 1.0 - AFFINE_EPS, device=device, dtype=dtype))


def _restore(module: nn.Module) -> None:
    if not is_output_cloned(module):
        return
    if _ORIGINAL_CLASS[type(module)] in _NORM_CLASSES:
        rewrite.restore(module, _NORM_ATTRS, _NORM_BUFFERS)
    else:
        rewrite.restore(module, _LAYER_ATTRS, _LAYER_BUFFERS)


@torch.no_grad()
def _fill_clone_rows(module: nn.Module) -> None:
    """Write each clone's source rows into the clone's rows (conv weight/bias; norm running statistics)."""
    roles: Roles = module._egg_roles
    if not roles.has_clones:
        return
    clones, sources = roles.clones, roles.sources
    if type(module) in _NORM_CLASSES.values():
        tensors = [module.running_mean, module.running_var]  # own affine was used in forward: kept
    else:
        tensors = [module.weight, module.bias]
    for t in tensors:
        if t is not None:
            copy_positions_(t, 0, clones, sources)  # FSDP2: rows on any rank


def take_probe(layer: nn.Module) -> torch.Tensor | None:
    """The weight gradient of *every* unit of ``layer`` from its last probed training step (see
    :meth:`OutputCloning.probe`), as if each clone computed its own output with its source's weights, or
    ``None`` when no probe was recorded since the last call. It is not the gradient the optimizer steps with
    (there clone positions are summed into their source)."""
    data = layer.__dict__.pop("_egg_probe_data", None)
    if data is None:
        return None
    x, g = data
    with torch.enable_grad():
        w = layer.weight.detach().requires_grad_()
        y = F.linear(x, w) if isinstance(layer, nn.Linear) else layer._conv_forward(x, w, None)
        (grad,) = torch.autograd.grad(y, w, g)
    return grad


# ---------------------------------------------------------------------------------------------- public
class OutputCloning(rewrite.LayerRewrite):
    """Apply output cloning to ``model`` in place (reversible with :meth:`remove`).

    Args:
        model: any ``nn.Module``; managed submodules keep their objects, parameters, names and hooks.
        roles: qualified layer name -> :class:`~egg_optim.core.roles.Roles` (``nn.Linear`` / ``nn.Conv1d/2d/3d``
            with ``groups == 1``; ``num_units`` must equal the layer's output features/channels).
        norms: optional layer name -> name of the ``BatchNorm1d/2d/3d`` that directly follows it, to fuse them
            (the norm then receives the layer's active channels only; see the module docstring). The caller
            guarantees that the norm takes the layer's output and nothing else reads it;
            :class:`~egg_optim.LeaderCloneOptimizer` fuses only pairs a forward pass proved
            (:mod:`egg_optim.core.coupling`).
        eval_mode: ``"as_trained"`` (clones follow their leaders, as in training) or ``"own_weights"`` (every
            unit computed with its own weights and own norm statistics: the plain model) when in ``eval()``.
        native_kernels: run fused norms on CPU float32/float64 with the small compiled kernels of
            :mod:`egg_optim.rewrites.output_cloning._kernel` when they can be built (else, and on GPU, torch ops).
        pointwise_matmul: on CPU, compute the active channels of 1x1 convs (stride 1, no padding) of layers
            with clones as a batched matmul instead of the conv op (faster at every width measured, and its cost
            follows the number of active channels; layers without clones keep the plain op).

    Raises:
        PlanError: unknown layer/norm names, unsupported module types, size mismatches; raised before any module
            is changed.
    """

    owner = _OWNER
    option = "clone_mode='output'"
    clones_follow_sources = True
    probes_clone_grads = True
    can_fuse = staticmethod(can_fuse)

    def __init__(
        self,
        model: nn.Module,
        roles: Mapping[str, Roles],
        norms: Mapping[str, str] | None = None,
        eval_mode: str = "as_trained",
        *,
        native_kernels: bool = True,
        pointwise_matmul: bool = True,
    ) -> None:
        check_eval_mode(eval_mode)
        norms = dict(norms or {})
        layers = rewrite.validate_layers(model, roles, _LAYER_CLASSES, _OWNER)
        fused = self._validate_norms(dict(model.named_modules()), layers, roles, norms)
        # ---- everything checked: change modules
        self.model = model
        self._layers: dict[str, nn.Module] = layers
        self._norms: dict[str, nn.Module] = fused  # keyed by layer name
        self._norm_names: dict[str, str] = {k: norms[k] for k in fused}
        self._roles: dict[str, Roles] = dict(roles)
        self._eval_mode = eval_mode
        self._native_kernels = bool(native_kernels)
        self._removed = False
        for name, layer in layers.items():
            layer.__class__ = _LAYER_CLASSES[type(layer)]
            layer._egg_fused = False
            layer._egg_own_weights = eval_mode == "own_weights"
            layer._egg_dim = -1 if isinstance(layer, nn.Linear) else 1
            if not isinstance(layer, nn.Linear):
                layer._egg_pointwise = bool(pointwise_matmul) and _is_pointwise(layer)
            layer._egg_watch = True
            _set_layer_roles(layer, roles[name])
        self._fuse(fused)

    def check_called(self) -> bool:
        """Clones take their sources' outputs in each layer's forward; a model that computes with a layer's weight
        without calling it (Jamba's Mamba mixer multiplies by ``dt_proj.weight``) would use each clone's own rows
        while its saved model holds its source's. At the first step with gradients (before its update), refuse
        (:class:`RewriteCheckError`) a layer with clones whose weight has a gradient but whose forward never ran,
        or, where no forward noted its calls (compiled, or every such layer bypassed), whose clone rows have a
        gradient: the layer's own forward never reaches them. Returns whether the check is done."""
        graded = [n for n, m in self._layers.items() if m._egg_has_clones and m.weight.grad is not None]
        called = {n for n, m in self._layers.items() if m.__dict__.get("_egg_called")}
        if not graded and not called:
            return False
        for m in self._layers.values():
            m._egg_watch = False
        if called:
            bypassed = [n for n in graded if n not in called]
        else:
            bypassed = [n for n in graded if _clone_rows_graded(self._layers[n])]
        if bypassed:
            raise RewriteCheckError(
                bypassed[0],
                f"output mode cannot give the clones of {bypassed} their sources' outputs: the model computes with "
                "their weights without calling these layers (their forward never ran, or their clones' rows have "
                "gradients, which the layer's own forward never gives them), so clones would compute with their "
                "own rows while the saved model holds their sources'. Use clone_mode='weight', or leave them out: "
                f"RolePlan(..., exclude={bypassed!r})",
            )
        return True

    def _fuse(self, fused: dict[str, nn.Module]) -> None:
        for name, norm in fused.items():
            norm.__class__ = _NORM_CLASSES[type(norm)]
            norm._egg_kernel = self._native_kernels
            norm._egg_own_weights = self._eval_mode == "own_weights"
            _set_norm_roles(norm, self._roles[name])
            self._layers[name]._egg_fused = True
        if self._native_kernels and fused:
            _kernel.load()  # build now (about a second, once per machine) rather than in the first step

    def fuse_norms(self, norms: Mapping[str, str]) -> None:
        """Fuse more norms: ``{layer name: BatchNorm name}``, validated like the constructor's ``norms`` before
        anything changes. The caller guarantees that each norm takes that layer's output and nothing else does
        (:mod:`egg_optim.core.coupling` proves it from a forward pass)."""
        self._check_live()
        norms = dict(norms)
        for lname in norms:
            if lname in self._norms:
                raise PlanError(f"layer {lname!r} already has a fused norm ({self._norm_names[lname]!r})")
        fused = self._validate_norms(dict(self.model.named_modules()), self._layers, self._roles, norms)
        self._norms.update(fused)
        self._norm_names.update({k: norms[k] for k in fused})
        self._fuse(fused)

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate_norms(
        modules: dict[str, nn.Module],
        layers: dict[str, nn.Module],
        roles: Mapping[str, Roles],
        norms: dict[str, str],
    ) -> dict[str, nn.Module]:
        fused: dict[str, nn.Module] = {}
        used: dict[int, str] = {}
        for lname, nname in norms.items():
            if lname not in layers:
                raise PlanError(
                    f"norms names layer {lname!r}, which has no roles (layers with roles: {known_names(list(layers))})"
                )
            if nname not in modules:
                raise PlanError(f"unknown norm layer {nname!r} (given for layer {lname!r})")
            norm = modules[nname]
            layer = layers[lname]
            layer_type = _ORIGINAL_CLASS.get(type(layer), type(layer))
            allowed = _NORM_FOR_LAYER[layer_type]
            if is_output_cloned(norm):
                raise PlanError(f"norm {nname!r} is already fused by output cloning")
            if type(norm) not in allowed:
                raise PlanError(
                    f"norm {nname!r} for layer {lname!r} is a {type(norm).__name__}; a "
                    f"{layer_type.__name__} can be fused only with "
                    f"{', '.join('nn.' + c.__name__ for c in allowed)}"
                )
            n = roles[lname].num_units
            if norm.num_features != n:
                raise PlanError(
                    f"norm {nname!r} has num_features={norm.num_features} but layer {lname!r} has {n} outputs"
                )
            if id(norm) in used:
                raise PlanError(f"norm {nname!r} is given for two layers: {used[id(norm)]!r} and {lname!r}")
            used[id(norm)] = lname
            fused[lname] = norm
        return fused

    # ------------------------------------------------------------------ roles
    @property
    def norms(self) -> dict[str, str]:
        """Layer name -> fused norm name."""
        return dict(self._norm_names)

    @property
    def fused_norms(self) -> dict[str, str]:
        return self.norms

    def module_names(self) -> list[str]:
        return [*self._layers, *self._norm_names.values()]

    def take_clone_grads(self, name: str) -> torch.Tensor | None:
        return take_probe(self._layers[name])

    def export(self, model: nn.Module) -> nn.Module:
        return export_plain(model, inplace=True)

    def probe(self, names=None) -> None:
        """Probe the next training forward of the named layers (default: all): that forward computes full width
        (the same function and parameter gradients, at the cost of the unfused path) and keeps the gradient at
        every output position for :func:`take_probe`. Clone-aware election scores use it."""
        self._check_live()
        for name in self._layers if names is None else names:
            layer = self._layers[name]
            layer._egg_probe = True
            layer.__dict__.pop("_egg_probe_data", None)

    def _apply_roles(self, name: str, roles: Roles) -> None:
        _set_layer_roles(self._layers[name], roles)
        if name in self._norms:
            _set_norm_roles(self._norms[name], roles)

    # ------------------------------------------------------------------ eval mode
    @property
    def eval_mode(self) -> str:
        return self._eval_mode

    @eval_mode.setter
    def eval_mode(self, mode: str) -> None:
        check_eval_mode(mode)
        self._eval_mode = mode
        for m in list(self._layers.values()) + list(self._norms.values()):
            if is_output_cloned(m):
                m._egg_own_weights = mode == "own_weights"

    # ------------------------------------------------------------------ clones' rows / undo
    def fill_clones(self, skip: Collection[str] = ()) -> None:
        """Copy each clone's source conv weight/bias rows (and fused norm running stats) into the clone, in place;
        layers named in ``skip`` (frozen ones) are left as they are.

        Afterwards ``eval_mode="own_weights"`` gives the same outputs as ``"as_trained"``. Clone rows are unused
        in output-cloning training, so this does not change training.
        """
        self._check_live()
        for name, layer in self._layers.items():
            if name in skip:
                continue
            _fill_clone_rows(layer)
            if name in self._norms:
                _fill_clone_rows(self._norms[name])

    def _restore_all(self) -> None:
        for m in list(self._layers.values()) + list(self._norms.values()):
            _restore(m)

    def _check_live(self) -> None:
        if not self._removed and not all(
            is_output_cloned(m) for m in list(self._layers.values()) + list(self._norms.values())
        ):
            self._removed = True  # restored behind our back (export_plain(model, inplace=True))
        super()._check_live()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._layers)} layers, {len(self._norms)} fused norms"
        return f"OutputCloning({state}, eval_mode={self._eval_mode!r})"


def export_plain(model_or_oc: nn.Module | OutputCloning, inplace: bool = False) -> nn.Module:
    """A plain model (original module classes, no egg_optim objects) that reproduces ``"as_trained"`` eval.

    Each clone's conv/linear weight row and bias entry are set to its source's (they were never used: the clone
    carried its source's output) and a fused norm's running statistics of clones to the source's; the clone's
    own norm affine weight/bias (which were used) are kept. The result loads strictly into the unmodified
    architecture. ``inplace=False`` (default) works on a deep copy; ``inplace=True`` changes the live model and
    ends output cloning on it (an :class:`OutputCloning` passed in is marked removed).
    """
    oc = model_or_oc if isinstance(model_or_oc, OutputCloning) else None
    model = oc.model if oc is not None else model_or_oc
    if not isinstance(model, nn.Module):
        raise PlanError(f"export_plain needs an nn.Module or OutputCloning, got {type(model_or_oc).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for m in model.modules():
        if is_output_cloned(m):
            _fill_clone_rows(m)
            _restore(m)
    if inplace and oc is not None:
        oc._removed = True
    return model


def export_state_dict(model_or_oc: nn.Module | OutputCloning) -> dict[str, torch.Tensor]:
    """``export_plain(...).state_dict()`` without copying the model: untouched tensors are shared (detached),
    tensors with clone rows are fresh copies."""
    model = model_or_oc.model if isinstance(model_or_oc, OutputCloning) else model_or_oc
    state = model.state_dict()
    for prefix, m in model.named_modules():
        if not is_output_cloned(m) or not m._egg_roles.has_clones:
            continue
        roles: Roles = m._egg_roles
        is_norm = type(m) in _NORM_CLASSES.values()
        for attr in ("running_mean", "running_var") if is_norm else ("weight", "bias"):
            key = f"{prefix}.{attr}" if prefix else attr
            t = state.get(key)
            if t is None:
                continue
            state[key] = copied_positions(t, 0, roles.clones, roles.sources)
    return state


def _clone_rows_graded(layer: nn.Module) -> bool:
    """Whether any clone row of ``layer``'s weight gradient is nonzero (one host read; a sharded gradient: no)."""
    grad = layer.weight.grad
    if is_sharded(grad):
        return False
    clones = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
    clones[layer._egg_active.to(grad.device)] = False
    return bool(grad[clones].any())
