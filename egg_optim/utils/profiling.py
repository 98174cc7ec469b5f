"""Step profiling that needs no GPU: aten ops dispatched, index traffic over parameter-sized tensors, Python calls
on the host, and the bytes autograd saves for backward.

On a GPU a small model's training step is bound by how many kernels the host launches, and index ops
(``gather``, ``index_select``, ``index_add``, ...) over weights, gradients and optimizer state are memory
traffic the bare step does not have. Both show on a CPU as *dispatched aten ops*, which :class:`DispatchCounter`
counts (a :class:`~torch.utils._python_dispatch.TorchDispatchMode`; forward, backward and optimizer step alike)::

    with DispatchCounter(model, optimizer) as count:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    count.total, count.launches, count.param_index_ops, count.param_index_bytes

An index op counts as **over a parameter-sized tensor** when one of its floating-point inputs or outputs

- shares storage with a parameter or floating-point buffer of ``model`` (views and ``.detach()`` included), a
  tensor of the optimizer's state, or a gradient (known from the moment autograd accumulates it);
- is the output of an earlier parameter-sized index op (a weight's active rows, and what is built from them);
- in backward, is a parameter's gradient being formed: the op writes a tensor of as many elements as a parameter
  that the autograd node running it accumulates into (its next function, directly or through view and cast
  nodes), and that tensor becomes the parameter's gradient or is added to it (a weight's or bias's gradient
  scattered by ``index_add``; not the per-channel statistics a norm's backward gathers for its input gradient).

Collectives (``torch.distributed`` ops and functional collectives, e.g. FSDP2's and DTensor's all-gathers) are
counted apart, with the bytes of the largest tensor each one moves (an all-gather's output, a broadcast's or
all-reduce's tensor): what a step adds to the traffic between GPUs.

Index tensors themselves (integers) are ignored. Activations are told from weights by where they come from, not
by their shape; a gradient formed by an index op and then changed by another op before it is accumulated (a cast)
is not seen. Work done in opaque kernels (egg_optim's native CPU norm kernels, fused optimizer kernels) is one
op, as it is one launch. Counting costs time: measure time without the counter.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["INDEX_OPS", "DispatchCounter", "PythonCallCounter", "peak_bytes_above", "saved_tensor_bytes"]

# aten op names (overload packets, without a trailing "_") that move data by index
INDEX_OPS = frozenset(
    {
        "gather", "scatter", "scatter_add", "scatter_reduce", "index_select", "index_add", "index_copy",
        "index_put", "_index_put_impl", "index", "index_fill", "index_reduce", "take", "put", "masked_select",
        "masked_scatter",
    }
)  # fmt: skip

# autograd nodes between an op's node and a parameter's gradient accumulation that only view or cast (class names
# without their version digits)
_PASS_THROUGH = frozenset(
    {
        "TBackward", "ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "NarrowBackward", "SliceBackward",
        "SelectBackward", "PermuteBackward", "TransposeBackward", "SqueezeBackward", "UnsqueezeBackward",
        "AliasBackward", "AsStridedBackward", "ExpandBackward", "ToCopyBackward", "CloneBackward",
    }
)  # fmt: skip
_COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional"})
_NOT_COLLECTIVES = frozenset({"wait_tensor", "_wrap_tensor_autograd"})  # bookkeeping of functional collectives


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None


def _state_tensors(optimizer: Any) -> list[torch.Tensor]:
    state = getattr(optimizer, "state", None) or {}
    out = [v for st in state.values() if isinstance(st, dict) for v in st.values() if torch.is_tensor(v)]
    parked = getattr(optimizer, "_parked", None) or {}  # a LeaderCloneOptimizer's clones' parked state
    out += [v for rows in parked.values() for v in rows.values() if torch.is_tensor(v)]
    return out


class DispatchCounter(TorchDispatchMode):
    """Count the aten ops dispatched inside the ``with`` block (see the module docstring).

    Args:
        model: its parameters are the parameter-sized tensors (with ``params``, any tensors).
        optimizer: its state tensors (read when the block is entered) count as parameter-sized too.
        params: more tensors to treat as parameters.

    After the block: ``ops`` (a :class:`~collections.Counter` by op name), ``total``, ``launches`` (ops that
    are not views: what would launch a kernel), ``index_ops`` and ``param_index_ops`` (by name),
    ``param_index_bytes`` (bytes written by the parameter-sized index ops), ``collectives`` (by name) and
    ``collective_bytes``.
    """

    def __init__(self, model: nn.Module | None = None, optimizer: Any = None, params: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._model, self._optimizer, self._extra = model, optimizer, list(params)
        self.ops: Counter[str] = Counter()
        self.views = 0
        self.index_ops: Counter[str] = Counter()
        self.param_index_ops: Counter[str] = Counter()
        self.param_index_bytes = 0
        self.collectives: Counter[str] = Counter()
        self.collective_bytes = 0
        self._known: set[int] = set()
        self._params: set[int] = set()
        # storages of tainted outputs and of what may become gradients, kept alive so that no new tensor reuses their
        # memory (the storages, not the tensors: autograd steals a gradient only when no one else holds the tensor,
        # and a counter must not change what it counts)
        self._keep: list[Any] = []
        self._pending: list[tuple[str, int, list[int]]] = []  # (op, bytes written, storages) that may form gradients
        self._accumulated: set[int] = set()  # storages that became or were added to a gradient
        self._hooks: list[Any] = []

    def __enter__(self) -> DispatchCounter:
        params = list(self._model.parameters()) if self._model is not None else []
        params += self._extra
        buffers = [b for b in self._model.buffers() if b.is_floating_point()] if self._model is not None else []
        self._params = {p for p in map(_storage, params) if p is not None}
        tensors = params + buffers + _state_tensors(self._optimizer)
        tensors += [p.grad for p in params if p.grad is not None]
        self._known = {p for p in map(_storage, tensors) if p is not None}
        for p in params:
            if p.requires_grad and p.is_leaf:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_seen))
        return super().__enter__()

    def _grad_seen(self, p: torch.Tensor) -> None:
        ptr = _storage(p.grad)
        if ptr is not None:
            self._known.add(ptr)
            self._accumulated.add(ptr)

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for h in self._hooks:
            h.remove()
        for name, written, ptrs in self._pending:
            if self._accumulated.intersection(ptrs):
                self.param_index_ops[name] += 1
                self.param_index_bytes += written
        self._hooks, self._keep, self._pending, self._accumulated = [], [], [], set()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def launches(self) -> int:
        return self.total - self.views

    @property
    def param_index_total(self) -> int:
        return sum(self.param_index_ops.values())

    def _forms_grad(self, outs: list[torch.Tensor]) -> bool:
        """In backward: whether the autograd node running accumulates into a parameter (directly or through view
        and cast nodes) of as many elements as a tensor the op returns."""
        node = torch._C._current_autograd_node()
        sizes = {t.numel() for t in outs}
        todo, seen = [node] if node is not None else [], 0
        while todo and seen < 16:
            seen += 1
            for nxt, _ in todo.pop().next_functions:
                variable = getattr(nxt, "variable", None)
                if variable is not None:
                    if variable.numel() in sizes and _storage(variable) in self._params:
                        return True
                elif nxt is not None and type(nxt).__name__.rstrip("0123456789") in _PASS_THROUGH:
                    todo.append(nxt)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if func.is_view:
            self.views += 1
        if self._pending and type(torch._C._current_autograd_node()).__name__ == "AccumulateGrad":
            # a gradient added to an existing one: what it adds may have been formed by an index op
            self._accumulated.update(_storage(t) for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor))
        if func.namespace in _COLLECTIVE_NAMESPACES and name not in _NOT_COLLECTIVES:
            self.collectives[name] += 1
            moved = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.collective_bytes += max((t.numel() * t.element_size() for t in moved), default=0)
            return out
        if name.rstrip("_") not in INDEX_OPS:
            return out
        self.index_ops[name] += 1
        leaves = pytree.tree_leaves((args, kwargs, out))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        # bytes written: the result, or for an in-place op the values written into its first argument
        written_tensors = tensors[1 : len(tensors) - len(outs)] if func._schema.is_mutable else outs
        written = sum(t.numel() * t.element_size() for t in written_tensors)
        if any(_storage(t) in self._known for t in tensors):
            self.param_index_ops[name] += 1
            self.param_index_bytes += written
            for t in outs:
                ptr = _storage(t)
                if ptr is not None:
                    self._known.add(ptr)
                    self._keep.append(t.untyped_storage())
        elif self._forms_grad(outs):  # (an in-place op returns the tensor it wrote into)
            self._keep += [t.untyped_storage() for t in outs]
            self._pending.append((name, written, [p for p in map(_storage, outs) if p is not None]))
        return out

    def summary(self) -> dict[str, Any]:
        """The counts as plain values."""
        return {
            "total": self.total,
            "launches": self.launches,
            "index_ops": dict(self.index_ops),
            "param_index_ops": dict(self.param_index_ops),
            "param_index_bytes": self.param_index_bytes,
            "collectives": dict(self.collectives),
            "collective_bytes": self.collective_bytes,
        }


class PythonCallCounter:
    """Counts the Python function calls (Python frames and calls of builtins: ``sys.setprofile``'s ``call`` and
    ``c_call`` events) made while the block runs, in the calling thread.

    The host of a launch-bound GPU step spends its time in Python and in the dispatcher; aten ops are counted by
    :class:`DispatchCounter`, Python work by this. Unlike a timing it is exact and deterministic for given code
    and inputs, so a test can bound it. Restores the profiler that was set before (coverage tools use one)::

        with PythonCallCounter() as calls:
            optimizer.step()
        calls.count
    """

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None

    def _event(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" or event == "c_call":
            self.count += 1

    def __enter__(self) -> PythonCallCounter:
        self._previous = sys.getprofile()
        sys.setprofile(self._event)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.setprofile(self._previous)
        self.count -= 2  # this __exit__ and its sys.setprofile call were counted too


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """``(bytes, fn())``: the bytes of the distinct storages autograd saves for backward while ``fn`` runs
    (a forward pass; call backward inside ``fn`` or after), storages of ``exclude`` (e.g. the parameters,
    which exist anyway) not counted. Saved views of one storage count once, at the storage's size."""
    skip = {p for p in map(_storage, exclude) if p is not None}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = _storage(t)
        if ptr is not None and ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result


def peak_bytes_above(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[int, Any]:
    """``(bytes, fn())``: the most memory allocated on ``device`` while ``fn`` runs, above what was allocated
    when it started (add the resident parameters, buffers and optimizer state for a step's peak).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: from ``torch.profiler`` with ``profile_memory=True``, the
    running sum of each op's net allocation and of the frees between ops, in time order; memory an op allocates
    and frees before it returns is not seen, so this is a lower bound of the true peak."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    current = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += ev.self_cpu_memory_usage
        peak = max(peak, current)
    return peak, result


def _grouped_mm_flops(a_shape, b_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """``torch._grouped_mm``: a ``[M, K]`` input against ``[groups, K, N]`` weights (M split over the groups), the
    weight gradient ``[K, M] x [M, N] -> [groups, K, N]``, or a batch ``[groups, M, K] x [groups, K, N]``."""
    if len(a_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]
    return 2 * int(torch.Size(out_shape).numel()) * a_shape[-1]


def flop_counter() -> Any:
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts ``torch._grouped_mm``, which transformers 5
    runs for MoE experts (``experts_implementation="grouped_mm"``) and the stock counter skips."""
    from torch.utils.flop_counter import FlopCounterMode

    grouped = getattr(torch.ops.aten, "_grouped_mm", None)
    return FlopCounterMode(display=False, custom_mapping={grouped: _grouped_mm_flops} if grouped is not None else {})
