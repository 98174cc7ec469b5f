"""Every transformers architecture named in issue 20, in both clone modes (tiny random-init configs).

For each family and mode: units="auto" finds its blocks by structure (heads, neurons, experts; no layer left as
rows that belongs to a block), it trains a step at an odd sequence length, ``model.state_dict()`` loaded into a
fresh plain instance computes the live model's eval logits, and the optimizer's state dict resumes the run exactly
(a fresh plain model and optimizer loaded from both state dicts take the live run's second step, at an even
length, to the same weights). What
``opt.coverage()`` reports is what ``docs/architectures.md`` lists.
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from egg_recipes import tiny_transformers as tiny  # noqa: E402

from egg_optim import LeaderCloneOptimizer, RolePlan  # noqa: E402

# family -> the kinds of blocks managed and the layers managed as rows (none belongs to a block)
KINDS = {f: {"attention", "mlp"} for f in tiny.FAMILIES}
KINDS.update({"mixtral": {"attention", "experts"}, "qwen3_moe": {"attention", "experts"},
              "qwen2_moe": {"attention", "experts", "mlp"}, "granitemoe": {"attention", "experts"},
              "olmo2": {"mlp"}, "olmoe": {"experts"}, "gpt_oss": {"attention", "experts"},
              "phimoe": {"attention", "experts"}, "llama4": {"attention", "experts", "mlp"},
              "qwen3_next": {"attention", "experts", "mlp"}, "qwen3_5": {"attention", "mlp"},
              "qwen3_5_moe": {"attention", "experts", "mlp"}, "kimi_linear": {"attention", "experts", "mlp"},
              "deepseek_v3": {"attention", "experts", "mlp"}, "deepseek_v2": {"attention", "experts", "mlp"},
              "deepseek_v2_lite": {"attention", "experts", "mlp"}, "mistral4": {"attention", "experts", "mlp"},
              "diffllama": {"mlp"}, "hunyuan_v1_moe": {"attention", "experts", "mlp"},
              "minimax": {"attention", "experts"}, "olmo3": {"mlp"}, "mamba2": {"attention"},
              "granitemoehybrid": {"attention", "experts", "mlp"}, "wavlm": {"mlp"}, "resnet": set(),
              "convnext": {"mlp"}, "convnextv2": set(), "mamba": set(), "efficientnet": set(), "regnet": set(),
              "jamba": {"attention", "experts", "mlp"}, "qwen3_vl_moe": {"attention", "experts", "mlp"},
              "llama4_vlm": {"attention", "experts", "mlp"}, "glm4_moe": {"attention", "experts", "mlp"},
              "zamba2": {"attention"}, "falcon_mamba": set(),
              "ernie4_5_moe": {"attention", "experts", "mlp"}, "jetmoe": set(), "dbrx": {"attention"}})  # fmt: skip
# family -> blocks found but not decomposed: attention whose q/k norms span every head (no head is a unit), that
# mixes its heads (differential attention, found by dataflow) (low-rank MLA is decomposed: its shared down
# projections are neither units nor rows; so is the gated delta net's linear attention: key heads with their value
# heads)
NOT_DECOMPOSED = {
    "olmo2": {"model.layers.0.self_attn"},
    "olmoe": {"model.layers.0.self_attn"},
    "diffllama": {"model.layers.0.self_attn"},
    "olmo_hybrid": {"model.layers.1.self_attn"},
    "olmo3": {"model.layers.0.self_attn"},
    "minimax": {"model.layers.1.self_attn"},  # lightning attention: one fused qkv of every head, a norm over all
    "falcon_h1": {"model.layers.0.mamba"},  # a Mamba-2 mixer of one group, its rows scaled by a buffer
    "wavlm": {"wavlm.encoder.layers.0.attention"},  # a gated relative position bias computed from every head
    "siglip": {"vision_model.head"},  # torch's MultiheadAttention pooling head: one fused in_proj parameter
    "siglip2": {"vision_model.head"},  # SigLIP's pooling head (torch's MultiheadAttention), masked over padding
    # a global response norm across the MLP's neurons (the identity at initialisation: the probe wakes it up)
    "convnextv2": {"convnextv2.encoder.stages.0.layers.0", "convnextv2.encoder.stages.1.layers.0"},
    "gemma3n": {"model.layers.2.self_attn"},  # queries only: its keys and values are layer 1's (a shared cache)
    # Zamba2's shared attention reads the hidden states and the embeddings side by side (2x the hidden size, its
    # output projection writing 1x): not recognised as q/k/v and an output projection; tied across layers anyway
    "zamba2": {f"model.layers.{i}.shared_transformer.self_attn" for i in (0, 1)},
    # RecurrentGemma's recurrent block: its RG-LRU's gates are block-diagonal (3-D [blocks, width, width] weights,
    # taken for experts by structure) and mix the channels of a block, so neither the RG-LRU nor the block around it
    # (linear_x, linear_y, linear_out: taken for an MLP) computes its units apart: the probe leaves both alone
    "recurrent_gemma": {"model.layers.0.temporal_block", "model.layers.0.temporal_block.rg_lru"},
}
_INVERTED = ("expand_1x1", "reduce_1x1")  # an inverted residual's pointwise convolutions (MobileNet V2's)
ROWS = {
    "bert": {"bert.pooler.dense"},
    "roberta": {"classifier.dense"},
    "distilbert": {"pre_classifier"},
    "vit": {"vit.embeddings.patch_embeddings.projection"},
    "qwen2_moe": {"model.layers.0.mlp.shared_expert_gate"},
    "deberta_v2": {"pooler.dense"},
    "electra": {"classifier.dense"},
    "xlm_roberta": {"classifier.dense"},  # its classifier.out_proj, registered first, is the output head
    "qwen3_next": {"model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"},
    "qwen3_5_moe": {"model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"},
    "esm": {"classifier.dense", "esm.contact_head.regression"},
    "albert": {"albert.encoder.embedding_hidden_mapping_in", "albert.pooler"},  # no MLP: not a block, rows
    "modernbert": {"head.dense"},
    "swin": {"swin.embeddings.patch_embeddings.projection"},
    "swinv2": {"swinv2.embeddings.patch_embeddings.projection"},
    "whisper": {"model.encoder.conv1", "model.encoder.conv2"},
    "moonshine": {f"model.encoder.conv{i}" for i in (1, 2, 3)},  # its waveform's convolutions
    **{
        f: {f"{f}.feature_extractor.conv_layers.{i}.conv" for i in (0, 1)}
        | {f"{f}.feature_projection.projection", "projector"}
        for f in ("wav2vec2", "hubert", "wavlm")
    },
    # wav2vec 2.0-BERT's feature projection, its convolution module's pointwise convolutions (the depthwise one,
    # grouped, left alone), its classifier's projector
    "wav2vec2_bert": {"wav2vec2_bert.feature_projection.projection", "projector"}
    | {f"wav2vec2_bert.encoder.layers.0.conv_module.pointwise_conv{i}" for i in (1, 2)},
    "clip": {"vision_model.embeddings.patch_embedding"},
    "siglip": {"vision_model.embeddings.patch_embedding"},
    "siglip2": {"vision_model.embeddings.patch_embedding"},  # a Linear over the flattened patches
    **{f: {f"{f}.embeddings.patch_embeddings.projection"} for f in ("dinov2", "deit", "beit", "videomae")},
    "dinov3_vit": {"model.embeddings.patch_embeddings"},
    "segformer": {
        "segformer.stages.0.patch_embeddings.proj",
        "segformer.stages.1.patch_embeddings.proj",
        "segformer.stages.0.blocks.0.attention.sequence_reduction.sequence_reduction",
    },
    "resnet": {
        "resnet.embedder.embedder.convolution",
        "resnet.encoder.stages.1.layers.0.shortcut.convolution",
        *(f"resnet.encoder.stages.{s}.layers.0.layer.{i}.convolution" for s in (0, 1) for i in (0, 1, 2)),
    },
    **{
        f: {f"{f}.embeddings.patch_embeddings", f"{f}.encoder.stages.1.downsampling_layer.1"}
        for f in ("convnext", "convnextv2")
    },
    "mobilebert": {
        "mobilebert.embeddings.embedding_transformation",
        "mobilebert.pooler.dense",
        "mobilebert.encoder.layer.0.output.bottleneck.dense",
        "mobilebert.encoder.layer.0.bottleneck.input.dense",
        "mobilebert.encoder.layer.0.bottleneck.attention.dense",
    },
    # vision-language models: the vision tower's patch embedding, Qwen2-VL's merger of 2x2 patches (an MLP from 4x
    # the hidden size), Idefics' connector (from its pixel shuffle's 4x); PaliGemma's projector returns the image
    # features the model returns as well (``image_hidden_states``): an output head, left alone
    **{
        f: {"model.vision_tower.embeddings.patch_embedding"}
        for f in ("llava", "gemma3_vlm", "paligemma", "llava_next", "llava_onevision")
    },
    **{
        f: {"model.visual.patch_embed.proj", "model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}
        for f in ("qwen2_vl", "qwen2_5_vl")
    },
    **{
        f: {"model.vision_model.embeddings.patch_embedding", "model.connector.modality_projection.proj"}
        for f in ("idefics3", "smolvlm")
    },
    # Qwen3-VL's mergers (the last layer's and its deepstack layer's), Mistral 3's merger of 2x2 patches (from 4x)
    **{
        f: {"model.visual.patch_embed.proj"}
        | {f"model.visual.{m}.linear_fc{i}" for m in ("merger", "deepstack_merger_list.0") for i in (1, 2)}
        for f in ("qwen3_vl", "qwen3_vl_moe")
    },
    "mistral3": {"model.vision_tower.patch_conv", "model.multi_modal_projector.patch_merger.merging_layer"},
    "pixtral": {"model.vision_tower.patch_conv"},  # (its projector, as LLaVA's: an MLP block)
    # InternVL's projector from its pixel shuffle's 4x (its second layer returns the image features: an output head)
    "internvl": {"model.vision_tower.embeddings.patch_embeddings.projection", "model.multi_modal_projector.linear_1"},
    # Llama 4's patch embedding (unfolded patches into a Linear), its pixel shuffle's MLP (its projector's only
    # layer returns the image features: an output head)
    "llama4_vlm": {"vision_model.patch_embedding.linear"} | {f"vision_model.vision_adapter.mlp.fc{i}" for i in (1, 2)},
    # GLM-4.1V's merger (a projection, then a gated MLP) after its 2x2 patches' downsampling convolution
    "glm4v": {f"model.visual.{m}" for m in ("patch_embed.proj", "downsample")}
    | {f"model.visual.merger.{p}" for p in ("proj", "gate_proj", "up_proj", "down_proj")},
    # Aya Vision's projector from its pixel shuffle's 4x (a SwiGLU of one fused layer: rows)
    "aya_vision": {"model.vision_tower.embeddings.patch_embedding"}
    | {f"model.multi_modal_projector.linear_{i}" for i in (1, 2)},
    # Ovis2's visual tokenizer: its 2x2 patches' logits over a visual vocabulary (normalised together, each row apart)
    "ovis2": {f"model.vision_tower.{m}" for m in ("transformer.embeddings.patch_embedding", "head_linear")},
    # VipLLaVA's projector from its two layers' features (2x the width: rows; its second layer returns the image
    # features: an output head)
    "vipllava": {"model.vision_tower.embeddings.patch_embedding", "model.multi_modal_projector.linear_1"},
    # BLIP-2's projection of the Q-Former's query outputs into the language model
    "blip_2": {"vision_model.embeddings.patch_embedding", "language_projection"},
    # Qwen2-Audio's convolutions (as Whisper's) and its projector of the audio frames into the language model
    "qwen2_audio": {"model.audio_tower.conv1", "model.audio_tower.conv2", "model.multi_modal_projector.linear"},
    # Mllama's projector of its tower's last and intermediate layers' features (2x the width) into the states its
    # cross-attention reads
    "mllama": {"model.vision_model.patch_embedding", "model.multi_modal_projector"},
    # Gemma 3n's alternating-updates coefficients and router, per-layer inputs' gates and projections, and the
    # projections into and out of its parallel streams (called one by one: no block)
    "gemma3n": {
        f"model.layers.{i}.{m}"
        for i in range(3)
        for m in (
            "altup.correction_coefs",
            "altup.prediction_coefs",
            "altup.modality_router",
            "per_layer_input_gate",
            "per_layer_projection",
        )
    }  # fmt: skip
    | {"model.per_layer_model_projection"}
    | {f"model.altup_{p}projections.{i}" for p in ("", "unembed_") for i in range(3)},
    # MobileViT's convolutions (its depthwise ones, grouped, left alone), around the transformers of its last stages
    "mobilevit": {
        f"mobilevit.{m}.convolution"
        for m in (
            "conv_stem",
            "conv_1x1_exp",
            *(f"encoder.layer.{i}.layer.{j}.{c}" for i, n in ((0, 1), (1, 3)) for j in range(n) for c in _INVERTED),
            *(f"encoder.layer.{i}.downsampling_layer.{c}" for i in (2, 3, 4) for c in _INVERTED),
            *(
                f"encoder.layer.{i}.{c}"
                for i in (2, 3, 4)
                for c in ("conv_kxk", "conv_1x1", "conv_projection", "fusion")
            ),
        )
    },
    # EfficientNet's and RegNet's convolutions, their squeeze-and-excitation's among them (their depthwise and grouped
    # ones left alone)
    "efficientnet": {"efficientnet.embeddings.convolution", "efficientnet.encoder.top_conv"}
    | {f"efficientnet.encoder.blocks.{i}.squeeze_excite.{c}" for i in (0, 1) for c in ("reduce", "expand")}
    | {f"efficientnet.encoder.blocks.{i}.projection.project_conv" for i in (0, 1)}
    | {"efficientnet.encoder.blocks.1.expansion.expand_conv"},
    "regnet": {"regnet.embedder.embedder.convolution"}
    | {
        f"regnet.encoder.stages.{s}.layers.0.{m}"
        for s in (0, 1)
        for m in (
            "shortcut.convolution",
            "layer.0.convolution",
            "layer.2.attention.0",
            "layer.2.attention.2",
            "layer.3.convolution",
        )
    },
    "mamba": {f"backbone.layers.0.mixer.{p}_proj" for p in ("in", "x", "dt", "out")},
    "jamba": {f"model.layers.0.mamba.{p}_proj" for p in ("in", "x", "dt", "out")},
    "falcon_mamba": {f"backbone.layers.0.mixer.{p}_proj" for p in ("in", "x", "dt", "out")},
    # JetMoE: its attention's key/value projection, the one Linear outside its experts and routers (their 3-D
    # weights are no block egg_optim recognises; the routers are left alone)
    "jetmoe": {"model.layers.0.self_attention.kv_proj"},
    # LFM2's gated short convolution (in_proj's B, C and x chunks, a depthwise convolution, out_proj): no block
    # egg_optim recognises, its Linears managed as rows (as Mamba's mixers'), its convolution left alone
    "lfm2": {f"model.layers.0.conv.{p}_proj" for p in ("in", "out")},
    # Zamba2: each hybrid layer's projection of the shared block's output (its shared transformer block, weights
    # tied across layers, and that block's adapters are left alone: tied weights cannot have roles)
    "zamba2": {f"model.layers.{i}.linear" for i in (0, 1)},
}
# layers whose weight the model computes with without calling them (Mamba-1 mixers' dt_proj): output mode's default
# plan leaves them alone (found on the model's dummy inputs), weight mode manages them
# (Gemma 3n's correction coefficients, read clamped in training only: seen by the probe's training-mode pass)
READ_DIRECTLY = {
    "mamba": {"backbone.layers.0.mixer.dt_proj"},
    "jamba": {"model.layers.0.mamba.dt_proj"},
    "falcon_mamba": {"backbone.layers.0.mixer.dt_proj"},
    "gemma3n": {f"model.layers.{i}.altup.correction_coefs" for i in range(3)},
}
# blocks whose units differ by more than their slices: a clone computes with its own value (kind: why)
OWN_PER_UNIT_VALUES = {
    "bloom": ("attention", "ALiBi slopes"),
    "mpt": ("attention", "ALiBi slopes"),
    "beit": ("attention", "a relative position bias per head, held by the layer and handed to the attention"),
    # each layer's LoRA adapter adds its own rows to the shared MLP's gate/up (rows of another Linear, no slice of
    # the block: said as inexact where such a block is managed; here its weights are tied, left alone)
    "zamba2": ("mlp", "per-layer LoRA adapters on its gate/up rows"),
}
PLAN = RolePlan(0.4, 0.1)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def _optimizer(model, mode: str) -> LeaderCloneOptimizer:
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return LeaderCloneOptimizer(model, base, PLAN, clone_mode=mode, seed=1, assign="round_robin")


def _step(model, opt, batch) -> None:
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_election_scores_saved_between_elections_resume(family):
    """A checkpoint between two elections holds each block's running score; it resumes onto blocks whose module
    has no ``weight`` (fused experts) as onto any other."""

    def optimizer(model):
        base = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return LeaderCloneOptimizer(model, base, PLAN, election="grad_norm", elect_every=5)

    model = tiny.make(family)
    opt = optimizer(model)
    _step(model, opt, tiny.inputs(family))
    resumed = optimizer(tiny.make(family, seed=1))
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    books = opt.controller.book.layers
    assert any("experts" in n for n in books)
    for name, lb in books.items():
        got = resumed.controller.book.layers[name]
        assert lb.score_count == got.score_count == 1 and torch.equal(lb.score_sum, got.score_sum), name


@pytest.mark.parametrize("mode", ["weight", "output"])
@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_family_trains_saves_and_resumes(family, mode):
    model = tiny.make(family)
    opt = _optimizer(model, mode)
    cov = opt.coverage()
    assert set(cov.not_decomposed) == NOT_DECOMPOSED.get(family, set())
    rows = ROWS.get(family, set()) - (READ_DIRECTLY.get(family, set()) if mode == "output" else set())
    assert set(cov.managed_blocks.values()) == KINDS[family] and set(cov.row_layers) == rows
    if mode == "output":
        for layer in READ_DIRECTLY.get(family, ()):
            assert "without calling it" in cov.left_alone[layer]
    assert cov.by_structure == ()  # every block was checked by dataflow on the model's dummy inputs
    first, second = tiny.inputs(family, length=15), tiny.inputs(family, length=8, seed=1)  # odd and even lengths
    model.train()
    _step(model, opt, first)
    if mode == "output":  # every block with clones was checked, the way it computes decided
        assert set(opt.coverage().modes.values()) <= {"shrink", "expand"}
    probe = tiny.inputs(family, length=11, seed=9, labels=False)
    model.eval()
    with torch.no_grad():
        want = tiny.logits(model(**probe))
    saved_model, saved_opt = model.state_dict(), copy.deepcopy(opt.state_dict())  # as written to disk

    plain = tiny.make(family, seed=1)  # a fresh plain instance, other weights
    plain.load_state_dict(saved_model)
    assert not any(type(m).__module__.startswith("egg_optim") for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(tiny.logits(plain.eval()(**probe)), want, rtol=1e-5, atol=1e-5)

    # resume: the plain instance and a new optimizer over it take the step the live run takes
    resumed = _optimizer(plain, mode)
    resumed.load_state_dict(saved_opt)
    for m, o in ((model, opt), (plain, resumed)):
        m.train()
        torch.manual_seed(3)  # the same dropout masks and router noise
        _step(m, o, second)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_docs_table_is_what_coverage_reports():
    """``docs/architectures.md`` is generated by ``scripts/architectures_table.py`` from ``opt.coverage()``; each
    family's row there is the row the script builds now."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("table", DOCS.parents[1] / "scripts" / "architectures_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    text = DOCS.read_text()
    if not re.search(rf"transformers\s+{re.escape(transformers.__version__)};", text):
        # which blocks compute only their active heads is found per transformers version (its attention code)
        pytest.skip(f"docs/architectures.md describes another transformers version than {transformers.__version__}")
    for family in sorted(tiny.FAMILIES):
        assert table.row(family) in text, family


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_units_are_found_by_dataflow(family):
    """Each unit's slices partition their tensors, and the units are what the model computes: changing one unit's
    producer slices (its q/k/v rows, whatever the fused layout, and its column of a per-head bias; its up/gate
    rows) changes only that unit's inputs of the block's consumer (output or down projection)."""
    from egg_optim.core.blocks import discover
    from egg_optim.core.probe import fresh_inputs as _fresh

    model = tiny.make(family).eval()
    found = discover(model)
    # the library checked the same on the model's dummy inputs when it found them (experts by ablation)
    assert all(g.probed for g in found.groups.values()), family
    if family == "gpt_oss":  # its experts interleave gate and up; the gate/up bias and the attention sinks are owned
        assert all(g.layout.endswith("gate/up interleaved") for g in found.groups.values() if g.kind == "experts")
        assert {s.param.rpartition(".")[2] for g in found.groups.values() for s in g.slices} >= {"gate_up_proj_bias",
                                                                                                 "sinks"}  # fmt: skip
    # (by every name: a block of tied weights names them by its own path, Zamba2's shared blocks)
    params, modules = dict(model.named_parameters(remove_duplicate=False)), dict(model.named_modules())
    for g in found.groups.values():
        for s in g.slices:
            size = params[s.param].shape[s.dim] if isinstance(s.dim, int) else s.index.numel()
            assert torch.equal(torch.sort(s.index.flatten()).values, torch.arange(size)), s.param
    blocks = [g for g in found.groups.values() if g.kind != "experts" and g.name in modules][:2]
    calls, seen = {}, []
    hooks = [modules[g.name].register_forward_pre_hook(
        lambda m, a, k, n=g.name: calls.setdefault(n, (a, k)) and None, with_kwargs=True) for g in blocks]  # fmt: skip
    with torch.no_grad():
        model(**tiny.inputs(family, length=6, labels=False))
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(0)
    for g in blocks:
        consumer = modules[g.consumer]
        hook = consumer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()) and None)
        cols = next(s.index for s in g.slices if s.role == "consumer")
        args, kwargs = calls[g.name]
        with torch.no_grad():
            modules[g.name].forward(*_fresh(args), **_fresh(kwargs))
            base = seen[-1]
            for unit in sorted({0, g.num_units - 1}):
                saved = {}
                for s in g.slices:
                    if s.role == "producer":
                        p = params[s.param]
                        saved[s.param] = p.detach().clone()
                        noise = torch.randn(p.shape, generator=gen) * (1 + p.abs().mean())
                        p.index_add_(s.dim, s.index[unit], noise.index_select(s.dim, s.index[unit]))
                modules[g.name].forward(*_fresh(args), **_fresh(kwargs))
                for name, value in saved.items():
                    params[name].copy_(value)
                changed = ((seen[-1] - base).abs() > 1e-6).flatten(0, -2).any(0).nonzero().flatten()
                assert changed.numel() and set(changed.tolist()) <= set(cols[unit].tolist()), (g.name, unit)
            # a clone is its source: with the last unit's producer slices copied from the first's, the last unit's
            # inputs of the consumer are the first's (every per-unit value of the block is among the slices)
            if OWN_PER_UNIT_VALUES.get(family, ("",))[0] == g.kind:
                continue
            saved = [(p, p.detach().clone()) for p in modules[g.name].parameters()]
            for p, _ in saved:  # no per-unit value of the block may be equal across units by its initialisation
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            for s in g.slices:
                if s.role == "producer":
                    p = params[s.param]
                    p.index_copy_(s.dim, s.index[-1], p.index_select(s.dim, s.index[0]))
            modules[g.name].forward(*_fresh(args), **_fresh(kwargs))
            for p, value in saved:
                p.copy_(value)
            torch.testing.assert_close(seen[-1][..., cols[-1]], seen[-1][..., cols[0]], msg=g.name)
        hook.remove()


VLMS = sorted(f for f, (_, kind) in tiny.FAMILIES.items() if kind.startswith("vlm"))


@pytest.mark.parametrize("family", VLMS)
def test_vision_language_dummy_inputs_run_the_vision_tower_with_the_language_model(family):
    """A model that places image features among its token ids gets dummy images, and as many image tokens per
    sequence as the model makes of one (the tiny families' IMAGE_TOKENS: counted on ``get_image_features``); the
    probe's forward pass runs its vision tower with its language model, so every block, the vision tower's too, is
    checked by dataflow (its attention decomposed by its own config's heads, not the text config's key/value
    heads); the model is left as it was (parameters, modes, state a forward pass keeps: Qwen2-VL's
    ``rope_deltas``)."""
    from egg_optim.core.blocks import discover
    from egg_optim.core.probe import _dummy_inputs

    model = tiny.make(family).train()
    dummy = _dummy_inputs(model)
    ids = dummy["input_ids"]
    assert (ids == tiny.IMAGE_TOKEN).sum(1).tolist() == [tiny.IMAGE_TOKENS] * len(ids)
    pixels = {k: v for k, v in dummy.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
    with torch.no_grad():
        features = model.eval().get_image_features(**pixels).pooler_output
    assert sum(f.shape[:-1].numel() for f in features) == (ids == tiny.IMAGE_TOKEN).sum()
    model.train()
    before = copy.deepcopy(model.state_dict())
    found = discover(model)
    vision = [n for n in found.groups if not n.removeprefix("model.").startswith(("language_model", "text_model"))]
    assert vision and all(g.probed for g in found.groups.values()), family
    # a unit per head of the vision tower (its config's 4 heads), per key/value group of the language model (its 2)
    heads = {n: g.num_units for n, g in found.groups.items() if g.kind == "attention"}
    assert {u for n, u in heads.items() if n in vision} == {tiny.HEADS} and set(heads.values()) == {tiny.HEADS, 2}
    assert all(m.training for m in model.modules())
    assert getattr(getattr(model, "model", model), "rope_deltas", None) is None
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_audio_placed_among_the_tokens_runs_the_audio_tower_with_the_language_model():
    """A model that places its audio tower's frames among its token ids (Qwen2-Audio: ``input_features``, an audio
    token id) gets a dummy spectrogram of the length its audio encoder takes and as many audio tokens as the tower
    makes frames of it: the probe's pass runs the audio tower with the language model, so every block is checked by
    dataflow; the model is left as it was."""
    from egg_optim.core.probe import _dummy_inputs

    model = tiny.make("qwen2_audio").train()
    dummy = _dummy_inputs(model)
    audio = model.config.audio_config
    assert dummy["input_features"].shape == (1, audio.num_mel_bins, 2 * audio.max_source_positions)
    assert dummy["feature_attention_mask"].shape == (1, 2 * audio.max_source_positions)
    assert (dummy["input_ids"] == model.config.audio_token_id).sum(1).tolist() == [tiny.AUDIO_TOKENS]
    _probed_and_unchanged(model, {"model.audio_tower.layers.0.self_attn", "model.language_model.layers.0.mlp"})


def test_images_read_by_cross_attention_run_the_vision_tower_and_the_cross_attention_layers():
    """A model whose language model reads the images by cross-attention, in tiles (Mllama: ``cross_attention_mask``,
    ``aspect_ratio_ids``), gets a dummy image per sequence in the vision config's tiles, its one image token first,
    and a cross-attention mask by which every token reads it: the probe's pass runs the vision tower and the
    cross-attention layers (which a text-only pass skips), so every block is checked by dataflow; the model is left
    as it was."""
    from egg_optim.core.probe import _dummy_inputs

    model = tiny.make("mllama").train()
    dummy = _dummy_inputs(model)
    tiles = model.config.vision_config.max_num_tiles
    assert dummy["pixel_values"].shape[:3] == (1, 1, tiles) and dummy["aspect_ratio_ids"].tolist() == [[1]]
    assert dummy["cross_attention_mask"].shape == (*dummy["input_ids"].shape, 1, tiles)
    assert (dummy["input_ids"] == tiny.IMAGE_TOKEN).sum(1).tolist() == [1]
    _probed_and_unchanged(
        model,
        {
            "model.vision_model.transformer.layers.0.self_attn",
            "model.vision_model.global_transformer.layers.0.mlp",
            "model.language_model.layers.1.cross_attn",
        },
    )


def _probed_and_unchanged(model: torch.nn.Module, blocks: set[str]) -> None:
    """Every block of ``model`` (``blocks`` among them) checked by dataflow, and the model left as it was: its
    values and its modules' training flags."""
    from egg_optim.core.blocks import discover

    before = copy.deepcopy(model.state_dict())
    found = discover(model)
    assert all(g.probed for g in found.groups.values())  # checked by dataflow, the towers' blocks too
    assert set(found.groups) >= blocks
    assert all(m.training for m in model.modules())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_no_token_id_a_config_names_stands_in_for_text():
    """The probe's stand-in for image-token ids in the text is an id no config names: single ids and lists of them
    (Ovis2's visual indicator ids)."""
    import types

    from egg_optim.core.probe import _special_ids

    cfg = types.SimpleNamespace(image_token_id=5, pad_token_id=0, visual_indicator_token_ids=[7, 8], eos_token_id=None)
    assert _special_ids([cfg]) == {0, 5, 7, 8}


def test_a_vision_language_model_that_rejects_the_dummy_images_is_probed_on_text_alone():
    """Where the model does not run on the dummy images (here: LLaVA with no ``get_image_features`` to count on and a
    config that says a wrong number of image tokens), the probe runs on the token ids alone: the language model's
    blocks are checked by dataflow, the vision tower's by structure (said by coverage and a warning)."""
    import warnings

    from egg_optim.core.blocks import discover

    model = tiny.make("llava")
    model.get_image_features = None  # the count is the config's
    model.config.image_seq_length = tiny.IMAGE_TOKENS - 1
    found = discover(model)
    unchecked = {n for n, g in found.groups.items() if not g.probed}
    assert unchecked == {n for n in found.groups if not n.startswith("model.language_model")} != set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cov = _optimizer(model, "weight").coverage()
    assert set(cov.by_structure) == unchecked
    assert any("decomposed into units by their structure alone" in str(w.message) for w in caught)


def test_routers_and_grouped_convolutions_are_left_alone_unless_named():
    """A default plan gives no roles to a router (a Linear with one output per expert beside the experts: Phi-MoE's
    subclasses nn.Linear, which output mode could not rewrite; or one whose scores pick experts by top-k) nor to a
    grouped convolution (ConvBERT's depthwise convolution), and says why; a plan naming the router manages it, one
    naming the convolution is refused."""
    from egg_optim.errors import PlanError

    moe = tiny.make("phimoe")
    left = _optimizer(moe, "output").coverage().left_alone
    assert "router of 'model.layers.0.mlp.experts'" in left["model.layers.0.mlp.router"]
    # DBRX's experts are 2-D fused parameters no structure shows: its router is found by dataflow (its scores,
    # through a softmax, pick the experts by top-k)
    left = _optimizer(tiny.make("dbrx"), "output").coverage().left_alone
    assert "router of 'transformer.blocks.0.ffn'" in left["transformer.blocks.0.ffn.router.layer"]
    named = LeaderCloneOptimizer(moe, torch.optim.AdamW(moe.parameters()), RolePlan(0.5, 0.0, layers=["*router"]))
    assert named.coverage().row_layers == ("model.layers.0.mlp.router",)

    cfg = transformers.ConvBertConfig(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4, embedding_size=32)  # fmt: skip
    convbert = transformers.ConvBertForMaskedLM(cfg)
    conv = "convbert.encoder.layer.0.attention.self.key_conv_attn_layer.depthwise"
    assert "grouped convolution (groups=" in _optimizer(convbert, "weight").coverage().left_alone[conv]
    with pytest.raises(PlanError, match="grouped convolutions"):
        LeaderCloneOptimizer(convbert, torch.optim.AdamW(convbert.parameters()), RolePlan(0.5, 0.0, layers=[conv]))


def test_a_model_whose_units_all_mix_is_refused_naming_why():
    """BitNet normalises its attention output over every head and its MLP's hidden width over every neuron (one
    statistic each, parameters of the width of the hidden states: nothing structural shows it): the dataflow probe
    leaves both blocks alone, so a default plan has nothing to manage and says why."""
    from egg_optim.errors import PlanError

    cfg = transformers.BitNetConfig(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(cfg)
    with pytest.raises(PlanError, match="left alone by default.*not computed apart"):
        _optimizer(model, "output")


@pytest.mark.parametrize("mode", ["weight", "output"])
def test_a_model_without_a_head_has_every_block_managed(mode):
    """A base model (``LlamaModel``: no task head) ends with a block, whose units feed the residual stream, not the
    output: a default plan leaves no "output head" alone there, and trains (the first forward pass finds no managed
    layer producing the model's output)."""
    causal = tiny.make("llama")
    model = causal.model  # LlamaModel, the base model of the tiny causal LM
    opt = _optimizer(model, mode)
    cov = opt.coverage()
    assert set(cov.managed_blocks) == {"layers.0.self_attn", "layers.0.mlp"}
    assert not any("output head" in why for why in cov.left_alone.values())
    before = model.layers[0].mlp.down_proj.weight.detach().clone()
    model(**tiny.inputs("llama", labels=False)).last_hidden_state.pow(2).mean().backward()
    opt.step()
    assert not torch.equal(model.layers[0].mlp.down_proj.weight, before)


def test_a_default_plan_that_misses_most_of_a_model_says_so():
    """JetMoE keeps its experts in two modules of one 3-D weight each (no block egg_optim recognises) and routes its
    attention through experts too: a default plan finds little to manage (its routers left alone) and warns with
    the share, where a model whose blocks are found does not."""
    import warnings

    cfg = transformers.JetMoeConfig(vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=1, num_key_value_heads=2,
                                    kv_channels=8, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                    pad_token_id=0)  # fmt: skip
    for model, low in ((transformers.JetMoeForCausalLM(cfg), True), (tiny.make("llama"), False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = _optimizer(model, "weight")
        said = [str(w.message) for w in caught if "a default plan gives roles to only" in str(w.message)]
        assert bool(said) == low == (opt.coverage().share < 1 / 3), (type(model).__name__, said)


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2_lite"])
def test_latent_attention_units_are_heads_beside_shared_down_projections(family):
    """Multi-head latent attention (MLA) is one unit per head: its query (or query up) rows, its key/value up rows
    and its output columns. The down projections into the latents compute for every head: members of the block that
    no unit owns, neither rows of a default plan nor rewritten in output mode."""
    from egg_optim.core.blocks import discover

    model = tiny.make(family)
    rows = _optimizer(model, "output").coverage().row_layers
    cfg, modules = model.config, dict(model.named_modules())
    heads, qk = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attention = [g for g in discover(model).groups.values() if g.kind == "attention"]
    assert len(attention) == cfg.num_hidden_layers  # every layer's attention is decomposed
    for g in attention:
        assert g.num_units == heads and g.heads_per_unit == 1, g.name
        down = {f"{g.name}.kv_a_proj_with_mqa", *([f"{g.name}.q_a_proj"] if cfg.q_lora_rank else [])}
        assert set(g.shared) == down and not down & {s.module for s in g.slices} and not down & set(rows)
        assert not any(type(modules[m]).__module__.startswith("egg_optim") for m in down)
        q = "q_b_proj" if cfg.q_lora_rank else "q_proj"
        v = cfg.v_head_dim
        want = {q: (heads, qk), "kv_b_proj": (heads, cfg.qk_nope_head_dim + v), "o_proj": (heads, v)}
        assert {s.module.rpartition(".")[2]: tuple(s.index.shape) for s in g.slices} == want, g.name


def test_clones_that_cannot_be_exact_are_said():
    """BLOOM's heads differ by their ALiBi slopes, which are no parameter: a clone head computes with its own slope.
    The probe sees it (the first unit's slices copied into the last unit's place give other inputs of the output
    projection) and construction says so; where every per-head value is a slice (Llama), nothing is said."""
    import warnings

    for family, inexact in (("bloom", {"transformer.h.0.self_attention"}), ("llama", set())):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cov = _optimizer(tiny.make(family), "output").coverage()
        assert set(cov.inexact) == inexact, family
        assert any("Clones there are approximate" in str(w.message) for w in caught) == bool(inexact), family


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "qwen3_next", "olmo_hybrid"])
def test_linear_attention_units_are_key_heads_with_their_value_heads(family):
    """The gated delta net (the linear attention of Qwen3.5, Qwen3-Next, OLMo hybrid: fused [q | k | v], fused per
    key head with the output gate, separate projections): a unit is one key head with the value heads that read
    it: its rows of every input projection, its channels of the depthwise convolution, its value heads' A_log and
    dt_bias, its output columns; checked by dataflow. Output mode computes only the active key heads ("shrink":
    the block's width attributes set to theirs for the forward pass, the convolution, whose weight the block reads
    without calling it, on their channels); the self-check confirms it (it fails otherwise). Where the output
    projection and the gate cannot be told apart by their shapes (value width == hidden size), the block is left
    alone, saying so."""
    from egg_optim.core.blocks import discover

    model = tiny.make(family)
    cfg = model.config
    hk, hv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)  # fmt: skip
    g = discover(model).groups["model.layers.0.linear_attn"]
    assert g.probed and g.num_units == hk and g.heads_per_unit == hv // hk
    shapes = {s.param.rpartition("linear_attn.")[2]: tuple(s.index.shape) for s in g.slices}
    per_value_heads = (hk, hv // hk)
    out = next(s.param for s in g.slices if s.role == "consumer").rpartition("linear_attn.")[2]  # out_proj, o_proj
    assert shapes["conv1d.weight"] == (hk, 2 * dk + hv // hk * dv) and shapes[out] == (hk, hv // hk * dv)
    assert shapes["A_log"] == shapes["dt_bias"] == per_value_heads
    opt = _optimizer(model, "output")
    _step(model, opt, tiny.inputs(family))
    assert opt.coverage().modes["model.layers.0.linear_attn"] == "shrink"
    assert g.sizes and all(getattr(model.get_submodule(g.name), k) == n * hk for k, n in g.sizes.items())

    if family == "qwen3_5":
        same = transformers.Qwen3_5TextConfig(**{**cfg.to_dict(), "linear_value_head_dim": cfg.hidden_size // hv})
        cov = _optimizer(transformers.Qwen3_5ForCausalLM(same), "weight").coverage()
        assert "cannot be told from its input projections" in cov.not_decomposed["model.layers.0.linear_attn"]


def test_delta_attention_units_are_heads_beside_shared_gate_projections():
    """Kimi Delta Attention (Kimi-Linear's linear attention): a unit is one head, its q, k, v, beta and gate-up rows,
    its convolution channels, its entries of the forget gate's dt_bias (one per channel) and A_log (one per head,
    along dim 2 of a 4-D parameter) and its output columns; the gates' down projections are shared by every head.
    Output mode computes only the active heads, the self-check confirming it."""
    from egg_optim.core.blocks import discover

    model = tiny.make("kimi_linear")
    heads, d = model.config.linear_num_heads, model.config.linear_head_dim
    g = discover(model).groups["model.layers.0.self_attn"]
    assert g.probed and g.num_units == heads and set(g.sizes) == {"num_heads", "qkv_dim", "conv_dim"}
    assert {n.rpartition("self_attn.")[2] for n in g.shared} == {"g_a_proj", "forget_gate.f_a_proj"}
    shapes = {s.param.rpartition("self_attn.")[2]: (s.dim, tuple(s.index.shape)) for s in g.slices}
    assert shapes["conv1d.weight"] == (0, (heads, 3 * d)) and shapes["forget_gate.A_log"] == (2, (heads, 1))
    assert shapes["forget_gate.dt_bias"] == (0, (heads, d)) and shapes["o_proj.weight"] == (1, (heads, d))
    opt = _optimizer(model, "output")
    _step(model, opt, tiny.inputs("kimi_linear"))
    assert opt.coverage().modes["model.layers.0.self_attn"] == "shrink"


def test_bailing_hybrid_gated_latent_attention_and_delta_attention_with_full_rank_gates():
    """Bailing hybrid: its latent attention gates each head's output (``g_proj``, one value per head: rows per head
    beside the latent up projections), its linear attention has full-rank forget and output gates (rows per head
    like q, k, v). Both are decomposed, checked by dataflow, and train in both modes with the saved model computing
    what the live one does."""
    if not hasattr(transformers, "BailingHybridConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Bailing hybrid")
    from egg_optim.core.blocks import discover

    cfg = transformers.BailingHybridConfig(
        vocab_size=tiny.VOCAB, pad_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=48,
        moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, num_local_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, head_dim=8, layer_group_size=2, num_mtp_layers=0, linear_head_dim=16,
        layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    found = discover(transformers.BailingHybridForCausalLM(cfg))
    latent, delta = found.groups["model.layers.1.self_attn"], found.groups["model.layers.0.self_attn"]
    assert latent.probed and delta.probed and not found.skipped
    assert {s.module.rpartition(".")[2]: tuple(s.index.shape) for s in latent.slices}["g_proj"] == (4, 1)
    gates = {s.module.rpartition("self_attn.")[2] for s in delta.slices}
    assert {"g_proj", "forget_gate.f_proj", "forget_gate"} <= gates and not delta.shared
    batch = tiny.inputs("llama")
    for mode in ("weight", "output"):
        torch.manual_seed(0)
        model = transformers.BailingHybridForCausalLM(cfg)
        opt = _optimizer(model, mode)
        _step(model, opt, batch)
        model.eval()
        with torch.no_grad():
            want = model(input_ids=batch["input_ids"]).logits
        plain = transformers.BailingHybridForCausalLM(cfg)
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(input_ids=batch["input_ids"]).logits, want, rtol=1e-5, atol=1e-5)


def _index_ops(family: str, mode: str | None) -> tuple[LeaderCloneOptimizer | None, dict[str, int]]:
    """Parameter-sized index ops of one steady-state step (after one step), by op: the bare model with AdamW
    (``mode=None``) or under the default plan with packed first roles."""
    from egg_optim.utils import DispatchCounter

    torch.manual_seed(0)
    model = tiny.make(family)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = None if mode is None else LeaderCloneOptimizer(model, base, "mild", clone_mode=mode)
    step = base if opt is None else opt
    batch = tiny.inputs(family, batch=3, seed=0)  # (batch 2 makes BERT's pooler output [2, 32] look like a parameter)
    for counted in (False, True):
        with DispatchCounter(model, step) if counted else contextlib.nullcontext() as counter:
            model(**batch).loss.backward()
            step.step()
            step.zero_grad()
    return opt, dict(counter.param_index_ops)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_a_packed_step_adds_no_index_op_over_parameters_to_the_bare_step(family):
    """Issue 19 item 2 across every family: with the default (packed) first roles a training step of either mode
    dispatches no index op (gather, scatter, index_select, index_add, index_copy ...) over a parameter, its
    gradient or its state beyond those the bare model's own code dispatches (GPT-OSS's experts kernel, Swin's
    relative position lookup): per-head tables and sinks, the delta net's convolution and per-head vectors, fused
    layouts and experts are all cut and copied by views."""
    _, bare = _index_ops(family, None)
    for mode in ("output", "weight"):
        opt, ops = _index_ops(family, mode)
        assert any(r.has_clones for r in opt.roles.values()), (family, mode)
        extra = {op: n - bare.get(op, 0) for op, n in ops.items() if n > bare.get(op, 0)}
        assert not extra, (mode, extra, bare)


# blocks with slices in modules other than their projections: T5's relative attention bias and Swin's relative
# position table (per head, at full width), Swin V2's logit scales, GPT-OSS's sinks, the gated delta net's
# convolution and per-head vectors
TIED = ["t5", "swin", "swinv2", "gpt_oss", "qwen3_next", "kimi_linear"]


@pytest.mark.parametrize("family", TIED)
def test_tied_slices_taken_by_views_train_as_the_gather_path_does(family, monkeypatch):
    """The views of a block's tied slices (:attr:`_TiedMember._egg_views` / ``_egg_copies``) compute what the
    index path computes: three output-mode steps with packed roles, then the same with every role made to look
    scattered (spans, cycles and runs patched away): the same weights, to summation order."""
    from egg_optim.core import axes
    from egg_optim.core.roles import Roles

    def train():
        torch.manual_seed(0)
        model = tiny.make(family)
        # SGD: Adam would blow the summation order's rounding in gradients that are noise (a key bias's) up to lr
        opt = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mild", clone_mode="output",
                                   assign="round_robin")  # fmt: skip
        for seed in range(3):
            _step(model, opt, tiny.inputs(family, batch=3, seed=seed))
        viewed = [m for m in model.modules() if getattr(m, "_egg_views", None) or getattr(m, "_egg_copies", None)]
        return model, viewed

    fast, viewed = train()
    assert viewed, "no tied slice was taken by views"
    for name in ("active_span", "clone_span", "source_cycle"):
        monkeypatch.setattr(Roles, name, property(lambda self: None))
    monkeypatch.setattr(axes, "part_runs", lambda *a, **k: None)
    slow, viewed = train()
    assert not viewed
    for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("family", ["mamba2", "nemotron_h"])
def test_mamba2_mixers_compute_their_active_groups_and_decode_as_the_saved_model(family):
    """A Mamba-2 mixer's unit is a group of heads (sharing B and C, normalised apart): output mode computes the
    active groups only (its head, group and width attributes set to theirs), and generating from its caches, which
    transformers allocates at the full widths, gives the tokens and logits of the plain model it saves."""
    torch.manual_seed(0)
    model = tiny.make(family)
    opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), RolePlan(0.5),
                               clone_mode="output")  # fmt: skip
    mixers = [n for n, g in opt.block_output.groups.items() if g.layout.startswith("Mamba-2")]
    assert mixers and all(opt.block_output.groups[n].num_units >= 2 for n in mixers)
    for seed in range(2):
        _step(model, opt, tiny.inputs(family, seed=seed))
    assert all(opt.block_output.modes[n] == "shrink" and opt.block_output.resized(n) for n in mixers)
    model.eval()
    plain = tiny.make(family).eval()
    plain.load_state_dict(model.state_dict())
    ids = tiny.inputs(family, seed=5)["input_ids"][:, :6]
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        want = plain.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-5)


def test_a_position_bias_mlp_and_logit_scales_go_with_their_heads():
    """Swin V2's attention computes its position bias by an MLP from relative coordinates (one output per head) and
    scales each head's cosine scores by its own logit scale (a parameter ``[heads, 1, 1]``): a unit is a head with
    its row of the MLP's last layer and its logit scale; the MLP's first layer computes for every head (shared: no
    unit's, no rows). Clones compute what their sources do (none said approximate), and output mode shrinks."""
    from egg_optim.core.blocks import discover

    model = tiny.make("swinv2")
    name = "swinv2.encoder.layers.0.blocks.0.attention"
    g = discover(model).groups[name]
    shapes = {s.param.rpartition(".self.")[2]: (s.dim, tuple(s.index.shape)) for s in g.slices}
    assert shapes["continuous_position_bias_mlp.2.weight"] == shapes["logit_scale"] == (0, (tiny.HEADS, 1))
    assert g.shared == [f"{name}.self.continuous_position_bias_mlp.0"]
    for mode in ("weight", "output"):
        model = tiny.make("swinv2")
        opt = _optimizer(model, mode)
        cov = opt.coverage()
        assert not cov.inexact and not any("position_bias" in n for n in cov.row_layers), mode
    _step(model, opt, tiny.inputs("swinv2"))
    assert opt.coverage().modes[name] == "shrink"
