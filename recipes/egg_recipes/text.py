"""Causal-LM text data as :class:`datasets.Dataset`, offline first: load, tokenise, group, batch, score.

- :func:`load_text_dataset`: one split as a one-column (``text``) Dataset, from a Hub name (through
  :func:`datasets.load_dataset`), a local folder (the *same* ``load_dataset(path)`` call a Hub name gets, which is
  how the Hub path is tested offline), or local ``.txt`` files (``load_dataset("text", data_files=...)``). Text
  files keep their line breaks, so the token stream is the text itself. A source with no ``validation`` split
  gets one from the last ``validation_fraction`` of its ``train`` rows, as HF's ``run_clm.py`` does: deterministic,
  and no line of the validation text sits in the middle of the training text.
- Tokenisers with no Hub download: :class:`ByteTokenizer` (UTF-8 bytes plus BOS/EOS/PAD, the default: nothing to
  train or to save, no out-of-vocabulary text, identical on every machine) or a local Hugging Face tokenizer
  folder through :func:`load_tokenizer` (:class:`HFTokenizer`).
- :func:`tokenize_and_group`: tokenise and concatenate, then cut fixed ``block_size`` blocks (``group_texts`` of
  ``run_clm.py``); :class:`CausalLMCollator` pads a batch to ``input_ids`` / ``attention_mask`` / ``labels``
  (``-100`` on padding); :func:`make_lm_dataloader` with a sampler generator a recipe can reseed per epoch.
- :func:`token_nll` and :func:`evaluate_perplexity`: ``exp(mean NLL)`` over the real (non-padding) next-token
  predictions, the same numbers under Accelerate, DDP and the transformers ``Trainer``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from egg_optim.errors import ConfigError

from .data import DatasetUnavailableError, _is_hub_failure, _one_line

if TYPE_CHECKING:  # `datasets` is imported lazily, like in egg_recipes.data
    import datasets

__all__ = [
    "IGNORE_INDEX",
    "TEXT_SUFFIXES",
    "ByteTokenizer",
    "CausalLMCollator",
    "HFTokenizer",
    "TextTokenizer",
    "evaluate_perplexity",
    "group_texts",
    "load_text_dataset",
    "load_tokenizer",
    "make_lm_dataloader",
    "token_nll",
    "tokenize_and_group",
]

IGNORE_INDEX = -100  # label of positions that are not scored (padding): PyTorch's and transformers' convention
TEXT_SUFFIXES = (".txt",)
_TEXT_COLUMNS = ("text", "content", "document", "sentence")
_VALIDATION_NAMES = ("validation", "valid", "val", "dev")
_OFFLINE_CHOICES = (
    "offline choices: local .txt files, a folder of .txt (or parquet/json/csv) files, or a save_to_disk folder"
)


# --------------------------------------------------------------------------------------------- loading
def _text_files(paths: Sequence[Path]) -> list[str]:
    """The text files named by ``paths`` (files, or folders searched recursively), sorted per folder."""
    files: list[str] = []
    for p in paths:
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise ConfigError(f"text folder {str(p)!r} holds no {'/'.join(TEXT_SUFFIXES)} files")
            files += [str(q) for q in found]
        elif p.is_file():
            files.append(str(p))
        else:
            raise DatasetUnavailableError(f"text path {str(p)!r} does not exist; {_OFFLINE_CHOICES}")
    return files


def _data_files(folder: Path) -> list[Path]:
    """The files ``datasets`` reads as data in a folder: not hidden, not the dataset card."""
    return [
        q
        for q in folder.rglob("*")
        if q.is_file()
        and q.name.lower() != "readme.md"
        and not any(part.startswith((".", "__")) for part in q.relative_to(folder).parts)
    ]


def _load_dict(source: str, config_name: str | None, cache_dir: str | None, **builder_kwargs: Any):
    """``datasets.load_dataset(source)`` for a Hub name or a local folder, all splits; Hub failures become
    :class:`DatasetUnavailableError` (one line)."""
    import datasets

    try:
        loaded = datasets.load_dataset(source, config_name, cache_dir=cache_dir, **builder_kwargs)
    except Exception as exc:
        if isinstance(exc, ValueError) and not isinstance(exc, ConfigError):  # bad config name, no data files...
            raise ConfigError(f"cannot load dataset {source!r}: {_one_line(exc, 200)}") from exc
        if not _is_hub_failure(exc):
            raise
        reason = _one_line(f"{type(exc).__name__}: {exc}", 200)
        raise DatasetUnavailableError(f"cannot load dataset {source!r} ({reason}); {_OFFLINE_CHOICES}") from exc
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _raw_splits(source: str | os.PathLike | Sequence[str | os.PathLike], config_name: str | None, cache_dir):
    """All splits of ``source`` as a DatasetDict, and a short display name."""
    import datasets

    if not isinstance(source, (str, os.PathLike)):  # several files / folders
        paths = [Path(p).expanduser() for p in source]
        if not paths:
            raise ConfigError("load_text_dataset: got an empty list of paths")
        files = _text_files(paths)
        loaded = datasets.load_dataset("text", data_files={"train": files}, cache_dir=cache_dir, keep_linebreaks=True)
        return loaded, f"{len(files)} text files"
    text = os.fspath(source)
    if not text:
        raise ConfigError("load_text_dataset: the dataset name is empty")
    p = Path(text).expanduser()
    looks_local = p.exists() or text.startswith(("/", "./", "../", "~")) or p.suffix.lower() in TEXT_SUFFIXES
    if not looks_local:
        return _load_dict(text, config_name, cache_dir), text
    if not p.exists():
        raise DatasetUnavailableError(f"text path {str(p)!r} does not exist; {_OFFLINE_CHOICES}")
    if p.is_file():
        if p.suffix.lower() not in TEXT_SUFFIXES:
            raise ConfigError(f"{str(p)!r} is not a .txt file; pass the folder that holds it instead")
        loaded = datasets.load_dataset(
            "text", data_files={"train": [str(p)]}, cache_dir=cache_dir, keep_linebreaks=True
        )
        return loaded, p.name
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        loaded = datasets.load_from_disk(str(p))
        return (loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})), p.name
    files = _data_files(p)
    if not files:
        raise ConfigError(f"folder {str(p)!r} holds no data files")
    # The Hub's code path: datasets infers the format and the splits (train*.txt, validation*.txt, ...) itself.
    # Text files keep their line breaks; other formats (parquet, json, csv) are the builder's business.
    kwargs = {"keep_linebreaks": True} if all(q.suffix.lower() in TEXT_SUFFIXES for q in files) else {}
    return _load_dict(str(p), config_name, cache_dir, **kwargs), p.name


def _pick_text_column(ds, wanted: str | None, name: str) -> str:
    """``wanted``, else the first usual text column name, else the dataset's only string column."""
    import datasets

    from .data import _pick_column

    cols = ds.column_names
    strings = [c for c in cols if isinstance(ds.features[c], datasets.Value) and ds.features[c].dtype == "string"]
    return _pick_column(cols, wanted, [*_TEXT_COLUMNS, *(strings if len(strings) == 1 else [])], "text", name)


def load_text_dataset(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    split: str = "train",
    config_name: str | None = None,
    text_column: str | None = None,
    validation_fraction: float = 0.05,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """One split of a text corpus as a Dataset with a single string column, ``text``.

    ``source``: a Hub dataset name (``config_name`` picks its configuration, e.g. ``"wikitext-2-raw-v1"``), a
    local folder (of ``.txt`` files, of parquet/json/csv files, or a ``save_to_disk`` folder), one ``.txt`` file,
    or a list of files and folders. ``split``: ``"train"``, ``"validation"`` or another split of the source. When
    the source has no validation split (a plain folder of text files), ``"validation"`` is the last
    ``validation_fraction`` of the ``train`` rows and ``"train"`` the rest, so the two never overlap.

    Raises :class:`~egg_recipes.data.DatasetUnavailableError` (one line) for a missing path or an unreachable
    Hub, :class:`~egg_optim.errors.ConfigError` for bad arguments.
    """
    if not (isinstance(validation_fraction, (int, float)) and 0 < validation_fraction < 1):
        raise ConfigError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    splits, name = _raw_splits(source, config_name, cache)
    available = list(splits)
    validation = next((s for s in _VALIDATION_NAMES if s in splits), None)
    if split in _VALIDATION_NAMES and validation is not None:
        ds = splits[validation]
    elif split in splits and not (split == "train" and validation is None):
        ds = splits[split]
    elif split in ("train", *_VALIDATION_NAMES) and "train" in splits:
        train = splits["train"]
        n = len(train)
        n_val = max(1, round(n * validation_fraction))
        if n - n_val < 1:
            raise ConfigError(f"dataset {name!r} has {n} rows: too few to split off a validation part")
        ds = train.select(range(n - n_val, n)) if split in _VALIDATION_NAMES else train.select(range(n - n_val))
    else:
        raise ConfigError(f"dataset {name!r} has splits {available}, got split={split!r}")
    column = _pick_text_column(ds, text_column, name)
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    ds = ds.filter(lambda rows: [t is not None for t in rows["text"]], batched=True, desc="egg_optim: dropping nulls")
    if len(ds) == 0:
        raise ConfigError(f"dataset {name!r} (split {split!r}) holds no text")
    ds.info.dataset_name = Path(name).name
    return ds


# --------------------------------------------------------------------------------------------- tokenisers
class TextTokenizer(Protocol):
    """What the pipeline needs from a tokeniser."""

    name: str
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255, then BOS (256), EOS (257) and PAD (258): 259 ids.

    Nothing to download, train or save, no unknown text, the same ids on every machine and library version; the
    price is ~4x longer sequences than a trained BPE, which a tiny model does not mind."""

    name = "bytes"
    vocab_size = 259
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).tolist() for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Special ids are dropped; a sequence cut inside a multi-byte character decodes with U+FFFD there."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A local Hugging Face tokenizer folder behind the :class:`TextTokenizer` interface (no special tokens are
    added per row: the text is one stream). Padding uses the tokenizer's pad token, else EOS, else id 0 (padded
    positions are masked and never scored, so the id only has to exist)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from transformers import AutoTokenizer

        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError(f"tokenizer folder {str(p)!r} does not exist (pass 'bytes' or a local tokenizer folder)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/... for unusable folders
            raise ConfigError(f"cannot load a tokenizer from {str(p)!r}: {_one_line(exc, 200)}") from exc
        self.name = str(p.resolve())
        self.vocab_size = len(self.tokenizer)
        self.bos_token_id = self.tokenizer.bos_token_id
        self.eos_token_id = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_id if self.eos_token_id is not None else 0)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


def load_tokenizer(spec: str | os.PathLike | None = None) -> TextTokenizer:
    """``None`` or ``"bytes"``: :class:`ByteTokenizer`; a folder: :class:`HFTokenizer` (local files only)."""
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)


# --------------------------------------------------------------------------------------------- blocks
def group_texts(examples: Mapping[str, list[list[int]]], block_size: int, *, keep_remainder: bool = False):
    """``run_clm.py``'s ``group_texts``: concatenate every column and cut it into ``block_size`` pieces. The
    last, shorter piece is dropped, or kept when ``keep_remainder`` (to score every token of an evaluation split)."""
    concatenated = {k: list(chain.from_iterable(v)) for k, v in examples.items()}
    total = len(next(iter(concatenated.values()), []))
    end = total if keep_remainder else (total // block_size) * block_size
    return {k: [t[i : i + block_size] for i in range(0, end, block_size)] for k, t in concatenated.items()}


def _tokenize_rows(rows: Mapping[str, list[str]], tokenizer: TextTokenizer, append_eos: bool) -> dict[str, list]:
    ids = tokenizer.encode_batch(rows["text"])
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{tokenizer!r} has no EOS token to append")
        ids = [row + [tokenizer.eos_token_id] for row in ids]
    return {"input_ids": ids}


def tokenize_and_group(
    ds: datasets.Dataset,
    tokenizer: TextTokenizer,
    block_size: int,
    *,
    keep_remainder: bool = False,
    append_eos: bool = False,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """Tokenise the ``text`` column and regroup into ``block_size`` token blocks (column ``input_ids``).

    Rows are concatenated ``batch_size`` at a time (as in ``run_clm.py``), so at most one partial block per
    ``batch_size`` rows is dropped (or kept, with ``keep_remainder``). ``append_eos`` ends every row with EOS,
    for sources whose rows are whole documents; text files are a stream of lines and need none."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2:
        raise ConfigError(f"block_size must be an integer >= 2 (one input and one target), got {block_size!r}")
    tokenized = ds.map(
        _tokenize_rows,
        batched=True,
        batch_size=batch_size,
        remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "append_eos": append_eos},
        desc="egg_optim: tokenising",
    )
    grouped = tokenized.map(
        group_texts,
        batched=True,
        batch_size=batch_size,
        fn_kwargs={"block_size": block_size, "keep_remainder": keep_remainder},
        desc=f"egg_optim: grouping into blocks of {block_size}",
    )
    if len(grouped) == 0:
        raise ConfigError(f"the text is shorter than one block of {block_size} tokens: lower the block size")
    return grouped


class CausalLMCollator:
    """Pad a list of ``{"input_ids": ...}`` rows (lists or tensors) to the longest: returns ``input_ids``,
    ``attention_mask`` (1 on real tokens) and ``labels`` (= ``input_ids``, ``-100`` on padding; the model shifts
    them by one). Picklable, so DataLoader workers and the ``Trainer`` can use it."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows]
        length = max(s.numel() for s in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : s.numel()] = s
            mask[i, : s.numel()] = 1
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def make_lm_dataloader(
    ds: datasets.Dataset,
    batch_size: int,
    *,
    pad_token_id: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """Batches of :class:`CausalLMCollator`. With ``shuffle`` the sampler draws from its own generator
    (``loader.sampler.generator``, seeded with ``seed``) so a recipe can reseed it per epoch for exact resumes."""
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

    rows = ds.with_format("python", columns=["input_ids"])
    sampler = (
        RandomSampler(rows, generator=torch.Generator().manual_seed(int(seed))) if shuffle else SequentialSampler(rows)
    )
    return DataLoader(
        rows, batch_size=batch_size, sampler=sampler, collate_fn=CausalLMCollator(pad_token_id), num_workers=num_workers
    )


# --------------------------------------------------------------------------------------------- scores
def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: summed next-token NLL (float64) and the number of scored positions.

    Position ``t`` predicts ``labels[t + 1]``; positions whose target is ``-100`` (padding) are not scored."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    scored = targets != IGNORE_INDEX
    return nll.double().mul(scored).sum(dim=1), scored.sum(dim=1)


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], accelerator: Any = None):
    """``{"loss": mean NLL per scored token, "perplexity": exp(loss), "tokens": scored tokens}`` of ``model``
    (a causal LM returning ``.logits``) over ``loader``. With an ``accelerator`` the per-sequence sums are
    gathered across processes (``gather_for_metrics`` drops the samples a sharded loader repeats)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, n = token_nll(logits, batch["labels"])
            if accelerator is not None:
                nll, n = accelerator.gather_for_metrics((nll, n))
            total += float(nll.sum())
            count += int(n.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("evaluate_perplexity: no scored tokens (empty loader, or blocks of one token)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
