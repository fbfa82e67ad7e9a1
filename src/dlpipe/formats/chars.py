"""Format "char_text": one plain-text file as a character-level token stream, split by position
(not shuffled) the way nanoGPT's shakespeare_char does: train is the head of the text, then the
validation slice, then a held-out test tail.

    train = text[: n - n_val - n_test]   val = the next n_val chars   test = the last n_test chars
    n_val = round(val_fraction * n), n_test = round(test_fraction * n)

The vocabulary is the sorted set of characters of the training text (id = index). A character of
the validation or test text that never occurs in training has no id: it is dropped from its
stream, and meta.json counts the drops per split (`unseen_dropped`; 0 for Tiny Shakespeare).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dlpipe.data import (
    DataError,
    check_fraction,
    check_limit,
    checked_manifest,
    decode_text,
    read_verified,
    save_arrays,
    source_of,
    write_meta,
)

log = logging.getLogger(__name__)


def split_bounds(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(train end, val end) character offsets of a text of `n` characters."""
    n_val, n_test = round(val_fraction * n), round(test_fraction * n)
    return n - n_val - n_test, n - n_test


def smallest_text(block_size: int, val_fraction: float, test_fraction: float) -> int:
    """The fewest characters whose three splits each hold a (block_size + 1)-character window."""
    # round(fraction * n) reaches block_size + 1 from about here on: step up to the first fit
    smallest_share = min(val_fraction, test_fraction, 1 - val_fraction - test_fraction)
    n = int((block_size + 0.5) / smallest_share) - 2
    while True:
        train_end, val_end = split_bounds(n, val_fraction, test_fraction)
        if min(train_end, val_end - train_end, n - val_end) >= block_size + 1:
            return n
        n += 1


def encode(text: str, chars: str) -> tuple[np.ndarray, int]:
    """(ids of the characters of `text` that are in `chars`, how many were not)."""
    # A lookup table over code points: vectorized, no per-character Python loop.
    points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    table = np.full(max(map(ord, chars)) + 1, -1, np.int64)
    table[[ord(c) for c in chars]] = np.arange(len(chars))
    ids = np.where(points < len(table), table[np.minimum(points, len(table) - 1)], -1)
    known = ids >= 0
    dtype = np.uint8 if len(chars) <= 256 else np.int32
    return ids[known].astype(dtype), int((~known).sum())


def preprocess(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
    manifest = checked_manifest(data, raw_dir)
    _validate(data)
    if len(manifest["files"]) != 1:
        raise DataError(
            f"data.files must list exactly one text file, got {list(manifest['files'])}"
        )
    ((name, sha256),) = manifest["files"].items()
    blob = read_verified(Path(raw_dir) / name, sha256)
    text = decode_text(blob, data["encoding"], source_of(data, Path(raw_dir) / name))
    if data.get("limit") is not None:
        text = text[: data["limit"]]  # the head of the text, for quick runs

    block_size = data["block_size"]
    train_end, val_end = split_bounds(len(text), data["val_fraction"], data["test_fraction"])
    parts = {"train": text[:train_end], "val": text[train_end:val_end], "test": text[val_end:]}
    chars = "".join(sorted(set(parts["train"])))
    streams, dropped = {}, {}
    for split, part in parts.items():
        streams[split], dropped[split] = encode(part, chars)
        if len(streams[split]) < block_size + 1:
            fix = f"data.{'limit' if split == 'train' else f'{split}_fraction'}"
            if data.get("limit") is not None:  # the usual cause: a cap sized for other formats
                smallest = smallest_text(block_size, data["val_fraction"], data["test_fraction"])
                fix = f"data.limit (at least {smallest} characters at this block size)"
            raise ValueError(
                f"the {split} split has {len(streams[split])} characters, fewer than "
                f"data.block_size + 1 = {block_size + 1}: lower data.block_size or raise {fix}"
            )
    if any(dropped.values()):
        log.warning("dropped characters never seen in training: %s", dropped)

    sha = save_arrays(out_dir, {f"{split}_x": ids for split, ids in streams.items()})
    meta = {
        "input_shape": [block_size],
        "input_kind": "tokens",
        "mean": None,
        "std": None,
        "vocab_size": len(chars),
        "pad_id": 0,  # nothing is padded: every window is full (the key is the tokens contract)
        "chars": chars,
        "bounds": {
            "train": [0, train_end],
            "val": [train_end, val_end],
            "test": [val_end, len(text)],
        },
        "unseen_dropped": dropped,
        "sizes": {split: len(ids) for split, ids in streams.items()},
    }
    meta = write_meta(out_dir, meta, data, raw_dir, manifest, seed, sha)
    log.info(
        "preprocessed %s: %d chars, vocabulary %d, sizes %s -> %s",
        data["name"],
        len(text),
        len(chars),
        meta["sizes"],
        out_dir,
    )
    return meta


def _validate(data: Mapping) -> None:
    for key in ("val_fraction", "test_fraction"):
        check_fraction(data, key, below=0.5)
    block = data.get("block_size")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"data.block_size={block!r} must be a positive integer, e.g. 256")
    check_limit(data, 1, "characters")
