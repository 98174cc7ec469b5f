"""What constructing a ``LeaderCloneOptimizer`` costs on a transformers model, and how much of it the dataflow probe
of its blocks takes (one forward pass on the model's dummy inputs, then a few runs of one block per kind: see
``egg_optim.core.probe.probe_blocks``).

Per model (random init from a config, float32 on this machine's CPU, no download): the median seconds of
``discover(model, probe=False)`` (blocks by structure alone), ``discover(model)`` (with the probe) and the whole
construction (``LeaderCloneOptimizer(model, AdamW, "mild", clone_mode="output")``, probe included) and the same with
``repack=True`` on the seed's drawn first roles (the check of which layers may move their units: forward passes
with the units of groups of layers swapped; then every block reordered), each on a fresh model, interleaved over
rounds. Writes
``docs/results/bench_construct.md``::

    python benchmarks/bench_construct.py              # 3 rounds
    python benchmarks/bench_construct.py --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from egg_optim import LeaderCloneOptimizer
from egg_optim.core.blocks import discover


def _llama(hidden: int, layers: int, inner: int, heads: int, kv: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inner,
                                       num_hidden_layers=layers, num_attention_heads=heads,
                                       num_key_value_heads=kv)  # fmt: skip
        return transformers.LlamaForCausalLM(cfg)

    return make


def _gpt_oss() -> nn.Module:
    import transformers

    cfg = transformers.GptOssConfig(vocab_size=32000, hidden_size=512, intermediate_size=512, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=8,
                                    num_experts_per_tok=2, sliding_window=128)  # fmt: skip
    return transformers.GptOssForCausalLM(cfg)


def _llava() -> nn.Module:
    """A vision-language model: a CLIP ViT-B/16 tower at 224 px (196 image tokens) beside the Llama h1024 above; its
    probe runs the tower on a dummy image placed among the tokens (``probe._placed_images``)."""
    import transformers

    vision = {"model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "image_size": 224, "patch_size": 16}  # fmt: skip
    text = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
            "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4}  # fmt: skip
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999,
                                   image_seq_length=196)  # fmt: skip
    return transformers.LlavaForConditionalGeneration(cfg)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "Llama h1024, 8 layers, GQA 16/4 (~150M)": _llama(1024, 8, 2816, 16, 4),
    "Llama h2048, 4 layers, GQA 32/8 (~330M)": _llama(2048, 4, 5632, 32, 8),
    "GPT-OSS h512, 8 layers, 8 experts (~90M)": _gpt_oss,
    "LLaVA: CLIP ViT-B/16 224 px + the Llama h1024 (~240M)": _llava,
}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    times: dict[str, dict[str, list[float]]] = {
        name: {"structure": [], "probe": [], "whole": [], "repack": []} for name in MODELS
    }
    params: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, make in MODELS.items():
            model = make()
            params[name] = sum(p.numel() for p in model.parameters())
            times[name]["structure"].append(_seconds(lambda m=model: discover(m, probe=False)))
            model = make()
            times[name]["probe"].append(_seconds(lambda m=model: discover(m)))
            model = make()
            base = torch.optim.AdamW(model.parameters())
            times[name]["whole"].append(
                _seconds(lambda m=model, b=base: LeaderCloneOptimizer(m, b, "mild", clone_mode="output"))
            )
            model = make()
            base = torch.optim.AdamW(model.parameters())
            times[name]["repack"].append(
                _seconds(
                    lambda m=model, b=base: LeaderCloneOptimizer(
                        m, b, "mild", clone_mode="output", repack=True, first_roles="drawn"
                    )
                )
            )
    lines = [
        "# Constructing the optimizer: the cost of the dataflow probe",
        "",
        f"`python benchmarks/bench_construct.py --rounds {args.rounds}` (torch {torch.__version__}, CPU, float32, "
        f"{torch.get_num_threads()} threads; median seconds over rounds, each on a fresh random-init model).",
        "",
        "| model | parameters | blocks by structure | with the probe | whole construction (output mode, mild) "
        "| with repack=True, drawn roles |",
        "|---|---|---|---|---|---|",
    ]
    medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    for name, med in medians.items():
        lines.append(f"| {name} | {params[name] / 1e6:.0f}M | {med['structure']:.3f} s | {med['probe']:.3f} s | "
                     f"{med['whole']:.3f} s | {med['repack']:.3f} s |")  # fmt: skip
    lines += [
        "",
        "The probe (one forward pass of the whole model on its dummy inputs, a few tokens, one more in training "
        "mode under ``no_grad``, then a few runs of one block per class and of each experts block, perturbed) is "
        "most of the construction time; the structure alone reads shapes and config values. ``repack=True`` adds "
        "the check of which layers may move their units (the model run with every block's units swapped, then every "
        "plain layer's, then halves of a group whose output changed) and the reordering of every block the drawn "
        "roles scattered.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_construct.md").write_text(text)
    return medians


if __name__ == "__main__":
    main()
