"""Image-classification data as :class:`datasets.Dataset`, offline first.

Every loader returns the same shape of dataset so recipes, models and metrics never special-case a source:
exactly two columns, ``pixel_values`` (float32 ``(C, H, W)`` in ``[0, 1]``, an ``Array3D`` feature) and
``label`` (a ``ClassLabel``), torch-formatted. The features carry the class count and the image geometry,
read back with :func:`dataset_spec`.

Sources (``name`` of :func:`load_image_dataset`):

- ``"digits"``: scikit-learn's bundled 8x8 digits. Needs nothing else: the default for tests and CI.
- ``"fashion_mnist"``: the IDX files of Debian's ``dataset-fashion-mnist`` package (the Hub cannot be reached
  on our machines; this is the same data as ``zalando-datasets/fashion_mnist``).
- anything else: :func:`datasets.load_dataset` on a Hub name *or a local path* (a folder of parquet/arrow/csv
  files, one data file, or a ``save_to_disk`` folder). A local path runs the same ``datasets`` code and the
  same column normalisation as a Hub name, which is how the Hub path is tested offline.

A source with a single split (one data file, a ``save_to_disk`` Dataset, a folder or Hub dataset with only
``train``) is never served as its own test split, which would report training accuracy as test accuracy:
``test_split_fraction`` carves a fixed held-out part out of ``train`` instead. :func:`check_splits` refuses
a train split with fewer than two classes (every prediction would be right) and test labels the train split
does not define.

Batches come from :func:`make_dataloader`, which materialises the columns as tensors once (indexing Arrow per
batch costs more than a small CNN's step) and applies resize / channel repeat / augmentation / normalisation
per batch in torch (there is no CPU torchvision build to lean on).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from egg_optim.errors import ConfigError, EggOptimError

if TYPE_CHECKING:  # `datasets` is imported lazily: models and batch transforms work without it
    import datasets

__all__ = [
    "DatasetSpec",
    "DatasetUnavailableError",
    "BatchTransform",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "DEFAULT_FASHION_MNIST_DIR",
    "NORMALIZE_PRESETS",
    "AUGMENT_PRESETS",
    "check_splits",
    "dataset_spec",
    "load_image_dataset",
    "make_dataloader",
    "parse_augment",
    "random_flip_crop",
]

FASHION_MNIST_ENV = "EGG_OPTIM_FASHION_MNIST_DIR"
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_ALIASES = {"fashion_mnist", "fashion-mnist", "fashionmnist"}
_LOCAL_SPLITS = ("train", "test")
_HOLDOUT_SEED = 0  # the held-out part of test_split_fraction never depends on the run's seed
_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "fine_label")
_DATA_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
}
_OFFLINE_CHOICES = (
    "offline choices: 'digits' (bundled with scikit-learn), 'fashion_mnist' "
    "(apt-get install -y dataset-fashion-mnist), or a local path (a folder of parquet/arrow files, "
    "one data file, or a save_to_disk folder)"
)

#: ``normalize=`` presets of :func:`make_dataloader`: (mean, std), broadcast over channels.
NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),  # the seed's MNIST script
    "half": ((0.5,), (0.5,)),  # the seed's CIFAR-100 / Fashion-MNIST script
}
#: ``augment=`` presets: the seed's training transforms.
AUGMENT_PRESETS: dict[str, str] = {
    "seed_mnist": "crop:2",  # RandomCrop(28, padding=2)
    "seed_cifar": "flip+crop:4",  # RandomHorizontalFlip + RandomCrop(32, padding=4)
}


class DatasetUnavailableError(EggOptimError, RuntimeError):
    """A data source cannot be reached or is not installed. The message is one line, fit to print as is."""


def _one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class DatasetSpec:
    """What a model factory needs to know about a dataset (read from its features by :func:`dataset_spec`)."""

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    class_names: tuple[str, ...] | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def transformed(self, *, resize_to: int | Sequence[int] | None = None, channels: int | None = None) -> DatasetSpec:
        """The spec of the batches a :class:`BatchTransform` with these options emits."""
        h, w = _size_pair(resize_to) if resize_to is not None else (self.height, self.width)
        return replace(self, height=h, width=w, channels=channels or self.channels)


def dataset_spec(
    ds: datasets.Dataset, *, resize_to: int | Sequence[int] | None = None, channels: int | None = None
) -> DatasetSpec:
    """Class count and image geometry of a dataset made by :func:`load_image_dataset`.

    ``resize_to``/``channels`` give the spec of the batches :func:`make_dataloader` emits with the same
    options, so a model can be built for what it will actually see.
    """
    import datasets

    feats = ds.features
    if "pixel_values" not in feats or "label" not in feats:
        raise ConfigError(f"expected columns 'pixel_values' and 'label', got {list(feats)}")
    pv, lab = feats["pixel_values"], feats["label"]
    shape = getattr(pv, "shape", None)
    if shape is None or len(shape) != 3:
        raise ConfigError(f"'pixel_values' must be an Array3D (C, H, W) feature, got {pv!r}")
    if isinstance(lab, datasets.ClassLabel):
        num_classes, names = lab.num_classes, tuple(lab.names)
    else:
        labels = ds.with_format("numpy")[:]["label"]
        num_classes, names = int(np.max(labels)) + 1, None
    c, h, w = (int(v) for v in shape)
    spec = DatasetSpec(ds.info.dataset_name or "dataset", int(num_classes), c, h, w, names)
    return spec.transformed(resize_to=resize_to, channels=channels)


# --------------------------------------------------------------------------------------------- building
def _fingerprint(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:32]


def _build_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    name: str,
    class_names: Sequence[str],
    fingerprint: str,
    description: str,
):
    """Wrap a float32 (N, C, H, W) array and int labels as an in-memory Dataset without per-row conversion.

    ``Dataset.from_dict`` converts row by row (seconds for Fashion-MNIST); the nested list arrays built here
    from offsets share the numpy buffer, so this takes milliseconds.
    """
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    images = np.ascontiguousarray(images, dtype=np.float32)
    n, c, h, w = images.shape
    feature = datasets.Array3D(shape=(c, h, w), dtype="float32")
    arr: pa.Array = pa.array(images.reshape(-1))
    for dim in (w, h, c):
        offsets = pa.array(np.arange(0, len(arr) + 1, dim, dtype=np.int32))
        arr = pa.ListArray.from_arrays(offsets, arr)
    pixel_values = pa.ExtensionArray.from_storage(feature(), arr)
    features = datasets.Features(
        {"pixel_values": feature, "label": datasets.ClassLabel(names=[str(x) for x in class_names])}
    )
    table = pa.Table.from_arrays(
        [pixel_values, pa.array(np.asarray(labels, dtype=np.int64))], schema=features.arrow_schema
    )
    info = datasets.DatasetInfo(description=description, features=features, dataset_name=name)
    ds = datasets.Dataset(InMemoryTable(table), info=info, fingerprint=fingerprint)
    ds.set_format("torch")
    return ds


def _subset_indices(n: int, max_samples: int | None, seed: int) -> np.ndarray | None:
    """Sorted random subset (reproducible from ``seed``), or None to keep everything."""
    if max_samples is None or max_samples >= n:
        return None
    if max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1, got {max_samples}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_samples, replace=False))


def _holdout_indices(n: int, fraction: float, split: str, name: str) -> np.ndarray:
    """Sorted rows of ``split`` when a fixed random ``fraction`` of ``n`` rows is held out as ``"test"``."""
    k = int(round(fraction * n))
    if not 1 <= k <= n - 1:
        raise ConfigError(
            f"dataset {name!r}: test_split_fraction={fraction} of its {n} train rows leaves "
            f"{'no test' if k < 1 else 'no train'} row; use a fraction between {1 / n:.3g} and {1 - 1 / n:.3g}"
        )
    perm = np.random.default_rng(_HOLDOUT_SEED).permutation(n)
    return np.sort(perm[:k] if split == "test" else perm[k:])


def _no_split(what: str, split: str) -> ConfigError:
    return ConfigError(
        f"{what} has no {split!r} split, and using its train rows for testing would report training accuracy: "
        f"pass test_split_fraction (recipes: --test-split-fraction, e.g. 0.2) to hold out part of it, or give a "
        f"source with separate train and test splits"
    )


def _check_local_split(name: str, split: str) -> str:
    if split not in _LOCAL_SPLITS:
        raise ConfigError(f"dataset {name!r} has splits {list(_LOCAL_SPLITS)}, got split={split!r}")
    return split


# --------------------------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8), 0..16 -> [0, 1]
    y = d.target.astype(np.int64)
    # Fixed 80/20 stratified split, independent of `seed`, so train and test never overlap across calls.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    for a in (x_tr, x_te, y_tr, y_te):
        a.setflags(write=False)
    return x_tr, y_tr, x_te, y_te


def _load_digits(split: str, max_samples: int | None, seed: int):
    _check_local_split("digits", split)
    x_tr, y_tr, x_te, y_te = _digits_arrays()
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    idx = _subset_indices(len(y), max_samples, seed)
    if idx is not None:
        x, y = x[idx], y[idx]
    return _build_dataset(
        x,
        y,
        name="digits",
        class_names=[str(i) for i in range(10)],
        fingerprint=_fingerprint("egg_optim.digits", split, max_samples, seed),
        description="scikit-learn load_digits, 8x8 grey, fixed stratified 80/20 split (random_state=0)",
    )


# --------------------------------------------------------------------------------------------- fashion-mnist
def _idx_path(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse an IDX file (ubyte data): 4-byte magic (0, 0, 0x08, ndim), ndim big-endian int32 sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise DatasetUnavailableError(f"{path} is not an IDX ubyte file with {expected_ndim} dimensions")
    dims = np.frombuffer(raw, dtype=">i4", count=expected_ndim, offset=4)
    offset = 4 + 4 * expected_ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DatasetUnavailableError(f"{path} is truncated: header says {tuple(dims)}, got {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(tuple(int(d) for d in dims))


@functools.lru_cache(maxsize=4)
def _fashion_arrays(images_path: str, labels_path: str, _stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(Path(images_path), 3)
    labels = _read_idx(Path(labels_path), 1).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetUnavailableError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    x = np.multiply(images[:, None], np.float32(1.0 / 255.0), dtype=np.float32)
    x.setflags(write=False)
    labels.setflags(write=False)
    return x, labels


def _load_fashion_mnist(split: str, data_dir: str | os.PathLike | None, max_samples: int | None, seed: int):
    _check_local_split("fashion_mnist", split)
    directory = Path(data_dir or os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_DIR).expanduser()
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_idx_path(directory, s) for s in stems]
    if any(p is None for p in paths):
        missing = ", ".join(f"{s}.gz" for s, p in zip(stems, paths) if p is None)
        raise DatasetUnavailableError(
            f"Fashion-MNIST files not found in {directory} (missing {missing}): install them with "
            f"'apt-get install -y dataset-fashion-mnist' or point {FASHION_MNIST_ENV} at a folder with them; "
            f"other offline choices: 'digits' or a local path"
        )
    img_path, lab_path = paths
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    x, y = _fashion_arrays(str(img_path), str(lab_path), stamp)
    idx = _subset_indices(len(y), max_samples, seed)
    if idx is not None:
        x, y = x[idx], y[idx]
    return _build_dataset(
        x,
        y,
        name="fashion_mnist",
        class_names=FASHION_MNIST_CLASSES,
        fingerprint=_fingerprint("egg_optim.fashion_mnist", str(img_path), stamp, split, max_samples, seed),
        description=f"Fashion-MNIST from IDX files in {directory}",
    )


# --------------------------------------------------------------------------------------------- hub / local
def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~"))
        or os.path.splitext(name)[1].lower() in _DATA_FILE_BUILDERS
        or os.path.exists(os.path.expanduser(name))
    )


def _is_hub_failure(exc: BaseException) -> bool:
    """Errors that mean "could not reach or find it", as opposed to bugs or bad arguments."""
    import datasets

    if isinstance(exc, (OSError, datasets.exceptions.DatasetsError)):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in {"httpx", "httpcore", "requests", "urllib3", "huggingface_hub", "fsspec", "aiohttp"}


def _raw_local(path: str, split: str, cache_dir: str | None):
    import datasets

    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetUnavailableError(f"local dataset path {str(p)!r} does not exist; {_OFFLINE_CHOICES}")
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(p))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                if split == "test" and list(loaded) == ["train"]:
                    raise _no_split(f"{str(p)!r} (splits {list(loaded)})", split)
                raise ConfigError(f"{str(p)!r} has splits {list(loaded)}, got split={split!r}")
            return loaded[split]
        if split != "train":  # one Dataset, no split names: it is the train split
            raise _no_split(f"{str(p)!r} (a single save_to_disk Dataset)", split)
        return loaded
    try:
        if p.is_file():
            builder = _DATA_FILE_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise ConfigError(f"cannot tell the format of {str(p)!r}: use one of {sorted(_DATA_FILE_BUILDERS)}")
            if split != "train":
                raise _no_split(f"{str(p)!r} (a single data file)", split)
            return datasets.load_dataset(builder, data_files={split: str(p)}, split=split, cache_dir=cache_dir)
        return datasets.load_dataset(str(p), split=split, cache_dir=cache_dir)
    except ValueError as exc:  # e.g. an unknown split
        if isinstance(exc, ConfigError):
            raise
        raise _split_error(exc, repr(str(p)), split) from exc


def _split_error(exc: ValueError, what: str, split: str) -> ConfigError:
    """``datasets``' "Unknown split" (or another bad argument) as a ConfigError; a test split missing from a
    train-only source gets the test_split_fraction hint."""
    text = str(exc)
    if split == "test" and "Unknown split" in text and re.search(r"\[\s*'train'\s*\]", text):
        return _no_split(f"{what} (splits ['train'])", split)
    return ConfigError(f"cannot load {what} (split {split!r}): {_one_line(exc)}")


def _raw_hub(name: str, split: str, cache_dir: str | None):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as exc:
        if isinstance(exc, ValueError) and "Unknown split" in str(exc):
            raise _split_error(exc, repr(name), split) from exc
        if not _is_hub_failure(exc):
            raise
        reason = _one_line(f"{type(exc).__name__}: {exc}", 200)
        raise DatasetUnavailableError(
            f"cannot load dataset {name!r} (split {split!r}) from the Hugging Face Hub ({reason}); {_OFFLINE_CHOICES}"
        ) from exc


def _pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, name: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ConfigError(f"dataset {name!r} has no {what} column {wanted!r}; columns: {list(columns)}")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise ConfigError(
        f"dataset {name!r}: no {what} column among {list(candidates)}; columns: {list(columns)} "
        f"(pass {what}_column=...)"
    )


def _image_mode(value: Any) -> str:
    mode = getattr(value, "mode", None)
    if mode is None:  # an array
        return "array"
    return "L" if mode in ("1", "L", "LA", "I", "I;16", "F", "P;L") else "RGB"


def _to_chw(value: Any, mode: str) -> np.ndarray:
    """One image (PIL or array-like, HWC or CHW, uint8 or float) as float32 (C, H, W) in [0, 1]."""
    if mode != "array":
        a = np.asarray(value.convert(mode) if value.mode != mode else value)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return np.multiply(a, np.float32(1.0 / 255.0), dtype=np.float32)
    a = np.asarray(value)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4):
        a = a.transpose(2, 0, 1)
    if a.ndim != 3:
        raise ConfigError(f"image arrays must be (H, W), (H, W, C) or (C, H, W), got shape {a.shape}")
    if a.shape[0] == 4:  # drop alpha
        a = a[:3]
    if np.issubdtype(a.dtype, np.integer) or float(np.max(a, initial=0.0)) > 1.0:
        return np.multiply(a, np.float32(1.0 / 255.0), dtype=np.float32)
    return a.astype(np.float32, copy=False)


def _normalise_columns(raw, name: str, image_column: str | None, label_column: str | None):
    """Any image dataset -> the two-column ``pixel_values``/``label`` layout of this module."""
    import datasets

    if len(raw) == 0:
        raise ConfigError(f"dataset {name!r} is empty")
    cols = raw.column_names
    img_col = _pick_column(cols, image_column, _IMAGE_COLUMNS, "image", name)
    lab_col = _pick_column(cols, label_column, _LABEL_COLUMNS, "label", name)
    raw = raw.with_format(None)
    lab_feat = raw.features[lab_col]
    if isinstance(lab_feat, datasets.ClassLabel):
        class_names = list(lab_feat.names)
    else:
        labels = np.asarray(raw[lab_col])
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
            raise ConfigError(f"dataset {name!r}: label column {lab_col!r} must hold non-negative integers")
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    first = raw[0][img_col]
    mode = _image_mode(first)
    c, h, w = _to_chw(first, mode).shape

    def convert(batch: dict[str, list]) -> dict[str, Any]:
        arrays = [_to_chw(v, mode) for v in batch[img_col]]
        for a in arrays:
            if a.shape != (c, h, w):
                raise ConfigError(
                    f"dataset {name!r}: images must share one size, got {a.shape} and {(c, h, w)} (C, H, W)"
                )
        return {"pixel_values": np.stack(arrays), "label": np.asarray(batch[lab_col], dtype=np.int64)}

    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=(c, h, w), dtype="float32"),
            "label": datasets.ClassLabel(names=class_names),
        }
    )
    ds = raw.map(
        convert,
        batched=True,
        batch_size=1000,
        remove_columns=cols,
        features=features,
        desc=f"egg_optim: converting {name}",
    )
    ds.info.dataset_name = name
    ds.set_format("torch")
    return ds


# --------------------------------------------------------------------------------------------- public loader
def load_image_dataset(
    name: str,
    *,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    test_split_fraction: float | None = None,
) -> datasets.Dataset:
    """Load an image-classification split as a torch-formatted (``pixel_values``, ``label``) Dataset.

    ``name``: ``"digits"`` (bundled, no network), ``"fashion_mnist"`` (Debian IDX files in ``data_dir``, else
    ``$EGG_OPTIM_FASHION_MNIST_DIR``, else ``/usr/share/datasets/fashion-mnist``), a Hub dataset name, or a
    local path (folder of data files, one data file, ``save_to_disk`` folder). ``split`` is ``"train"`` or
    ``"test"`` for the local sources and anything ``datasets`` accepts otherwise. ``max_samples`` keeps a
    random subset chosen by ``seed`` (in original order) for quick runs. ``image_column``/``label_column``
    override the column detection (e.g. ``label_column="coarse_label"`` for CIFAR-100's 20 super-classes).

    ``test_split_fraction`` (in (0, 1)) holds out that fraction of the source's ``train`` rows: ``split="test"``
    returns them and ``split="train"`` the rest (a fixed draw, independent of ``seed``, so the two never
    overlap; pass the same fraction for both). It is how a single-split source (one data file...) gets a test
    set; asking such a source for ``"test"`` without it is a :class:`~egg_optim.errors.ConfigError`.

    Raises :class:`DatasetUnavailableError` (one-line message listing the offline choices) when a source is
    missing or the Hub cannot be reached, :class:`~egg_optim.errors.ConfigError` for bad arguments.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"dataset name must be a non-empty string, got {name!r}")
    holdout = test_split_fraction is not None
    if holdout:
        f = test_split_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
            raise ConfigError(f"test_split_fraction must be a number in (0, 1), got {f!r}")
        if split not in _LOCAL_SPLITS:
            raise ConfigError(f"with test_split_fraction the splits are {list(_LOCAL_SPLITS)}, got split={split!r}")
    source_split = "train" if holdout else split
    key = name.strip().lower()
    if key == "digits" or key in _FASHION_ALIASES:
        if key == "digits":
            ds = _load_digits(source_split, None if holdout else max_samples, seed)
        else:
            ds = _load_fashion_mnist(source_split, data_dir, None if holdout else max_samples, seed)
        if holdout:
            ds = ds.select(_holdout_indices(len(ds), float(test_split_fraction), split, key).tolist())
            idx = _subset_indices(len(ds), max_samples, seed)
            if idx is not None:
                ds = ds.select(idx.tolist())
        return ds
    cache = str(cache_dir) if cache_dir is not None else None
    if _looks_like_path(name):
        raw = _raw_local(name, source_split, cache)
        display = Path(name).expanduser().name or name
    else:
        raw = _raw_hub(name, source_split, cache)
        display = name
    if holdout:
        raw = raw.select(_holdout_indices(len(raw), float(test_split_fraction), split, display).tolist())
    idx = _subset_indices(len(raw), max_samples, seed)
    if idx is not None:
        raw = raw.select(idx.tolist())
    return _normalise_columns(raw, display, image_column, label_column)


def _labels(ds: datasets.Dataset) -> np.ndarray:
    return np.asarray(ds.with_format("numpy", columns=["label"])[:]["label"])  # not the pixels


def check_splits(train: datasets.Dataset, test: datasets.Dataset | None = None) -> None:
    """Refuse data no classifier can be judged on: a ``train`` split with fewer than two distinct labels
    (predicting the one class is always right: accuracy 1.0 by construction), or ``test`` labels outside the
    classes ``train`` defines (see :func:`dataset_spec`). Raises :class:`~egg_optim.errors.ConfigError`."""
    spec = dataset_spec(train)
    present = np.unique(_labels(train))
    if len(present) < 2:
        which = f"only label {int(present[0])}" if len(present) else "no labels"
        raise ConfigError(
            f"dataset {spec.name!r}: the train split has {which} in its {len(train)} rows; a classifier needs "
            f"at least 2 classes (with 1, every prediction is right and accuracy is 1.0 by construction)"
        )
    if test is not None and len(test):
        labels = _labels(test)
        if int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes:
            raise ConfigError(
                f"dataset {spec.name!r}: the test split has labels {int(labels.min())}..{int(labels.max())} but the "
                f"train split defines {spec.num_classes} classes (0..{spec.num_classes - 1})"
            )


# --------------------------------------------------------------------------------------------- batches
_AUG_TOKEN = re.compile(r"^(flip|crop)(?::(\d+))?$")


def parse_augment(augment: str | None) -> tuple[bool, int]:
    """``None``/``"none"``, a preset (``seed_mnist``, ``seed_cifar``) or ``+``-joined ``flip``, ``crop[:pad]``
    -> (horizontal flip?, crop padding; 0 = no crop)."""
    if augment is None or augment.strip().lower() in ("", "none"):
        return False, 0
    spec = AUGMENT_PRESETS.get(augment.strip().lower(), augment.strip().lower())
    flip, pad = False, 0
    for token in spec.split("+"):
        m = _AUG_TOKEN.match(token.strip())
        if m is None:
            raise ConfigError(
                f"unknown augmentation {token!r} in {augment!r}: use 'flip', 'crop[:pad]' joined by '+', "
                f"or a preset {sorted(AUGMENT_PRESETS)}"
            )
        if m.group(1) == "flip":
            flip = True
        else:
            pad = int(m.group(2)) if m.group(2) else 4
            if pad < 1:
                raise ConfigError(f"crop padding must be >= 1, got {pad}")
    return flip, pad


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = (int(v) for v in size)
    return (h, w)


def random_flip_crop(
    x: torch.Tensor, *, flip: bool, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """torchvision's RandomHorizontalFlip (p=0.5) then RandomCrop(size, padding) on a (B, C, H, W) batch.

    Each sample gets its own flip and offset; both become one pair of gathers on the zero-padded batch
    (a flipped crop at offset ``ox`` reads padded columns ``Wp-1-ox-j``).
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    wp = padded.shape[-1]
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    cols = ox[:, None] + torch.arange(w)
    if flip:
        flipped = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], wp - 1 - cols, cols)
    out = padded
    if padding:
        rows = oy[:, None] + torch.arange(h)
        out = out.gather(2, rows[:, None, :, None].expand(b, c, h, wp))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


class BatchTransform:
    """Per-batch tensor pipeline: resize -> flip/crop -> repeat channels -> normalise.

    The seed repeats grey to RGB before flip/crop; the two commute, and repeating last moves a third of the
    bytes.

    Usable as a DataLoader ``collate_fn`` (or a Trainer ``data_collator``): accepts ``(pixels, labels)``
    tensors, a dict of batched tensors, or a list of per-example dicts. Augmentation draws from its own
    generator seeded with ``seed`` (plus the rank when torch.distributed is up at construction, so ranks do
    not crop alike), so two loaders built alike produce the same batches. In DataLoader worker processes it
    reseeds from the worker's seed, which the loader derives from its own generator every epoch.
    """

    def __init__(
        self,
        *,
        resize_to: int | Sequence[int] | None = None,
        channels: int | None = None,
        augment: str | None = None,
        normalize: str | tuple[Sequence[float], Sequence[float]] | None = None,
        seed: int = 0,
        return_dict: bool = False,
    ) -> None:
        self.resize_to = _size_pair(resize_to) if resize_to is not None else None
        if channels is not None and channels < 1:
            raise ConfigError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.flip, self.pad = parse_augment(augment)
        if isinstance(normalize, str):
            if normalize not in NORMALIZE_PRESETS:
                raise ConfigError(f"unknown normalize preset {normalize!r}; choices: {sorted(NORMALIZE_PRESETS)}")
            normalize = NORMALIZE_PRESETS[normalize]
        self.normalize = (
            None
            if normalize is None
            else (
                torch.tensor(normalize[0], dtype=torch.float32),
                torch.tensor(normalize[1], dtype=torch.float32),
            )
        )
        self.return_dict = return_dict
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.generator = torch.Generator().manual_seed(int(seed) + 1_000_003 * rank)
        self._worker_seed: int | None = None

    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, Mapping):
            x = batch["pixel_values"]
            y = batch["label"] if "label" in batch else batch["labels"]
        elif isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
            x, y = batch
        elif isinstance(batch, Sequence) and batch and isinstance(batch[0], Mapping):
            x = torch.stack([torch.as_tensor(ex["pixel_values"]) for ex in batch])
            key = "label" if "label" in batch[0] else "labels"
            y = torch.as_tensor([int(ex[key]) for ex in batch])
        else:
            raise TypeError(f"cannot read a batch of type {type(batch).__name__}")
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)

    def __call__(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.generator.manual_seed(info.seed)
        x, y = self._unpack(batch)
        if self.resize_to is not None and tuple(x.shape[-2:]) != self.resize_to:
            shrink = self.resize_to[0] < x.shape[-2] or self.resize_to[1] < x.shape[-1]
            x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False, antialias=shrink)
        if self.flip or self.pad:
            x = random_flip_crop(x, flip=self.flip, padding=self.pad, generator=self.generator)
        if self.channels is not None and x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ConfigError(f"can only repeat a 1-channel image to {self.channels} channels, got {x.shape[1]}")
            x = x.expand(-1, self.channels, -1, -1)
        if self.normalize is not None:
            mean, std = self.normalize
            x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        x = x.contiguous()
        return {"pixel_values": x, "labels": y} if self.return_dict else (x, y)


class _TensorBatches(torch.utils.data.Dataset):
    """Tensors indexed a batch at a time: the DataLoader calls ``__getitems__`` with a batch of indices."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pixels[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.pixels[idx], self.labels[idx]


def _materialise(ds: datasets.Dataset) -> _TensorBatches:
    cols = ds.with_format("numpy")[:]
    pixels = torch.from_numpy(np.ascontiguousarray(cols["pixel_values"], dtype=np.float32))
    labels = torch.from_numpy(np.ascontiguousarray(cols["label"], dtype=np.int64))
    return _TensorBatches(pixels, labels)


def make_dataloader(
    ds: datasets.Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    augment: str | None = None,
    resize_to: int | Sequence[int] | None = None,
    channels: int | None = None,
    normalize: str | tuple[Sequence[float], Sequence[float]] | None = None,
    return_dict: bool = False,
    num_workers: int = 0,
    materialize: bool | None = None,
    collate_fn: Callable[[Any], Any] | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a :func:`load_image_dataset` dataset yielding ``(pixels, labels)`` (or a dict with
    ``pixel_values``/``labels`` when ``return_dict``).

    Shuffling and augmentation are seeded by ``seed`` (accelerate's ``prepare`` keeps the sampler's generator
    in sync across ranks). ``augment``: ``None``, ``"flip"``, ``"crop[:pad]"``, ``"flip+crop:4"`` or a preset
    (``seed_mnist`` = crop pad 2, ``seed_cifar`` = flip + crop pad 4); use it for training loaders only.
    ``resize_to``/``channels`` feed e.g. Fashion-MNIST at 32x32x3 to the CIFAR net (see :func:`dataset_spec`
    for the matching spec). ``normalize``: ``None``, ``"mnist"``, ``"half"`` or ``(mean, std)``.
    ``materialize`` (default: when under 2 GiB) copies the columns into tensors once so a batch is one
    tensor index instead of an Arrow gather.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if materialize is None:
        feats = ds.features["pixel_values"]
        per_row = int(np.prod(getattr(feats, "shape", (0,)))) * 4
        materialize = per_row * len(ds) < 2 * 1024**3
    source = _materialise(ds) if materialize else ds.with_format("torch")
    transform = collate_fn or BatchTransform(
        resize_to=resize_to,
        channels=channels,
        augment=augment,
        normalize=normalize,
        seed=seed,
        return_dict=return_dict,
    )
    generator = torch.Generator().manual_seed(int(seed))
    return torch.utils.data.DataLoader(
        source,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=transform,
        generator=generator,
        num_workers=num_workers,
    )
