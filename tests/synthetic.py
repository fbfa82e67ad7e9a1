"""Seeded synthetic datasets, made in the test session: no download and no mirror. They stand in
for the real data where a test needs the real *code path* (collect, preprocess, the stages), not
the real data's semantics.

- `write_idx_mirror`: a mirror folder `fashion-mnist/` of idx files shaped like Fashion-MNIST
  (28x28 uint8, 10 classes), each class a fixed random blob pattern plus noise, so a small net
  learns it in an epoch. `idx_data_config` is conf/data/fashion_mnist.yaml with their sha256s.
- `write_text_csv`: text,label rows whose words give the class away (data=text_csv).
- `write_table_csv`: numeric rows with a linear target plus noise (data=table_csv).
- `write_char_text`: a plain-text file of repeated phrases (format char_text).
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

IDX_FILES = {  # Fashion-MNIST's file names: (split, kind)
    "train-images-idx3-ubyte.gz": ("train", "images"),
    "train-labels-idx1-ubyte.gz": ("train", "labels"),
    "t10k-images-idx3-ubyte.gz": ("test", "images"),
    "t10k-labels-idx1-ubyte.gz": ("test", "labels"),
}


def image_classes(
    n: int, rng: np.random.Generator, classes: int = 10, size: int = 28
) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) uint8 images and their labels: one smooth random prototype per class
    (the same for every call with the same seed-derived prototypes) plus per-image noise."""
    prototypes = _prototypes(classes, size)
    y = rng.permutation(np.arange(n) % classes).astype(np.uint8)
    noise = rng.normal(0, 40, (n, size, size))
    x = np.clip(prototypes[y] + noise, 0, 255).astype(np.uint8)
    return x, y


def _prototypes(classes: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(1234)  # fixed: train and test share the class patterns
    grid = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    out = np.zeros((classes, size, size))
    for c in range(classes):
        for _ in range(3):  # three bright blobs per class
            cy, cx, width = rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), rng.uniform(0.2, 0.5)
            out[c] += 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    return np.clip(out, 0, 230)


def _idx_bytes(array: np.ndarray) -> bytes:
    # idx: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dims, then the raw bytes
    magic = struct.pack(">BBBB", 0, 0, 8, array.ndim)
    return magic + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_mirror(root: Path, n_train: int = 2400, n_test: int = 1000, seed: int = 0) -> dict:
    """Writes root/fashion-mnist/*.gz; returns {file name: sha256}."""
    rng = np.random.default_rng(seed)
    splits = {"train": image_classes(n_train, rng), "test": image_classes(n_test, rng)}
    folder = Path(root) / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (split, kind) in IDX_FILES.items():
        x, y = splits[split]
        # mtime=0: the same bytes (and sha256) on every run
        blob = gzip.compress(_idx_bytes(x if kind == "images" else y), mtime=0)
        (folder / name).write_bytes(blob)
        files[name] = hashlib.sha256(blob).hexdigest()
    return files


def idx_data_config(base: dict, files: dict[str, str], **overrides) -> dict:
    """The Fashion-MNIST data config pointed at the synthetic files: same name, format, classes."""
    return {**base, "files": files, "url": "http://127.0.0.1:9/", **overrides}


WORDS = {  # class -> words that give it away; every text also gets shared filler words
    "negative": ["dull", "boring", "awful", "weak", "bad"],
    "positive": ["great", "funny", "gripping", "fine", "good"],
}
FILLER = ["the", "film", "a", "plot", "is", "and", "story"]


def write_text_csv(path: Path, n: int = 400, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = ["text,label"]
    labels = sorted(WORDS)
    for i in range(n):
        label = labels[i % len(labels)]
        words = list(rng.choice(WORDS[label], 2)) + list(rng.choice(FILLER, rng.integers(2, 8)))
        rows.append(f"{' '.join(rng.permutation(words))},{label}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def write_table_csv(path: Path, n: int = 600, seed: int = 0) -> Path:
    """Columns a, b (numeric), kind (categorical) and target = 3a - 2b + kind offset + noise."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    kind = rng.choice(["x", "y", "z"], n)
    target = 3 * a - 2 * b + np.select([kind == "x", kind == "y"], [1.0, -1.0], 0.0)
    target += rng.normal(0, 0.1, n)
    lines = ["a,b,kind,target"] + [
        f"{a[i]:.4f},{b[i]:.4f},{kind[i]},{target[i]:.4f}" for i in range(n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_char_text(path: Path, n_chars: int = 30000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    phrases = ["ROMEO: ", "JULIET: ", "First Citizen:\n", "the rose ", "by any other name\n"]
    parts, size = [], 0
    while size < n_chars:
        parts.append(phrases[rng.integers(len(phrases))])
        size += len(parts[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts)[:n_chars])
    return path
