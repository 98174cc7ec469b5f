"""Leader-follower local losses on an unmodified model, through forward hooks.

:class:`LeaderFollowerLoss` implements the LFNN of the seed paper around any ``nn.Module``:

- ``mode="lfnn"`` (Eq. 1): ``L = L_g + l1 * L_leader + l2 * L_follower``. The global loss reaches only the
  leaders of a managed layer (and, through them, the layers below); followers learn only from the
  alignment loss.
- ``mode="lfnn_l"`` (Eq. 2, BP-free): ``L = L_g^o + l1 * L_leader + l2 * L_follower`` with ``l1 = 1`` and
  ``l2 = lambda`` in the paper. Managed layers/blocks are gradient-isolated: they learn only from their own
  local losses, and the global loss trains only what comes after the last managed site (the output layer).

Defaults (``worker_reduction="mean"``, ``follower_target="probs"``) are not the paper's literal sums of
raw-output MSEs, which collapsed in ``docs/results/lfnn_study.md``; ``worker_reduction="sum",
follower_target="output"`` gives Eq. 1 / Eq. 2 as written.

Everything happens inside the model's one forward and the user's one backward of the single tensor that
:meth:`LeaderFollowerLoss.loss` returns (one backward, as DDP needs).

Detach points (where gradients stop), per managed site (a layer, or a block of consecutive modules):

=================  =====================================================  ===============================
                   local losses (leader CE, follower MSE)                 global loss
=================  =====================================================  ===============================
``lfnn``           reach the site's own parameters (and its readout        leaders: site params and the
                   heads) only, never the layers below                    layers below. followers: none
``lfnn_l``         same                                                   none (site output detached)
=================  =====================================================  ===============================

In ``lfnn`` mode the site still runs once: a forward pre-hook feeds the site a detached copy of its input,
and the forward hook routes gradients with a small autograd function whose backward makes two partial
passes through the site's own graph (parameters: ``mask * g_global + g_local``; input: ``mask * g_global``,
with ``mask`` 1 on leader units and 0 on follower units). That equals the textbook
``y * mask + y.detach() * (1 - mask)`` for the global path plus local losses computed from the layer applied
to a detached input, without running the layer twice.

Block workers in ``lfnn`` mode follow the same rule: a follower block passes no global gradient to the
blocks below it, so a leader block is informed by the global loss only if every block above it leads.
(The paper's block-wise results use ``lfnn_l`` with ``delta=1``.)

Limits: a managed module must run once per forward (weight-shared reuse: the last call wins); activation
checkpointing of a managed site and ``nn.DataParallel`` are not supported (DDP is: leaders are chosen from
worker losses averaged over ranks); readout heads live in this module, not in the model, so under DDP
either wrap them too or attach ``lf.heads`` to the model before wrapping it; a block should not start with
an in-place operation on its input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.distributed import all_reduce_mean, is_distributed
from ..errors import ConfigError
from .functional import (
    Selection,
    follower_alignment_loss,
    leader_loss,
    per_worker_cross_entropy,
    readout_logits,
    select_leaders,
    split_workers,
)
from .sites import (
    Claims,
    _Site,
    block_unit_modules,
    block_worker_sites,
    build_heads,
    check_options,
    layer_sites,
)

_INPUT_KWARGS = ("hidden_states", "input", "x")
_RAW = {"output": "raw", "logits": "raw"}  # follower_target -> functional target


# --------------------------------------------------------------------------- gradient routing (lfnn mode)
class _Route:
    """What the backward of :class:`_SplitGrad` needs: the site's own graph (``y`` computed from the
    detached input ``x_d`` and ``params``) and the leader mask, filled in once leaders are known."""

    __slots__ = ("y", "x_d", "params", "mask")

    def __init__(self, y: torch.Tensor, x_d: torch.Tensor | None, params: list[torch.Tensor]) -> None:
        self.y, self.x_d, self.params = y, x_d, params
        self.mask: torch.Tensor | None = None


class _SplitGrad(torch.autograd.Function):
    """Outputs ``(y_global, y_local)``, both equal to the site output. Backward: parameters get
    ``mask * g_global + g_local``; the site input gets ``mask * g_global`` only."""

    @staticmethod
    def forward(ctx, route: _Route, x: torch.Tensor | None, *params: torch.Tensor):  # type: ignore[override]
        ctx.route = route
        out = route.y.detach()
        return out, out.view_as(out)

    @staticmethod
    def backward(ctx, g_global: torch.Tensor, g_local: torch.Tensor):  # type: ignore[override]
        route: _Route = ctx.route
        if route.y is None:
            raise RuntimeError(
                "LeaderFollowerLoss: backward ran twice through a managed site's graph "
                "(the first backward needs retain_graph=True)"
            )
        if route.mask is not None:
            g_global = g_global * route.mask
        keep = _keep_graph()  # the outer backward's retain_graph: keep the site graph too
        need_x = ctx.needs_input_grad[1] and route.x_d is not None
        want = [i for i, p in enumerate(route.params) if ctx.needs_input_grad[2 + i]]
        grads: list[torch.Tensor | None] = [None] * len(route.params)
        if want:
            got = torch.autograd.grad(
                route.y,
                [route.params[i] for i in want],
                g_global + g_local,
                retain_graph=need_x or keep,
                allow_unused=True,
            )
            for i, g in zip(want, got):
                grads[i] = g
        gx = None
        if need_x:
            gx = torch.autograd.grad(route.y, route.x_d, g_global, retain_graph=keep, allow_unused=True)[0]
        if not keep:
            route.y = route.x_d = None  # free the site graph now, like the engine frees saved tensors
        return (None, gx, *grads)


def _keep_graph() -> bool:
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(getter()) if getter is not None else False


def _split_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple]]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    for key in _INPUT_KWARGS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], lambda t, key=key: (args, {**kwargs, key: t})
    raise ConfigError("a managed layer/block must take its input tensor as first positional argument")


def _split_output(output: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0], lambda t: type(output)((t, *output[1:]))
    raise ConfigError(f"a managed layer/block must return a tensor (or a tuple starting with one), got {type(output)}")


# --------------------------------------------------------------------------- the module
class LeaderFollowerLoss(nn.Module):
    """Leader-follower local losses (LFNN / LFNN-l) for classification, attached to ``model`` by hooks.

    Args:
        model: the network; it is not modified (only hooked) and not registered as a submodule, so
            ``self.parameters()`` are only the readout heads this object creates (add them to the optimizer).
        layers: names (``model.named_modules()``) of hidden ``nn.Linear`` / ``nn.ConvNd`` layers whose output
            units are grouped into workers of ``worker_size`` consecutive units.
        num_classes: number of classes of the targets.
        worker_size: units per worker (int, or a dict per layer). Default ``num_classes`` (the paper).
        delta: leader fraction in ``(0, 1]``; ``round(delta * W)`` (half up, at least 1) workers lead.
        mode: ``"lfnn"`` (Eq. 1, with backprop) or ``"lfnn_l"`` (Eq. 2, BP-free).
        l1, l2: weights of the leader and follower losses (``l2`` is Eq. 2's ``lambda``).
        readout: how a worker predicts: ``"direct"`` (its units are the logits; Linear), ``"gap"``
            (global average pool over space first; convolutions), ``"head"`` (a per-worker linear head
            ``S -> num_classes`` after pooling, created here), or ``"auto"`` (direct for Linear, gap for
            conv).
        follower_target: what a follower matches to the best leader's, by MSE: ``"probs"`` (default: the
            softmax of its class logits; bounded and blind to a shift of the logits, so it never pulls
            outputs below a following ReLU), ``"centred"`` (logits minus their mean over classes),
            ``"logits"`` (raw class logits) or ``"output"`` (the worker's raw unit outputs, incl. spatial
            maps: the paper's Eq. 1/2 as written). Block workers compare their aux-head logits
            (``"output"`` = ``"logits"``).
        align: older spelling of ``follower_target``: ``"output"`` or ``"readout"`` (= ``"logits"``).
        local_activation: ``None`` (default: workers read the layer's output as it is, i.e. before the
            model's nonlinearity) or ``"relu"`` / a callable applied to it first, so the local losses see
            what the next layer sees (the paper does not say which).
        blocks: ``{name: module_name | [consecutive module names]}``: each block is ONE worker with a
            DGL-style auxiliary head (average pool, then an MLP: ``aux_pool``, ``aux_hidden``); the blocks
            compete with each other for leadership (``delta=1``: every block is a leader, i.e. DGL with the LFNN
            losses). Block followers align their head logits (as ``follower_target`` says) to the best block's.
        block_workers: block-wise LFNN(-l) as DGL runs it: ``int`` (every block) or ``{block: int}``. Each
            block's output channels are split into that many workers of equal size, each with its own
            DGL-style aux head (pool, then MLP, as above); leaders and followers are chosen
            INSIDE each block (statistics under the block's name) instead of blocks competing as single
            workers. In ``lfnn_l`` mode the blocks are gradient-isolated: a block learns only from its own
            workers' losses and what follows the last block only from ``L_g``. ``1``: plain DGL.
        aux_hidden, aux_pool: the aux heads' MLP width (``0``: one Linear) and pooled size per spatial
            dimension (default 2: 2x2 for images, as DGL). A larger pool keeps more of the block's spatial
            layout for its local loss, at ``aux_pool**2`` times the head's input features.
        block_group: name under which the block workers' statistics are reported.
        block_channels: ``{block: channels | (channels, spatial_dims)}`` where it cannot be inferred.
        worker_reduction: ``"mean"`` (default) averages the leader losses over the leaders and the follower
            losses over the followers of a layer, so the local terms stay O(1) next to ``L_g`` whatever the
            number of workers; ``"sum"`` gives every worker its own loss at full weight (the paper's sums:
            with 32 workers the local gradient was 14-20x the global one, ``docs/results/lfnn_study.md``).
        score_momentum: momentum of the running mean of worker losses (``unit_scores(kind="ema")``).
        sync_selection: average worker losses over ranks before choosing leaders so all ranks choose the
            same leaders (``None``: whenever torch.distributed is initialised with more than one rank).
        criterion: global loss ``criterion(logits, targets)``; default cross-entropy.
        ignore_index: target value ignored by the losses.

    Usage::

        lf = LeaderFollowerLoss(model, ["fc1", "fc2"], num_classes=10, delta=0.7, mode="lfnn")
        opt = torch.optim.Adam([*model.parameters(), *lf.parameters()])
        with lf.targets(y):
            logits = model(x)
        loss = lf.loss(logits)          # L_g + local terms, ONE tensor
        loss.backward(); opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] | None = None,
        *,
        num_classes: int,
        worker_size: int | Mapping[str, int] | None = None,
        delta: float = 0.7,
        mode: str = "lfnn",
        l1: float = 1.0,
        l2: float = 1.0,
        readout: str = "auto",
        follower_target: str | None = None,
        align: str | None = None,
        local_activation: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
        blocks: Mapping[str, str | Sequence[str]] | None = None,
        block_group: str = "blocks",
        aux_hidden: int = 256,
        aux_pool: int = 2,
        block_channels: Mapping[str, int | tuple[int, int]] | None = None,
        block_workers: int | Mapping[str, int] | None = None,
        worker_reduction: str = "mean",
        score_momentum: float = 0.9,
        sync_selection: bool | None = None,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        mode, follower_target = check_options(
            model,
            mode=mode,
            delta=delta,
            num_classes=num_classes,
            l1=l1,
            l2=l2,
            readout=readout,
            align=align,
            follower_target=follower_target,
            local_activation=local_activation,
            worker_reduction=worker_reduction,
            score_momentum=score_momentum,
            aux_hidden=aux_hidden,
            aux_pool=aux_pool,
        )
        layer_names = [layers] if isinstance(layers, str) else list(layers or [])
        blocks = dict(blocks or {})
        if not layer_names and not blocks:
            raise ConfigError("give at least one layer (layers=[...]) or block (blocks={...}) to manage")
        modules = dict(model.named_modules())
        claims = Claims(modules)
        sites = layer_sites(claims, layer_names, worker_size, num_classes, readout)
        block_sites, block_shapes = block_worker_sites(
            claims, blocks, block_channels, block_group, layer_names, block_workers
        )

        # ---- everything is valid: build state, heads, then hooks
        object.__setattr__(self, "_model", model)  # not a submodule: parameters() are the heads only
        self.mode, self.delta, self.l1, self.l2 = mode, float(delta), float(l1), float(l2)
        self.num_classes, self.follower_target, self.worker_reduction = num_classes, follower_target, worker_reduction
        self.local_activation = local_activation
        self.score_momentum, self.sync_selection, self.ignore_index = (
            float(score_momentum),
            sync_selection,
            ignore_index,
        )
        self.block_group = block_group
        self.criterion = criterion
        self.enabled = True
        self.heads = build_heads(sites, block_sites, block_shapes, num_classes, aux_hidden, aux_pool)
        # sites with workers inside (layers, blocks with block_workers); blocks that are one worker each
        self._sites: list[_Site] = [*sites, *(s for s in block_sites if s.readout == "aux_workers")]
        self._block_sites: list[_Site] = [s for s in block_sites if s.readout == "aux"]
        self._block_current: dict[str, tuple] = {}
        self._targets: torch.Tensor | None = None
        self._recent_targets: torch.Tensor | None = None  # for loss() after a `with lf.targets(y)` block
        self._pending: dict[str, torch.Tensor] = {}
        self._last: dict[str, dict[str, torch.Tensor]] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._ema: dict[str, torch.Tensor] = {}
        self._steps: dict[str, int] = {}
        self._unit_modules = block_unit_modules(modules, self._block_sites)
        self._removed = False
        try:
            for site in [*self._sites, *self._block_sites]:
                site.handles.append(site.first.register_forward_pre_hook(self._make_pre(site), with_kwargs=True))
                site.handles.append(site.last.register_forward_hook(self._make_post(site)))
        except Exception:
            self.remove()
            raise

    # ------------------------------------------------------------------ public API
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def layer_names(self) -> list[str]:
        return [s.name for s in self._sites if s.kind == "layer"]

    @property
    def block_names(self) -> list[str]:
        return [s.name for s in [*self._sites, *self._block_sites] if s.kind == "block"]

    def workers(self) -> dict[str, tuple[int, int]]:
        """``{layer or block with workers: (num_workers, worker_size)}``; the group of single-worker blocks
        reports ``(num_blocks, 1)``."""
        out = {s.name: (s.num_workers, s.worker_size) for s in self._sites}
        if self._block_sites:
            out[self.block_group] = (len(self._block_sites), 1)
        return out

    def set_targets(self, targets: torch.Tensor | None) -> None:
        """Class indices ``[N]`` (or ``[N, *positions]`` for per-position ``direct`` readout) of the next
        training forwards. They stay set until replaced or cleared with ``set_targets(None)``."""
        if targets is not None:
            if not isinstance(targets, torch.Tensor):
                raise ConfigError(f"targets must be a tensor of class indices, got {type(targets).__name__}")
            if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
                raise ConfigError(f"targets must be integer class indices, got dtype {targets.dtype}")
            if targets.dim() == 0:
                raise ConfigError("targets must have a batch dimension")
            self._recent_targets = targets
        self._targets = targets

    @contextlib.contextmanager
    def targets(self, targets: torch.Tensor) -> Iterator[LeaderFollowerLoss]:
        """``with lf.targets(y): logits = model(x)``: set the targets for the forward(s) inside."""
        previous = self._targets
        self.set_targets(targets)
        try:
            yield self
        finally:
            self._targets = previous

    def forward(self, *args: Any, targets: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Run the model with ``targets`` set (they stay set for :meth:`loss`)."""
        if targets is not None:
            self.set_targets(targets)
        return self._model(*args, **kwargs)

    @contextlib.contextmanager
    def paused(self) -> Iterator[LeaderFollowerLoss]:
        """Hooks pass everything through (no local losses, no gradient routing) inside the block."""
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    def local_terms(self) -> dict[str, torch.Tensor]:
        """Per site, ``l1 * L_leader + l2 * L_follower`` of the last training forward (not consumed)."""
        return dict(self._pending)

    def local_loss(self) -> torch.Tensor:
        """Sum of the local terms of the last training forward; consumes them (a zero if there are none)."""
        terms = list(self._pending.values())
        self._pending.clear()
        if not terms:
            ref = next(iter(self._model.parameters()), None)
            return torch.zeros((), device=None if ref is None else ref.device)
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    def global_loss(self, logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``criterion(logits, targets)``; targets default to the ones set (or last set) for the forward."""
        if targets is None and self._targets is None:
            targets = self._recent_targets
        targets = self._resolve_targets(targets, "the global loss")
        if self.criterion is not None:
            return self.criterion(logits, targets)
        if logits.dim() > 2 and targets.dim() == logits.dim() - 1:
            return F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=self.ignore_index
            )
        return F.cross_entropy(logits, targets, ignore_index=self.ignore_index)

    def loss(
        self,
        logits: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        *,
        global_loss: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``L_g + sum of local terms``: the ONE tensor to backward. ``L_g`` is ``criterion(logits, targets)``
        (targets default to the ones set for the forward), or pass a precomputed ``global_loss`` (e.g. a
        transformers model's ``outputs.loss``). In ``lfnn_l`` mode this is Eq. 2 (the hidden sites'
        outputs are detached, so ``L_g`` only trains the output layer)."""
        if global_loss is None:
            if logits is None:
                raise ConfigError("loss() needs logits (with targets) or global_loss=")
            global_loss = self.global_loss(logits, targets)
        self._recent_targets = None
        return global_loss + self.local_loss()

    def last_stats(self) -> dict[str, dict[str, Any]]:
        """Per layer (and the block group) for the last training step, as Python values: ``worker_losses``,
        ``leaders`` / ``followers`` (ordered by loss), ``best``, ``leader_loss``, ``follower_loss``."""
        out = {}
        for name, rec in self._last.items():
            out[name] = {
                "worker_losses": rec["worker_losses"].tolist(),
                "leaders": rec["leaders"].tolist(),
                "followers": rec["followers"].tolist(),
                "best": int(rec["best"]),
                "leader_loss": float(rec["leader_loss"]),
                "follower_loss": float(rec["follower_loss"]),
                "num_leaders": int(rec["leaders"].numel()),
            }
        return out

    def worker_losses(self) -> dict[str, torch.Tensor]:
        """Per layer, the ``[W]`` worker losses of the last training step (detached, averaged over ranks
        when selection is synchronised)."""
        return {name: rec["worker_losses"] for name, rec in self._last.items()}

    def leader_sets(self) -> dict[str, torch.Tensor]:
        """Per layer, the leader worker indices of the last training step (ordered by loss)."""
        return {name: rec["leaders"] for name, rec in self._last.items()}

    def leadership_counts(self) -> dict[str, torch.Tensor]:
        """Per layer, how many training steps each worker led (``[W]`` int64): the heat map of Figure 4."""
        return {name: c.clone() for name, c in self._counts.items()}

    def reset_stats(self) -> None:
        self._last.clear()
        self._counts.clear()
        self._ema.clear()
        self._steps.clear()

    def unit_scores(self, kind: str = "last") -> dict[str, torch.Tensor]:
        """Per-UNIT scores for the optimizer's ``"local_loss"`` election (higher = better): minus the loss
        of the unit's worker (``kind="last"``: last step; ``"ema"``: running mean). Keys are module names:
        managed layers give ``[num_units]``; block workers broadcast their score to every Linear / ConvNd
        inside the block. Layers that have not run a training step yet are left out, and so are blocks with
        ``block_workers`` (their workers are channels of the block's output, not units of one layer)."""
        if kind not in ("last", "ema"):
            raise ConfigError(f"unit_scores kind must be 'last' or 'ema', got {kind!r}")
        src = {n: r["worker_losses"] for n, r in self._last.items()} if kind == "last" else self._ema
        out: dict[str, torch.Tensor] = {}
        for site in self._sites:
            if site.kind == "layer" and site.name in src:
                out[site.name] = -src[site.name].float().repeat_interleave(site.worker_size)
        if self.block_group in src:
            vals = src[self.block_group].float()
            for k, site in enumerate(self._block_sites):
                for mod_name, units in self._unit_modules[site.name]:
                    out[mod_name] = (-vals[k]).expand(units).clone()
        return out

    def remove(self) -> None:
        """Remove every hook (the model behaves exactly as before) and drop pending losses."""
        for site in [*self._sites, *self._block_sites]:
            for h in site.handles:
                h.remove()
            site.handles.clear()
            site.ctx = None
        self._pending.clear()
        self._block_current.clear()
        self._removed = True

    def __enter__(self) -> LeaderFollowerLoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, delta={self.delta}, l1={self.l1}, l2={self.l2}, layers={self.layer_names}, "
            f"blocks={self.block_names}, worker_reduction={self.worker_reduction!r}, "
            f"follower_target={self.follower_target!r}"
        )

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "counts": {k: v.detach().cpu() for k, v in self._counts.items()},
            "ema": {k: v.detach().cpu() for k, v in self._ema.items()},
            "steps": dict(self._steps),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._counts = {k: v.clone() for k, v in state.get("counts", {}).items()}
        self._ema = {k: v.clone() for k, v in state.get("ema", {}).items()}
        self._steps = dict(state.get("steps", {}))

    # ------------------------------------------------------------------ internals
    def _resolve_targets(self, targets: torch.Tensor | None, what: str) -> torch.Tensor:
        if targets is None:
            targets = self._targets
        if targets is None:
            raise ConfigError(
                f"{what} needs classification targets: use `with lf.targets(y): model(x)`, lf.set_targets(y) "
                "or lf(x, targets=y) (or lf.paused() / model.eval() for forwards without targets)"
            )
        return targets

    def _active(self, module: nn.Module) -> bool:
        return self.enabled and not self._removed and module.training and torch.is_grad_enabled()

    def _make_pre(self, site: _Site):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
            site.ctx = None
            if not self._active(module):
                return None
            targets = self._resolve_targets(None, f"training forward through managed {site.kind} {site.name!r}")
            x, rebuild = _split_input(args, kwargs)
            if targets.shape[0] != x.shape[0]:
                raise ConfigError(
                    f"targets have batch size {targets.shape[0]} but {site.kind} {site.name!r} got {x.shape[0]} samples"
                )
            if self.mode == "lfnn_l":
                site.ctx = {"x": None, "x_d": None}
                return rebuild(x.detach())
            if x.requires_grad:
                x_d = x.detach().requires_grad_(True)
                site.ctx = {"x": x, "x_d": x_d}
                return rebuild(x_d)
            site.ctx = {"x": None, "x_d": None}
            return None

        return pre_hook

    def _make_post(self, site: _Site):
        def post_hook(module: nn.Module, args: tuple, output: Any):
            ctx, site.ctx = site.ctx, None
            if ctx is None:
                return None
            y, rebuild = _split_output(output)
            route = None
            if self.mode == "lfnn_l":
                y_loc, y_out = y, y.detach()
            elif y.requires_grad:
                params = [p for p in site.params if p.requires_grad]
                route = _Route(y, ctx["x_d"], params)
                y_out, y_loc = _SplitGrad.apply(route, ctx["x"], *params)
            else:
                y_loc = y_out = y
            targets = self._targets.to(y.device, non_blocking=True)
            if site.readout != "aux":  # workers inside the site (a layer, or a block with block_workers)
                mask = self._layer_local(site, y_loc, targets)
                if route is not None:
                    shape = [1] * y.dim()
                    shape[site.unit_dim] = site.num_units
                    route.mask = mask.to(y.dtype).repeat_interleave(site.worker_size).reshape(shape)
            else:
                self._block_local(site, y_loc, targets, route)
            return rebuild(y_out)

        return post_hook

    def _select(self, losses: torch.Tensor) -> tuple[torch.Tensor, Selection]:
        sel_losses = losses.detach().float()
        sync = is_distributed() if self.sync_selection is None else self.sync_selection
        if sync and is_distributed():
            sel_losses = all_reduce_mean(sel_losses.clone())
        return sel_losses, select_leaders(sel_losses, self.delta)

    def _layer_local(self, site: _Site, y: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        act = self.local_activation
        if act is not None:
            y = F.relu(y) if act == "relu" else act(y)
        z = split_workers(y, site.worker_size, site.unit_dim)  # [N, W, S, *rest]
        ro: Any = self.heads[site.head_key] if site.readout in ("head", "aux_workers") else site.readout
        logits, tgt = readout_logits(z, targets, ro)
        wl = per_worker_cross_entropy(logits, tgt, self.ignore_index)  # [W], differentiable
        shown, sel = self._select(wl)
        lead = leader_loss(wl, sel.leaders, self.worker_reduction)
        ft = self.follower_target
        fol = follower_alignment_loss(
            z if ft == "output" else logits, sel.followers, sel.best, self.worker_reduction, _RAW.get(ft, ft)
        )
        self._pending[site.name] = self.l1 * lead + self.l2 * fol
        self._record(site.name, shown, sel, lead, fol)
        return sel.mask

    def _block_local(self, site: _Site, y: torch.Tensor, targets: torch.Tensor, route: _Route | None) -> None:
        if site.name in self._block_current:  # a new forward started before the last one completed
            self._block_current.clear()
        if targets.dim() != 1:
            raise ConfigError(f"block workers need targets of shape [N], got {tuple(targets.shape)}")
        logits = self.heads[site.head_key](y)  # [N, C]
        ce = per_worker_cross_entropy(logits.unsqueeze(1), targets, self.ignore_index)[0]
        self._block_current[site.name] = (ce, logits, route)
        if len(self._block_current) < len(self._block_sites):
            return
        entries = [self._block_current[s.name] for s in self._block_sites]
        self._block_current.clear()
        wl = torch.stack([e[0] for e in entries])
        shown, sel = self._select(wl)
        lead = leader_loss(wl, sel.leaders, self.worker_reduction)
        all_logits = torch.stack([e[1] for e in entries], dim=1)  # [N, K, C]
        ft = _RAW.get(self.follower_target, self.follower_target)
        fol = follower_alignment_loss(all_logits, sel.followers, sel.best, self.worker_reduction, ft)
        self._pending[self.block_group] = self.l1 * lead + self.l2 * fol
        self._record(self.block_group, shown, sel, lead, fol)
        for k, (_, _, r) in enumerate(entries):
            if r is not None:
                r.mask = sel.mask[k].to(r.y.dtype)

    @torch.no_grad()
    def _record(self, name: str, losses: torch.Tensor, sel: Selection, lead: torch.Tensor, fol: torch.Tensor) -> None:
        self._last[name] = {
            "worker_losses": losses,
            "leaders": sel.leaders,
            "followers": sel.followers,
            "best": sel.best,
            "leader_loss": lead.detach(),
            "follower_loss": fol.detach(),
        }
        counts = self._counts.get(name)
        if counts is None or counts.numel() != losses.numel():
            counts = torch.zeros(losses.numel(), dtype=torch.long, device=losses.device)
        self._counts[name] = counts.to(losses.device) + sel.mask.to(torch.long)
        ema = self._ema.get(name)
        if ema is None or ema.numel() != losses.numel():
            self._ema[name] = losses.clone()
        else:
            m = self.score_momentum
            self._ema[name] = ema.to(losses.device) * m + losses * (1.0 - m)
        self._steps[name] = self._steps.get(name, 0) + 1
