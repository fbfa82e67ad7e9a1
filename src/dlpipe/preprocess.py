"""Stage 2: decode the raw data into seeded train/val/test arrays plus meta.json.

Images (formats idx and image_folder, here) keep their raw uint8 layout, split stratified;
meta.json carries the train-split mean/std. Other formats (audio, text, prices, tables) live in
`dlpipe.formats.<module>` and use the helpers below: every format writes `{split}_{key}.npy`
arrays and, last, a meta.json whose presence means the arrays are complete.
"""

import gzip
import hashlib
import importlib
import io
import json
import logging
import struct
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dlpipe.collect import (
    MANIFEST,
    DataError,
    image_root,
    load_manifest,
    sha256_file,
    write_atomic,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_FORMATS = ("idx", "image_folder")
# format -> module with `preprocess(data, raw_dir, out_dir, seed) -> meta` (see dlpipe.formats)
FORMAT_MODULES = {
    "idx": "dlpipe.formats.images",
    "image_folder": "dlpipe.formats.images",
    "fsdd": "dlpipe.formats.audio",
    "text_table": "dlpipe.formats.text",
    "char_text": "dlpipe.formats.chars",
    "stock_prices": "dlpipe.formats.stocks",
    "table": "dlpipe.formats.tabular",
}
FORMATS = tuple(FORMAT_MODULES)
META = "meta.json"
IDX_MAGIC = {2051: 3, 2049: 1}  # images (N, H, W) / labels (N,): uint8, big-endian dims
STATS_CHUNK = 1 << 22  # pixels per bincount call, to bound the int64 temporary


def format_module(fmt: str):
    """The module that handles data.format=`fmt` (preprocessing and, for serving, its inputs)."""
    if fmt not in FORMAT_MODULES:
        raise ValueError(f"data.format={fmt!r} is not supported; use one of {list(FORMATS)}")
    return importlib.import_module(FORMAT_MODULES[fmt])


def preprocess(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
    """Split and decode the collected dataset into `out_dir`; returns the meta it writes."""
    fmt = data.get("format")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer, or the splits would not be repeatable")
    return format_module(fmt).preprocess(data, Path(raw_dir), Path(out_dir), seed)


def checked_manifest(data: Mapping, raw_dir: Path) -> dict:
    """The collect stage's manifest of `raw_dir`, checked to be of the configured dataset."""
    manifest = load_manifest(raw_dir)
    if (manifest["name"], manifest["format"]) != (data["name"], data.get("format")):
        raise DataError(
            f"{raw_dir} holds {manifest['name']!r} ({manifest['format']}), not {data['name']!r} "
            f"({data.get('format')}): re-run the collect stage with the same data config"
        )
    return manifest


def preprocess_images(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
    """Formats idx and image_folder: uint8 images, stratified splits, per-channel stats."""
    t0 = time.perf_counter()
    fmt = data["format"]
    manifest = checked_manifest(data, raw_dir)
    classes = list(data["classes"]) if fmt == "idx" else manifest["classes"]
    _validate(data, fmt, len(classes))
    rng = np.random.default_rng(seed)

    if fmt == "idx":
        (x, y), test = _read_idx(raw_dir, manifest)
        if y.max() >= len(classes):
            raise DataError(
                f"labels go up to {y.max()} but data.classes lists {len(classes)} names"
            )
    else:
        x, y = _read_image_folder(data, manifest)
        test_idx, rest = stratified_split(y, fraction_count(data, "test_fraction", len(y)), rng)
        test, x, y = (x[test_idx], y[test_idx]), x[rest], y[rest]

    limit = data.get("limit")
    if limit is not None and limit < len(y):
        keep, _ = stratified_split(y, limit, rng)
        x, y = x[keep], y[keep]
    elif limit is not None:
        log.info(
            "data.limit=%d >= the %d training samples there are: using them all", limit, len(y)
        )
    val_idx, train_idx = stratified_split(y, fraction_count(data, "val_fraction", len(y)), rng)
    splits = {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]), "test": test}

    sha256 = save_arrays(
        out_dir,
        {
            f"{split}_{k}": a
            for split, (xs, ys) in splits.items()
            for k, a in (("x", xs), ("y", ys.astype(np.int64)))
        },
    )
    x_train = splits["train"][0]
    mean, std = channel_stats(x_train)
    meta = {
        "name": data["name"],
        "format": fmt,
        "classes": classes,
        "input_shape": list(x_train.shape[1:]),
        "num_classes": len(classes),
        "mean": mean,
        "std": std,
        "sizes": {split: len(ys) for split, (_, ys) in splits.items()},
        "seed": seed,
        "raw_sha256": raw_sha256(raw_dir, manifest),
        "sha256": sha256,
    }
    write_meta(out_dir, meta)
    log.info(
        "preprocessed %s: sizes %s, input_shape %s, mean %s, std %s in %.2fs -> %s",
        data["name"],
        meta["sizes"],
        meta["input_shape"],
        [round(m, 4) for m in mean],
        [round(s, 4) for s in std],
        time.perf_counter() - t0,
        out_dir,
    )
    return meta


def save_arrays(out_dir: Path, arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Write each array as `out_dir/<name>.npy` (atomically); returns {file name: sha256}."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return {
        f"{name}.npy": _save_npy(Path(out_dir) / f"{name}.npy", array)
        for name, array in arrays.items()
    }


def write_meta(out_dir: Path, meta: Mapping) -> None:
    """meta.json goes last: its presence means every array beside it is complete."""
    write_atomic(Path(out_dir) / META, [json.dumps(meta, indent=2).encode()])


def load_array(processed_dir: Path, name: str) -> np.ndarray:
    path = Path(processed_dir) / f"{name}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the preprocess stage first")
    return np.load(path)


def load_split(processed_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one split written by `preprocess`: for images x is uint8 (N, H, W) or
    (N, H, W, C) and y int64 (N,); other formats store their own dtypes and shapes."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
    return load_array(processed_dir, f"{split}_x"), load_array(processed_dir, f"{split}_y")


def load_meta(processed_dir: Path) -> dict:
    path = Path(processed_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the preprocess stage first")
    return json.loads(path.read_text())


def stratified_split(
    y: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled indices (taken, rest), `n` taken with each class's share of `y` kept.

    Per-class counts use largest remainders, so they add up to exactly `n`.
    """
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n / len(y)
    take = np.floor(quota).astype(np.int64)
    # Ties go to the lower class index (stable sort), so the split is deterministic.
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1
    taken, rest = [], []
    for c, k in zip(classes, take, strict=True):
        idx = rng.permutation(np.flatnonzero(y == c))
        taken.append(idx[:k])
        rest.append(idx[k:])
    # Shuffled rather than class-sorted, so any prefix of a split is a fair sample.
    return rng.permutation(np.concatenate(taken)), rng.permutation(np.concatenate(rest))


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, H, W[, C]), pixels scaled to 0..1."""
    channels = x.shape[3] if x.ndim == 4 else 1
    pixels = x.reshape(-1, channels)  # (N*H*W, C)
    # Exact 256-bin histograms: integer counts, so no float accumulation error and no
    # float64 copy of the whole split.
    hist = np.zeros((channels, 256), np.int64)
    for start in range(0, len(pixels), STATS_CHUNK):
        block = pixels[start : start + STATS_CHUNK]
        for c in range(channels):
            hist[c] += np.bincount(block[:, c], minlength=256)
    levels = np.arange(256) / 255.0
    n = hist.sum(axis=1)
    mean = hist @ levels / n
    var = (hist * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / n
    return mean.tolist(), np.sqrt(var).tolist()


def _validate(data: Mapping, fmt: str, num_classes: int) -> None:
    fraction_keys = (
        ("val_fraction", "test_fraction") if fmt == "image_folder" else ("val_fraction",)
    )
    for key in fraction_keys:
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise ValueError(
                f"data.{key}={value!r} must be a fraction in (0, 1), e.g. data.{key}=0.1"
            )
    limit = data.get("limit")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or limit < num_classes
    ):
        raise ValueError(
            f"data.limit={limit!r} must be null (no cap) or an integer >= the number of classes "
            f"({num_classes}), e.g. data.limit=2000"
        )
    if fmt == "image_folder":
        size = data.get("image_size")
        if not (
            isinstance(size, list | tuple)
            and len(size) == 2
            and all(isinstance(s, int) and s > 0 for s in size)
        ):
            raise ValueError(
                f"data.image_size={size!r} must be [height, width], e.g. data.image_size=[28,28]"
            )
        if data.get("channels") not in (1, 3):
            raise ValueError(
                f"data.channels={data.get('channels')!r} must be 1 (grayscale) or 3 (RGB)"
            )


def fraction_count(data: Mapping, key: str, n: int) -> int:
    """round(data[key] * n), checked to leave at least one sample on each side."""
    k = round(data[key] * n)
    if not 0 < k < n:
        raise ValueError(
            f"data.{key}={data[key]} of {n} samples gives {k}, leaving one side empty: "
            f"change data.{key} or use more data"
        )
    return k


def _save_npy(path: Path, array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return write_atomic(path, [buf.getbuffer()])


def raw_sha256(raw_dir: Path, manifest: Mapping) -> dict[str, str]:
    # An image folder may hold thousands of files, and each entry becomes a tracking tag, so
    # it is summarized by the manifest, which changes exactly when an image does.
    if manifest["format"] == "image_folder":
        return {MANIFEST: sha256_file(raw_dir / MANIFEST)}
    return dict(manifest["files"])


def read_verified(path: Path, expected: str) -> bytes:
    """The bytes of a raw file, checked against the manifest so a stale collect can't slip by."""
    if not path.is_file():
        raise DataError(f"{path} is missing: re-run the collect stage")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != expected:
        raise DataError(f"{path} changed since it was collected: re-run the collect stage")
    return blob


# --- format "idx" --------------------------------------------------------------------------


def _read_idx(raw_dir: Path, manifest: Mapping) -> tuple[tuple, tuple]:
    """((train_x, train_y), (test_x, test_y)) from the official MNIST-style gzipped idx files."""
    out = []
    for prefix in ("train", "t10k"):  # the official training and test splits
        x = _read_idx_file(raw_dir, manifest, f"{prefix}-images-", 2051)
        y = _read_idx_file(raw_dir, manifest, f"{prefix}-labels-", 2049)
        if len(x) != len(y):
            raise DataError(
                f"{prefix}: {len(x)} images but {len(y)} labels: re-run the collect stage"
            )
        out.append((x, y))
    return out[0], out[1]


def _read_idx_file(raw_dir: Path, manifest: Mapping, prefix: str, magic: int) -> np.ndarray:
    names = [name for name in manifest["files"] if name.startswith(prefix)]
    if len(names) != 1:
        raise DataError(f"data.files needs exactly one '{prefix}*' idx file, found {names}")
    path = raw_dir / names[0]
    blob = read_verified(path, manifest["files"][names[0]])
    try:
        buf = gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path} is not valid gzip ({e}): delete it and re-run the collect stage"
        ) from e
    ndim = IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(buf) < header or struct.unpack(">i", buf[:4])[0] != magic:
        raise DataError(f"{path} is not an idx file with magic {magic}: check data.files")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    if len(buf) != header + int(np.prod(dims)):
        raise DataError(f"{path} holds {len(buf) - header} bytes of data, its header says {dims}")
    return np.frombuffer(buf, np.uint8, offset=header).reshape(dims)


# --- format "image_folder" ------------------------------------------------------------------


def _read_image_folder(data: Mapping, manifest: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """All images listed in the manifest, decoded and resized: (x uint8, y int64)."""
    root = image_root(data)
    height, width = data["image_size"]
    channels = data["channels"]
    mode = "L" if channels == 1 else "RGB"
    label_of = {name: i for i, name in enumerate(manifest["classes"])}
    names = sorted(manifest["files"])
    x = np.empty((len(names), height, width) + ((channels,) if channels > 1 else ()), np.uint8)
    y = np.empty(len(names), np.int64)
    for i, name in enumerate(names):
        path = root / name
        blob = read_verified(path, manifest["files"][name])
        try:
            with Image.open(io.BytesIO(blob)) as img:
                # exif_transpose: phone JPEGs store rotation as a tag, not in the pixels.
                img = ImageOps.exif_transpose(img).convert(mode)
                x[i] = np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(
                f"{path} can't be decoded ({e}): replace or delete it, then re-run collect"
            ) from e
        y[i] = label_of[name.split("/", 1)[0]]
    return x, y
