"""Training-step time of tiny random-init transformers: baseline vs weight mode vs output mode.

Models are built from configs (random init, no Hub download): a BERT encoder for sequence classification (hidden 256, 4
layers, 4 heads, intermediate 1024), a Llama-style causal LM (hidden 256, intermediate 688, 4 layers, 4 heads),
(``--models qwen3_5``) a Qwen3.5-style hybrid whose first 3 layers are linear attention and (``--models mixtral``) a
Mixtral-style mixture of 4 experts of 344 neurons routed top 2, vocabulary 1000, batch 16 x sequence 128 tokens;
``--models gpt2 opt``: GPT-2 and OPT of the Llama's hidden size, layers and heads (MLP 1024), whose attention stores its
widths (output mode sets them to the active heads'); ``phi3``: Phi-3 of the Llama's sizes; ``mamba2``: Mamba-2 mixers;
beyond text (``--models vit convnext whisper wav2vec2``): ViT and ConvNeXt on 64 x 64 images, Whisper on 80 mel bins,
wav2vec 2.0 on 1 s of audio. A step is forward (loss) + backward + AdamW step + zero_grad. Plans:
``RolePlan.preset(scenario, table="uniform")`` for each ``--scenarios`` entry (mild: 40 % leaders, 10 % independents;
aggressive: 20 % / 5 %). With the default ``units="auto"`` the units are MLP neurons, attention heads and each expert's
neurons (``egg_optim.core.blocks``), so output mode computes only the active ones and folds clones into the down/o
projections; the head has no roles.

Counted FLOPs: ``egg_optim.utils.flop_counter()`` (``FlopCounterMode``, plus the experts' grouped matmuls) over
one step's forward and backward (the matmuls and attention torch actually ran). ``time / FLOPs`` is the step-time
ratio divided by the FLOP ratio, both against the baseline: 1.0 means the step got exactly as much faster as its
arithmetic shrank.

Memory (eager cases): ``activations MB``, the bytes of every tensor autograd saves for backward in one step
(``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded: the sliced active weights
output mode saves count), and ``optimizer state MB`` (AdamW's ``exp_avg``/``exp_avg_sq``; with roles,
``LeaderCloneOptimizer.state_bytes()``, clones' parked slices included). Compiled models run one eager forward
first and apply the norm coupling (``couple_norms()``; a compiled forward gives no evidence).

Cases run in ONE process, interleaved round-robin so machine noise hits all of them alike; the table gives
medians and the median of per-round ratios against the bare AdamW step measured in the same rounds. Then the
output-mode and baseline steps are profiled (``torch.profiler``, a few steps each) and the ops whose total
self time differs most between the two are listed: that is where output mode's time goes.

    python benchmarks/bench_transformers.py                  # 20 timed rounds
    python benchmarks/bench_transformers.py --steps 5 --no-profile
    python benchmarks/bench_transformers.py --models llama --compile   # eager and torch.compile cases

The last line printed is one JSON object with the headline ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from egg_optim import LeaderCloneOptimizer, RolePlan
from egg_optim.utils import flop_counter

MODES = ("baseline", "weight", "output")


@dataclass
class Case:
    name: str
    step: Callable[[], None]
    flops: int = 0
    saved_bytes: int = -1
    state_bytes: int = 0
    times: list[float] = field(default_factory=list)


def _bert(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=128,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg), {"labels": torch.randint(0, 2, (16,))}


# the causal LMs' sizes (Llama; the Qwen3.5 hybrid adds its linear attention's)
_LM = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
)


def _llama(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_LM)), {}


def _qwen3_5(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A Qwen3.5-style hybrid: 3 layers of linear attention (the gated delta net: 4 key heads, 8 value heads of
    64) and 1 of full attention, the Llama sizes otherwise."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(
        **_LM,
        head_dim=64,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
    )
    return Qwen3_5ForCausalLM(cfg), {}


def _mixtral(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A Mixtral-style mixture of experts: 4 experts of 344 neurons per layer, each token routed to 2 (the Llama's
    688 neurons per token), no auxiliary loss; the Llama sizes otherwise."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        **{**_LM, "intermediate_size": 344}, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.0
    )
    return MixtralForCausalLM(cfg), {}


def _gpt2(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """GPT-2 (fused qkv split at a stored width, MLP 4x): the Llama's hidden size, layers and heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=4, n_inner=1024, n_positions=128)
    return GPT2LMHeadModel(cfg), {}


def _opt(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """OPT (reshapes by a stored head count and width, MLP 4x): the Llama's hidden size, layers and heads."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
                    word_embed_proj_dim=256, max_position_embeddings=128)  # fmt: skip
    return OPTForCausalLM(cfg), {}


def _phi3(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Phi-3 (fused qkv split at its config's head count, fused gate/up): the Llama's sizes."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_LM, pad_token_id=0)), {}


def _mamba2(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Mamba-2 (hidden 256, 4 layers of mixers only: 16 heads of 32 in 2 groups, a state of 64; a unit is a group):
    the torch path of its chunked scan (no ``mamba_ssm`` kernels)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    cfg = Mamba2Config(vocab_size=1000, hidden_size=256, num_hidden_layers=4, expand=2, num_heads=16, head_dim=32,
                       n_groups=2, state_size=64, chunk_size=64)  # fmt: skip
    return Mamba2ForCausalLM(cfg), {}


def _inputs(batch: int, *shape: int, classes: int = 10, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=gen), torch.randint(0, classes, (batch,), generator=gen)


# the encoders' sizes (BERT's)
_ENCODER = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)


def _vit(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """ViT for image classification (hidden 256, 4 layers, 4 heads, MLP 1024): 64 x 64 images in 8 x 8 patches (64
    patches and the class token)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=64, patch_size=8, num_labels=10, **_ENCODER)
    images, labels = _inputs(batch, 3, 64, 64)
    return ViTForImageClassification(cfg), {"pixel_values": images, "labels": labels}


def _convnext(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """ConvNeXt for image classification (stages of 64, 128, 256 channels, 2 blocks each; an MLP of 4x per block,
    whose neurons are the units; the convolutions are rows): 64 x 64 images."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(hidden_sizes=[64, 128, 256], depths=[2, 2, 2], num_stages=3, num_labels=10)
    images, labels = _inputs(batch, 3, 64, 64)
    return ConvNextForImageClassification(cfg), {"pixel_values": images, "labels": labels}


def _whisper(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Whisper (d_model 256, 2 encoder and 2 decoder layers, 4 heads, MLP 1024): 80 mel bins over ``2 x seq`` frames
    (``seq`` encoder positions), ``seq / 4`` decoder tokens as labels."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=1000, d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, num_mel_bins=80,
                        max_source_positions=seq, max_target_positions=seq, pad_token_id=0, decoder_start_token_id=1,
                        bos_token_id=1, eos_token_id=2, suppress_tokens=None, begin_suppress_tokens=None)  # fmt: skip
    features, _ = _inputs(batch, 80, 2 * seq)
    labels = torch.randint(3, 1000, (batch, seq // 4), generator=torch.Generator().manual_seed(4))
    return WhisperForConditionalGeneration(cfg), {"input_features": features, "labels": labels}


def _wav2vec2(batch: int, seq: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """wav2vec 2.0 for audio classification (hidden 256, 4 layers, 4 heads, MLP 1024; its 7 feature convolutions of
    128 channels, rows): 1 s of 16 kHz audio (49 frames)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    cfg = Wav2Vec2Config(conv_dim=(128,) * 7, num_labels=10, mask_time_prob=0.0, layerdrop=0.0, **_ENCODER)
    audio, labels = _inputs(batch, 16000)
    return Wav2Vec2ForSequenceClassification(cfg), {"input_values": audio, "labels": labels}


MODELS = {
    "bert": _bert, "llama": _llama, "qwen3_5": _qwen3_5, "mixtral": _mixtral, "gpt2": _gpt2, "opt": _opt, "phi3": _phi3,
    "mamba2": _mamba2, "vit": _vit, "convnext": _convnext, "whisper": _whisper, "wav2vec2": _wav2vec2,
}  # fmt: skip
_NOT_TEXT = ("pixel_values", "input_features", "input_values")  # models whose inputs are no token ids


def _make(kind: str, mode: str, scenario: str, batch: int, seq: int, compiled: bool = False) -> Case:
    torch.manual_seed(0)
    model, extra = MODELS[kind](batch, seq)
    model.train()
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(1))
    inputs = {**({} if any(k in extra for k in _NOT_TEXT) else {"input_ids": ids}), **extra}
    if "labels" not in inputs:
        inputs["labels"] = ids
    if kind == "bert" and "labels" in extra:
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(2))
    base = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt: torch.optim.Optimizer = base
    if mode != "baseline":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = RolePlan.preset(scenario, table="uniform")
            opt = LeaderCloneOptimizer(model, base, plan, clone_mode=mode, seed=0)
    if compiled:
        with torch.no_grad():
            model(**inputs)
        if isinstance(opt, LeaderCloneOptimizer):
            opt.couple_norms()
    forward = torch.compile(model) if compiled else model

    def loss_backward() -> None:
        forward(**inputs).loss.backward()

    def step() -> None:
        loss_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the first step settles lazy state (norm coupling, compilation) before FLOPs are counted
    counter = flop_counter()
    with counter, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the counter's global module hooks around a compiled module
        loss_backward()
    opt.zero_grad(set_to_none=True)
    name = f"{kind}/{mode}" if mode == "baseline" else f"{kind}/{mode}/{scenario}"
    case = Case(name + ("/compiled" if compiled else ""), step, counter.get_total_flops())
    state = [v for st in base.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    case.state_bytes = opt.state_bytes() if opt is not base else sum(t.numel() * t.element_size() for t in state)
    if not compiled:
        case.saved_bytes = _saved_bytes(model, loss_backward)
        opt.zero_grad(set_to_none=True)
    return case


def _saved_bytes(model: nn.Module, loss_backward: Callable[[], None]) -> int:
    """Bytes of the tensors autograd saves for backward in one forward + backward (each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_backward()
    return sum(seen.values())


def _profile(case: Case, steps: int) -> dict[str, tuple[float, int]]:
    """Self CPU time (ms per step) and calls per step of every op over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            case.step()
    out: dict[str, tuple[float, int]] = defaultdict(lambda: (0.0, 0))
    for ev in prof.key_averages():
        if ev.key.startswith(("Optimizer.", "ProfilerStep", "## ")):
            continue  # wrappers: their self time is Python overhead, reported under "(other)"
        out[ev.key] = (ev.self_cpu_time_total / 1e3 / steps, ev.count // steps)
    return dict(out)


def _profile_table(kind: str, base: dict, other: dict, top: int) -> list[str]:
    keys = set(base) | set(other)
    diff = sorted(keys, key=lambda k: -abs(other.get(k, (0.0, 0))[0] - base.get(k, (0.0, 0))[0]))
    tot_b = sum(v[0] for v in base.values())
    tot_o = sum(v[0] for v in other.values())
    lines = [
        f"{kind}: profiled self CPU time per step, ops by |difference| (total {tot_b:.1f} -> {tot_o:.1f} ms)",
        "| op | baseline ms | calls | this case ms | calls | difference ms |",
        "|---|---|---|---|---|---|",
    ]
    for k in diff[:top]:
        b, o = base.get(k, (0.0, 0)), other.get(k, (0.0, 0))
        lines.append(f"| `{k}` | {b[0]:.1f} | {b[1]} | {o[0]:.1f} | {o[1]} | {o[0] - b[0]:+.1f} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (every case steps once per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--scenarios", nargs="+", default=["mild", "aggressive"], choices=["mild", "aggressive"])
    parser.add_argument("--compile", action="store_true", help="also time every case under torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="rows of each profile table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    cases = {}
    for kind in args.models:
        for mode in MODES:
            for scenario in args.scenarios[:1] if mode == "baseline" else args.scenarios:
                for compiled in (False, True) if args.compile else (False,):
                    case = _make(kind, mode, scenario, args.batch, args.seq, compiled)
                    cases[case.name] = case
    for _ in range(args.warmup):
        for case in cases.values():
            case.step()
    for _ in range(args.steps):
        for case in cases.values():
            t0 = time.perf_counter()
            case.step()
            case.times.append(time.perf_counter() - t0)

    def ratio(a: Case, b: Case) -> float:
        return statistics.median(x / y for x, y in zip(a.times, b.times))

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch} x seq {args.seq}, "
        f"{args.steps} timed rounds, medians"
    )
    print(
        "| case | step ms | vs baseline | compiled / eager | GFLOPs (fwd+bwd) | FLOPs vs baseline | time / FLOPs "
        "| activations MB | optimizer state MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    result: dict[str, float] = {}
    for name, case in cases.items():
        kind = name.split("/")[0]
        base = cases[f"{kind}/baseline" + ("/compiled" if name.endswith("/compiled") else "")]
        r, fr = ratio(case, base), case.flops / base.flops
        eager = cases.get(name.removesuffix("/compiled"))
        vs_eager = f"{ratio(case, eager):.3f}" if case is not eager else "-"
        act = f"{case.saved_bytes / 2**20:.1f}" if case.saved_bytes >= 0 else "-"
        print(
            f"| {name} | {statistics.median(case.times) * 1e3:.1f} | {r:.3f} | {vs_eager} | {case.flops / 1e9:.2f} | "
            f"{fr:.3f} | {r / fr:.3f} | {act} | {case.state_bytes / 2**20:.1f} |"
        )
        if case is not base:
            key = name.replace("/", "_").replace("-", "_")
            result[f"{key}_vs_baseline"] = r
            result[f"{key}_time_over_flops"] = r / fr
            result[f"{key}_flops_vs_baseline"] = fr
            if case.saved_bytes >= 0:
                result[f"{key}_activations_vs_baseline"] = case.saved_bytes / base.saved_bytes
    if not args.no_profile:
        for kind in args.models:
            base = _profile(cases[f"{kind}/baseline"], args.profile_steps)
            for name in [n for n in cases if n.startswith(f"{kind}/output") and not n.endswith("/compiled")]:
                out = _profile(cases[name], args.profile_steps)
                print()
                print("\n".join(_profile_table(name, base, out, args.top)))
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
