"""Output mode is never silently wrong: the self-check at each block's first forward pass (issue 20).

Attention code that reshapes with a stored head count (OPT's ``view(bsz, -1, self.num_heads, ...)``, GPT-Neo's and
StableLM's explicit head counts) runs on the active heads only once that count is set to theirs for the forward
pass, where the attribute's name says it is one (``num_heads``); where it does not, the block computes all heads
instead ("expand"), which the check finds and logs. A block that no rewrite can compute exactly is refused with a
typed error before anything trains.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from egg_optim import LeaderCloneOptimizer, PlanError, RewriteCheckError, RolePlan
from egg_optim.rewrites import block_output


class ToyAttention(nn.Module):
    """Attention over ``num_heads`` heads; ``reshape`` says how it splits them: ``"minus_one"`` (``view(b, -1,
    heads, head_dim)``: folds tokens into heads when fewer heads come in), ``"stored"`` (``view(b, t, heads,
    head_dim)``: fails), ``"head_dim"`` (``view(b, t, -1, head_dim)``: works on any number of heads), ``"direct"``
    (reads ``q_proj.weight`` itself, bypassing the module: no rewrite can be exact). ``heads`` is read from the
    attribute ``count``: ``"split_heads"`` is no name egg_optim knows for a head count, ``"num_heads"`` is."""

    def __init__(self, dim: int = 16, heads: int = 4, reshape: str = "stored", count: str = "split_heads") -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.reshape, self.count = heads, dim // heads, reshape, count
        setattr(self, count, heads)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shape = {
            "minus_one": (b, -1, getattr(self, self.count), self.head_dim),
            "stored": (b, t, getattr(self, self.count), self.head_dim),
        }.get(self.reshape, (b, t, -1, self.head_dim))
        return x.reshape(shape).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_proj.bias) if self.reshape == "direct" else self.q_proj(x)
        q, k, v = self._split(q), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class ToyLM(nn.Module):
    def __init__(self, reshape: str = "stored", vocab: int = 20, dim: int = 16, count: str = "split_heads") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = ToyAttention(dim, reshape=reshape, count=count)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(h + self.attn(h))


def _ids(n: int = 2, t: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 20, (n, t), generator=torch.Generator().manual_seed(seed))


def _opt(model: nn.Module, **kw) -> LeaderCloneOptimizer:
    plan = RolePlan(0.25, 0.0, layers=["attn"])  # 4 heads: 1 leader, 3 clones
    return LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), plan, clone_mode="output", **kw)


def _step(model: nn.Module, opt: LeaderCloneOptimizer, ids: torch.Tensor) -> None:
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()


def _saved_equals_live(model: nn.Module, ids: torch.Tensor) -> None:
    plain = copy.deepcopy(model)
    for m in plain.modules():  # a plain instance of the same classes, loaded from what the live model saves
        block_output._restore(m)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids), model.eval()(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reshape", ["minus_one", "stored"])
@pytest.mark.parametrize("length", [8, 7])  # 8 tokens: "minus_one" folds tokens into heads silently; 7: it raises
def test_attention_reshaping_with_a_stored_head_count_computes_every_head(reshape, length, caplog):
    torch.manual_seed(0)
    model = ToyLM(reshape)
    opt = _opt(model)
    assert opt.block_output.modes == {"attn": "shrink"}
    with caplog.at_level("INFO", logger="egg_optim"):
        for seed in range(3):
            _step(model, opt, _ids(t=length, seed=seed))
    assert opt.block_output.modes == {"attn": "expand"} and opt.block_output.verified == {"attn"}
    assert sum("cannot compute with only its active units" in r.getMessage() for r in caplog.records) == 1
    _saved_equals_live(model, _ids(t=length, seed=9))
    assert opt.block_output._hooks == {}  # checked once: no hook left on the hot path


@pytest.mark.parametrize("reshape", ["minus_one", "stored"])
@pytest.mark.parametrize("length", [8, 7])
def test_attention_reshaping_with_a_named_head_count_computes_active_heads_with_it_set(reshape, length, caplog):
    """``num_heads`` is a head count by its name: the block computes its active heads with it set to theirs for
    the forward pass (restored after), exactly what the saved plain model computes."""
    torch.manual_seed(0)
    model = ToyLM(reshape, count="num_heads")
    opt = _opt(model)
    inside = []
    model.attn.o_proj.register_forward_pre_hook(lambda m, args: inside.append((model.attn.num_heads, args[0].shape)))
    with caplog.at_level("INFO", logger="egg_optim"):
        for seed in range(3):
            _step(model, opt, _ids(t=length, seed=seed))
    assert opt.block_output.modes == {"attn": "shrink"} and opt.block_output.resized("attn")
    assert opt.block_output.verified == {"attn"}
    assert not any("cannot compute" in r.getMessage() for r in caplog.records)
    assert model.attn.num_heads == 4  # restored after each forward pass
    assert inside[-1] == (1, torch.Size([2, length, 4]))  # 1 active head of 4 read by the output projection
    with _Attention() as seen:
        model(_ids(t=length))
    assert [q[1] for q, _, _ in seen.calls] == [1]  # attention over the leader's head only
    _saved_equals_live(model, _ids(t=length, seed=9))


def test_attention_that_splits_heads_by_head_dim_keeps_computing_active_heads_only():
    model = ToyLM("head_dim")
    opt = _opt(model)
    _step(model, opt, _ids())
    assert opt.block_output.modes == {"attn": "shrink"} and opt.block_output.verified == {"attn"}
    _saved_equals_live(model, _ids(seed=3))


@pytest.mark.parametrize("reshape", ["minus_one", "stored"])
@pytest.mark.parametrize("zero_init", [False, True])
def test_without_the_fix_the_mismatch_is_refused_before_anything_trains(reshape, zero_init, monkeypatch):
    """With the full-head fallback bypassed, the check refuses the block with a typed error naming it, the reason
    and the workarounds; the optimizer never steps. Zero-initialised projections (every head computes zeros, so
    the batch at hand cannot show the wrong reshape) are caught by the check's run with random weights."""
    monkeypatch.setattr(block_output, "MODES", ("shrink",))
    torch.manual_seed(0)
    model = ToyLM(reshape)
    if zero_init:
        with torch.no_grad():
            for proj in (model.attn.q_proj, model.attn.k_proj, model.attn.v_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    opt = _opt(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(RewriteCheckError, match=r"block 'attn'") as err:
        _step(model, opt, _ids())
    assert isinstance(err.value, PlanError) and err.value.block == "attn"
    assert "clone_mode='weight'" in str(err.value) and "RolePlan(exclude=['attn'])" in str(err.value)
    assert ("with random weights" in str(err.value)) == (zero_init and reshape == "minus_one")
    assert opt.steps == 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())  # the check's eval mode is undone


def test_a_block_no_rewrite_computes_exactly_is_refused():
    """An attention that reads its projection's weight itself bypasses the rewritten module: neither way of
    computing matches what its saved model computes, so it is refused."""
    model = ToyLM("direct")
    opt = _opt(model)
    with pytest.raises(RewriteCheckError, match=r"block 'attn' \(attention\).*clone_mode='weight'"):
        _step(model, opt, _ids())
    assert opt.steps == 0


def test_the_check_waits_for_clones_and_follows_role_changes():
    model = ToyLM("stored")
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(1.0, layers=["attn"]),
                               clone_mode="output")  # fmt: skip
    _step(model, opt, _ids())  # no clones: nothing to check yet
    assert opt.block_output.verified == set() and not opt.block_output._hooks  # armed once roles have clones
    from egg_optim import Roles

    opt.controller._set_roles({"attn": Roles(4, [0], [], [1, 2, 3], [0, 0, 0])})
    _step(model, opt, _ids())
    assert opt.block_output.verified == {"attn"} and opt.block_output.modes == {"attn": "expand"}


def test_eval_mode_own_weights_is_checked_as_trained():
    model = ToyLM("stored")
    opt = _opt(model, eval_mode="own_weights")
    model.eval()
    with torch.no_grad():
        model(_ids())
    assert opt.block_output.verified == {"attn"} and opt.block_output.modes == {"attn": "expand"}


@pytest.mark.parametrize("family", ["opt", "phi3"])
def test_the_check_does_not_touch_the_key_value_cache(family):
    """OPT reshapes by the head count its attention stores, Phi3 splits its fused qkv at the head count its config
    holds: with those set to the active heads' (Phi3's on a view of the config, for its attention alone), the block
    computes those only, its cache holds their keys and values, and decoding on from it is the plain model's."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    if family == "opt":
        cfg = transformers.OPTConfig(vocab_size=50, hidden_size=16, ffn_dim=24, num_hidden_layers=1,
                                     num_attention_heads=4, word_embed_proj_dim=16)  # fmt: skip
        cls, name = transformers.OPTForCausalLM, "model.decoder.layers.0.self_attn"
    else:
        cfg = transformers.Phi3Config(vocab_size=50, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
        cls, name = transformers.Phi3ForCausalLM, "model.layers.0.self_attn"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5),
                               clone_mode="output")  # fmt: skip
    attention = model.get_submodule(name)
    seen = []  # what the attention reads from its config, what the rest of the model reads meanwhile
    consumer = model.get_submodule(opt.block_output.groups[name].consumer)
    consumer.register_forward_pre_hook(
        lambda m, args: seen.append((attention.config.num_attention_heads, model.config.num_attention_heads))
    )
    ids = _ids(t=6)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    assert out.past_key_values.get_seq_length() == 6
    assert opt.block_output.modes[name] == "shrink" and opt.block_output.resized(name)
    assert seen[-1] == (2, 4) and attention.config is model.config  # the view: its alone, for its forward pass
    plain = cls(cfg).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, out.logits, rtol=1e-5, atol=1e-5)
        # decoding on from the cache (which holds the active heads' keys and values) is the plain model's too
        more = _ids(t=2, seed=5)
        step = model(input_ids=more, past_key_values=out.past_key_values, use_cache=True).logits
        full = plain(input_ids=torch.cat([ids, more], dim=1)).logits[:, -2:]
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


class _Attention(TorchFunctionMode):
    """Records the shapes of every attention call that reaches torch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Size, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append(tuple(t.shape for t in args[:3]))
        return func(*args, **(kwargs or {}))


def test_the_check_hands_attention_no_impossible_shapes():
    """Phi-3 splits its fused qkv at offsets its config gives: run on its active heads only with the config's head
    count, the key and value get no head at all, which torch 2.11's CPU attention divides by (the process died of
    SIGFPE). The check turns that call into a finding before torch sees it."""
    tiny = pytest.importorskip("egg_recipes.tiny_transformers")
    model = tiny.make("phi3")
    opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters()), RolePlan(0.4, 0.1), clone_mode="output")
    with _Attention() as seen:
        model(**tiny.inputs("phi3", length=15)).loss.backward()
    opt.step()
    assert seen.calls and all(0 not in k[:-2] and 0 not in v[:-2] for _, k, v in seen.calls), seen.calls
    # the next try, with its config's head count set to the active heads', computes those only
    assert opt.block_output.modes["model.layers.0.self_attn"] == "shrink"
    assert opt.block_output.resized("model.layers.0.self_attn")


@pytest.mark.parametrize(
    ("q", "k", "gqa", "ok"),
    [((2, 4, 5, 8), (2, 2, 5, 8), True, True), ((2, 4, 5, 8), (2, 0, 5, 8), True, False),
     ((2, 4, 5, 8), (2, 3, 5, 8), True, False), ((2, 4, 5, 8), (2, 1, 5, 8), False, True),
     ((0, 4, 5, 8), (0, 4, 5, 8), False, False), ((2, 4, 0, 8), (2, 4, 0, 8), False, True)],
)  # fmt: skip
def test_the_attention_guard_refuses_only_what_no_kernel_computes(q, k, gqa, ok):
    args = torch.zeros(q), torch.zeros(k), torch.zeros(k)
    if ok:
        block_output._check_attention(*args, enable_gqa=gqa)
    else:
        with pytest.raises(ValueError, match="attention with"):
            block_output._check_attention(*args, enable_gqa=gqa)


class _DirectDt(nn.Module):
    """A mixer that computes with one Linear's weight without calling it (Jamba's ``dt_proj``)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.dt, self.out = nn.Linear(8, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        return self.out(h @ self.dt.weight.T + self.dt.bias)


@pytest.mark.parametrize("plan", [RolePlan(0.5, 0.0), RolePlan(1.0, 0.0)])
def test_a_layer_the_model_uses_without_calling_it_is_refused_in_output_mode(plan):
    """Output mode gives clones their sources' outputs in the layer's forward: a layer the model computes with
    without calling it would train with the clones' own rows while its saved model holds their sources'. The first
    step refuses it, naming it, before its update changes anything; without clones there is nothing to refuse."""
    torch.manual_seed(0)
    model = _DirectDt()
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), plan, clone_mode="output")
    before = copy.deepcopy(model.state_dict(keep_vars=False))
    model(torch.randn(4, 8)).sum().backward()
    if plan.leaders == 1.0:
        opt.step()
        return
    with pytest.raises(RewriteCheckError, match=r"clones of \['dt'\].*without calling.*exclude=\['dt'\]") as info:
        opt.step()
    assert info.value.block == "dt"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _OnlyDirect(nn.Module):
    """A model whose one managed layer (``dt``) is never called: its weight is read directly."""

    def __init__(self) -> None:
        super().__init__()
        self.dt, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x @ self.dt.weight.T + self.dt.bias)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_layer_used_without_calling_it_is_refused_when_no_forward_noted_a_call(compiled):
    """Where no managed layer's forward noted its call (every layer with clones bypassed; or a compiled forward,
    which notes nothing), the gradient tells: a layer's own forward never reaches its clones' weight rows, a model
    computing with the whole weight does. The first step refuses it, before its update."""
    torch.manual_seed(0)
    models = [_OnlyDirect(), _DirectDt()] if not compiled else [_DirectDt()]
    for model in models:
        opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5, 0.0),
                                   clone_mode="output")  # fmt: skip
        before = copy.deepcopy(model.state_dict())
        run = torch.compile(model, backend="eager") if compiled else model
        run(torch.randn(4, 8)).sum().backward()
        with pytest.raises(RewriteCheckError, match=r"clones of \['dt'\].*without calling"):
            opt.step()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_compiled_model_that_calls_its_layers_passes_the_check_once():
    """Compiled, the layers' forward passes note nothing; their clone rows have no gradient: the first step passes
    the check and it is not asked again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3))
    opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5, 0.0),
                               clone_mode="output")  # fmt: skip
    run = torch.compile(model, backend="eager")
    for _ in range(2):
        run(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.controller._calls_checked


def test_width_attributes_are_not_set_where_a_block_hands_later_blocks_a_per_head_tensor(caplog):
    """T5's first cross-attention returns its (all-zero, masked) position bias, which the later cross-attention
    blocks add to their scores: with ``n_heads`` set to the active heads' it would be the active heads' only, which
    the self-check finds (the block's second output differs), so T5's attention computes every head. Attention
    weights, which no later block reads, may be the active heads' (GPT-2 with eager attention)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    t5 = transformers.T5Config(vocab_size=50, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=3,
                               num_heads=4, decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    gpt2 = transformers.GPT2Config(vocab_size=50, n_embd=32, n_inner=64, n_layer=2, n_head=4,
                                   attn_implementation="eager")  # fmt: skip
    for cfg, cls in ((t5, transformers.T5ForConditionalGeneration), (gpt2, transformers.GPT2LMHeadModel)):
        torch.manual_seed(0)
        model = cls(cfg).eval()
        opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), RolePlan(0.5),
                                   clone_mode="output")  # fmt: skip
        ids = _ids(t=7)
        kw = {"decoder_input_ids": ids} if cls is not transformers.GPT2LMHeadModel else {}
        with caplog.at_level("INFO", logger="egg_optim"), warnings.catch_warnings():
            warnings.simplefilter("error")  # no block left unchecked
            with torch.no_grad():
                out = model(input_ids=ids, **kw).logits
        attention = {n: m for n, m in opt.block_output.modes.items() if opt.block_output.groups[n].kind == "attention"}
        if cls is transformers.GPT2LMHeadModel:
            assert set(attention.values()) == {"shrink"} and all(opt.block_output.resized(n) for n in attention)
        else:
            assert set(attention.values()) == {"expand"}, attention
            assert any("EncDecAttention" in r.getMessage() and "its output 2" in r.getMessage() for r in caplog.records)
        plain = cls(cfg).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids, **kw).logits, out, rtol=1e-5, atol=1e-5)
