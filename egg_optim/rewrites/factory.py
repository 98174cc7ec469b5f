"""The rewrites a run asks for, built in one place with one rollback.

The role controller holds them as a list of :class:`~egg_optim.rewrites.base.LayerRewrite` and drives them only
through that interface; which rewrite a clone mode or option asks for is decided here and nowhere else:

* ``clone_mode="output"``: :class:`~egg_optim.rewrites.block_output.BlockOutputCloning` for transformer blocks
  (when there are some), then :class:`~egg_optim.rewrites.output_cloning.OutputCloning` for the plain layers
  (always, possibly over none: it is what fuses norms);
* weight mode with gradient skipping: :class:`~egg_optim.rewrites.grad_skip.GradSkip` for the plain layers it
  supports, :class:`~egg_optim.rewrites.grad_skip.BlockGradSkip` for the blocks' Linear producers and consumers
  (when there are some).

A new rewrite subclasses ``LayerRewrite``, sets the class attributes that say what it does (``option``,
``clones_follow_sources``, ``probes_clone_grads``, ``can_fuse``) and is added here.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..core.roles import Roles
from ..core.units import ManagedLayer
from ..errors import ConfigError
from .base import LayerRewrite


def build_rewrites(
    model: nn.Module,
    layers: Mapping[str, ManagedLayer],
    roles: Mapping[str, Roles],
    *,
    clone_mode: str,
    eval_mode: str = "as_trained",
    skip_clone_grads: bool = False,
    clone_grads_for: str | None = None,
) -> list[LayerRewrite]:
    """The rewrites of ``model`` for ``layers`` under their initial ``roles``, in the order they were applied.
    Everything is validated before anything changes; when one rewrite refuses, those already built are removed.

    ``clone_grads_for``: the name of an election score that needs every unit's weight gradient (``None``: none
    does); refused when a rewrite would hide clones' gradients and cannot probe them.
    """
    # a list in the layers' order, not a set: every rank must rewrite (and later gather) in the same order
    plain = [n for n, lay in layers.items() if lay.group is None]
    blocks = [n for n in layers if n not in plain]
    if clone_mode == "output" and blocks and clone_grads_for is not None:
        # the output-mode probe records plain layers only: blocks would score nothing
        raise ConfigError(
            f"EggConfig.election {clone_grads_for!r} probes clone gradients, which output mode records "
            f"for plain layers only, not for transformer blocks {blocks}; use weight mode, "
            "RolePlan(units='layers') or another score"
        )
    built: list[LayerRewrite] = []
    try:
        if clone_mode == "output":
            from .block_output import BlockOutputCloning
            from .output_cloning import OutputCloning

            if blocks:
                groups = {n: layers[n].group for n in blocks}
                built.append(BlockOutputCloning(model, groups, {n: roles[n] for n in blocks}, eval_mode=eval_mode))
            # norms are fused once the coupling is decided (core.coupling); until then the layers expand their
            # output themselves, which computes the same
            built.append(OutputCloning(model, {n: roles[n] for n in plain}, eval_mode=eval_mode))
        elif skip_clone_grads:
            from .grad_skip import BlockGradSkip, GradSkip, supports

            rewritable = {n: roles[n] for n in plain if supports(layers[n].module)}
            if rewritable:
                built.append(GradSkip(model, rewritable))
            if blocks:
                skipping = BlockGradSkip(model, {n: layers[n].group for n in blocks}, {n: roles[n] for n in blocks})
                if skipping.layers:  # (one with no member to rewrite changed nothing)
                    built.append(skipping)
    except Exception:
        for rw in reversed(built):
            rw.remove()
        raise
    return built
