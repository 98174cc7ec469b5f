"""torch.compile: both clone modes trace without graph breaks, match eager training, and follow role changes."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from conftest import TinySeedNet, train_tiny
from torch import nn

from egg_optim import LeaderCloneOptimizer, RolePlan
from egg_optim.core.roles import Roles
from egg_optim.rewrites.output_cloning import OutputCloning, _fused, native_kernels_available

HAVE_KERNEL = native_kernels_available()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pair(mode: str, first_roles: str = "drawn"):
    """Two identical models, each with its own identically seeded optimizer (so the same roles and elections)."""
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinySeedNet()
        base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # Adam would amplify float noise
        opt = LeaderCloneOptimizer(
            model, base, RolePlan(0.4, 0.1), clone_mode=mode, election="random", seed=0, first_roles=first_roles
        )
        with torch.no_grad():  # one eager forward records the norm coupling's evidence, before compiling
            model(torch.zeros(2, 1, 8, 8))
        opt.couple_norms()  # applied before compiling (as the warning says): it swaps norm classes
        out.append((model, opt))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal up to float reordering (a conv bias before a BatchNorm has a gradient of pure rounding noise)."""
    if not a.is_floating_point():
        assert torch.equal(a, b), what
        return
    atol = 1e-5 + 1e-4 * float(b.detach().abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: {m}")


def _assert_same(a: nn.Module, b: nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        _close(sa[k], sb[k], f"{what} {k}")
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None), k
        if pa.grad is not None:
            _close(pa.grad, pb.grad, f"{what} grad {k}")


@pytest.mark.parametrize("first_roles", ["drawn", "packed"])
@pytest.mark.parametrize("mode", ["output", "weight"])
def test_compiled_training_has_no_graph_break_matches_eager_and_follows_elections(mode, first_roles):
    """fullgraph=True fails on any graph break (output mode had one at every ctypes kernel call). Elections
    replace the index buffers: the compiled model must use the new roles (not stale ones baked into the graph),
    in forward and backward. Between scattered roles that is a change of buffer values, without recompiling;
    packed roles are taken as views (their offsets are in the graph), so the first election, which scatters
    them, recompiles once."""
    (eager, eager_opt), (model, opt) = _pair(mode, first_roles)
    for m in eager.modules():  # compiled, 1x1 convs run as convs (not batched matmuls): the same ops in eager
        if getattr(m, "_egg_pointwise", False):
            m._egg_pointwise = False
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    history = []
    for step in range(2):
        y, ye = compiled(x), eager(x)
        _close(y, ye, f"step {step} output")
        (y * w).sum().backward()
        (ye * w).sum().backward()
        _assert_same(model, eager, f"step {step}")
        layer = model.layer2.conv1
        roles = opt.roles["layer2.conv1"]
        history.append(roles.leaders.tolist())
        # independent of eager: exact zeros at the *current* clones (stale roles would zero the old ones)
        assert torch.count_nonzero(layer.weight.grad[roles.clones]) == 0
        assert torch.count_nonzero(layer.weight.grad[roles.active].flatten(1).abs().sum(1)) == roles.active.numel()
        for o in (opt, eager_opt):
            o.step()
            o.zero_grad()
            o.elect_now()
        assert opt.roles["layer2.conv1"].same_as(eager_opt.roles["layer2.conv1"])
    assert len({tuple(h) for h in history}) > 1, "the elections changed no roles: the test proves nothing"
    assert counter.frame_count == (1 if first_roles == "drawn" else 2)  # scattered roles: buffer values, no guards
    if mode == "output":  # eval ("as_trained"): the fused norm's running-statistics path (a recompile)
        model.eval()
        eager.eval()
        _close(compiled(x), eager(x), "eval output")
        _assert_same(model, eager, "eval")


@pytest.mark.parametrize("native_kernels", [True, False])
def test_compiled_output_cloning_recompiles_when_clone_counts_change(native_kernels):
    """A layer that gains or loses active units (or all its clones) changes shapes or python flags: Dynamo must
    recompile, never reuse the graph traced for the old roles. ``native_kernels=False``: the torch-ops norm (the
    GPU path) under compile."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 6)
    )
    oc = OutputCloning(
        model,
        {"0": Roles(8, [0, 1], [2], [3, 4, 5, 6, 7], [0, 1, 0, 1, 0]), "4": Roles(6, [0], [1], [2, 3, 4, 5], [0] * 4)},
        norms={"0": "1"},
        native_kernels=native_kernels,
    )
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    updates = [
        {},
        {"0": Roles(8, [4, 5, 6], [7], [0, 1, 2, 3], [4, 6, 5, 4])},  # more active units
        {"0": Roles.all_leaders(8), "4": Roles(6, [3, 4], [], [0, 1, 2, 5], [3, 4, 3, 4])},  # no clones left in "0"
        {"0": Roles(8, [0, 1], [2], [3, 4, 5, 6, 7], [1, 0, 1, 0, 1])},  # back to the first counts, new sources
    ]
    for update in updates:
        oc.update_roles(update)
        for p in model.parameters():
            p.grad = None
        y = compiled(x)
        y.sum().backward()
        got = [y.detach()] + [p.grad.clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        ye = model(x)
        ye.sum().backward()
        want = [ye.detach()] + [p.grad for p in model.parameters()]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        clones = oc.roles["4"].clones
        assert torch.count_nonzero(model[4].weight.grad[clones]) == 0


@pytest.mark.skipif(not HAVE_KERNEL, reason="no C compiler, or kernels disabled by EGG_OPTIM_NO_KERNEL")
def test_fused_norm_custom_ops_pass_opcheck():
    """Schema, fake (shape) implementations and the registered autograd formula of the kernels' custom ops."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    gather = torch.tensor([0, 1, 2, 1, 0, 2])
    w = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    mean, var = _fused._batch_stats_op(x.detach())
    torch.testing.assert_close(mean, x.detach().mean((0, 2)))
    torch.testing.assert_close(var, x.detach().var((0, 2), unbiased=False))
    invstd = (var + 1e-5).rsqrt()
    for batch_stats in (True, False):
        torch.library.opcheck(_fused._expand_norm_op, (x, w, b, gather, mean, invstd, batch_stats))
    torch.library.opcheck(_fused._expand_norm_op, (x, None, None, gather, mean, invstd, True))
    gy = torch.randn(4, 6, 5, dtype=torch.float64, generator=gen)
    torch.library.opcheck(_fused._batch_stats_op, (x.detach(),))
    torch.library.opcheck(_fused._reduce_op, (x.detach(), gy, gather, mean.index_select(0, gather)))
    coef, p, q = (torch.randn(n, dtype=torch.float64, generator=gen) for n in (6, 3, 3))
    torch.library.opcheck(_fused._grad_input_op, (x.detach(), gy, gather, coef, p, q))
    # channels innermost (inductor's conv layout): the fake implementations must give the real outputs' strides
    x4 = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=gen).contiguous(memory_format=torch.channels_last)
    gy4 = torch.randn(2, 6, 4, 5, dtype=torch.float64, generator=gen).contiguous(memory_format=torch.channels_last)
    mean4, var4 = _fused._batch_stats_op(x4)
    torch.library.opcheck(_fused._expand_norm_op, (x4.requires_grad_(), w, b, gather, mean4, var4.rsqrt(), True))
    torch.library.opcheck(_fused._grad_input_op, (x4.detach(), gy4, gather, coef, p, q))
    torch.library.opcheck(_fused._reduce_op, (x4.detach(), gy4, gather, mean4.index_select(0, gather)))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("EGG_OPTIM_TEST_INDUCTOR", "") in ("", "0"),
    reason="inductor compiles C++ with gcc: 40-60 s per test with a cold cache on 2 cores; EGG_OPTIM_TEST_INDUCTOR=1",
)
@pytest.mark.parametrize("mode", ["output", "weight"])
def test_inductor_matches_eager(mode):
    """The default backend: in output mode inductor calls the kernels' custom ops (extern calls) from its
    generated C++; in weight mode it compiles the split backward of the gradient-skipping autograd functions."""
    (eager, _), (model, _) = _pair(mode)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y, ye = compiled(x), eager(x)
    torch.testing.assert_close(y, ye, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    ye.square().sum().backward()
    # inductor's own float32 rounding (its BatchNorm decomposition): on the plain TinySeedNet, without egg_optim,
    # the shortcut conv's weight gradient is 2.5e-5 off a float64 reference where eager is 1e-6 off (max 0.015)
    for (k, p), pe in zip(model.named_parameters(), eager.parameters()):
        atol = 1e-5 + 5e-3 * float(pe.grad.abs().max())
        torch.testing.assert_close(p.grad, pe.grad, rtol=1e-3, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_a_compiled_base_optimizer_step_is_traced_once_on_packed_roles(mode):
    """``base.step = torch.compile(base.step)``: the compact stand-ins of packed roles are views kept from step to
    step, so the compiled step sees the same parameters every step: traced for the step that creates the state
    and the next (whose state dict is ordered differently), then reused until roles change. Drawn (scattered)
    roles hand it fresh gathered tensors, which Dynamo retraces at every step."""

    def run(first_roles: str, compiled: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TinySeedNet()
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        if compiled:
            base.step = torch.compile(base.step, backend=counter)
        opt = LeaderCloneOptimizer(model, base, RolePlan.preset("mild"), clone_mode=mode, first_roles=first_roles)
        train_tiny(model, opt, 6)
        return model, counter.frame_count

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's recompile-limit warnings for the drawn roles
        compiled, frames = run("packed", True)
        eager, _ = run("packed", False)
        _, drawn_frames = run("drawn", True)
    assert frames <= 2 and drawn_frames >= 5, (frames, drawn_frames)
    for (k, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        _close(a, b, k)


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_a_compiled_base_optimizer_step_is_traced_once_on_a_transformer(mode):
    """On a Llama the active heads of ``o_proj`` (and active neurons of ``down_proj``) are a block of COLUMNS:
    the base step runs on a contiguous copy, which is kept in a buffer from step to step so that the compiled
    step sees the same tensors (a fresh copy per step retraced it at every step). Exact against eager."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip

    def run(compiled: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        base = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        if compiled:
            base.step = torch.compile(base.step, backend=counter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = LeaderCloneOptimizer(model, base, RolePlan.preset("mild"), clone_mode=mode)
        columns = [e for e in opt.masked._compact if not e.select(e.param).is_contiguous()]
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            ids = torch.randint(0, 64, (2, 8), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, counter.frame_count, len(columns)

    compiled, frames, columns = run(True)
    eager, _, _ = run(False)
    assert columns > 0  # the case this test is about: column blocks stepped on copies
    assert frames <= 2, frames
    for (k, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        _close(a, b, k)


def _graph_index_ops(model: nn.Module, run) -> list[str]:
    """The index ops (gathers, scatters, ``index_*``) of the forward and backward graphs AOTAutograd makes of
    ``model`` when ``run(compiled_model)`` runs it (fullgraph)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    seen: list[str] = []

    def record(gm, _inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm)

    run(torch.compile(model, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True))
    return [op for op in seen if any(name in op for name in ("index", "gather", "scatter"))]


def test_compiled_output_mode_on_packed_roles_expands_clones_without_an_index_op():
    """Compiled, output mode expands packed clones by a ``cat`` of broadcast views (``expand_tiled``): no gather in
    the forward graph and no scatter (``index_add``) in the backward one, which inductor compiles to an atomic
    scatter on GPUs and a scalar loop on CPUs; values and gradients are eager's. Drawn roles still gather."""

    def index_ops(first_roles: str) -> list[str]:
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            model = TinySeedNet()
            opt = LeaderCloneOptimizer(
                model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan.preset("mild"), clone_mode="output",
                first_roles=first_roles, fuse_norms=False,
            )  # fmt: skip
            model(torch.zeros(2, 1, 8, 8))
            opt.couple_norms()
            models.append(model)
        eager, model = models
        x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))

        def run(compiled):
            y, ye = compiled(x), eager(x)
            _close(y, ye, f"{first_roles} output")
            y.square().sum().backward()
            ye.square().sum().backward()
            _assert_same(model, eager, first_roles)

        return _graph_index_ops(model, run)

    assert index_ops("packed") == []
    assert any("index_select" in op for op in index_ops("drawn"))  # the check sees gathers where there are some


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_a_compiled_transformer_on_packed_roles_has_no_index_op(mode):
    """Transformer blocks (neuron and head units of a Llama) on packed roles: their compiled forward and backward
    graphs hold no index op either (active rows and columns are views, clone columns fold by reshaped sums)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))

    def index_ops(first_roles: str) -> list[str]:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        base = torch.optim.AdamW(model.parameters())
        opt = LeaderCloneOptimizer(model, base, RolePlan.preset("mild"), clone_mode=mode, first_roles=first_roles)
        model(input_ids=ids, labels=ids).loss.backward()  # the eager first pass checks the blocks
        opt.step()
        opt.zero_grad()
        return _graph_index_ops(model, lambda compiled: compiled(input_ids=ids, labels=ids).loss.backward())

    assert index_ops("packed") == []
    if mode == "output":  # not vacuous: drawn roles gather the active heads' and neurons' rows
        assert index_ops("drawn")


@pytest.mark.parametrize("family", ["qwen3_5", "kimi_linear", "gpt2", "opt", "phi3"])
def test_compiled_attention_with_width_attributes_set_matches_eager(family):
    """Linear attention, GPT-2's split and OPT's head count shrink by setting their block module's width
    attributes for the forward pass (attribute writes inside the traced code): compiled, the loss and every
    gradient match an eager copy."""
    import copy

    tiny = pytest.importorskip("egg_recipes.tiny_transformers")
    torch.manual_seed(0)
    model = tiny.make(family)
    opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), RolePlan(0.4, 0.1),
                               clone_mode="output")  # fmt: skip
    batch = tiny.inputs(family)
    model(**batch).loss.backward()  # eager first: the self-check decides how each block computes
    opt.step()
    opt.zero_grad()
    attention = next(n for n in opt.coverage().modes if ".0." in n and "mlp" not in n)
    assert opt.coverage().modes[attention] == "shrink" and opt.block_output.resized(attention)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    try:
        torch.manual_seed(1)  # the same dropout masks (GPT-2, OPT) in both runs
        loss = compiled(**batch).loss
        loss.backward()
    except Exception as exc:
        try:  # the plain model (torch 2.11 with transformers 5.17 cannot differentiate a compiled Qwen3.5)
            torch.compile(tiny.make(family), backend="aot_eager")(**batch).loss.backward()
        except Exception:  # noqa: BLE001
            pytest.skip(f"{family} without egg_optim does not compile here either ({type(exc).__name__})")
        raise
    torch.manual_seed(1)
    want = eager(**batch).loss
    want.backward()
    torch.testing.assert_close(loss, want)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
