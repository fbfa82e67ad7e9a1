"""Stage 2 on real data: Fashion-MNIST from the mirror and a tiny generated image folder."""

import gzip
import hashlib
import shutil
import time

import numpy as np
import pytest

from dlpipe.collect import collect
from dlpipe.data import MIRROR_ENV, DataError, load_meta, load_split
from dlpipe.preprocess import preprocess

META_KEYS = {
    "name",
    "format",
    "input_kind",
    "classes",
    "input_shape",
    "num_classes",
    "mean",
    "std",
    "sizes",
    "seed",
    "raw_sha256",
    "sha256",
}


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


def test_fmnist_shapes_dtypes_and_meta(fmnist_processed):
    meta = load_meta(fmnist_processed)
    assert set(meta) == META_KEYS
    assert meta["sizes"] == {"train": 1600, "val": 400, "test": 10000}
    assert meta["input_shape"] == [28, 28] and meta["num_classes"] == 10
    assert meta["input_kind"] == "image"
    assert meta["classes"][0] == "T-shirt/top" and meta["seed"] == 0
    assert len(meta["raw_sha256"]) == 4
    for split, n in meta["sizes"].items():
        x, y = load_split(fmnist_processed, split)
        assert x.shape == (n, 28, 28) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
    for name, sha in meta["sha256"].items():
        assert hashlib.sha256((fmnist_processed / name).read_bytes()).hexdigest() == sha


def test_fmnist_train_val_are_stratified_and_disjoint(fmnist_processed):
    (x_train, y_train), (x_val, y_val) = (load_split(fmnist_processed, s) for s in ("train", "val"))
    # Fashion-MNIST is balanced, so a stratified 2000 -> 1600/400 split is exact per class.
    assert np.bincount(y_train, minlength=10).tolist() == [160] * 10
    assert np.bincount(y_val, minlength=10).tolist() == [40] * 10
    assert not _rows(x_train) & _rows(x_val)
    assert len(_rows(x_train)) == len(x_train)
    assert len(np.unique(y_train[:50])) > 5  # shuffled, not sorted by class


def test_fmnist_test_split_is_the_official_one(fmnist_processed, mirror):
    x, y = load_split(fmnist_processed, "test")
    folder = mirror / "fashion-mnist"
    raw_x = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())[16:]
    raw_y = gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:]
    assert x.tobytes() == raw_x
    assert y.tolist() == list(raw_y)


def test_fmnist_stats_come_from_train_only(fmnist_processed):
    meta = load_meta(fmnist_processed)
    x_train, _ = load_split(fmnist_processed, "train")
    x_val, _ = load_split(fmnist_processed, "val")
    pixels = x_train / 255.0
    assert meta["mean"] == pytest.approx([pixels.mean()], abs=1e-12)
    assert meta["std"] == pytest.approx([pixels.std()], abs=1e-12)
    assert meta["mean"] != pytest.approx([np.concatenate([x_train, x_val]).mean() / 255], abs=1e-6)


def test_preprocess_is_deterministic(fmnist_raw, fmnist_processed, tmp_path, data_config):
    data = data_config("fashion_mnist", limit=2000, val_fraction=0.2)
    again = preprocess(data, fmnist_raw, tmp_path / "again", seed=0)
    assert again == load_meta(fmnist_processed)
    for name in again["sha256"]:
        assert (tmp_path / "again" / name).read_bytes() == (fmnist_processed / name).read_bytes()
    other = preprocess(data, fmnist_raw, tmp_path / "other", seed=1)
    assert other["sha256"]["train_x.npy"] != again["sha256"]["train_x.npy"]
    assert other["sha256"]["test_x.npy"] == again["sha256"]["test_x.npy"]


def test_full_fashion_mnist_is_fast(fmnist_raw, tmp_path, data_config):
    t0 = time.perf_counter()
    meta = preprocess(data_config("fashion_mnist"), fmnist_raw, tmp_path, seed=42)
    assert time.perf_counter() - t0 < 5
    assert meta["sizes"] == {"train": 54000, "val": 6000, "test": 10000}
    assert np.bincount(load_split(tmp_path, "val")[1]).tolist() == [600] * 10
    # The published Fashion-MNIST training-set statistics.
    assert meta["mean"][0] == pytest.approx(0.2860, abs=1e-3)
    assert meta["std"][0] == pytest.approx(0.3530, abs=1e-3)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_end_to_end(image_dir, tmp_path, data_config, channels):
    data = data_config("image_folder", path=str(image_dir), image_size=[8, 12], channels=channels)
    collect(data, tmp_path / "raw")
    meta = preprocess(data, tmp_path / "raw", tmp_path / "out", seed=0)

    shape = [8, 12] if channels == 1 else [8, 12, 3]
    assert meta["input_shape"] == shape
    assert meta["classes"] == ["cat", "dog", "frog"] and meta["num_classes"] == 3
    # 30 images: test round(0.2 * 30) = 6, then val round(0.1 * 24) = 2.
    assert meta["sizes"] == {"train": 22, "val": 2, "test": 6}
    assert len(meta["mean"]) == len(meta["std"]) == channels
    manifest_sha = hashlib.sha256((tmp_path / "raw" / "manifest.json").read_bytes()).hexdigest()
    assert meta["raw_sha256"] == {"manifest.json": manifest_sha}
    x_test, y_test = load_split(tmp_path / "out", "test")
    assert np.bincount(y_test).tolist() == [2, 2, 2]
    seen = set()
    for split in ("train", "val", "test"):
        x, y = load_split(tmp_path / "out", split)
        assert list(x.shape[1:]) == shape and x.dtype == np.uint8 and y.dtype == np.int64
        seen |= _rows(x)
        # class c was drawn from [60c, 60c + 100): check the labels follow the pixels
        assert (np.abs(x.reshape(len(x), -1).mean(axis=1) - (60 * y + 50)) < 15).all()
    assert len(seen) == 30
    assert preprocess(data, tmp_path / "raw", tmp_path / "again", seed=0) == meta


def test_image_folder_limit_caps_the_training_pool(image_dir, tmp_path, data_config):
    data = data_config("image_folder", path=str(image_dir), limit=12, val_fraction=0.25)
    collect(data, tmp_path / "raw")
    meta = preprocess(data, tmp_path / "raw", tmp_path / "out", seed=0)
    assert meta["sizes"] == {"train": 9, "val": 3, "test": 6}
    assert np.bincount(load_split(tmp_path / "out", "val")[1]).tolist() == [1, 1, 1]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("val_fraction", 0),
        ("val_fraction", 1.0),
        ("val_fraction", "0.1"),
        ("val_fraction", True),
        ("limit", 0),
        ("limit", 5),  # fewer than the 10 classes
        ("limit", 2.5),
        ("limit", -1),
    ],
)
def test_bad_config_names_the_key_and_value(fmnist_raw, tmp_path, data_config, key, value):
    with pytest.raises(ValueError, match=rf"data\.{key}={value!r} must"):
        preprocess(data_config("fashion_mnist", **{key: value}), fmnist_raw, tmp_path, seed=0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("key", "value"),
    [("test_fraction", 1.5), ("image_size", [28]), ("image_size", [0, 28]), ("channels", 2)],
)
def test_bad_image_folder_config(image_dir, tmp_path, data_config, key, value):
    data = data_config("image_folder", path=str(image_dir))
    collect(data, tmp_path / "raw")
    with pytest.raises(ValueError, match=rf"data\.{key}="):
        preprocess({**data, key: value}, tmp_path / "raw", tmp_path / "out", seed=0)


def test_val_fraction_too_small_for_the_data(fmnist_raw, tmp_path, data_config):
    data = data_config("fashion_mnist", limit=10, val_fraction=0.01)
    with pytest.raises(ValueError, match=r"data\.val_fraction=0\.01 of 10 samples gives 0"):
        preprocess(data, fmnist_raw, tmp_path, seed=0)


def test_preprocess_before_collect(tmp_path, data_config):
    with pytest.raises(DataError, match="run the collect stage first"):
        preprocess(data_config("fashion_mnist"), tmp_path / "raw", tmp_path / "out", seed=0)


def test_raw_file_changed_after_collect(mirror, tmp_path, monkeypatch, data_config):
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    data = data_config("fashion_mnist")
    collect(data, tmp_path / "raw")
    (tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"edited")
    with pytest.raises(DataError, match="changed since it was collected"):
        preprocess(data, tmp_path / "raw", tmp_path / "out", seed=0)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (lambda labels: b"not gzip at all", "not valid gzip"),
        (lambda labels: labels, "not an idx file with magic 2051"),  # labels posing as images
    ],
    ids=["not-gzip", "wrong-magic"],
)
def test_corrupt_idx_is_reported(mirror, tmp_path, monkeypatch, data_config, content, error):
    """Files that match their pinned sha256 but are not what the format expects."""
    folder = tmp_path / "mirror" / "fashion-mnist"
    shutil.copytree(mirror / "fashion-mnist", folder)
    blob = content((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (folder / "train-images-idx3-ubyte.gz").write_bytes(blob)
    data = data_config("fashion_mnist")
    data["files"]["train-images-idx3-ubyte.gz"] = hashlib.sha256(blob).hexdigest()
    monkeypatch.setenv(MIRROR_ENV, str(folder.parent))
    collect(data, tmp_path / "raw")
    with pytest.raises(DataError, match=error):
        preprocess(data, tmp_path / "raw", tmp_path / "out", seed=0)


def test_undecodable_image_is_named(image_dir, tmp_path, data_config):
    (image_dir / "dog" / "004.png").write_bytes(b"\x89PNG but not really")
    data = data_config("image_folder", path=str(image_dir))
    collect(data, tmp_path / "raw")
    with pytest.raises(DataError, match=r"dog/004\.png can't be decoded"):
        preprocess(data, tmp_path / "raw", tmp_path / "out", seed=0)


def test_loaders_explain_missing_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the preprocess stage"):
        load_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match="run the preprocess stage"):
        load_split(tmp_path, "train")
    with pytest.raises(ValueError, match="split='dev'"):
        load_split(tmp_path, "dev")
