"""Hugging Face models (tiny random-init configs): what is saved, what is managed, what is coupled (issue 13)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
safetensors_torch = pytest.importorskip("safetensors.torch")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from egg_optim import LeaderCloneOptimizer, PlanError, RolePlan  # noqa: E402
from egg_optim.callbacks import EggConfig  # noqa: E402
from egg_optim.integrations.transformers import EggTrainer  # noqa: E402

VOCAB = 40


@pytest.fixture(autouse=True)
def _quiet_and_reset():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )


def llama(tie: bool = False) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def vit() -> ViTForImageClassification:
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=3,
    )
    return ViTForImageClassification(cfg)


def ids(n: int = 4, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- saving
def test_output_mode_saves_reproduce_bert_through_every_save_path(tmp_path):
    """EggTrainer in output mode: Trainer.save_model, its checkpoint, accelerator.save_model and a plain
    state_dict all load into the plain BertForSequenceClassification and give the trained model's logits."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config())
    x = ids(16)
    ds = datasets.Dataset.from_dict({"input_ids": x.tolist(), "labels": (x[:, 0] % 3).tolist()}).with_format("torch")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        save_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = EggTrainer(model=model, args=args, train_dataset=ds, egg=EggConfig(plan="mild", clone_mode="output"))
    trainer.train()
    opt = trainer.egg_optimizer
    assert opt.stats()["total"]["clones"] > 0 and opt.block_output is not None
    live = model.state_dict(keep_vars=True)
    saved = model.state_dict()
    roles = opt.roles["bert.encoder.layer.0.mlp"]  # the MLP's hidden neurons: rows of intermediate.dense
    name = "bert.encoder.layer.0.intermediate.dense"
    w_live, w_saved = live[f"{name}.weight"], saved[f"{name}.weight"]
    assert torch.equal(w_saved[roles.clones], w_live[roles.sources])  # clones saved as their sources
    assert not torch.equal(w_live[roles.clones], w_live[roles.sources])  # ... the live rows untouched (stale)

    model.eval()
    probe = ids(5, seed=1)
    with torch.no_grad():
        want = model(input_ids=probe).logits
    trainer.save_model(str(tmp_path / "final"))
    trainer.accelerator.save_model(model, str(tmp_path / "accelerate"))
    loaded = {
        "save_model": BertForSequenceClassification.from_pretrained(tmp_path / "final"),
        "checkpoint": BertForSequenceClassification.from_pretrained(tmp_path / "run" / "checkpoint-4"),
    }
    plain = BertForSequenceClassification(bert_config())
    plain.load_state_dict(model.state_dict())
    loaded["state_dict"] = plain
    acc = BertForSequenceClassification(bert_config())
    acc.load_state_dict(safetensors_torch.load_file(str(tmp_path / "accelerate" / "model.safetensors")))
    loaded["accelerator.save_model"] = acc
    for how, m in loaded.items():
        assert not any(type(mod).__module__.startswith("egg_optim") for mod in m.modules())
        with torch.no_grad():
            torch.testing.assert_close(m.eval()(input_ids=probe).logits, want, rtol=1e-5, atol=1e-5, msg=how)


def test_output_mode_llama_save_pretrained_reproduces_the_loss(tmp_path):
    torch.manual_seed(0)
    model = llama()
    opt = LeaderCloneOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), RolePlan.preset("mild"), clone_mode="output"
    )
    x = ids(4, 8)
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x, labels=x).loss
    model.save_pretrained(tmp_path)
    fresh = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x, labels=x).loss, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- managed layers
def test_a_plan_that_manages_nothing_fails_loudly():
    model = gpt2()  # attention/MLP are transformers Conv1D; the only nn.Linear is the (tied) lm_head
    base = torch.optim.AdamW(model.parameters())
    with pytest.raises(PlanError, match=r"manages no layer of GPT2LMHeadModel.*'lm_head'.*8 transformers Conv1D"):
        LeaderCloneOptimizer(model, base, RolePlan(0.4, 0.1, units="layers"))
    opt = LeaderCloneOptimizer(model, base, config=EggConfig(plan="mild"))  # what EggTrainer builds: GPT-2 blocks
    assert sorted(opt.layers) == [f"transformer.h.{i}.{b}" for i in (0, 1) for b in ("attn", "mlp")]
    with pytest.raises(PlanError, match="manages no layer"):
        LeaderCloneOptimizer(model, base, RolePlan(0.5, exclude=["lm_head"], layers=["lm_head"]))
    only_embeddings = nn.Sequential(nn.Embedding(5, 4))
    with pytest.raises(PlanError, match="no nn.Linear"):
        LeaderCloneOptimizer(only_embeddings, torch.optim.SGD(only_embeddings.parameters(), lr=0.1))


def test_tied_and_shared_parameters_are_refused():
    cases = [
        (gpt2(), RolePlan(0.5, 0.1, layers=["lm_head"]), r"'lm_head.weight' is also 'transformer.wte.weight'"),
        (llama(tie=True), RolePlan(0.5, 0.1, layers=["lm_head"]), r"'lm_head.weight' is also 'model.embed_tokens"),
    ]
    shared = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    shared.register_module("proj", nn.Linear(6, 6))
    shared.proj.weight = shared[2].weight  # e.g. a weight reused by a module outside the plan
    cases.append((shared, RolePlan(0.5, layers=["2"]), r"layer '2': its parameter '2.weight' is also 'proj.weight'"))
    for model, plan, match in cases:
        classes = [type(m) for m in model.modules()]
        with pytest.raises(PlanError, match=match):
            LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters()), plan, clone_mode="output")
        assert [type(m) for m in model.modules()] == classes  # nothing rewritten
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing hooked
    # the same module under two names is one layer, not a shared parameter
    aliased = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    aliased.register_module("alias", aliased[0])
    opt = LeaderCloneOptimizer(aliased, torch.optim.SGD(aliased.parameters(), lr=0.1), RolePlan(0.5))
    assert list(opt.layers) == ["0"]


def test_blocks_of_tied_weights_are_left_alone_by_a_default_plan():
    """Blocks whose weights are tied (one set of weights called at two depths, each call its own module: Zamba2's
    shared transformer blocks) cannot have roles: a default plan leaves them alone, saying why, and manages the
    rest (it refused its own choice before); a plan naming one is refused naming the other module (a KeyError on
    the tied name before)."""
    cfg = llama().config
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    first, second = model.model.layers
    for name, p in first.mlp.named_parameters():
        module, _, attr = name.rpartition(".")
        setattr(second.mlp.get_submodule(module), attr, p)
    cov = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters()), RolePlan(0.5, 0.1)).coverage()
    assert set(cov.managed_blocks) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    for i in (0, 1):
        assert "tied or shared weights cannot have roles" in cov.left_alone[f"model.layers.{i}.mlp"]
    match = r"layer 'model.layers.1.mlp': its parameter '[^']*' is also 'model.layers.0.mlp"
    with pytest.raises(PlanError, match=match):
        LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters()), RolePlan(0.5, layers=["model.layers.1.mlp"]))


def test_a_block_not_decomposed_whose_weights_are_tied_is_not_offered_to_a_plan():
    """Zamba2's shared attention (one set of weights called at each hybrid layer) is found but not decomposed: its
    reason says its weights are tied, not that a plan naming its layers would manage them (it would refuse them)."""
    from egg_recipes import tiny_transformers as tiny

    model = tiny.make("zamba2")
    cov = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters()), RolePlan(0.4, 0.1)).coverage()
    reasons = [cov.not_decomposed[f"model.layers.{i}.shared_transformer.self_attn"] for i in (0, 1)]
    assert all("tied to other modules'" in r and "RolePlan(layers=" not in r for r in reasons)
    with pytest.raises(PlanError, match="tied or shared weights cannot have roles"):
        name = "model.layers.0.shared_transformer.self_attn.o_proj"
        LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters()), RolePlan(0.4, 0.1, layers=[name]))


# ---------------------------------------------------------------------------------------------- norm coupling
@pytest.mark.parametrize("mode", ["weight", "output"])
@pytest.mark.parametrize("which", ["bert", "vit", "llama"])
def test_transformer_norms_are_not_coupled(which, mode):
    """BERT's post-add LayerNorm, ViT's layernorm_before/after and Llama's RMSNorms never take a Linear's own
    output: no norm is coupled, so norm entries are trained normally."""
    torch.manual_seed(0)
    if which == "bert":
        model, inputs = BertForSequenceClassification(bert_config()), {"input_ids": ids()}
    elif which == "vit":
        model, inputs = vit(), {"pixel_values": torch.randn(2, 3, 8, 8)}
    else:
        model, inputs = llama(), {"input_ids": ids()}
    opt = LeaderCloneOptimizer(
        model, torch.optim.AdamW(model.parameters()), RolePlan.preset("mild"), clone_mode=mode, seed=1
    )
    out = model(**inputs).logits
    opt.couple_norms()  # applies what that forward pass recorded (the next step would)
    assert not opt.coupling_pending
    assert opt.coupled_norms == {}
    plain = {name: lay for name, lay in opt.layers.items() if lay.group is None}
    assert all(n.rsplit(".", 1)[0] == name for name, lay in plain.items() for n, _ in lay.params)
    out.sum().backward()
    opt.step()


# ---------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("mode", ["weight", "output"])
def test_gradient_checkpointing_trains_the_same_weights(mode, reentrant):
    """``model.gradient_checkpointing_enable()`` (transformers' activation checkpointing: each decoder layer's forward
    runs again in backward, through the rewritten blocks and weight mode's skipping functions) trains bit for bit
    what the same run without it trains."""

    def train(checkpointing: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), RolePlan.preset("mild"),
                                   clone_mode=mode)  # fmt: skip
        calls, losses = [], []
        model.model.layers[0].input_layernorm.register_forward_hook(lambda *_: calls.append(1))
        for step in range(3):
            loss = model(input_ids=ids(seed=step), labels=ids(seed=step)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert len(calls) == (6 if checkpointing else 3)  # recomputed in backward: checkpointing was on
        return losses, model.state_dict()

    (plain_losses, plain), (losses, state) = train(False), train(True)
    assert losses == plain_losses
    for k, v in plain.items():
        assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------------------------------------- Gemma 3n
def test_gemma3n_parallel_projections_are_layers_and_output_mode_leaves_its_training_mode_reads_alone():
    """Gemma 3n's ``altup_projections`` (a ModuleList of hidden -> hidden Linears, each called on the embeddings) look
    like an MLP by structure; the probe's pass shows them called one by one: each is managed by its rows. In training
    the model computes with ``correction_coefs.weight`` (clamped) without calling the layer: the probe's training-mode
    pass sees it, so output mode's default plan leaves those layers alone (warned) and trains; a plan naming them is
    refused at construction, typed, before anything changes. The pass changes nothing: parameters (its in-place clamp of
    ``prediction_coefs``, here pushed past the clip), buffers and the random state are as before."""
    import warnings

    from egg_optim.errors import RewriteCheckError

    cfg = transformers.Gemma3nTextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=16, hidden_size_per_layer_input=4,
        intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        laurel_rank=4, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0],
        layer_types=["sliding_attention", "full_attention"], sliding_window=8, altup_coef_clip=0.01,
    )  # fmt: skip
    coefs = [f"model.layers.{i}.altup.correction_coefs" for i in range(2)]
    for mode in ("weight", "output"):
        torch.manual_seed(0)
        model = transformers.Gemma3nForCausalLM(cfg)
        tensors = lambda m: dict([*m.named_parameters(), *m.named_buffers()])  # noqa: E731 - raw, not exported
        before = {k: v.detach().clone() for k, v in tensors(model).items()}
        assert before["model.layers.0.altup.prediction_coefs.weight"].abs().max() > 0.01  # the clamp would change it
        rng = torch.get_rng_state()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters()), RolePlan.preset("mild"),
                                       clone_mode=mode)  # fmt: skip
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(v, tensors(model)[k]) for k, v in before.items())
        cov = opt.coverage()
        assert {f"model.altup_projections.{i}" for i in range(3)} <= set(cov.row_layers)
        assert cov.by_structure == ()
        left = any("output mode leaves alone" in str(w.message) for w in caught)
        assert left == (mode == "output") and (set(coefs) <= set(cov.row_layers)) == (mode == "weight")
        _train(model, opt, 2)
    torch.manual_seed(0)
    model = transformers.Gemma3nForCausalLM(cfg)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(RewriteCheckError, match=r"altup\.correction_coefs.*without calling"):
        LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters()), RolePlan(0.5, 0.0, layers=coefs),
                             clone_mode="output")  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(model.model.layers[0].altup.correction_coefs) is nn.Linear  # nothing rewritten


def _train(model: nn.Module, opt: LeaderCloneOptimizer, steps: int) -> None:
    for step in range(steps):
        model(input_ids=ids(seed=step), labels=ids(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
