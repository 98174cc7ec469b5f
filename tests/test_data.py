"""egg_recipes.data: offline datasets, the Hub code path on local files, typed errors, batches."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from egg_recipes import data
from egg_recipes.data import (
    BatchTransform,
    DatasetUnavailableError,
    dataset_spec,
    load_image_dataset,
    make_dataloader,
    parse_augment,
    random_flip_crop,
)
from PIL import Image

from egg_optim.errors import ConfigError, EggOptimError

FASHION_DIR = Path(data.DEFAULT_FASHION_MNIST_DIR)
HAVE_FASHION = all(
    (FASHION_DIR / f"{p}-{k}-ubyte.gz").is_file() for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")
)


def _arrays(ds):
    cols = ds.with_format("numpy")[:]
    return cols["pixel_values"], cols["label"]


# ---------------------------------------------------------------------------------------- digits
def test_digits_columns_shapes_and_range():
    ds = load_image_dataset("digits")
    assert ds.column_names == ["pixel_values", "label"]
    ex = ds[0]
    assert isinstance(ex["pixel_values"], torch.Tensor) and ex["pixel_values"].dtype == torch.float32
    assert tuple(ex["pixel_values"].shape) == (1, 8, 8)
    x, y = _arrays(ds)
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() == 1.0  # 16/16 occurs
    assert set(np.unique(y).tolist()) == set(range(10))
    spec = dataset_spec(ds)
    assert (spec.name, spec.num_classes, spec.channels, spec.height, spec.width) == ("digits", 10, 1, 8, 8)
    assert spec.input_shape == (1, 8, 8) and spec.image_size == (8, 8)


def test_digits_split_is_deterministic_stratified_and_covers_the_data():
    from sklearn.datasets import load_digits

    tr, te = load_image_dataset("digits", split="train"), load_image_dataset("digits", split="test")
    tr2 = load_image_dataset("digits", split="train", seed=123)  # seed only drives max_samples
    x_tr, y_tr = _arrays(tr)
    x_te, y_te = _arrays(te)
    assert np.array_equal(x_tr, _arrays(tr2)[0]) and np.array_equal(y_tr, _arrays(tr2)[1])
    full = load_digits()
    assert len(y_tr) + len(y_te) == len(full.target)
    assert abs(len(y_te) / len(full.target) - 0.2) < 0.01
    # train + test is exactly the original data (as a multiset of (image, label) rows)
    ours = np.concatenate([x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)]) * 16
    ours = np.concatenate([ours, np.concatenate([y_tr, y_te])[:, None]], axis=1)
    ref = np.concatenate([full.data, full.target[:, None]], axis=1)
    key = lambda a: a[np.lexsort(a.T[::-1])]
    assert np.allclose(key(np.round(ours)), key(ref))
    # stratified: every class is about 20 % test
    for c in range(10):
        frac = (y_te == c).sum() / ((y_te == c).sum() + (y_tr == c).sum())
        assert 0.15 < frac < 0.25


def test_max_samples_is_a_seeded_subset():
    full_x, _ = _arrays(load_image_dataset("digits"))
    a = load_image_dataset("digits", max_samples=50, seed=1)
    b = load_image_dataset("digits", max_samples=50, seed=1)
    c = load_image_dataset("digits", max_samples=50, seed=2)
    xa, ya = _arrays(a)
    assert len(a) == 50 and np.array_equal(xa, _arrays(b)[0]) and np.array_equal(ya, _arrays(b)[1])
    assert not np.array_equal(xa, _arrays(c)[0])
    rows = {r.tobytes() for r in full_x}
    assert all(r.tobytes() in rows for r in xa)
    assert len(load_image_dataset("digits", max_samples=10**6)) == len(full_x)
    with pytest.raises(ConfigError):
        load_image_dataset("digits", max_samples=0)


def test_bad_split_for_local_sources_is_a_config_error():
    with pytest.raises(ConfigError, match="validation"):
        load_image_dataset("digits", split="validation")


# ---------------------------------------------------------------------------------------- fashion-mnist
def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_dir(root: Path, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        imgs[0, 0, 0] = 255
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[prefix] = (imgs, labels)
    return out


def test_fashion_mnist_idx_parsing_from_env_dir(tmp_path, monkeypatch):
    raw = _fake_fashion_dir(tmp_path)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
    tr = load_image_dataset("fashion_mnist")
    te = load_image_dataset("fashion-mnist", split="test")
    for ds, (imgs, labels) in ((tr, raw["train"]), (te, raw["t10k"])):
        x, y = _arrays(ds)
        assert x.shape == (len(imgs), 1, 28, 28)
        assert np.allclose(x[:, 0] * 255.0, imgs, atol=1e-3)
        assert np.array_equal(y, labels)
    spec = dataset_spec(tr)
    assert spec.num_classes == 10 and spec.class_names[0] == "T-shirt/top" and spec.name == "fashion_mnist"
    # the argument wins over the environment
    other = tmp_path / "other"
    other.mkdir()
    _fake_fashion_dir(other, n_train=3)
    assert len(load_image_dataset("fashion_mnist", data_dir=other)) == 3


def test_fashion_mnist_missing_files_error_is_typed_and_one_line(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_image_dataset("fashion_mnist", data_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "apt-get install -y dataset-fashion-mnist" in msg and str(tmp_path) in msg
    assert isinstance(info.value, EggOptimError) and isinstance(info.value, RuntimeError)


def test_fashion_mnist_truncated_file_is_reported(tmp_path):
    _fake_fashion_dir(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(p, "rb") as f:
        blob = f.read()
    with gzip.open(p, "wb") as f:
        f.write(blob[:-10])
    with pytest.raises(DatasetUnavailableError, match="truncated"):
        load_image_dataset("fashion_mnist", data_dir=tmp_path)


@pytest.mark.skipif(not HAVE_FASHION, reason=f"Debian's dataset-fashion-mnist files are not in {FASHION_DIR}")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    tr = load_image_dataset("fashion_mnist")
    te = load_image_dataset("fashion_mnist", split="test")
    assert (len(tr), len(te)) == (60000, 10000)
    x, y = _arrays(te)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.bincount(y, minlength=10).tolist() == [1000] * 10
    with gzip.open(FASHION_DIR / "t10k-images-idx3-ubyte.gz", "rb") as f:
        first = np.frombuffer(f.read(16 + 784), dtype=np.uint8, offset=16).reshape(28, 28)
    assert np.allclose(x[0, 0] * 255.0, first, atol=1e-3)
    spec = dataset_spec(tr, resize_to=32, channels=3)
    assert (spec.num_classes, spec.channels, spec.height, spec.width) == (10, 3, 32, 32)


# ---------------------------------------------------------------------------------------- hub path, offline
def _rgb_images(n: int, h: int = 6, w: int = 5, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def _write_cifar_like(folder: Path, n: int = 12) -> list[Image.Image]:
    imgs = _rgb_images(n)
    feats = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(num_classes=7),
            "coarse_label": datasets.ClassLabel(num_classes=2),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"img": imgs, "fine_label": [i % 7 for i in range(n)], "coarse_label": [i % 2 for i in range(n)]},
        features=feats,
    )
    folder.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "train-00000.parquet"))
    return imgs


def test_hub_code_path_on_local_parquet_normalises_columns(tmp_path):
    imgs = _write_cifar_like(tmp_path / "cifar_like")
    ds = load_image_dataset(str(tmp_path / "cifar_like"), cache_dir=tmp_path / "cache")
    assert ds.column_names == ["pixel_values", "label"]
    spec = dataset_spec(ds)
    assert (spec.num_classes, spec.channels, spec.height, spec.width) == (7, 3, 6, 5)  # fine_label preferred
    x, y = _arrays(ds)
    expected = np.stack([np.asarray(im).transpose(2, 0, 1) for im in imgs]).astype(np.float32) / 255.0
    assert np.allclose(x, expected, atol=1e-6)
    assert y.tolist() == [i % 7 for i in range(len(imgs))]
    coarse = load_image_dataset(
        str(tmp_path / "cifar_like" / "train-00000.parquet"),
        cache_dir=tmp_path / "cache",
        label_column="coarse_label",
    )
    assert dataset_spec(coarse).num_classes == 2 and _arrays(coarse)[1].tolist() == [i % 2 for i in range(12)]


def test_hub_code_path_grey_images_and_save_to_disk(tmp_path):
    rng = np.random.default_rng(1)
    grey = [Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), mode="L") for _ in range(6)]
    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": grey, "label": [0, 1, 2, 0, 1, 2]},
                features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
            )
            for split in ("train", "test")
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    ds = load_image_dataset(str(tmp_path / "saved"), split="test", max_samples=4, seed=0)
    assert len(ds) == 4 and dataset_spec(ds).input_shape == (1, 4, 4)
    assert dataset_spec(ds).num_classes == 3
    x, _ = _arrays(ds)
    assert x.min() >= 0.0 and x.max() <= 1.0
    with pytest.raises(ConfigError, match="validation"):
        load_image_dataset(str(tmp_path / "saved"), split="validation")


def test_missing_image_column_is_a_config_error(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    ds.to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(ConfigError, match="image"):
        load_image_dataset(str(tmp_path / "t.parquet"), cache_dir=tmp_path / "cache")


def test_hub_unreachable_gives_one_line_typed_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetUnavailableError) as info:
        load_image_dataset("uoft-cs/cifar10")
    msg = str(info.value)
    assert "\n" not in msg
    assert "uoft-cs/cifar10" in msg and "'digits'" in msg and "'fashion_mnist'" in msg and "local path" in msg
    assert isinstance(info.value.__cause__, ConnectionError)


def test_other_errors_are_not_disguised_as_offline(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(KeyError):
        load_image_dataset("uoft-cs/cifar10")


def test_hf_hub_offline_real_call_is_typed(monkeypatch):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE was not set before huggingface_hub was imported")
    with pytest.raises(DatasetUnavailableError) as info:
        load_image_dataset("egg-optim-tests/no-such-dataset")
    assert "\n" not in str(info.value)


def test_missing_local_path_is_unavailable(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        load_image_dataset(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------- batches
def test_dataloader_batches_and_seeded_shuffle():
    ds = load_image_dataset("digits", split="test")
    dl = make_dataloader(ds, 64, shuffle=True, seed=3)
    batches = list(dl)
    assert len(batches) == len(dl) == -(-len(ds) // 64)
    x, y = batches[0]
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = list(make_dataloader(ds, 64, shuffle=True, seed=3))
    other = list(make_dataloader(ds, 64, shuffle=True, seed=4))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert not torch.equal(batches[0][1], other[0][1])
    # every example exactly once per epoch
    all_x = torch.cat([b[0] for b in batches]).flatten(1)
    ref_x, _ = _arrays(ds)
    assert sorted(map(bytes, all_x.numpy())) == sorted(map(bytes, ref_x.reshape(len(ref_x), -1)))
    dropped = make_dataloader(ds, 64, drop_last=True, return_dict=True)
    b = next(iter(dropped))
    assert set(b) == {"pixel_values", "labels"} and len(dropped) == len(ds) // 64


def test_materialised_and_arrow_paths_agree():
    ds = load_image_dataset("digits", split="test", max_samples=40)
    fast = list(make_dataloader(ds, 16, materialize=True, resize_to=10, channels=3, normalize="half"))
    slow = list(make_dataloader(ds, 16, materialize=False, resize_to=10, channels=3, normalize="half"))
    for (xf, yf), (xs, ys) in zip(fast, slow, strict=True):
        assert torch.allclose(xf, xs) and torch.equal(yf, ys)


def test_resize_channels_normalize():
    ds = load_image_dataset("digits", split="test", max_samples=8)
    x0, _ = next(iter(make_dataloader(ds, 8)))
    x, _ = next(iter(make_dataloader(ds, 8, resize_to=32, channels=3, normalize="mnist")))
    assert x.shape == (8, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    up = F.interpolate(x0, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(x[:, :1], (up - 0.1307) / 0.3081, atol=1e-5)
    assert dataset_spec(ds, resize_to=(32, 30), channels=3).input_shape == (3, 32, 30)


def test_flip_only_augmentation_flips_some_samples_exactly():
    ds = load_image_dataset("digits", max_samples=256)
    x0, _ = next(iter(make_dataloader(ds, 256)))
    x, _ = next(iter(make_dataloader(ds, 256, augment="flip", seed=0)))
    same = (x == x0).flatten(1).all(1)
    flipped = (x == x0.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 0.3 < flipped.float().mean().item() < 0.7


def test_random_crop_matches_a_padded_window_and_is_seeded():
    x = torch.rand(64, 2, 7, 7)
    g = torch.Generator().manual_seed(0)
    out = random_flip_crop(x, flip=False, padding=2, generator=g)
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 7, dx : dx + 7])
        ]
        assert hits, i
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets vary per sample
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(out, random_flip_crop(x, flip=False, padding=2, generator=g2))
    both = random_flip_crop(x, flip=True, padding=2, generator=torch.Generator().manual_seed(1))
    pf = padded.flip(-1)
    for i in range(len(x)):
        assert any(
            torch.equal(both[i], p[i, :, dy : dy + 7, dx : dx + 7])
            for p in (padded, pf)
            for dy in range(5)
            for dx in range(5)
        )


def test_batch_transform_accepts_example_lists_for_trainer_collation():
    ds = load_image_dataset("digits", split="test", max_samples=5)
    examples = [ds[i] for i in range(5)]
    out = BatchTransform(return_dict=True)(examples)
    x, y = _arrays(ds)
    assert torch.equal(out["pixel_values"], torch.from_numpy(x)) and out["labels"].tolist() == y.tolist()


def test_parse_augment():
    assert parse_augment(None) == (False, 0) and parse_augment("none") == (False, 0)
    assert parse_augment("seed_mnist") == (False, 2)
    assert parse_augment("seed_cifar") == (True, 4)
    assert parse_augment("crop:3+flip") == (True, 3)
    for bad in ("rotate", "crop:0", "flip+blur"):
        with pytest.raises(ConfigError):
            parse_augment(bad)
    with pytest.raises(ConfigError):
        BatchTransform(normalize="imagenet")


# ---------------------------------------------------------------------------------------- single-split sources
def _grey_dataset(n: int, labels) -> datasets.Dataset:
    rng = np.random.default_rng(n)
    return datasets.Dataset.from_dict(
        {"image": [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(n)], "label": list(labels)}
    )


def test_single_data_file_is_not_its_own_test_split(tmp_path):
    _grey_dataset(20, [i % 3 for i in range(20)]).to_parquet(str(tmp_path / "one.parquet"))
    path, cache = str(tmp_path / "one.parquet"), tmp_path / "cache"
    assert len(load_image_dataset(path, cache_dir=cache)) == 20
    with pytest.raises(ConfigError, match="single data file.*test_split_fraction"):
        load_image_dataset(path, split="test", cache_dir=cache)
    train = load_image_dataset(path, split="train", test_split_fraction=0.25, cache_dir=cache)
    test = load_image_dataset(path, split="test", test_split_fraction=0.25, cache_dir=cache, seed=9)
    assert (len(train), len(test)) == (15, 5)
    rows = lambda ds: {bytes(r) for r in _arrays(ds)[0].reshape(len(ds), -1)}
    full = rows(load_image_dataset(path, cache_dir=cache))
    assert rows(train) | rows(test) == full and not rows(train) & rows(test)
    assert rows(test) == rows(load_image_dataset(path, split="test", test_split_fraction=0.25, cache_dir=cache))


def test_single_split_folder_and_save_to_disk_are_refused_as_test(tmp_path):
    ds = _grey_dataset(8, [0, 1] * 4)
    (tmp_path / "folder").mkdir()
    ds.to_parquet(str(tmp_path / "folder" / "data.parquet"))  # datasets names the one split "train"
    with pytest.raises(ConfigError, match=r"no 'test' split.*test_split_fraction"):
        load_image_dataset(str(tmp_path / "folder"), split="test", cache_dir=tmp_path / "cache")
    ds.save_to_disk(str(tmp_path / "saved"))  # a Dataset, not a DatasetDict
    assert len(load_image_dataset(str(tmp_path / "saved"))) == 8
    with pytest.raises(ConfigError, match="single save_to_disk Dataset"):
        load_image_dataset(str(tmp_path / "saved"), split="test")
    assert len(load_image_dataset(str(tmp_path / "saved"), split="test", test_split_fraction=0.5)) == 4


def test_hub_dataset_without_test_split_gets_the_hint(monkeypatch):
    def train_only(*args, **kwargs):
        raise ValueError("Unknown split \"test\". Should be one of ['train'].")

    monkeypatch.setattr(datasets, "load_dataset", train_only)
    with pytest.raises(ConfigError, match="test_split_fraction"):
        load_image_dataset("someone/train-only", split="test")


def test_test_split_fraction_on_digits_is_fixed_and_subset_after():
    train = load_image_dataset("digits", test_split_fraction=0.2)
    test = load_image_dataset("digits", split="test", test_split_fraction=0.2, seed=5)
    official = load_image_dataset("digits")
    assert len(train) + len(test) == len(official) and len(test) == round(0.2 * len(official))
    small = load_image_dataset("digits", split="test", test_split_fraction=0.2, max_samples=10, seed=1)
    held = {bytes(r) for r in _arrays(test)[0].reshape(len(test), -1)}
    assert len(small) == 10 and all(bytes(r) in held for r in _arrays(small)[0].reshape(10, -1))
    for bad in (0.0, 1.0, -0.1, "0.2", True):
        with pytest.raises(ConfigError, match="test_split_fraction"):
            load_image_dataset("digits", test_split_fraction=bad)
    with pytest.raises(ConfigError, match="leaves no test row"):
        load_image_dataset("digits", test_split_fraction=0.0001)  # of 1437 rows
    with pytest.raises(ConfigError, match="leaves no train row"):
        load_image_dataset("digits", test_split_fraction=0.9999)
    with pytest.raises(ConfigError, match="validation"):
        load_image_dataset("digits", split="validation", test_split_fraction=0.2)


def test_check_splits_refuses_one_class_and_unknown_test_labels(tmp_path):
    from egg_recipes.data import check_splits

    one = tmp_path / "one_class.parquet"
    _grey_dataset(6, [4] * 6).to_parquet(str(one))
    ds = load_image_dataset(str(one), cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"only label 4 in its 6 rows.*at least 2 classes"):
        check_splits(ds)
    few = tmp_path / "few.parquet"
    _grey_dataset(6, [0, 1, 2] * 2).to_parquet(str(few))
    many = tmp_path / "many.parquet"
    _grey_dataset(6, [0, 5, 9] * 2).to_parquet(str(many))
    train = load_image_dataset(str(few), cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"labels 0\.\.9 but the train split defines 3 classes"):
        check_splits(train, load_image_dataset(str(many), cache_dir=tmp_path / "cache"))
    check_splits(load_image_dataset("digits"), load_image_dataset("digits", split="test", max_samples=1))
