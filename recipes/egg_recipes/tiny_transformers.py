"""Tiny random-init models of the transformers architectures egg_optim is tested on, and inputs for them.

One config per family (hidden size 32, four heads, two key/value heads where the family has grouped-query
attention, one layer where one shows everything, vocabulary 100): enough to exercise each family's attention, MLP
and expert code in milliseconds. Used by the coverage matrix test (``tests/test_hf_coverage.py``) and the table of
architectures (``scripts/architectures_table.py`` -> ``docs/architectures.md``). Needs ``transformers``; no
download.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

VOCAB, HIDDEN, INNER, HEADS = 100, 32, 48, 4


def _t():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _causal(config_cls: str, model_cls: str, **kw) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        t = _t()
        cfg = getattr(t, config_cls)(vocab_size=VOCAB, **kw)
        return getattr(t, model_cls)(cfg)

    return make


_GQA = {"hidden_size": HIDDEN, "intermediate_size": INNER, "num_hidden_layers": 1, "num_attention_heads": HEADS,
        "num_key_value_heads": 2}  # fmt: skip
_MOE = {**_GQA, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
_ENCODER = {"hidden_size": HIDDEN, "intermediate_size": INNER, "num_hidden_layers": 1, "num_attention_heads": HEADS}

# family -> (builder, kind of inputs: "causal", "classify", "image", "seq2seq"; below: "image_text", "spectrogram",
# "waveform", "vlm"...)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "llama": (_causal("LlamaConfig", "LlamaForCausalLM", **_GQA), "causal"),
    "mistral": (_causal("MistralConfig", "MistralForCausalLM", **_GQA), "causal"),
    "qwen2": (_causal("Qwen2Config", "Qwen2ForCausalLM", **_GQA), "causal"),
    "qwen3": (_causal("Qwen3Config", "Qwen3ForCausalLM", head_dim=8, **_GQA), "causal"),
    "gemma": (_causal("GemmaConfig", "GemmaForCausalLM", head_dim=8, **_GQA), "causal"),
    "gemma2": (
        _causal("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, **{**_GQA, "num_hidden_layers": 2}),
        "causal",
    ),
    "gemma3": (
        _causal("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, **{**_GQA, "num_hidden_layers": 2}),
        "causal",
    ),
    "gemma3n": (
        _causal(
            "Gemma3nTextConfig",
            "Gemma3nForCausalLM",
            head_dim=8,
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
            laurel_rank=8,
            num_kv_shared_layers=1,
            sliding_window=8,
            activation_sparsity_pattern=[0.0] * 3,
            layer_types=["sliding_attention", "full_attention"] * 1 + ["full_attention"],
            **{**_GQA, "num_hidden_layers": 3},
        ),
        "causal",
    ),  # fmt: skip
    "stablelm": (_causal("StableLmConfig", "StableLmForCausalLM", **_GQA), "causal"),
    "phi3": (_causal("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **_GQA), "causal"),
    "opt": (
        _causal(
            "OPTConfig",
            "OPTForCausalLM",
            hidden_size=HIDDEN,
            ffn_dim=INNER,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            word_embed_proj_dim=HIDDEN,
        ),
        "causal",
    ),
    "xglm": (
        _causal("XGLMConfig", "XGLMForCausalLM", d_model=HIDDEN, ffn_dim=INNER, num_layers=1, attention_heads=HEADS),
        "causal",
    ),
    "gpt2": (
        _causal("GPT2Config", "GPT2LMHeadModel", n_embd=HIDDEN, n_inner=INNER, n_layer=1, n_head=HEADS),
        "causal",
    ),
    "gpt_neo": (
        _causal(
            "GPTNeoConfig",
            "GPTNeoForCausalLM",
            hidden_size=HIDDEN,
            intermediate_size=INNER,
            num_layers=2,
            num_heads=HEADS,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
        ),
        "causal",
    ),
    "gpt_neox": (
        _causal(
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            hidden_size=HIDDEN,
            intermediate_size=INNER,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
        ),
        "causal",
    ),
    "falcon": (
        _causal(
            "FalconConfig",
            "FalconForCausalLM",
            hidden_size=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            ffn_hidden_size=INNER,
            new_decoder_architecture=True,  # Falcon-40B's grouped layout (Falcon-7B: one key/value head, one unit)
            num_kv_heads=2,
        ),
        "causal",
    ),
    "bloom": (_causal("BloomConfig", "BloomForCausalLM", hidden_size=HIDDEN, n_layer=1, n_head=HEADS), "causal"),
    "mixtral": (
        _causal(
            "MixtralConfig",
            "MixtralForCausalLM",
            num_local_experts=4,
            num_experts_per_tok=2,
            **{**_GQA, "intermediate_size": 16},
        ),
        "causal",
    ),
    "qwen2_moe": (
        _causal("Qwen2MoeConfig", "Qwen2MoeForCausalLM", shared_expert_intermediate_size=24, **_MOE),
        "causal",
    ),
    "qwen3_moe": (_causal("Qwen3MoeConfig", "Qwen3MoeForCausalLM", head_dim=8, **_MOE), "causal"),
    "bert": (_causal("BertConfig", "BertForSequenceClassification", **_ENCODER), "classify"),
    "roberta": (_causal("RobertaConfig", "RobertaForSequenceClassification", pad_token_id=0, **_ENCODER), "classify"),
    "distilbert": (
        _causal(
            "DistilBertConfig",
            "DistilBertForSequenceClassification",
            dim=HIDDEN,
            hidden_dim=INNER,
            n_layers=1,
            n_heads=HEADS,
        ),
        "classify",
    ),
    "bart": (
        _causal(
            "BartConfig",
            "BartForConditionalGeneration",
            d_model=HIDDEN,
            encoder_ffn_dim=INNER,
            decoder_ffn_dim=INNER,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS,
        ),
        "seq2seq",
    ),
    "t5": (
        _causal(
            "T5Config",
            "T5ForConditionalGeneration",
            d_model=HIDDEN,
            d_ff=INNER,
            d_kv=8,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=HEADS,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
        "seq2seq",
    ),
}
# T5 v1.1 / Flan-T5: the gated MLP (wi_0, wi_1, wo)
FAMILIES["t5_gated"] = (
    _causal("T5Config", "T5ForConditionalGeneration", d_model=HIDDEN, d_ff=INNER, d_kv=8, num_layers=1,
            num_decoder_layers=1, num_heads=HEADS, decoder_start_token_id=0, pad_token_id=0,
            feed_forward_proj="gated-gelu"),
    "seq2seq",
)  # fmt: skip


# more decoders, encoders and encoder-decoders (code models, MoE, multilingual variants); XLM-RoBERTa's classification
# model registers its classifier before its encoder (the output head is found outside the base model)
_ONE = {"n_embd": HIDDEN, "n_inner": INNER, "n_layer": 1, "n_head": HEADS}
FAMILIES.update({
    "phi": (_causal("PhiConfig", "PhiForCausalLM", pad_token_id=0, **{**_ENCODER}), "causal"),
    # multi_query=False: StarCoder's one key/value head would be one attention unit, no clones (as Falcon-7B)
    "gpt_bigcode": (_causal("GPTBigCodeConfig", "GPTBigCodeForCausalLM", multi_query=False, **_ONE), "causal"),
    "gptj": (_causal("GPTJConfig", "GPTJForCausalLM", rotary_dim=4, **_ONE), "causal"),
    "codegen": (_causal("CodeGenConfig", "CodeGenForCausalLM", rotary_dim=4, **_ONE), "causal"),
    "starcoder2": (_causal("Starcoder2Config", "Starcoder2ForCausalLM", **_GQA), "causal"),
    "granite": (_causal("GraniteConfig", "GraniteForCausalLM", **_GQA), "causal"),
    # OLMo-2 / OLMoE normalise q and k over all heads at once: their attention is left alone, their MLPs managed
    "olmo2": (_causal("Olmo2Config", "Olmo2ForCausalLM", pad_token_id=0, **_GQA), "causal"),
    "olmoe": (
        _causal("OlmoeConfig", "OlmoeForCausalLM", pad_token_id=0, num_experts=4, num_experts_per_tok=2, **_GQA),
        "causal",
    ),
    "cohere": (_causal("CohereConfig", "CohereForCausalLM", pad_token_id=0, **_GQA), "causal"),
    "granitemoe": (
        _causal("GraniteMoeConfig", "GraniteMoeForCausalLM", num_local_experts=4, num_experts_per_tok=2, **_GQA),
        "causal",
    ),
    "deberta_v2": (_causal("DebertaV2Config", "DebertaV2ForSequenceClassification", **_ENCODER), "classify"),
    "electra": (
        _causal("ElectraConfig", "ElectraForSequenceClassification", embedding_size=HIDDEN, **_ENCODER), "classify"
    ),
    "xlm_roberta": (
        _causal("XLMRobertaConfig", "XLMRobertaForSequenceClassification", pad_token_id=0, **_ENCODER), "classify"
    ),
    "mbart": (
        _causal("MBartConfig", "MBartForConditionalGeneration", d_model=HIDDEN, encoder_ffn_dim=INNER,
                decoder_ffn_dim=INNER, encoder_layers=1, decoder_layers=1, encoder_attention_heads=HEADS,
                decoder_attention_heads=HEADS),
        "seq2seq",
    ),
    "mt5": (
        _causal("MT5Config", "MT5ForConditionalGeneration", d_model=HIDDEN, d_ff=INNER, d_kv=8, num_layers=1,
                num_decoder_layers=1, num_heads=HEADS, decoder_start_token_id=0, pad_token_id=0),
        "seq2seq",
    ),
})  # fmt: skip


# found by the dataflow probe at construction: GPT-OSS interleaves gate and up (its experts' biases and attention
# sinks go with their units), DiffLlama's differential attention mixes its heads (left alone), ESM's and ALBERT's
# attention norms are the block's pre-/post-norms (managed), routers (Phi-MoE, Llama 4) and Qwen3-Next's depthwise
# convolution are left alone by default (its gated attention is managed, its linear attention not); multi-head latent
# attention (DeepSeek-V2/V3, MiniCPM3) is decomposed into heads, its shared down projections left alone. MLA has as
# many key/value heads as heads (its up projection makes one key and value per head): with fewer, a config's
# key/value groups make eager attention repeat those heads into too many (SDPA's grouped-query mode hides it)
_MLA = {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
        "num_key_value_heads": HEADS}  # fmt: skip
_DEEPSEEK_MOE = {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_shared_experts": 1,
                 "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}  # fmt: skip
_SEQ2SEQ = {"d_model": HIDDEN, "encoder_ffn_dim": INNER, "decoder_ffn_dim": INNER, "encoder_layers": 1,
            "decoder_layers": 1, "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS}  # fmt: skip
FAMILIES.update({
    "gpt_oss": (
        _causal("GptOssConfig", "GptOssForCausalLM", head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                pad_token_id=0, sliding_window=4, **{**_GQA, "num_hidden_layers": 2, "intermediate_size": 16}),
        "causal",
    ),
    "phimoe": (
        _causal("PhimoeConfig", "PhimoeForCausalLM", num_local_experts=4, num_experts_per_tok=2, pad_token_id=0,
                **{**_GQA, "intermediate_size": 16}),
        "causal",
    ),
    "llama4": (
        _causal("Llama4TextConfig", "Llama4ForCausalLM", head_dim=8, pad_token_id=0, num_local_experts=4,
                num_experts_per_tok=1, intermediate_size_mlp=INNER, interleave_moe_layer_step=2,
                **{**_GQA, "num_hidden_layers": 2, "intermediate_size": 16}),
        "causal",
    ),
    "qwen3_next": (
        _causal("Qwen3NextConfig", "Qwen3NextForCausalLM", head_dim=8, pad_token_id=0,
                shared_expert_intermediate_size=24, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                layer_types=["linear_attention", "full_attention"], **{**_MOE, "num_hidden_layers": 2}),
        "causal",
    ),
    "qwen3_5": (
        _causal("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", head_dim=8, pad_token_id=0, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                layer_types=["linear_attention", "full_attention"], **{**_GQA, "num_hidden_layers": 2}),
        "causal",
    ),
    "qwen3_5_moe": (
        _causal("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", head_dim=8, pad_token_id=0, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                shared_expert_intermediate_size=24, layer_types=["linear_attention", "full_attention"],
                **{**_MOE, "num_hidden_layers": 2}),
        "causal",
    ),
    "kimi_linear": (  # Kimi Delta Attention (per-channel gates, low-rank) beside latent attention and experts
        _causal("KimiLinearConfig", "KimiLinearForCausalLM", pad_token_id=0, bos_token_id=1, eos_token_id=2,
                moe_intermediate_size=16, n_shared_experts=1, num_local_experts=4, num_experts_per_tok=2, n_group=1,
                topk_group=1, layer_types=["linear_attention", "full_attention"],
                mlp_layer_types=["dense", "sparse"], linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4,
                **{**_GQA, **_MLA, "num_hidden_layers": 2}),
        "causal",
    ),
    "olmo_hybrid": (  # its gated delta net with separate q, k, v projections; full attention with a k_norm over all
        _causal("OlmoHybridConfig", "OlmoHybridForCausalLM", pad_token_id=0, eos_token_id=2, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                layer_types=["linear_attention", "full_attention"], **{**_GQA, "num_hidden_layers": 2}),
        "causal",
    ),
    "deepseek_v3": (
        _causal("DeepseekV3Config", "DeepseekV3ForCausalLM", pad_token_id=0, **_DEEPSEEK_MOE,
                **{**_GQA, **_MLA, "num_hidden_layers": 2}),
        "causal",
    ),
    "deepseek_v2": (
        _causal("DeepseekV2Config", "DeepseekV2ForCausalLM", pad_token_id=0, **_DEEPSEEK_MOE,
                **{**_GQA, **_MLA, "num_hidden_layers": 2}),
        "causal",
    ),
    # DeepSeek-V2-Lite: a plain query projection (no query latent)
    "deepseek_v2_lite": (
        _causal("DeepseekV2Config", "DeepseekV2ForCausalLM", pad_token_id=0, **_DEEPSEEK_MOE,
                **{**_GQA, **_MLA, "q_lora_rank": None, "num_hidden_layers": 2}),
        "causal",
    ),
    "minicpm3": (_causal("MiniCPM3Config", "MiniCPM3ForCausalLM", pad_token_id=0, **{**_GQA, **_MLA}), "causal"),
    "mistral4": (
        _causal("Mistral4Config", "Mistral4ForCausalLM", pad_token_id=0, **_DEEPSEEK_MOE,
                **{**_GQA, **_MLA, "num_hidden_layers": 2}),
        "causal",
    ),
    "diffllama": (_causal("DiffLlamaConfig", "DiffLlamaForCausalLM", pad_token_id=0, **_GQA), "causal"),
    "esm": (_causal("EsmConfig", "EsmForSequenceClassification", pad_token_id=0, mask_token_id=2, **_ENCODER),
            "classify"),
    "albert": (_causal("AlbertConfig", "AlbertForSequenceClassification", pad_token_id=0, embedding_size=16,
                       **_ENCODER), "classify"),
    "pegasus": (_causal("PegasusConfig", "PegasusForConditionalGeneration", pad_token_id=0, decoder_start_token_id=0,
                        **_SEQ2SEQ), "seq2seq"),
})  # fmt: skip


# more families of 2025-26, found by the same structure: GLM-4, EXAONE 4, ERNIE 4.5, Hunyuan (dense and MoE), SmolLM3,
# Seed-OSS, Apertus, Command R7B, OLMo 3 (q/k norms over all heads: its attention left alone), Mamba-2 mixers (a unit
# per group of heads: Mamba-2 itself, Nemotron-H, Bamba, Granite 4 hybrids; Falcon-H1's, one group scaled by a
# buffer, left alone), MiniMax (lightning attention beside softmax attention, experts), ModernBERT (a fused qkv split
# per head)
# 8 heads per group: every run of a group's rows is at least 8 long (cut by views)
_MAMBA2 = {"mamba_n_heads": 16, "mamba_d_head": 4, "mamba_n_groups": 2, "mamba_d_state": 8, "mamba_expand": 2,
           "mamba_chunk_size": 8}  # fmt: skip
_GQA8 = {"head_dim": 8, "pad_token_id": 0, **_GQA}
FAMILIES.update({
    "glm4": (_causal("Glm4Config", "Glm4ForCausalLM", **_GQA8), "causal"),
    "exaone4": (_causal("Exaone4Config", "Exaone4ForCausalLM", **_GQA8), "causal"),
    "ernie4_5": (_causal("Ernie4_5Config", "Ernie4_5ForCausalLM", **_GQA8), "causal"),
    "hunyuan_v1_dense": (_causal("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", **_GQA8), "causal"),
    "smollm3": (_causal("SmolLM3Config", "SmolLM3ForCausalLM", **_GQA8), "causal"),
    "seed_oss": (_causal("SeedOssConfig", "SeedOssForCausalLM", **_GQA8), "causal"),
    "apertus": (_causal("ApertusConfig", "ApertusForCausalLM", **_GQA8), "causal"),
    "cohere2": (_causal("Cohere2Config", "Cohere2ForCausalLM", **_GQA8), "causal"),
    "olmo3": (_causal("Olmo3Config", "Olmo3ForCausalLM", **_GQA8), "causal"),
    "falcon_h1": (
        _causal("FalconH1Config", "FalconH1ForCausalLM", mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8, **_GQA8),
        "causal",
    ),
    "nemotron_h": (
        _causal("NemotronHConfig", "NemotronHForCausalLM", hybrid_override_pattern="M*-", mamba_num_heads=16,
                mamba_head_dim=4, n_groups=2, ssm_state_size=8, chunk_size=8, **{**_GQA8, "num_hidden_layers": 3}),
        "causal",
    ),
    "minimax": (
        _causal("MiniMaxConfig", "MiniMaxForCausalLM", num_local_experts=4, num_experts_per_tok=2,
                **{**_GQA8, "num_hidden_layers": 2}),
        "causal",
    ),
    "hunyuan_v1_moe": (
        _causal("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", num_experts=4, moe_topk=2, **_GQA8), "causal"
    ),
    "modernbert": (_causal("ModernBertConfig", "ModernBertForSequenceClassification", pad_token_id=0, **_ENCODER),
                   "classify"),
    "mamba2": (
        _causal("Mamba2Config", "Mamba2ForCausalLM", hidden_size=HIDDEN, state_size=8, num_hidden_layers=1, expand=2,
                num_heads=32, head_dim=2, n_groups=4, conv_kernel=4, chunk_size=8),
        "causal",
    ),
    "bamba": (
        _causal("BambaConfig", "BambaForCausalLM", attn_layer_indices=[1], **_MAMBA2,
                **{**_GQA8, "num_hidden_layers": 2}),
        "causal",
    ),
    "granitemoehybrid": (
        _causal("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", layer_types=["mamba", "attention"],
                num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=INNER, **_MAMBA2,
                **{**_GQA8, "num_hidden_layers": 2}),
        "causal",
    ),
})  # fmt: skip


def _vit() -> nn.Module:
    t = _t()
    return t.ViTForImageClassification(t.ViTConfig(image_size=8, patch_size=4, **_ENCODER))


def _swin() -> nn.Module:  # windowed attention with a relative position table per head
    t = _t()
    cfg = t.SwinConfig(image_size=8, patch_size=2, embed_dim=HIDDEN, depths=[1], num_heads=[HEADS], window_size=2,
                       mlp_ratio=1.5)  # fmt: skip
    return t.SwinForImageClassification(cfg)


def _swinv2() -> nn.Module:  # Swin's windows, with scaled cosine attention and a continuous position bias (an MLP)
    t = _t()
    cfg = t.Swinv2Config(image_size=8, patch_size=2, embed_dim=HIDDEN, depths=[1], num_heads=[HEADS], window_size=2,
                         mlp_ratio=1.5)  # fmt: skip
    return t.Swinv2ForImageClassification(cfg)


FAMILIES["vit"] = (_vit, "image")
FAMILIES["swin"] = (_swin, "image")
FAMILIES["swinv2"] = (_swinv2, "image")


# beyond text: speech (Whisper: a spectrogram; wav2vec 2.0, HuBERT, WavLM: a waveform), two towers (CLIP, SigLIP:
# images and text, a contrastive loss), more vision transformers (DINOv2, DeiT, BEiT with its relative position bias
# per head, SegFormer with a depthwise convolution over its MLP's neurons), convolutional networks (ResNet: rows;
# ConvNeXt: an MLP per block, ConvNeXt V2's normalised across its neurons), and text families of other lineages (MPT
# with ALiBi, Marian, M2M-100, MobileBERT, Mamba and Jamba, whose Mamba-1 mixers read ``dt_proj.weight`` without
# calling it)
def _build(config_cls: str, model_cls: str, **kw) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        t = _t()
        return getattr(t, model_cls)(getattr(t, config_cls)(**kw))

    return make


_SPEECH = {**_ENCODER, "conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3),
           "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4, "classifier_proj_size": 16,
           "mask_time_prob": 0.0, "layerdrop": 0.0}  # fmt: skip
_TOWER = {"text_config": {"vocab_size": VOCAB, "max_position_embeddings": 32, **_ENCODER},
          "vision_config": {"image_size": 8, "patch_size": 4, **_ENCODER}}  # fmt: skip
_VIT = {"image_size": 8, "patch_size": 4, **_ENCODER}
_S2S = {"vocab_size": VOCAB, "d_model": HIDDEN, "encoder_layers": 1, "decoder_layers": 1,
        "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS, "encoder_ffn_dim": INNER,
        "decoder_ffn_dim": INNER, "pad_token_id": 0, "decoder_start_token_id": 0}  # fmt: skip
FAMILIES.update({
    "whisper": (_build("WhisperConfig", "WhisperForConditionalGeneration", num_mel_bins=8, max_source_positions=8,
                       max_target_positions=32, bos_token_id=0, eos_token_id=0, suppress_tokens=None,
                       begin_suppress_tokens=None, **_S2S), "spectrogram"),
    "wav2vec2": (_build("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", **_SPEECH), "waveform"),
    "hubert": (_build("HubertConfig", "HubertForSequenceClassification", **_SPEECH), "waveform"),
    "wavlm": (_build("WavLMConfig", "WavLMForSequenceClassification", num_buckets=16, max_bucket_distance=32,
                     **_SPEECH), "waveform"),
    "clip": (_build("CLIPConfig", "CLIPModel", projection_dim=16, **_TOWER), "image_text"),
    "siglip": (_build("SiglipConfig", "SiglipModel", **_TOWER), "image_text"),
    "dinov2": (_build("Dinov2Config", "Dinov2ForImageClassification", mlp_ratio=2,
                      **{k: v for k, v in _VIT.items() if k != "intermediate_size"}), "image"),
    "deit": (_build("DeiTConfig", "DeiTForImageClassification", **_VIT), "image"),
    "beit": (_build("BeitConfig", "BeitForImageClassification", use_relative_position_bias=True, **_VIT), "image"),
    "segformer": (_build("SegformerConfig", "SegformerForImageClassification", num_encoder_blocks=2, depths=[1, 1],
                         sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[2, 4], patch_sizes=[3, 3],
                         strides=[2, 2], mlp_ratios=[2, 2], decoder_hidden_size=32), "image16"),
    "resnet": (_build("ResNetConfig", "ResNetForImageClassification", embedding_size=16, hidden_sizes=[16, 32],
                      depths=[1, 1], layer_type="bottleneck"), "image32"),
    "convnext": (_build("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[16, 32], depths=[1, 1],
                        num_stages=2, image_size=32), "image32"),
    "convnextv2": (_build("ConvNextV2Config", "ConvNextV2ForImageClassification", hidden_sizes=[16, 32], depths=[1, 1],
                          num_stages=2, image_size=32), "image32"),
    "mpt": (_causal("MptConfig", "MptForCausalLM", d_model=HIDDEN, n_heads=HEADS, n_layers=1, expansion_ratio=2),
            "causal"),
    "marian": (_build("MarianConfig", "MarianMTModel", **_S2S), "seq2seq"),
    # (GELU: with its default ReLU a unit of the tiny MLP can stay dead on the dataflow test's few tokens)
    "m2m_100": (_build("M2M100Config", "M2M100ForConditionalGeneration", activation_function="gelu", **_S2S),
                "seq2seq"),
    "mobilebert": (_causal("MobileBertConfig", "MobileBertForSequenceClassification", embedding_size=16,
                           intra_bottleneck_size=HIDDEN, true_hidden_size=HIDDEN, num_feedforward_networks=1,
                           **_ENCODER), "classify"),
    "mamba": (_causal("MambaConfig", "MambaForCausalLM", hidden_size=HIDDEN, state_size=8, num_hidden_layers=1,
                      expand=2), "causal"),
    "jamba": (_causal("JambaConfig", "JambaForCausalLM", attn_layer_period=2, attn_layer_offset=1,
                      expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                      mamba_d_state=8, mamba_expand=2, use_mamba_kernels=False, **{**_GQA, "num_hidden_layers": 2}),
              "causal"),
})  # fmt: skip


# more text decoders: LFM2 (gated short convolutions beside attention: their Linears rows), GLM-4.5 and ERNIE 4.5
# MoE (a dense first layer, then routed experts beside a shared one), T5Gemma (a Gemma 2 encoder and decoder, one
# sliding-window layer each), Zamba2 (Mamba-2 mixers; each hybrid layer calls one shared transformer block, its
# weights tied across layers, with the layer's own LoRA adapters on q, k, v and the MLP's gate/up: as many key/value
# heads as heads, the adapters write 2x the hidden size into each), Falcon Mamba (Mamba-1 mixers, RMS norms without
# weights on B, C, dt), OLMo 1 (layer norms without weights), RecurrentGemma (Griffin: a recurrent block, its RG-LRU
# gated per block of channels, then a local attention block), Nemotron (a squared-ReLU MLP), JetMoE (experts, its
# attention's too, as modules of one 3-D weight each: no block egg_optim recognises), DBRX (experts as 2-D fused
# parameters, no block egg_optim recognises; its router found by dataflow and left alone; transformers 5.25 reads
# rope_theta from the attention config without a default)
_T5GEMMA = {"vocab_size": VOCAB, "query_pre_attn_scalar": 8, "sliding_window": 8, **_GQA8}
FAMILIES.update({
    "lfm2": (_causal("Lfm2Config", "Lfm2ForCausalLM", block_auto_adjust_ff_dim=False,
                     layer_types=["conv", "full_attention"], **{**_GQA8, "num_hidden_layers": 2}), "causal"),
    "glm4_moe": (_causal("Glm4MoeConfig", "Glm4MoeForCausalLM", use_qk_norm=True, **_DEEPSEEK_MOE,
                         **{**_GQA8, "num_hidden_layers": 2}), "causal"),
    "ernie4_5_moe": (_causal("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", moe_intermediate_size=16, moe_k=2,
                             moe_num_experts=4, moe_num_shared_experts=1, moe_layer_start_index=1,
                             **{**_GQA8, "num_hidden_layers": 2}), "causal"),
    "t5gemma": (_build("T5GemmaConfig", "T5GemmaForConditionalGeneration", vocab_size=VOCAB, encoder=_T5GEMMA,
                       decoder=_T5GEMMA), "seq2seq"),
    "zamba2": (_causal("Zamba2Config", "Zamba2ForCausalLM", layers_block_type=["hybrid", "hybrid"], n_mamba_heads=16,
                       mamba_ngroups=2, mamba_d_state=8, chunk_size=8, use_mamba_kernels=False,
                       use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True,
                       **{**_GQA, "num_hidden_layers": 2, "num_key_value_heads": HEADS}), "causal"),
    "falcon_mamba": (_causal("FalconMambaConfig", "FalconMambaForCausalLM", hidden_size=HIDDEN, state_size=8,
                             num_hidden_layers=1, expand=2, use_mambapy=False), "causal"),
    "olmo": (_causal("OlmoConfig", "OlmoForCausalLM", **_GQA8), "causal"),
    "recurrent_gemma": (_causal("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                                block_types=["recurrent", "attention"], attention_window_size=8,
                                **{**_GQA, "num_hidden_layers": 2}), "causal"),
    "nemotron": (_causal("NemotronConfig", "NemotronForCausalLM", **_GQA8), "causal"),
    "dbrx": (_causal("DbrxConfig", "DbrxForCausalLM", d_model=HIDDEN, n_heads=HEADS, n_layers=1, pad_token_id=0,
                     attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
                     ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2}), "causal"),
    "jetmoe": (_causal("JetMoeConfig", "JetMoeForCausalLM", hidden_size=HIDDEN, num_hidden_layers=1,
                       num_key_value_heads=2, kv_channels=8, intermediate_size=INNER, num_local_experts=4,
                       num_experts_per_tok=2, pad_token_id=0), "causal"),
})  # fmt: skip


# SigLIP 2 (NaFlex): images as their patches flattened, each of its own grid (3x3, 2x4 padded to the 9 patches of
# the learned position grid, resized to each), with their grids and a mask of the padding
FAMILIES.update({
    "siglip2": (_build("Siglip2Config", "Siglip2Model", text_config=_TOWER["text_config"],
                       vision_config={"num_patches": 9, "patch_size": 2, **_ENCODER}), "patches_text"),
})  # fmt: skip


# DINOv3-ViT (2-D rotary positions, register tokens, layer scale; its SwiGLU MLP as the 7B's): transformers has its
# base model only (DINOv3ViTModel, whose encoder is named ``model``, the base model prefix), classified here as DINOv2
# is (its CLS token and its patch tokens' mean, after the registers), for a loss
@functools.cache
def _dinov3_classifier() -> type[nn.Module]:
    t = _t()
    from transformers.modeling_outputs import ImageClassifierOutput

    class DINOv3ViTForImageClassification(t.DINOv3ViTPreTrainedModel):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.model = t.DINOv3ViTModel(config)
            self.classifier = nn.Linear(2 * config.hidden_size, config.num_labels)
            self.post_init()

        def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
            hidden = self.model(pixel_values, **kwargs).last_hidden_state
            patches = hidden[:, 1 + self.config.num_register_tokens :]
            logits = self.classifier(torch.cat([hidden[:, 0], patches.mean(1)], dim=-1))
            loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
            return ImageClassifierOutput(loss=loss, logits=logits)

    return DINOv3ViTForImageClassification


def _dinov3(**kw) -> Callable[[], nn.Module]:
    return lambda: _dinov3_classifier()(_t().DINOv3ViTConfig(**kw))


FAMILIES.update({
    "dinov3_vit": (_dinov3(num_register_tokens=2, use_gated_mlp=True, **_VIT), "image"),
})  # fmt: skip


# convolutional networks beside vision transformers: MobileViT (inverted residuals, then per stage a transformer
# over unfolded 2x2 patches; its depths fixed by its code: 2, 4, 3 layers). MobileViT and EfficientNet initialised
# wider than their configs' 0.02 (from which these tiny networks' logits and gradients vanish, below 1e-4)
FAMILIES.update({
    "mobilevit": (_build("MobileViTConfig", "MobileViTForImageClassification", image_size=32, patch_size=2,
                         hidden_sizes=[HIDDEN] * 3, neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 64],
                         num_attention_heads=HEADS, mlp_ratio=1.5, expand_ratio=2.0, initializer_range=0.1), "image32"),
    # EfficientNet: inverted residuals with squeeze-and-excitation (a stage without expansion, one with), its widths
    # halved (its stem's 32 and top's 1280 are fixed by its code, scaled by the width coefficient)
    "efficientnet": (_build("EfficientNetConfig", "EfficientNetForImageClassification", image_size=32,
                            width_coefficient=0.5, depth_coefficient=1.0, kernel_sizes=[3, 3], in_channels=[32, 16],
                            out_channels=[16, 32], strides=[1, 2], num_block_repeats=[1, 1], expand_ratios=[1, 2],
                            hidden_dim=640, initializer_range=0.2), "image32"),
    # RegNet Y: grouped bottlenecks with squeeze-and-excitation
    "regnet": (_build("RegNetConfig", "RegNetForImageClassification", embedding_size=16, hidden_sizes=[16, 32],
                      depths=[1, 1], groups_width=8), "image32"),
    # VideoMAE: a ViT over tubelets of 2 frames of 4x4 patches (4 frames of 8x8), its patch tokens' mean classified
    "videomae": (_build("VideoMAEConfig", "VideoMAEForVideoClassification", num_frames=4, tubelet_size=2, **_VIT),
                 "video"),
})  # fmt: skip


# wav2vec 2.0-BERT: a conformer (two half-step MLPs around attention with relative position keys and a convolution
# module: pointwise, GLU, depthwise) over frames of 16 features, projected
FAMILIES.update({
    "wav2vec2_bert": (_build("Wav2Vec2BertConfig", "Wav2Vec2BertForSequenceClassification", **_ENCODER,
                             feature_projection_input_dim=16, conv_depthwise_kernel_size=3, classifier_proj_size=16,
                             left_max_position_embeddings=8, right_max_position_embeddings=4, mask_time_prob=0.0,
                             layerdrop=0.0), "frames"),
    # Moonshine: a waveform through three convolutions its code sizes (kernels 127, 7, 3; strides 64, 3, 2), an
    # encoder and a decoder with partial rotary embeddings (as many key/value heads as heads: transformers 5.25's
    # Moonshine attention views its queries by the key/value heads)
    "moonshine": (_build("MoonshineConfig", "MoonshineForConditionalGeneration", vocab_size=VOCAB, hidden_size=HIDDEN,
                         intermediate_size=INNER, encoder_num_hidden_layers=1, decoder_num_hidden_layers=1,
                         encoder_num_attention_heads=HEADS, decoder_num_attention_heads=HEADS,
                         max_position_embeddings=32, pad_token_id=0), "waveform_seq2seq"),
})  # fmt: skip


# vision-language models that place image features among their token ids: a vision tower of one layer (LLaVA's CLIP,
# Gemma 3's, PaliGemma's and Idefics' SigLIP, Qwen2-VL's own; Qwen2.5-VL's windowed and full attention, two layers)
# beside a language model of the family's text code; an 8x8 image becomes IMAGE_TOKENS tokens in each (4 patches;
# Qwen2-VL and Idefics: 16 patches merged 2x2), its token the last of the vocabulary (the ids before it name its
# other special tokens). Gemma 3's and PaliGemma's vision towers without SigLIP's pooling head (their checkpoints'),
# LLaVA's features from its only layer
IMAGE_TOKEN, IMAGE_TOKENS = VOCAB - 1, 4
_TEXT = {"vocab_size": VOCAB, "pad_token_id": 0, **_GQA}
_SIGLIP = {"model_type": "siglip_vision_model", "image_size": 8, "patch_size": 4, "vision_use_head": False,
           **_ENCODER}  # fmt: skip
# Qwen-VL: head_dim 8, 4 rotary frequencies split over time, height, width; MLPs 40 wide
_MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
_QWEN_TEXT = {**_TEXT, "intermediate_size": 40, "rope_parameters": _MROPE}
_QWEN_VISION = {"hidden_size": HIDDEN, "num_heads": HEADS, "patch_size": 2, "spatial_merge_size": 2,
                "temporal_patch_size": 2}  # fmt: skip
_QWEN_TOKENS = {"image_token_id": IMAGE_TOKEN, "video_token_id": VOCAB - 2, "vision_start_token_id": VOCAB - 3,
                "vision_end_token_id": VOCAB - 4}  # fmt: skip
_IDEFICS = {"text_config": {"model_type": "llama", **_TEXT}, "image_token_id": IMAGE_TOKEN, "scale_factor": 2,
            "vision_config": {"image_size": 8, "patch_size": 2, **_ENCODER}}  # fmt: skip
FAMILIES.update({
    "llava": (_build("LlavaConfig", "LlavaForConditionalGeneration", image_token_index=IMAGE_TOKEN,
                     image_seq_length=IMAGE_TOKENS, vision_feature_layer=-1,
                     text_config={"model_type": "llama", **_TEXT},
                     vision_config={"model_type": "clip_vision_model", "image_size": 8, "patch_size": 4,
                                    **_ENCODER}), "vlm"),
    "gemma3_vlm": (_build("Gemma3Config", "Gemma3ForConditionalGeneration", mm_tokens_per_image=IMAGE_TOKENS,
                          image_token_index=IMAGE_TOKEN, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                          text_config={"model_type": "gemma3_text", "head_dim": 8, **_TEXT, "num_hidden_layers": 2},
                          vision_config=_SIGLIP), "vlm"),
    "paligemma": (_build("PaliGemmaConfig", "PaliGemmaForConditionalGeneration", image_token_index=IMAGE_TOKEN,
                         vocab_size=VOCAB, projection_dim=HIDDEN, hidden_size=HIDDEN, vision_config=_SIGLIP,
                         text_config={"model_type": "gemma", "head_dim": 8, **_TEXT}), "vlm"),
    "qwen2_vl": (_build("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", **_QWEN_TOKENS,
                        text_config={"model_type": "qwen2_vl_text", **_QWEN_TEXT},
                        vision_config={"depth": 1, "embed_dim": HIDDEN, "mlp_ratio": 2, **_QWEN_VISION}),
                 "vlm_grid"),
    "qwen2_5_vl": (_build("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", **_QWEN_TOKENS,
                          text_config={"model_type": "qwen2_5_vl_text", **_QWEN_TEXT},
                          vision_config={"depth": 2, "intermediate_size": 40, "out_hidden_size": HIDDEN,
                                         "window_size": 8, "fullatt_block_indexes": [1], **_QWEN_VISION}),
                   "vlm_grid"),
    "idefics3": (_build("Idefics3Config", "Idefics3ForConditionalGeneration", **_IDEFICS), "vlm_per_text"),
    "smolvlm": (_build("SmolVLMConfig", "SmolVLMForConditionalGeneration", **_IDEFICS), "vlm_per_text"),
})  # fmt: skip

# Qwen3-VL: Qwen2.5-VL's tower with learned position embeddings (a 4x4 grid) and deepstack, its first layer's merged
# patches added to the language model's first layer's output (Qwen3-VL-MoE: its text MLP experts); Mistral 3: a
# Pixtral tower (2-D rotary), its 4x4 patches merged 2x2; LLaVA-NeXT, LLaVA-OneVision: an image 4x8 (the first of
# two grids) as two 4x4 tiles and the whole image, one patch each: the whole image's patch, then a row of the tiles'
# two and a newline (a 4x4 image would take the second grid: one tile, 3 tokens)
_QWEN3_VISION = {**_QWEN_VISION, "depth": 2, "intermediate_size": 40, "out_hidden_size": HIDDEN,
                 "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}  # fmt: skip
_QWEN3_TEXT = {**_QWEN_TEXT, "head_dim": 8}
_TILES = {"image_token_index": IMAGE_TOKEN, "image_grid_pinpoints": [[4, 8], [4, 4]],
          "image_seq_length": IMAGE_TOKENS, "vision_feature_layer": -1}  # fmt: skip
FAMILIES.update({
    "qwen3_vl": (_build("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", **_QWEN_TOKENS,
                        text_config={"model_type": "qwen3_vl_text", **_QWEN3_TEXT}, vision_config=_QWEN3_VISION),
                 "vlm_grid"),
    "qwen3_vl_moe": (_build("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", **_QWEN_TOKENS,
                            text_config={"model_type": "qwen3_vl_moe_text", **_QWEN3_TEXT, "num_experts": 4,
                                         "num_experts_per_tok": 2, "moe_intermediate_size": 16},
                            vision_config=_QWEN3_VISION), "vlm_grid"),
    "mistral3": (_build("Mistral3Config", "Mistral3ForConditionalGeneration", image_token_index=IMAGE_TOKEN,
                        spatial_merge_size=2, vision_feature_layer=-1, text_config={"model_type": "mistral", **_TEXT},
                        vision_config={"model_type": "pixtral", "image_size": 8, "patch_size": 2, **_ENCODER}),
                 "vlm_sizes"),
    # LLaVA with a Pixtral tower (Pixtral-12B): no CLS token to drop ("full"), no merger: each 4x4 patch a token
    "pixtral": (_build("LlavaConfig", "LlavaForConditionalGeneration", image_token_index=IMAGE_TOKEN,
                       vision_feature_layer=-1, vision_feature_select_strategy="full",
                       text_config={"model_type": "mistral", **_TEXT},
                       vision_config={"model_type": "pixtral", "image_size": 8, "patch_size": 4, **_ENCODER}),
                "vlm_sizes"),
    # VipLLaVA: the features of several layers of the tower (here its output and its embeddings), concatenated and
    # normalised, into LLaVA's projector
    "vipllava": (_build("VipLlavaConfig", "VipLlavaForConditionalGeneration", image_token_index=IMAGE_TOKEN,
                        image_seq_length=IMAGE_TOKENS, vision_feature_layers=[-1, -2],
                        text_config={"model_type": "llama", **_TEXT},
                        vision_config={"model_type": "clip_vision_model", "image_size": 8, "patch_size": 4,
                                       **_ENCODER}), "vlm"),
    "llava_next": (_build("LlavaNextConfig", "LlavaNextForConditionalGeneration", **_TILES,
                          text_config={"model_type": "llama", **_TEXT},
                          vision_config={"model_type": "clip_vision_model", "image_size": 4, "patch_size": 4,
                                         **_ENCODER}), "vlm_tiles"),
    "llava_onevision": (_build("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration", **_TILES,
                               text_config={"model_type": "qwen2", **_TEXT},
                               vision_config={**_SIGLIP, "image_size": 4}), "vlm_tiles"),
})  # fmt: skip

# InternVL: its own vision tower (layer scale, its CLS token dropped), 4x4 patches shuffled into 2x2 of 4x the width;
# Llama 4: a tower with 2-D rotary (its CLS token dropped), patches shuffled 2x2 into its adapter MLP (4x the width:
# the tower's MLP as wide), beside Llama 4's text model (a dense layer, then a MoE one; its dense MLP 40 wide);
# GLM-4.1V: Qwen2-VL's inputs, its
# tower's MLP as wide as its output, learned position embeddings of a 4x4 grid, a merger after a 2x2 convolution;
# Aya Vision: SigLIP's 4x4 patches shuffled 2x2 into a SwiGLU projector, Cohere 2's text model; Ovis2: its 4x4
# patches in 2x2 strides scored over a visual vocabulary of 16 (and 5 indicator tokens), embedded by their scores
FAMILIES.update({
    "internvl": (_build("InternVLConfig", "InternVLForConditionalGeneration", image_token_id=IMAGE_TOKEN,
                        image_seq_length=IMAGE_TOKENS, text_config={"model_type": "qwen2", **_TEXT},
                        vision_config={"image_size": 8, "patch_size": 2, **_ENCODER}), "vlm"),
    "llama4_vlm": (_build("Llama4Config", "Llama4ForConditionalGeneration", image_token_index=IMAGE_TOKEN,
                          boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                          text_config={"vocab_size": VOCAB, "pad_token_id": 0, "head_dim": 8, "num_local_experts": 4,
                                       "num_experts_per_tok": 1, "intermediate_size_mlp": 40,
                                       "interleave_moe_layer_step": 2,
                                       **{**_GQA, "num_hidden_layers": 2, "intermediate_size": 16}},
                          vision_config={**_ENCODER, "image_size": 8, "patch_size": 2, "intermediate_size": 4 * HIDDEN,
                                         "vision_output_dim": HIDDEN, "projector_input_dim": HIDDEN,
                                         "projector_output_dim": HIDDEN}), "vlm"),
    "glm4v": (_build("Glm4vConfig", "Glm4vForConditionalGeneration", image_token_id=IMAGE_TOKEN,
                     video_token_id=VOCAB - 2, image_start_token_id=VOCAB - 3, image_end_token_id=VOCAB - 4,
                     video_start_token_id=VOCAB - 5, video_end_token_id=VOCAB - 6,
                     text_config={"model_type": "glm4v_text", **_QWEN_TEXT},
                     vision_config={**_QWEN_VISION, "depth": 1, "intermediate_size": 40, "out_hidden_size": HIDDEN,
                                    "image_size": 8}), "vlm_grid"),
    "aya_vision": (_build("AyaVisionConfig", "AyaVisionForConditionalGeneration", image_token_index=IMAGE_TOKEN,
                          text_config={"model_type": "cohere2", **_TEXT},
                          vision_config={**_SIGLIP, "patch_size": 2}), "vlm"),
    "ovis2": (_build("Ovis2Config", "Ovis2ForConditionalGeneration", image_token_id=IMAGE_TOKEN,
                     visual_indicator_token_ids=[VOCAB - i for i in range(2, 7)], vocab_size=VOCAB, hidden_size=HIDDEN,
                     text_config={"model_type": "qwen2", **_TEXT},
                     vision_config={**_ENCODER, "image_size": 8, "patch_size": 2, "hidden_stride": 2,
                                    "vocab_size": 21}), "vlm"),
})  # fmt: skip


# BLIP-2: a Q-Former (BERT layers whose IMAGE_TOKENS learned queries read the vision tower's patches by
# cross-attention) between the vision tower (its config names no channels: RGB) and a language model, its queries'
# outputs placed among the token ids (a Llama language model, grouped key/value heads as the other VLMs'; OPT's
# checkpoints' text model is the opt family's)
FAMILIES["blip_2"] = (
    _build("Blip2Config", "Blip2ForConditionalGeneration", image_token_index=IMAGE_TOKEN, num_query_tokens=IMAGE_TOKENS,
           vision_config={"image_size": 8, "patch_size": 4, **_ENCODER},
           qformer_config={"vocab_size": VOCAB, "encoder_hidden_size": HIDDEN, "pad_token_id": 0, **_ENCODER},
           text_config={"model_type": "llama", **_TEXT}),
    "vlm",
)  # fmt: skip

# Mllama (Llama 3.2 Vision): the language model reads the image by cross-attention (layer 1 of 2, gated), not among
# its tokens (one image token each); its tower (a local encoder, then a gated global one, features of its last and
# its intermediate layers: 2x the width) takes each image in up to 2 tiles of 8x8, their aspect ratio by id
FAMILIES["mllama"] = (
    _build("MllamaConfig", "MllamaForConditionalGeneration", image_token_index=IMAGE_TOKEN,
           text_config={**_TEXT, "num_hidden_layers": 2, "cross_attention_layers": [1]},
           vision_config={"hidden_size": HIDDEN, "attention_heads": HEADS, "intermediate_size": INNER,
                          "num_hidden_layers": 1, "num_global_layers": 1, "intermediate_layers_indices": [0],
                          "image_size": 8, "patch_size": 4, "max_num_tiles": 2,
                          "supported_aspect_ratios": [[1, 1], [1, 2]], "vision_output_dim": 2 * HIDDEN}),
    "cross_tiles",
)  # fmt: skip

# Qwen2-Audio: a Whisper-like audio tower (a spectrogram of 8 mel bins, 16 frames: 8 after its strided convolution,
# 4 after its pooling), its frames placed among the token ids as Qwen2's audio tokens
AUDIO_TOKENS = 4
FAMILIES["qwen2_audio"] = (
    _build("Qwen2AudioConfig", "Qwen2AudioForConditionalGeneration", audio_token_index=IMAGE_TOKEN,
           text_config={"model_type": "qwen2", **_TEXT},
           audio_config={"d_model": HIDDEN, "encoder_attention_heads": HEADS, "encoder_ffn_dim": INNER,
                         "encoder_layers": 1, "num_mel_bins": 8, "max_source_positions": 8}),
    "audio_tokens",
)  # fmt: skip


def _vlm(kind: str, ids: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A vision-language batch: one 8x8 image (LLaVA-NeXT's 4x8, in tiles) per sequence, its IMAGE_TOKENS tokens
    first, then ``ids`` (none an image or other special token), labels over the text only."""
    batch = ids.shape[0]
    ids = torch.cat([torch.full((batch, IMAGE_TOKENS), IMAGE_TOKEN), ids.remainder(VOCAB - 5) + 1], dim=1)
    out = {"input_ids": ids, "labels": ids.masked_fill(ids == IMAGE_TOKEN, -100)}
    if kind == "vlm_grid":  # Qwen2-VL: each image's 4x4 patches (2x2 in time, space) flattened, its grid
        out.update(pixel_values=torch.randn(batch * 16, 3 * 2 * 2 * 2, generator=gen),
                   image_grid_thw=torch.tensor([[1, 4, 4]]).repeat(batch, 1),
                   mm_token_type_ids=(ids == IMAGE_TOKEN).int())  # fmt: skip
    elif kind == "vlm_tiles":  # LLaVA-NeXT: each image 4x8, as its two 4x4 tiles after the whole image shrunk to 4x4
        out.update(pixel_values=torch.randn(batch, 3, 3, 4, 4, generator=gen),
                   image_sizes=torch.tensor([[4, 8]]).repeat(batch, 1))  # fmt: skip
    else:  # Idefics: images per sequence; Mistral 3: each image's size
        shape = (batch, 1) if kind == "vlm_per_text" else (batch,)
        out["pixel_values"] = torch.randn(*shape, 3, 8, 8, generator=gen)
        if kind == "vlm_sizes":
            out["image_sizes"] = torch.tensor([[8, 8]]).repeat(batch, 1)
    return out


def make(family: str, seed: int = 0) -> nn.Module:
    """A fresh tiny model of ``family`` (one of :data:`FAMILIES`), initialised from ``seed``."""
    torch.manual_seed(seed)
    return FAMILIES[family][0]()


def inputs(
    family: str, batch: int = 2, length: int = 15, seed: int = 0, labels: bool = True
) -> dict[str, torch.Tensor]:
    """Model inputs, with labels (the loss is ``model(**inputs).loss``) or without (for logits only)."""
    gen = torch.Generator().manual_seed(seed)
    kind = FAMILIES[family][1]
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    if kind.startswith("vlm"):  # the same total length: the image's tokens and length - IMAGE_TOKENS of text
        out = _vlm(kind, ids[:, : length - IMAGE_TOKENS], gen)
    elif kind == "audio_tokens":  # Qwen2-Audio: a spectrogram per sequence, its AUDIO_TOKENS tokens first
        ids = torch.cat([torch.full((batch, AUDIO_TOKENS), IMAGE_TOKEN),
                         ids[:, : length - AUDIO_TOKENS].remainder(VOCAB - 5) + 1], dim=1)  # fmt: skip
        out = {"input_ids": ids, "labels": ids.masked_fill(ids == IMAGE_TOKEN, -100),
               "input_features": torch.randn(batch, 8, 16, generator=gen),
               "feature_attention_mask": torch.ones(batch, 16).long()}  # fmt: skip
    elif kind == "cross_tiles":  # Mllama: an image 8x16 in its two tiles (aspect ratio id 2: [1, 2]), its one token
        ids = torch.cat([torch.full((batch, 1), IMAGE_TOKEN), ids[:, 1:].remainder(VOCAB - 5) + 1], dim=1)
        out = {"input_ids": ids, "labels": ids.masked_fill(ids == IMAGE_TOKEN, -100),
               "pixel_values": torch.randn(batch, 1, 2, 3, 8, 8, generator=gen),
               "aspect_ratio_ids": torch.full((batch, 1), 2), "aspect_ratio_mask": torch.ones(batch, 1, 2).long(),
               "cross_attention_mask": torch.ones(batch, length, 1, 2).long()}  # fmt: skip
    elif kind.startswith("image"):
        size = int(kind.removeprefix("image").removesuffix("_text") or 8)
        out = {"pixel_values": torch.randn(batch, 3, size, size, generator=gen)}
        if kind == "image_text":  # a contrastive loss over the pairs of the batch
            out.update(input_ids=ids, return_loss=True)
        else:
            out["labels"] = torch.randint(0, 2, (batch,), generator=gen)
    elif kind == "patches_text":  # NaFlex: patches 2x2 flattened, grids 3x3 and 2x4 (one padding patch) in turn
        shapes = torch.tensor([[3, 3], [2, 4]]).repeat(batch, 1)[:batch]
        out = {"pixel_values": torch.randn(batch, 9, 3 * 2 * 2, generator=gen), "spatial_shapes": shapes,
               "pixel_attention_mask": (torch.arange(9) < shapes.prod(-1, keepdim=True)).long(), "input_ids": ids,
               "return_loss": True}  # fmt: skip
    elif kind == "waveform":  # a length in frames of its feature encoder's convolutions (stride 10)
        out = {"input_values": torch.randn(batch, 13 + 10 * length, generator=gen),
               "labels": torch.randint(0, 2, (batch,), generator=gen)}  # fmt: skip
    elif kind == "video":  # 4 frames of 8x8
        out = {"pixel_values": torch.randn(batch, 4, 3, 8, 8, generator=gen),
               "labels": torch.randint(0, 2, (batch,), generator=gen)}  # fmt: skip
    elif kind == "waveform_seq2seq":  # a waveform of length - 1 frames of Moonshine's convolutions; tokens as labels
        out = {"input_values": torch.randn(batch, 127 + 384 * length, generator=gen), "labels": ids}
        if not labels:
            out["decoder_input_ids"] = ids
    elif kind == "frames":  # frames of 16 features each
        out = {"input_features": torch.randn(batch, length, 16, generator=gen),
               "labels": torch.randint(0, 2, (batch,), generator=gen)}  # fmt: skip
    elif kind == "spectrogram":  # the length the encoder takes; the decoder's tokens as labels
        out = {"input_features": torch.randn(batch, 8, 16, generator=gen), "labels": ids}
        if not labels:
            out["decoder_input_ids"] = ids
    else:
        if kind == "classify":
            out = {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=gen)}
        else:
            out = {"input_ids": ids, "labels": ids}
            if not labels and kind == "seq2seq":
                out["decoder_input_ids"] = ids
    if not labels:
        out.pop("labels", None)
        if out.get("return_loss"):
            out["return_loss"] = False
    return out


def logits(output) -> torch.Tensor:
    """What a model of these families scores: its ``logits``, or a two-tower model's image-text scores."""
    return output.logits if getattr(output, "logits", None) is not None else output.logits_per_image
