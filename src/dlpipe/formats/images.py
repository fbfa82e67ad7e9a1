"""Images, formats idx (MNIST-style gzipped idx files, official test split) and image_folder
(one sub-folder of PNG/JPEG files per class, test split carved out, seeded and stratified).

Preprocessing keeps the raw uint8 layout (N, H, W) or (N, H, W, C) and splits stratified;
meta.json carries the train-split per-channel mean/std. A served image model is given raw
uint8 images, exactly as the data stores them (`Adapter`).
"""

from __future__ import annotations

import gzip
import io
import logging
import struct
import time
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dlpipe.data import (
    DataError,
    check_class_coverage,
    check_fraction,
    check_limit,
    checked_manifest,
    fraction_count,
    image_root,
    load_split,
    read_verified,
    save_arrays,
    stratified_split,
    write_meta,
)

log = logging.getLogger(__name__)

IDX_MAGIC = {2051: 3, 2049: 1}  # images (N, H, W) / labels (N,): uint8, big-endian dims
STATS_CHUNK = 1 << 22  # pixels per bincount call, to bound the int64 temporary


def preprocess(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
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
    fix = "raise data.limit" if fmt == "idx" else "add images to those class folders"
    check_class_coverage({s: ys for s, (_, ys) in splits.items()}, classes, fix)

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
        "input_kind": "image",
        "classes": classes,
        "input_shape": list(x_train.shape[1:]),
        "num_classes": len(classes),
        "mean": mean,
        "std": std,
        "sizes": {split: len(ys) for split, (_, ys) in splits.items()},
    }
    meta = write_meta(out_dir, meta, data, raw_dir, manifest, seed, sha256)
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
    check_fraction(data, "val_fraction")
    if fmt == "image_folder":
        check_fraction(data, "test_fraction")
    check_limit(data, num_classes, "images", "every class needs a training image")
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
    label_of = {name: i for i, name in enumerate(manifest["classes"])}
    names = sorted(manifest["files"])
    x = np.empty((len(names), height, width) + ((channels,) if channels > 1 else ()), np.uint8)
    y = np.empty(len(names), np.int64)
    for i, name in enumerate(names):
        path = root / name
        blob = read_verified(path, manifest["files"][name])
        x[i] = decode_image(blob, (height, width), channels, data["max_pixels"], str(path))
        y[i] = label_of[name.split("/", 1)[0]]
    return x, y


def fit_image(img: Image.Image, size: tuple[int, int], channels: int) -> np.ndarray:
    """`img` as the network takes it: converted to grayscale (channels=1) or RGB and resized
    bilinearly to `size` = (H, W); uint8 (H, W) or (H, W, 3). Preprocessing and the served
    model both call this, so a served image goes through exactly what training images did."""
    img = img.convert("L" if channels == 1 else "RGB")
    return np.asarray(img.resize(size[::-1], Image.Resampling.BILINEAR))


def decode_image(
    blob: bytes, size: tuple[int, int], channels: int, max_pixels: int, source: str
) -> np.ndarray:
    """An encoded image (PNG/JPEG bytes) as uint8 (H, W) for channels=1 or (H, W, 3): EXIF
    rotation applied, converted to grayscale/RGB, resized bilinearly to `size` = (H, W).

    DataError for bytes that are not an image, or one of more than `max_pixels` pixels
    (data.max_pixels: a decompression bomb or a photo far larger than the model's input)."""
    try:
        with warnings.catch_warnings():
            # Our own cap below replaces PIL's DecompressionBombWarning, with the fix.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob)) as img:
                if img.width * img.height > max_pixels:
                    raise DataError(
                        f"{source} is {img.width}x{img.height} = {img.width * img.height:,} "
                        f"pixels, more than data.max_pixels={max_pixels:,}: downscale it, or "
                        "raise data.max_pixels if you have the memory"
                    )
                # exif_transpose: phone JPEGs store rotation as a tag, not in the pixels.
                return fit_image(ImageOps.exif_transpose(img), size, channels)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise DataError(
            f"{source} can't be decoded ({e}): replace or delete it, then re-run collect"
        ) from e


# --- serving ---------------------------------------------------------------------------------

INPUT_DOC = (
    "raw pixel values 0-255 (uint8, or whole-number ints/floats) as an array (N, H, W) or "
    "(N, H, W, C) with C = 1, 3 or 4; other sizes and colours are converted as in "
    "preprocessing, e.g. (N, 28, 28) for Fashion-MNIST"
)


def serving_files(processed_dir: Path) -> dict[str, str]:
    """Extra files a served model needs besides its weights: none for images."""
    return {}


def example_input(processed_dir: Path, n: int = 2) -> np.ndarray:
    return load_split(processed_dir, "test")[0][:n]


class Adapter:
    """Raw images (see INPUT_DOC) -> uint8 (N, *input_shape), checked. Images of another size
    or colour mode go through `fit_image`, as the training images did; pixels scaled to
    [0, 1] or outside 0-255 are refused with the fix, never cast silently."""

    def __init__(self, spec: dict[str, Any], files: dict[str, str]):
        self.shape = tuple(spec["net"]["input_shape"])  # (H, W) or (H, W, C)
        self.channels = self.shape[2] if len(self.shape) == 3 else 1

    def __call__(self, model_input: Any) -> torch.Tensor:
        x = np.asarray(model_input)
        if x.dtype == object or not (
            np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
        ):
            raise ValueError(f"expected numeric pixel arrays, got {x.dtype}: send {INPUT_DOC}")
        if x.ndim not in (3, 4) or len(x) == 0 or (x.ndim == 4 and x.shape[3] not in (1, 3, 4)):
            hint = "; wrap a single image as [image]" if x.ndim == 2 else ""
            raise ValueError(f"expected {INPUT_DOC}; got shape {x.shape}{hint}")
        x = self._pixels(x)
        if x.shape[1:] != self.shape:
            size = self.shape[:2]
            x = np.stack([fit_image(Image.fromarray(_squeezed(image)), size, self.channels)
                          for image in x])  # fmt: skip
        return torch.from_numpy(x)

    @staticmethod
    def _pixels(x: np.ndarray) -> np.ndarray:
        low, high = (x.min(), x.max()) if x.size else (0, 0)
        if np.issubdtype(x.dtype, np.floating):
            if not np.isfinite(x).all():
                raise ValueError("pixel values must be finite numbers 0-255, got NaN or inf")
            if (x != np.round(x)).any():
                if low >= 0 and high <= 1:
                    raise ValueError(
                        "pixel values look scaled to [0, 1]; the model takes raw values 0-255: "
                        "send (x * 255).round().astype('uint8')"
                    )
                raise ValueError("pixel values must be whole numbers 0-255 (raw, not normalized)")
        if low < 0 or high > 255:
            raise ValueError(
                f"pixel values must be 0-255 (raw, not normalized), got {low:g}..{high:g}"
            )
        return x.astype(np.uint8)


def _squeezed(image: np.ndarray) -> np.ndarray:
    """(H, W, 1) as (H, W): the form PIL reads as grayscale."""
    return image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
