"""The dataflow probe of transformer blocks: what :func:`egg_optim.core.blocks.discover` found by structure, checked
on one forward pass of the model's dummy inputs.

Per class of block (same modules, parameters and slices), changing one unit's producer positions must change that
unit's inputs of the consumer (output or down projection) and no other unit's: a fused qkv projection or a gated
query takes the layout under which that holds, experts (no consumer module) are checked by ablation (which settles
their gate/up layout), a block whose units mix is left alone (:class:`~egg_optim.core.blocks.Skipped`), shapes that
only looked like a block are dropped, and a clone that cannot compute what its source does (per-head values that
are no unit's: ALiBi slopes) is noted; block parameters that are all zeros take random values for these checks
(:func:`_woken`). The same pass shows which Linear / ConvNd layers the model returns the output of (output heads)
and which it computes with without calling them (:class:`_LayerWatch`). The dummy inputs are completed from the
model's config where it takes images, audio or spectrograms (:func:`_modal_inputs`), and for a vision-language model
with images and their tokens among its token ids (:func:`_placed_images`: its vision tower checked too, or, where the
model does not run on them, the token ids alone). Nothing is decided where the model cannot run here. Under FSDP2
the forward
pass is FSDP2's own and each checked block's ``fully_shard``-ed module is gathered for its checks (every rank probes
the same blocks in the same order: the gathers are collectives), then sharded again.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import ConfigError
from . import sharding
from .blocks import (
    Discovery,
    Skipped,
    UnitGroup,
    UnitSlice,
    _configs,
    _expert_index,
    _is_conv1d,
    _layout_index,
)
from .units import MANAGED_TYPES

logger = logging.getLogger("egg_optim")


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first floating-point tensor of a module's output (its hidden states, in transformers' conventions)."""
    if torch.is_tensor(out):
        return out if out.is_floating_point() else None
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def _is_cache(x: Any) -> bool:
    return any(c.__name__ == "Cache" for c in type(x).__mro__)


def fresh_inputs(x: Any) -> Any:
    """Inputs for one check run: tensors copied (a block may write its input in place), key/value caches
    dropped (a run must not append to the cache the real forward pass uses)."""
    if torch.is_tensor(x):
        return x.detach().clone()
    if _is_cache(x):
        return None
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(fresh_inputs(v) for v in x)
    if isinstance(x, list):
        return [fresh_inputs(v) for v in x]
    if type(x) is dict:
        return {k: fresh_inputs(v) for k, v in x.items()}
    return x


_NO_IMAGES: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models the probe found not to run on dummy images


def _dummy_inputs(model: nn.Module, images: bool = True) -> dict[str, torch.Tensor] | None:
    """The model's own dummy inputs (transformers' ``dummy_inputs``), completed from its config where its forward
    pass takes more or other inputs than token ids (:func:`_modal_inputs`: images, waveforms, spectrograms; decoder
    inputs for an encoder-decoder; ``images``: an image placed among the token ids of one sequence or read by
    cross-attention, :func:`_placed_images`, and a spectrogram placed so, :func:`_placed_audio`); ``None`` where
    there are none or the model is on the meta device."""
    inputs = getattr(model, "dummy_inputs", None)
    main = getattr(model, "main_input_name", "input_ids")
    try:
        p = next(model.parameters())
    except StopIteration:
        return None
    if p.device.type == "meta" or not isinstance(inputs, Mapping):
        return None
    try:
        takes = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        takes = set()
    dtype = p.dtype if p.is_floating_point() else torch.float32
    inputs = {k: v for k, v in inputs.items() if torch.is_tensor(v) and (k in takes or not takes)}
    if main != "input_ids" and "input_ids" not in takes:
        inputs.pop("input_ids", None)  # token ids an audio or vision model's forward pass does not take
    cfg = getattr(model, "config", None)
    batch = inputs["input_ids"].shape[0] if "input_ids" in inputs else 2
    for name, value in _modal_inputs(cfg, takes | {main}, dtype, batch).items():
        inputs.setdefault(name, value)
    if images and model not in _NO_IMAGES and "input_ids" in inputs and "pixel_values" not in inputs:
        placed = None
        try:  # one sequence: an image's tokens make it long (hundreds), and the vision tower runs once per image
            placed = _placed_images(model, takes, dtype, inputs["input_ids"][:1])
        except Exception as exc:  # noqa: BLE001 - a config read otherwise: no images, the vision tower by structure
            logger.debug("egg_optim: no dummy images for %s (%s)", type(model).__name__, exc)
        if placed:
            inputs = {k: v[:1] for k, v in inputs.items()} | placed
    if images and model not in _NO_IMAGES and "input_ids" in inputs and "input_features" not in inputs:
        placed = None
        try:  # one sequence, as for images
            placed = _placed_audio(model, takes, dtype, inputs["input_ids"][:1])
        except Exception as exc:  # noqa: BLE001 - a config read otherwise: no audio, the audio tower by structure
            logger.debug("egg_optim: no dummy audio for %s (%s)", type(model).__name__, exc)
        if placed:
            inputs = {k: v[:1] for k, v in inputs.items()} | placed
    if main not in inputs:
        return None
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs:
        # BART- and Whisper-like models make no decoder inputs from the inputs alone
        vocab = getattr(_decoder_config(cfg), "vocab_size", None) or 2
        inputs["decoder_input_ids"] = inputs.get("input_ids", torch.arange(5).remainder(vocab).repeat(batch, 1))
    return {k: v.to(p.device) for k, v in inputs.items()}


def _decoder_config(cfg: Any) -> Any:
    return getattr(cfg, "decoder", None) or getattr(cfg, "text_config", None) or cfg


def _modal_inputs(cfg: Any, takes: set[str], dtype: torch.dtype, batch: int) -> dict[str, torch.Tensor]:
    """Inputs of other modalities that a model's forward pass takes (``takes``), of the sizes its config gives:
    ``pixel_values`` (images of the vision config's size: a vision model, CLIP's two towers; videos of its
    ``num_frames`` such images: VideoMAE; for a model that takes each image's ``spatial_shapes``, SigLIP 2's, the
    patches of one square grid of the config's ``num_patches``, flattened, with that grid and a
    ``pixel_attention_mask`` of ones; not for a model that places images among its tokens, whose token ids must hold
    theirs: :func:`_placed_images`), ``input_values`` (a waveform long enough for
    the feature encoder's convolutions to give 16 frames: wav2vec 2.0, HuBERT, WavLM; where the config does not size
    them, a second at 16 kHz for a model that takes no token ids beside it: Moonshine), ``input_features`` (a log-mel
    spectrogram of the length the encoder expects: Whisper; or 16 frames of the features a feature projection reads,
    ``feature_projection_input_dim`` wide: wav2vec 2.0-BERT). Fixed seed."""
    gen = torch.Generator().manual_seed(0)
    configs = list(_configs(cfg))
    out: dict[str, torch.Tensor] = {}
    vision = next((c for c in configs if hasattr(c, "num_channels") and hasattr(c, "image_size")), None)
    vision = vision or next((c for c in configs if hasattr(c, "num_channels")), None)  # any size: SegFormer, ResNet
    placed = any(hasattr(c, a) for c in configs for a in ("image_token_id", "image_token_index"))
    patches, patch = getattr(vision, "num_patches", None), getattr(vision, "patch_size", None)
    if (
        "pixel_values" in takes
        and vision is not None
        and not placed
        and "spatial_shapes" in takes
        and patches
        and patch
    ):
        # images as their patches flattened (NaFlex: SigLIP 2), each with its grid: one square grid of every patch
        side, (height, width) = math.isqrt(patches), _pair(patch)
        pixels = torch.randn(batch, side * side, vision.num_channels * height * width, generator=gen)
        out["pixel_values"] = pixels.to(dtype)
        out["spatial_shapes"] = torch.tensor([[side, side]]).repeat(batch, 1)
        if "pixel_attention_mask" in takes:
            out["pixel_attention_mask"] = torch.ones(batch, side * side, dtype=torch.long)
    elif "pixel_values" in takes and vision is not None and not placed:
        size = getattr(vision, "image_size", None) or 64
        size = (size, size) if isinstance(size, int) else tuple(size)
        frames = getattr(vision, "num_frames", None)  # a video model (VideoMAE): its frames, each an image
        shape = (batch, *([frames] if isinstance(frames, int) and frames > 0 else []), vision.num_channels, *size[-2:])
        out["pixel_values"] = torch.randn(*shape, generator=gen).to(dtype)
    kernels, strides = getattr(cfg, "conv_kernel", None), getattr(cfg, "conv_stride", None)
    if "input_values" in takes and kernels and strides and len(kernels) == len(strides):
        length, step = 1, 1
        for k, s in zip(kernels, strides):  # the receptive field of the convolutions, then 15 more frames
            length, step = length + (k - 1) * step, step * s
        out["input_values"] = torch.randn(batch, length + 15 * step, generator=gen).to(dtype)
    elif "input_values" in takes and "input_ids" not in takes:  # convolutions its code sizes (Moonshine's)
        out["input_values"] = torch.randn(batch, 16000, generator=gen).to(dtype)
    mels, positions = getattr(cfg, "num_mel_bins", None), getattr(cfg, "max_source_positions", None)
    features = getattr(cfg, "feature_projection_input_dim", None)
    if "input_features" in takes and mels and positions:  # two stride-1 and -2 convolutions down to the positions
        out["input_features"] = torch.randn(batch, mels, 2 * positions, generator=gen).to(dtype)
    elif "input_features" in takes and features:  # frames of features, projected (wav2vec 2.0-BERT's conformer)
        out["input_features"] = torch.randn(batch, 16, features, generator=gen).to(dtype)
    return out


_IMAGE_TOKEN = ("image_token_id", "image_token_index")
# what a config says one image becomes among the tokens (Gemma 3, LLaVA, PaliGemma's text config, Idefics)
_TOKENS_PER_IMAGE = ("mm_tokens_per_image", "image_seq_length", "num_image_tokens", "image_seq_len")


def _placed_images(
    model: nn.Module, takes: set[str], dtype: torch.dtype, ids: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """Images for a vision-language model that places their features among its token ids (LLaVA, LLaVA-NeXT,
    LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V, Gemma 3, PaliGemma, Idefics3, SmolVLM, Mistral 3,
    InternVL, Llama 4, Aya Vision, Ovis2): one image per sequence, as its vision config sizes it (Qwen-VL's and
    GLM-4.1V's flattened patches of a grid of 2x2 merged patches, with ``image_grid_thw``; Idefics' images per
    sequence, with ``pixel_attention_mask``; LLaVA-NeXT's tiles of an image of its first grid's size, after the whole
    image; ``image_sizes`` where the model needs them), and that many image tokens before each sequence's ids (ids
    that are image tokens already replaced), ``mm_token_type_ids`` marking them. How many tokens an image becomes is
    what the model's ``get_image_features`` gives for it (run once, in eval mode, nothing kept), else what the config
    says. ``None`` where the config does not say enough: the vision tower is then not run (its blocks by
    structure)."""
    configs = list(_configs(getattr(model, "config", None)))
    token = next((v for c in configs for a in _IMAGE_TOKEN if isinstance(v := getattr(c, a, None), int)), None)
    vision = next((c for c in configs if hasattr(c, "patch_size") and _channels(c)), None)
    # (a vision config that names no channels, its tower taking RGB: BLIP-2's)
    vision = vision or next((c for c in configs if hasattr(c, "patch_size") and hasattr(c, "image_size")), None)
    if token is None or vision is None or "pixel_values" not in takes:
        return None
    gen = torch.Generator().manual_seed(0)
    batch, channels, patch = ids.shape[0], _channels(vision) or 3, _pair(vision.patch_size)[-1]
    if {"cross_attention_mask", "aspect_ratio_ids"} <= takes:  # read by cross-attention, in tiles (Mllama)
        return _cross_attended_images(vision, takes, dtype, ids, token, _free_id(configs), channels, gen)
    extra: dict[str, torch.Tensor] = {}
    if "image_grid_thw" in takes:  # Qwen2-VL: patches flattened, 2x2 merged patches of each image
        merge, frames = getattr(vision, "spatial_merge_size", 1), getattr(vision, "temporal_patch_size", 1)
        side = 2 * merge
        pixels = torch.randn(batch * side * side, channels * frames * patch * patch, generator=gen)
        extra["image_grid_thw"] = torch.tensor([[1, side, side]]).repeat(batch, 1)
        one = {"pixel_values": pixels[: side * side], "image_grid_thw": extra["image_grid_thw"][:1]}
    else:
        size = whole = _pair(getattr(vision, "image_size", None) or 4 * patch)
        shape = (batch, 1) if "pixel_attention_mask" in takes else (batch,)  # Idefics: images per sequence
        if grids := next((g for c in configs if (g := getattr(c, "image_grid_pinpoints", None))), None):
            # LLaVA-NeXT: an image of the first grid's size, as the whole image shrunk to one tile, then its tiles
            whole = _pair(grids[0])
            shape = (batch, 1 + (whole[0] // size[0]) * (whole[1] // size[1]))
        pixels = torch.randn(*shape, channels, *size, generator=gen)
        one = {"pixel_values": pixels[:1]}
        if _required(getattr(model, "get_image_features", None), "image_sizes"):  # Mistral 3: each image's size
            extra["image_sizes"] = torch.tensor([whole]).repeat(batch, 1)
            one["image_sizes"] = extra["image_sizes"][:1]
    one["pixel_values"] = one["pixel_values"].to(dtype)
    per_image = _image_tokens(model, one, configs)
    if not per_image:
        return None
    ids = torch.cat([torch.full((batch, per_image), token), ids.masked_fill(ids == token, _free_id(configs))], dim=1)
    out = {"input_ids": ids, "pixel_values": pixels.to(dtype), **extra}
    if "mm_token_type_ids" in takes:  # Qwen2-VL's multimodal rotary positions: 1 marks an image's tokens
        out["mm_token_type_ids"] = (ids == token).int()
    if "attention_mask" in takes:
        out["attention_mask"] = torch.ones_like(ids)
    return out


def _cross_attended_images(
    vision: Any,
    takes: set[str],
    dtype: torch.dtype,
    ids: torch.Tensor,
    token: int,
    free: int,
    channels: int,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Images that the language model reads by cross-attention (Mllama), not among its tokens: one image per
    sequence in the vision config's ``max_num_tiles`` tiles of its size, the first supported aspect ratio's tiles
    real (``aspect_ratio_ids`` 1; 0 is padding), the others padding (``aspect_ratio_mask``); its image token first,
    and a ``cross_attention_mask`` by which every token reads its real tiles."""
    batch = ids.shape[0]
    ids = torch.cat([torch.full((batch, 1), token), ids.masked_fill(ids == token, free)], dim=1)
    size = _pair(getattr(vision, "image_size", None) or 4 * _pair(vision.patch_size)[-1])
    tiles = getattr(vision, "max_num_tiles", None) or 1
    ratio = (getattr(vision, "supported_aspect_ratios", None) or [[1, 1]])[0]
    mask = (torch.arange(tiles) < min(tiles, int(ratio[0]) * int(ratio[1]))).long().repeat(batch, 1, 1)
    out = {"input_ids": ids, "pixel_values": torch.randn(batch, 1, tiles, channels, *size, generator=gen).to(dtype),
           "aspect_ratio_ids": torch.ones(batch, 1, dtype=torch.long), "aspect_ratio_mask": mask}  # fmt: skip
    out["cross_attention_mask"] = mask[:, None].expand(batch, ids.shape[1], *mask.shape[1:]).clone()
    if "attention_mask" in takes:
        out["attention_mask"] = torch.ones_like(ids)
    return out


_AUDIO_TOKEN = ("audio_token_id", "audio_token_index")


def _placed_audio(
    model: nn.Module, takes: set[str], dtype: torch.dtype, ids: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """A spectrogram for a model that places its audio tower's frames among its token ids (Qwen2-Audio): one per
    sequence, as long as its audio config's encoder takes (Whisper's: two convolutions, stride 1 then 2, down to
    ``max_source_positions``), ``feature_attention_mask`` all ones where the model takes it, and as many audio tokens
    before each sequence's ids as the audio tower (the module of the audio config) makes frames of one (run once, in
    eval mode, nothing kept; ids that are audio tokens already replaced). ``None`` where the config does not say
    enough, or the tower is sharded: the audio tower is then not run (its blocks by structure)."""
    configs = list(_configs(getattr(model, "config", None)))
    token = next((v for c in configs for a in _AUDIO_TOKEN if isinstance(v := getattr(c, a, None), int)), None)
    audio = next((c for c in configs if hasattr(c, "num_mel_bins") and hasattr(c, "max_source_positions")), None)
    tower = next((m for m in model.modules() if audio is not None and getattr(m, "config", None) is audio), None)
    if token is None or tower is None or "input_features" not in takes:
        return None
    if any(sharding.is_sharded(q) for q in tower.parameters()):  # (a collective the ranks might not all reach)
        return None
    gen = torch.Generator().manual_seed(0)
    batch, length = ids.shape[0], 2 * audio.max_source_positions
    features = torch.randn(batch, audio.num_mel_bins, length, generator=gen).to(dtype)
    p = next(tower.parameters())
    with torch.no_grad(), checking_pass(model):
        frames = first_tensor(tower(features[:1].to(p.device)))
    if frames is None or frames.dim() < 3:
        return None
    ids = torch.cat([torch.full((batch, frames.shape[-2]), token), ids.masked_fill(ids == token, _free_id(configs))], 1)
    out = {"input_ids": ids, "input_features": features}
    if "feature_attention_mask" in takes:
        out["feature_attention_mask"] = torch.ones(batch, length, dtype=torch.long)
    if "attention_mask" in takes:
        out["attention_mask"] = torch.ones_like(ids)
    return out


def _required(func: Any, name: str) -> bool:
    """Whether ``func`` takes argument ``name`` without a default (LLaVA takes ``image_sizes`` for a Pixtral tower
    only, Mistral 3 always)."""
    try:
        param = inspect.signature(func).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def _channels(cfg: Any) -> int | None:
    return getattr(cfg, "num_channels", None) or getattr(cfg, "in_channels", None) or getattr(cfg, "in_chans", None)


def _pair(size: Any) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)[-2:]


def _free_id(configs: list[Any]) -> int:
    """A text token to stand in place of an image token among the ids: the first id no config names."""
    special = _special_ids(configs)
    return next(i for i in range(len(special) + 1) if i not in special)


def _special_ids(configs: list[Any]) -> set[int]:
    """Token ids a config names (image, video, begin/end of image, padding, Ovis2's visual indicator ids...): no
    plain text token."""
    named = [v for c in configs for k, v in vars(c).items() if k.endswith(("token_id", "token_index", "token_ids"))]
    return {i for v in named for i in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(i, int)}


def _image_tokens(model: nn.Module, one: dict[str, torch.Tensor], configs: list[Any]) -> int | None:
    """How many token positions one image's features fill: counted on the model's ``get_image_features`` (its
    features, one row per token), else read from the config (:data:`_TOKENS_PER_IMAGE`); not run on a sharded
    model (a collective the ranks might not all reach)."""
    features = getattr(model, "get_image_features", None)
    p = next(model.parameters())
    if features is not None and not any(sharding.is_sharded(q) for q in model.parameters()):
        try:
            with torch.no_grad(), checking_pass(model):
                out = features(**{k: v.to(p.device) for k, v in one.items()})
            out = getattr(out, "pooler_output", out)
            rows = [t for t in (out if isinstance(out, (list, tuple)) else [out]) if torch.is_tensor(t)]
            if rows:
                return sum(t.shape[:-1].numel() for t in rows)
        except Exception as exc:  # noqa: BLE001 - the config may still say
            logger.debug("egg_optim: no image features from %s (%s)", type(model).__name__, exc)
    return next((v for c in configs for a in _TOKENS_PER_IMAGE if isinstance(v := getattr(c, a, None), int)), None)


@contextmanager
def checking_pass(model: nn.Module) -> Iterator[None]:
    """Run a check's forward passes on ``model`` in eval mode, and put back after what they may change: each
    module's training flag, and the tensors a forward pass keeps in public attributes (Qwen2-VL's multimodal rotary
    offsets per sequence, ``rope_deltas``, which a later generation would read: a tensor attribute it set is removed
    or given its former value, one it cleared is set again). Other attributes stay as the passes left them (a lazy
    layer's sizes, found by such a pass)."""
    tensors = lambda m: {k: v for k, v in vars(m).items() if not k.startswith("_") and torch.is_tensor(v)}  # noqa: E731
    saved = [(m, m.training, dict(vars(m)), tensors(m)) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training, before, kept in saved:
            m.training = training
            for k in tensors(m).keys() - kept.keys():  # a tensor it set: as before (absent or another value)
                if k in before:
                    setattr(m, k, before[k])
                else:
                    delattr(m, k)
            for k, v in kept.items():  # a tensor it replaced or cleared
                if vars(m).get(k) is not v:
                    setattr(m, k, v)


def example_call(model: nn.Module, inputs: Any) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` of the probe's forward pass: ``inputs`` as given (a mapping of keyword arguments, a tuple
    or list of positional ones, or one tensor), its top-level tensors moved to the model's device; else the
    model's dummy inputs; ``None`` where there are none."""
    if inputs is None:
        dummy = _dummy_inputs(model)
        return None if dummy is None else ((), dummy)
    device = next((p.device for p in model.parameters()), None)
    moved = lambda v: v.to(device) if torch.is_tensor(v) and device is not None else v  # noqa: E731
    if isinstance(inputs, Mapping):
        return (), {k: moved(v) for k, v in inputs.items()}
    return tuple(moved(v) for v in (inputs if isinstance(inputs, (tuple, list)) else (inputs,))), {}


@torch.no_grad()
def probe_blocks(model: nn.Module, found: Discovery, inputs: Any = None) -> None:
    """Check by dataflow, on one forward pass of the model's dummy inputs (or of ``inputs``, a batch as the model
    takes it: one it cannot run on raises :class:`~egg_optim.errors.ConfigError`), that each kind of block computes
    its units apart: changing one unit's producer positions changes that unit's inputs of the consumer (output or
    down projection) and no other unit's. A fused qkv projection takes the layout under which that holds (``[q | k |
    v]`` blocks or per-group interleaved); a block whose units spill into each other (a norm or a mix across heads or
    neurons that its structure does not show) becomes :class:`Skipped`. Blocks of one class and shapes are checked
    once. The pass also sets ``found.outputs`` and ``found.read_directly`` (:class:`_LayerWatch`), for a model with
    no blocks too. Nothing is decided where the model cannot run here (no dummy inputs, parameters sharded otherwise
    than by ``fully_shard``, an error)."""
    modules = dict(model.named_modules())
    runners = {n: r for n, g in found.groups.items() if (r := _runner(modules, g)) is not None}
    call = example_call(model, inputs)
    sharded = any(sharding.is_sharded(p) for p in model.parameters())
    if call is None or (sharded and not _gatherable(model)):
        return
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = [
        modules[r].register_forward_pre_hook(
            lambda m, a, k, r=r: calls.setdefault(r, (a, k)) and None, with_kwargs=True
        )
        for r in set(runners.values())
    ]
    settled: dict[tuple, tuple[UnitGroup, str, str]] = {}  # per class and shapes: the first block's layout, verdict
    passes = ExitStack()
    try:
        passes.enter_context(checking_pass(model))
        watch, returned, used = _watched_pass(model, modules, call, inputs, calls)
        for h in handles:
            h.remove()
        found.outputs = watch.outputs(returned)
        members = {m for g in found.groups.values() for m in g.modules}
        for name in watch.routing:  # routers by dataflow (DBRX's, beside 2-D fused experts no structure shows)
            if name not in members:  # named by the module around it (its experts' block)
                holder = name.rpartition(".")[0]
                if holder in modules and _sole_layer(modules[holder]):  # (a module of the router alone)
                    holder = holder.rpartition(".")[0]
                found.routers.setdefault(name, holder)
        found.read_directly = tuple(dict.fromkeys([*watch.read_directly, *_training_reads(model, modules, used)]))
        for name, runner in runners.items():
            g = found.groups[name]
            if runner not in calls:
                if watch.called.intersection(g.producers) or g.consumer in watch.called:
                    # its layers ran, called one by one by code around them (Gemma 3n's parallel projections in
                    # a ModuleList): its structure says nothing of how they feed each other: no block
                    found.groups.pop(name)
                    logger.debug("egg_optim: %s is no %s block: its layers run outside %s", name, g.kind, runner)
                continue
            key = _signature(modules[runner], g), _call_signature(calls[runner])
            if key in settled:  # the same code on the same shapes: the first block's answer
                first, verdict, why = settled[key]
                why = why.replace(repr(first.consumer), repr(g.consumer))
                g.slices = [UnitSlice(s.param, s.dim, f.index, s.role) for s, f in zip(g.slices, first.slices)]
                g.layout, g.inexact = first.layout, first.inexact.replace(repr(first.consumer), repr(g.consumer))
            else:
                with _gathered(modules, runner) as gathered:
                    verdict, why = _settle(modules, modules[runner], g, *calls[runner]) if gathered else _INNER
                settled[key] = (g, verdict, why)
            g.probed = verdict == "apart"
            if verdict == "unfed":  # shapes that looked like a block (ALBERT's pooler and input mapping): no block
                found.groups.pop(name)
                logger.debug("egg_optim: %s is no %s block: %s", name, g.kind, why)
            elif verdict == "coupled":
                found.groups.pop(name)
                why = f"{g.kind} {name!r}: its units are not computed apart ({why}); its layers are left alone "
                why += "(manage them with units='layers', or name them in RolePlan(layers=[...]))"
                found.skipped[name] = Skipped(name, g.kind, why, tuple(g.modules))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model the dummy inputs do not fit: nothing is decided
        logger.debug("egg_optim: no dummy forward pass for %s (%s)", type(model).__name__, exc)
    finally:
        for h in handles:
            h.remove()
        passes.close()
        if sharded:  # FSDP2's forward leaves the root's parameters gathered
            sharding.reshard(model)


def _watched_pass(
    model: nn.Module, modules: Mapping[str, nn.Module], call: tuple[tuple, dict], inputs: Any, calls: dict
) -> tuple[_LayerWatch, Any, tuple[tuple, dict]]:
    """The probe's forward pass under a layer watch: ``(watch, what the model returned, the call it ran)``. Given
    ``inputs`` the model cannot run on are refused (:class:`ConfigError`); dummy images placed among the tokens that
    it does not take leave it to its token ids alone (its vision tower unchecked, remembered for the model); else
    what it raised."""
    try:
        with (watch := _LayerWatch(modules)):
            return watch, model(*call[0], **call[1]), call
    except Exception as exc:
        if inputs is not None:
            raise ConfigError(
                f"example_inputs: {type(model).__name__} could not run on them ({type(exc).__name__}: {exc}); pass "
                "a batch as the model takes it: a dict of keyword arguments, a tuple of positional ones, or a tensor"
            ) from exc
        text = _dummy_inputs(model, images=False)
        if text is None or text.keys() == call[1].keys():
            raise
        logger.debug("egg_optim: %s did not run on dummy images (%s)", type(model).__name__, exc)
        _NO_IMAGES.add(model)
        calls.clear()  # (recorded by the failed pass)
    with (watch := _LayerWatch(modules)):
        return watch, model(**text), ((), text)


def _training_reads(model: nn.Module, modules: Mapping[str, nn.Module], call: tuple[tuple, dict]) -> tuple[str, ...]:
    """The layers whose weight a training-mode forward pass of ``call`` computes with without calling them (Gemma
    3n's ``correction_coefs``, read clamped in training only), which the eval-mode pass does not show: one more pass,
    in training mode, under ``no_grad``, that changes nothing: buffers (running statistics) and the parameters it
    writes into (Gemma 3n's in-place clamp of ``prediction_coefs``) are put back (:class:`_KeptValues`), and so is
    the random state (dropout). Not run on a sharded model (FSDP2's gathered parameters are its own), nor
    where the pass fails: then the first training step is the check (output mode's ``check_called``)."""
    if any(sharding.is_sharded(p) for p in model.parameters()):
        return ()
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    training = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings(), _KeptValues(model):
            warnings.simplefilter("ignore")  # (training-mode advice, e.g. on caches under gradient checkpointing)
            model.train()
            with (watch := _LayerWatch(modules)):
                model(*call[0], **call[1])
        return tuple(watch.read_directly)
    except Exception as exc:  # noqa: BLE001 - the first step checks what this pass could not
        logger.debug("egg_optim: no training-mode pass for %s (%s)", type(model).__name__, exc)
        return ()
    finally:
        for m, flag in training:
            m.training = flag


class _KeptValues(TorchDispatchMode):
    """Puts back, on exit, every buffer of ``model`` (copied on entry: BatchNorm's kernels update running statistics
    through arguments their schema does not mark as written) and every parameter an aten op wrote into inside the
    block (matched by storage: views and ``.data`` included; copied when first written)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._params: dict[int, list[torch.Tensor]] = {}
        for p in model.parameters():
            self._params.setdefault(p.untyped_storage().data_ptr(), []).append(p)
        self._saved = [(b, b.clone()) for b in model.buffers()]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            given = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
            for a in func._schema.arguments:
                value = given.get(a.name)
                if a.alias_info is not None and a.alias_info.is_write and isinstance(value, torch.Tensor):
                    for p in self._params.pop(value.untyped_storage().data_ptr(), ()):
                        self._saved.append((p, p.detach().clone()))
        return func(*args, **kwargs)

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        with torch.no_grad():
            for t, copy in self._saved:
                t.copy_(copy)


class _LayerWatch(TorchFunctionMode):
    """Watches the probe's forward pass for what each Linear / ConvNd layer does outside its own forward: which
    layers' outputs the model returns (:meth:`outputs`), and which layers' weights the model computes with without
    calling them (:attr:`read_directly`: Mamba's ``dt_proj``; a training-mode pass too: :func:`_training_reads`),
    which output mode cannot give their sources' outputs. Metadata (``weight.dtype``) does not count; a result that is
    a tensor does; a weight tied to another module (an embedding) is that module's to read."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self._layers = {n: m for n, m in modules.items() if isinstance(m, MANAGED_TYPES) or _is_conv1d(m)}
        held: dict[int, int] = {}  # a weight tied to another module's (an embedding's) is read by that module
        for m in modules.values():
            for p in m._parameters.values():
                held[id(p)] = held.get(id(p), 0) + 1
        self._weights = {
            id(w): n
            for n, m in self._layers.items()
            if isinstance(w := m._parameters.get("weight"), torch.Tensor) and held[id(w)] == 1
        }
        self._running: dict[str, int] = {}
        self._produced: dict[int, tuple[str, weakref.ref]] = {}
        self._scores: dict[int, tuple[str, weakref.ref]] = {}  # layer outputs after _ROUTED ops (not themselves)
        self._handles: list[Any] = []
        self.read_directly: dict[str, None] = {}
        self.called: set[str] = set()  # the layers the pass called
        self.routing: dict[str, None] = {}  # layers whose scores pick by top-k (routers), through _ROUTED ops

    def __enter__(self) -> _LayerWatch:
        for n, m in self._layers.items():
            self._handles.append(m.register_forward_pre_hook(lambda m, a, n=n: self._enter(n)))
            self._handles.append(m.register_forward_hook(lambda m, a, out, n=n: self._leave(n, out)))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        super().__exit__(*exc)

    def _enter(self, name: str) -> None:
        self._running[name] = self._running.get(name, 0) + 1
        self.called.add(name)

    def _leave(self, name: str, out: Any) -> None:
        self._running[name] -= 1
        if torch.is_tensor(out):
            self._produced[id(out)] = (name, weakref.ref(out))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fname = getattr(func, "__name__", "")
        if fname in _ROUTED or fname == "topk":
            first = args[0] if args and torch.is_tensor(args[0]) else None
            hit = None if first is None else self._scores.get(id(first)) or self._produced.get(id(first))
            if hit is not None and hit[1]() is first:
                if fname == "topk":
                    self.routing[hit[0]] = None
                elif torch.is_tensor(out):  # scores on their way to a top-k: softmax, sigmoid, a cast, a reshape
                    self._scores[id(out)] = (hit[0], weakref.ref(out))
        if torch.is_tensor(out) and fname != "__get__":
            for a in (*args, *(kwargs or {}).values()):
                name = self._weights.get(id(a)) if torch.is_tensor(a) else None
                if name is not None and not self._running.get(name):
                    self.read_directly[name] = None
        return out

    def outputs(self, returned: Any) -> tuple[str, ...]:
        """The layers whose output tensor is among ``returned`` (the model's), in registration order."""
        hits = {
            self._produced[id(t)][0]
            for t in _returned(returned)
            if id(t) in self._produced and self._produced[id(t)][1]() is t
        }
        return tuple(n for n in self._layers if n in hits)


# what a router's scores pass through before their top-k picks the experts (and what stays the same tensor's values)
_ROUTED = frozenset({"softmax", "log_softmax", "sigmoid", "to", "float", "type_as", "view", "reshape", "contiguous"})


def _sole_layer(module: nn.Module) -> bool:
    """Whether ``module`` holds one Linear / ConvNd and nothing else with parameters (DBRX's router module)."""
    return sum(1 for m in module.modules() if any(True for _ in m.parameters(recurse=False))) == 1


def _returned(out: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors of a model's output (a ``ModelOutput``, tuples, dicts; nested a few levels)."""
    if torch.is_tensor(out):
        yield out
    elif depth < 4 and isinstance(out, (list, tuple, Mapping)):
        for v in out.values() if isinstance(out, Mapping) else out:
            yield from _returned(v, depth + 1)


_INNER = "unknown", "a module inside it is fully_shard-ed itself: FSDP2 would gather over the probe's changes"


def _gatherable(model: nn.Module) -> bool:
    """Whether every sharded parameter is ``fully_shard``'s (FSDP2 gathers it for a forward pass), not tensor
    parallelism's, whose DTensors the probe's edits cannot take."""
    roots = [n for n, m in model.named_modules() if sharding.is_fsdp_module(m)]
    return all(
        any(n == r or n.startswith(r + ".") or not r for r in roots)
        for n, p in model.named_parameters()
        if sharding.is_sharded(p)
    )


@contextmanager
def _gathered(modules: Mapping[str, nn.Module], name: str) -> Iterator[bool]:
    """Block ``name`` with its parameters gathered where FSDP2 sharded them: the nearest ``fully_shard``-ed module
    around it unsharded for the checks (a collective) and resharded after. ``False`` where a ``fully_shard``-ed
    module inside the block would gather its own parameters over the probe's changes."""
    block = modules[name]
    if any(sharding.is_fsdp_module(m) for m in block.modules() if m is not block):
        yield False
        return
    parts = name.split(".") if name else []
    around = (".".join(parts[:i]) for i in range(len(parts), -1, -1))
    owner = next((modules[a] for a in around if sharding.is_fsdp_module(modules[a])), None)
    if owner is None or not any(sharding.is_sharded(p) for p in block.parameters()):
        yield True
        return
    owner.unshard()
    try:
        yield True
    finally:
        owner.reshard()


def _settle(
    modules: Mapping[str, nn.Module], runner: nn.Module, g: UnitGroup, args: tuple, kwargs: dict
) -> tuple[str, str]:
    """Settle ``g``'s layout where it has one to choose (a fused qkv projection or a gated query: the layout under
    which units are apart; gated experts: by ablation) and return the dataflow verdict (:func:`_spill`)."""
    if g.kind == "experts":  # no consumer module to read: ablation, which also settles a gated layout
        return _experts_apart(runner, g, args, kwargs)
    if g.kind == "attention" and g.layout.endswith("(assumed)"):
        for layout in ("blocked", "interleaved"):
            if _spill(modules, runner, g, args, kwargs, _layout_index(g, layout))[0] == "apart":
                _set_layout(g, layout)
                break
        else:
            g.layout = g.layout.replace("(assumed)", "(no layout fits: assumed)")
    verdict, why = _spill(modules, runner, g, args, kwargs)
    if verdict == "apart":
        g.inexact = _clone_differs(modules, runner, g, args, kwargs)
    return verdict, why


def _clone_differs(modules: Mapping[str, nn.Module], runner: nn.Module, g: UnitGroup, args: tuple, kwargs: dict) -> str:
    """Why a clone does not compute what its source does (``""`` where it does): with the last unit's producer
    positions copied from the first's, the two units' inputs of the consumer must be equal. Per-head values that are
    no unit's slices (BLOOM's and MPT's ALiBi slopes, a position table held outside the block) make them differ."""
    cols = next(s.index for s in g.slices if s.role == "consumer")
    changes = []
    for s in g.slices:
        if s.role == "producer" and isinstance(s.dim, int):
            p = modules[s.module]._parameters[s.key].detach()
            source = p.index_select(s.dim, s.index[0].to(p.device))
            changes.append((modules[s.module], s.key, p.index_copy(s.dim, s.index[-1].to(p.device), source)))
    try:
        x = _consumer_input(modules, runner, g, args, kwargs, changes)
    except Exception:  # noqa: BLE001 - nothing to say where the block cannot run here
        return ""
    gap = float((x[..., cols[-1].to(x.device)] - x[..., cols[0].to(x.device)]).abs().max())
    if gap <= float(_moved(x)):
        return ""
    return f"a copy of unit 0 in unit {g.num_units - 1}'s place computes other inputs of {g.consumer!r}, by {gap:.2g}"


@contextmanager
def _swapped(changes: list[tuple[nn.Module, str, torch.Tensor]]) -> Iterator[None]:
    """Run with these tensors in place of the modules' parameters, which are put back after (nothing is changed)."""
    saved = [(m, k, m._parameters[k]) for m, k, _ in changes]
    for m, k, t in changes:
        m._parameters[k] = t
    try:
        yield
    finally:
        for m, k, p in saved:
            m._parameters[k] = p


def _consumer_input(
    modules: Mapping[str, nn.Module],
    runner: nn.Module,
    g: UnitGroup,
    args: tuple,
    kwargs: dict,
    changes: list[tuple[nn.Module, str, torch.Tensor]],
) -> torch.Tensor:
    """The input of ``g``'s consumer at its first call in one run of the block, with ``changes`` swapped in."""

    seen: list[torch.Tensor] = []
    hook = modules[g.consumer].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()) and None)
    try:
        with _swapped(changes):
            runner.forward(*fresh_inputs(args), **fresh_inputs(kwargs))
    finally:
        hook.remove()
    return seen[0]


def _runner(modules: Mapping[str, nn.Module], g: UnitGroup) -> str | None:
    """The module whose call computes the block: the block itself, or the layer holding an MLP that has no module of
    its own (BERT's ``intermediate`` and ``output``)."""
    if g.kind == "experts":
        return g.name if g.name in modules else None
    if g.consumer is None or g.consumer not in modules:
        return None
    return next((n for n in (g.name, g.name.rpartition(".")[0]) if n in modules), None)


def _moved(base: torch.Tensor) -> torch.Tensor:
    """How far a value must move to count as changed: far above rounding (a GPU kernel may sum in another order
    from run to run, and bfloat16 rounds at 1/256), far below what a changed unit or a norm over it does to it;
    relative to the largest value, without an absolute floor (a freshly initialised block's outputs may be 1e-4,
    and what one unit leaks into another's columns 1e-7: a state-space mixer whose shared rows looked like heads)."""
    rel = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3}.get(base.dtype, 2e-2)
    return rel * base.abs().max()


def _signature(module: nn.Module, g: UnitGroup) -> tuple:
    """What makes two blocks compute alike: the runner's modules (names and classes), parameters and the slices."""
    parts = tuple((n, type(m).__name__) for n, m in module.named_modules())
    params = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
    return type(module), g.kind, g.layout, parts, params, tuple((s.key, tuple(s.index.shape)) for s in g.slices)


def _call_signature(value: Any) -> Any:
    """What a block's call is given (its recorded ``(args, kwargs)``): tensors by shape and dtype, containers by
    their items, anything else by type. Blocks of one class called with other inputs may compute otherwise: T5's
    cross-attention gets the encoder's states and no per-head position bias, its self-attention the reverse."""
    if torch.is_tensor(value):
        return tuple(value.shape), value.dtype
    if isinstance(value, (tuple, list)):
        return tuple(_call_signature(v) for v in value)
    if isinstance(value, Mapping):
        return tuple((k, _call_signature(v)) for k, v in value.items())
    return type(value)


def _set_layout(g: UnitGroup, layout: str) -> None:
    index = _layout_index(g, layout)
    g.slices = [UnitSlice(s.param, s.dim, index, s.role) if s.module == g.producers[0] else s for s in g.slices]
    g.layout = layout if len(g.producers) == 1 else f"gated q, {layout}"


def _spill(
    modules: Mapping[str, nn.Module],
    runner: nn.Module,
    g: UnitGroup,
    args: tuple,
    kwargs: dict,
    layout: torch.Tensor | None = None,
) -> tuple[str, str]:
    """Change the producer positions of every unit, then of the first and of the last unit (``layout``: only the
    first producer's, at these positions: a candidate layout of a fused qkv projection or a gated query), and compare
    the consumer's input with an unchanged run's. ``(verdict, why)``: ``"apart"`` (only the changed unit's columns
    move), ``"coupled"`` (other units' columns move too), ``"unfed"`` (changing every unit moves nothing: the
    producers do not feed the consumer, not a block), ``"unknown"`` (a unit moves nothing, e.g. a dead neuron on
    these inputs, or the block cannot run here)."""
    producers = [s for s in g.slices if s.role == "producer" and isinstance(s.dim, int)]
    if layout is not None:
        producers = [UnitSlice(s.param, s.dim, layout) for s in producers if s.module == g.producers[0]]
    cols = next(s.index for s in g.slices if s.role == "consumer")
    gen = torch.Generator().manual_seed(0)
    woken = _woken(modules, runner, g)

    def consumed(unit: int | None = None, every: bool = False) -> torch.Tensor:
        """The consumer's input with ``unit``'s (or ``every`` unit's) producer positions changed."""
        changes = list(woken)
        for s in producers if unit is not None or every else ():
            p = modules[s.module]._parameters[s.key].detach()
            rows = (s.index.flatten() if every else s.index[unit]).to(p.device)
            shape = list(p.shape)
            shape[s.dim] = rows.numel()
            noise = torch.randn(shape, generator=gen).to(p) * (1 + p.abs().mean())
            changes.append((modules[s.module], s.key, p.index_add(s.dim, rows, noise)))
        return _consumer_input(modules, runner, g, args, kwargs, changes)

    try:
        base = consumed()

        def moved(x: torch.Tensor) -> set[int]:
            diff = (x - base).abs().flatten(0, -2).amax(0) > _moved(base)
            return set(diff.nonzero().flatten().tolist())

        if not moved(consumed(every=True)):
            return "unfed", f"changing every unit's rows changes nothing {g.consumer!r} reads"
        for u in sorted({0, g.num_units - 1}):
            changed = moved(consumed(u))
            outside = changed - set(cols[u].tolist())
            if not changed:  # the wrong positions (a layout tried), or a unit these inputs do not reach
                return "unknown", f"changing unit {u} changes nothing {g.consumer!r} reads"
            if outside:
                return "coupled", f"changing unit {u} changes {len(outside)} inputs of {g.consumer!r} other units own"
        return "apart", ""
    except Exception as exc:  # noqa: BLE001 - a layout or block the module cannot run with here
        return "unknown", f"{type(exc).__name__}: {exc}"


def _woken(
    modules: Mapping[str, nn.Module], runner: nn.Module, g: UnitGroup
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Random values for the block's parameters outside its unit slices that are all zeros (ConvNeXt V2's global
    response norm starts as the identity: zero scale and shift), so that a mix across units they will make once
    trained shows on the probe's run too."""
    sliced = {id(modules[s.module]._parameters[s.key]) for s in g.slices}
    gen = torch.Generator().manual_seed(1)
    return [
        (m, k, (torch.randn(p.shape, generator=gen) * 0.5).to(p))
        for m in runner.modules()
        for k, p in m._parameters.items()
        if p is not None and id(p) not in sliced and p.is_floating_point() and p.numel() and not p.detach().any()
    ]


def _experts_apart(module: nn.Module, g: UnitGroup, args: tuple, kwargs: dict) -> tuple[str, str]:
    """Experts by ablation (their down projection is no module whose input can be read): with neuron ``j`` of every
    expert zeroed in the down weights, changing its gate/up positions must not move the block's output. Gated
    experts take the gate/up layout under which that holds. ``(verdict, why)`` as :func:`_spill` says."""
    from . import axes

    params = module._parameters
    down = next(s for s in g.slices if s.role == "consumer")
    ups = [s for s in g.slices if s.role == "producer"]
    experts = params[down.key].shape[0]
    inner = g.num_units // experts
    width = inner * ups[0].index.shape[1]
    units = torch.cat([torch.arange(experts) * inner + j for j in sorted({0, inner - 1})])
    gen = torch.Generator().manual_seed(0)

    def run(index: torch.Tensor | None, zero: bool) -> torch.Tensor | None:
        """The block's output with the probed neurons' down weights zeroed and/or their ``index`` positions changed."""
        edits = [(down, down.index, None)] if zero else []
        edits += [(s, index, gen) for s in ups] if index is not None else []
        changes = []
        for s, idx, noise in edits:
            p = params[s.key].detach()
            at = idx[units].flatten().to(p.device)
            old = axes.select(p, s.dim, at)
            new = old + torch.randn(old.shape, generator=noise).to(old) * (1 + p.abs().mean()) if noise else 0 * old
            changes.append((module, s.key, axes.copied(p, s.dim, at, new)))
        with _swapped(changes):
            return first_tensor(module.forward(*fresh_inputs(args), **fresh_inputs(kwargs)))

    def differ(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return x is not None and y is not None and bool(((x - y).abs() > _moved(y)).any())

    try:
        candidates = {layout: _expert_index(experts, inner, width, layout) for layout in ("blocked", "interleaved")}
        if not differ(run(next(iter(candidates.values())), False), run(None, False)):
            return "unknown", "changing its neurons does not move its output on these inputs"
        for layout, index in candidates.items():
            if not differ(run(index, True), run(None, True)):
                g.slices = [UnitSlice(s.param, s.dim, index, s.role) if s.role == "producer" else s for s in g.slices]
                if width == 2 * inner:
                    g.layout = f"{experts} experts x {inner} neurons, gate/up {layout}"
                return "apart", ""
        return "coupled", "a neuron whose down weights are zeroed still moves the output under every gate/up layout"
    except Exception as exc:  # noqa: BLE001 - a block the module cannot run with here
        return "unknown", f"{type(exc).__name__}: {exc}"
