"""Text classification tables (format "text_table"): one text and one label per row of a TSV/CSV
(SST-2, the SMS Spam Collection, a user's own CSV) -> word-level token ids, 0-padded, plus the
`tokenizers` tokenizer fitted on the training split, which a served model takes strings through.

Word-level, not subword: models here learn from scratch, sentiment and spam cues are whole words,
and a word vocabulary keeps sequences short (fast recurrent models on a CPU); a word the
training split never saw becomes [UNK] instead of sub-word pieces with no learned meaning.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from dlpipe.data import (
    DataError,
    check_class_coverage,
    check_fraction,
    check_limit,
    checked_manifest,
    decode_text,
    fraction_count,
    load_array,
    read_verified,
    save_arrays,
    source_of,
    stratified_split,
    write_atomic,
    write_meta,
)

log = logging.getLogger(__name__)

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1  # the trainer numbers the special tokens first, in this order
TOKENIZER = "tokenizer.json"

INPUT_DOC = (
    'a list of strings, e.g. ["a gripping, funny film", "dull"]; or a DataFrame/Series with a '
    "`text` column (what MLflow serving sends)"
)


def preprocess(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
    """Read the table(s), split them (seeded, stratified), fit the tokenizer on the training
    split, and write token ids x int32 (N, max_len), labels y int64 and lengths per split."""
    t0 = time.perf_counter()
    _validate(data)
    manifest = checked_manifest(data, raw_dir)
    rng = np.random.default_rng(seed)
    texts, labels = _read_table(data, raw_dir, manifest, _train_file(data, manifest))
    if data.get("test_file"):
        test = _read_table(data, raw_dir, manifest, data["test_file"])
    else:
        taken, rest = stratified_split(
            labels, fraction_count(data, "test_fraction", len(labels)), rng
        )
        test, texts, labels = (texts[taken], labels[taken]), texts[rest], labels[rest]

    limit = data.get("limit")
    if limit is not None and limit < len(labels):
        keep, _ = stratified_split(labels, limit, rng)
        texts, labels = texts[keep], labels[keep]
    taken, rest = stratified_split(labels, fraction_count(data, "val_fraction", len(labels)), rng)
    splits = {
        "train": (texts[rest], labels[rest]),
        "val": (texts[taken], labels[taken]),
        "test": test,
    }
    classes = sorted(set(splits["train"][1].tolist()))
    if len(classes) < 2:
        raise DataError(f"the training split holds one class only ({classes}): check the labels")

    max_len = data["max_len"]
    tokenizer = fit_tokenizer(
        splits["train"][0].tolist(),
        data["vocab_size"],
        data["min_frequency"],
        data["lowercase"],
        max_len,
    )
    arrays, truncated = {}, {}
    for split, (xs, ys) in splits.items():
        x = encode(tokenizer, xs.tolist(), width=max_len)
        arrays[f"{split}_x"] = x
        arrays[f"{split}_y"] = _label_ids(ys, classes, split)
        arrays[f"{split}_lengths"] = (x != PAD_ID).sum(1, dtype=np.int32)
        truncated[split] = int((arrays[f"{split}_lengths"] == max_len).sum())
    check_class_coverage(
        {s: arrays[f"{s}_y"] for s in splits}, classes, "give those classes more rows"
    )
    sha256 = save_arrays(out_dir, arrays)
    sha256[TOKENIZER] = write_atomic(out_dir / TOKENIZER, [tokenizer.to_str(pretty=True).encode()])
    meta = {
        "classes": classes,
        "num_classes": len(classes),
        "input_kind": "tokens",
        "input_shape": [max_len],
        "vocab_size": tokenizer.get_vocab_size(),
        "pad_id": PAD_ID,
        # the token strings by id, for models that look inside words (fasttext's char n-grams)
        "vocab": sorted(tokenizer.get_vocab(), key=tokenizer.token_to_id),
        # x rows are right-padded; {split}_lengths.npy lets batches be trimmed (make_datamodule)
        "padded": True,
        "mean": None,
        "std": None,
        "tokenizer": "word-level",
        "lowercase": data["lowercase"],
        "truncated": truncated,  # texts of max_len tokens or more (cut at max_len)
        "sizes": {split: len(ys) for split, (_, ys) in splits.items()},
    }
    meta = write_meta(out_dir, meta, data, raw_dir, manifest, seed, sha256)
    log.info(
        "preprocessed %s: sizes %s, classes %s, vocabulary %d, max_len %d (train texts cut: %d) "
        "in %.2fs -> %s",
        data["name"],
        meta["sizes"],
        classes,
        meta["vocab_size"],
        max_len,
        truncated["train"],
        time.perf_counter() - t0,
        out_dir,
    )
    return meta


def fit_tokenizer(
    texts: Sequence[str], vocab_size: int, min_frequency: int, lowercase: bool, max_len: int
) -> Tokenizer:
    """A word-level tokenizer of the `vocab_size` most frequent words of `texts` (ties broken by
    the trainer in a fixed order, so it is deterministic), splitting on whitespace and
    punctuation, truncating to `max_len` tokens and padding a batch to its longest text."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), *([normalizers.Lowercase()] if lowercase else [])]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, UNK],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # A literal "[PAD]" typed in a text must stay text, not become padding.
    tokenizer.encode_special_tokens = True
    tokenizer.enable_truncation(max_len)
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token=PAD)
    return tokenizer


def encode(tokenizer: Tokenizer, texts: Sequence[str], width: int | None = None) -> np.ndarray:
    """Token ids int32 (N, width), 0-padded on the right; width None = the longest text. A text
    without any token (empty, only spaces) becomes one [UNK], so no row is all padding."""
    # encode_batch_fast: the same ids without character offsets, which nothing here reads
    # (checked equal on all of SST-2's train texts); a quarter less time in serving.
    encodings = tokenizer.encode_batch_fast(list(texts))
    ids = np.array([e.ids for e in encodings], np.int32).reshape(len(texts), -1)
    width = max(ids.shape[1], 1) if width is None else width
    ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])), constant_values=PAD_ID)
    ids[ids[:, 0] == PAD_ID, 0] = UNK_ID
    return ids


# --- serving -------------------------------------------------------------------------------


def serving_files(processed_dir: Path) -> dict[str, str]:
    """The fitted tokenizer: a served model takes raw strings."""
    return {"tokenizer": str(Path(processed_dir) / TOKENIZER)}


def example_input(processed_dir: Path, n: int = 2) -> list[str]:
    """The first `n` test texts, as the tokenizer reads them back (lowercased, unknown words
    dropped): the processed data keeps token ids, not the raw strings."""
    tokenizer = Tokenizer.from_file(str(Path(processed_dir) / TOKENIZER))
    ids = load_array(processed_dir, "test_x")[:n]
    return tokenizer.decode_batch(ids.tolist())


class Adapter:
    """Strings -> token ids (N, longest text, at most max_len), with the training tokenizer."""

    def __init__(self, spec: dict[str, Any], files: dict[str, str]):
        self.tokenizer = Tokenizer.from_file(files["tokenizer"])

    def __call__(self, model_input: Any) -> torch.Tensor:
        return torch.from_numpy(encode(self.tokenizer, texts_of(model_input)))


def texts_of(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            model_input = model_input["text"]
        elif model_input.shape[1] == 1:  # MLflow turns a plain list into a one-column frame
            model_input = model_input.iloc[:, 0]
        else:
            raise ValueError(
                f"expected a `text` column, got columns {list(model_input.columns)}: "
                f"send {INPUT_DOC}"
            )
    if isinstance(model_input, str) or not isinstance(
        model_input, pd.Series | np.ndarray | list | tuple
    ):
        raise ValueError(f"expected {INPUT_DOC}; got {type(model_input).__name__}")
    texts = list(model_input)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"expected a non-empty list of strings: {INPUT_DOC}")
    return texts


# --- reading the tables --------------------------------------------------------------------


def _train_file(data: Mapping, manifest: Mapping) -> str:
    """data.train_file, or the one collected file (a user's own data.path)."""
    if data.get("train_file"):
        return data["train_file"]
    names = sorted(manifest["files"])
    if len(names) != 1:
        raise DataError(f"data.train_file is not set and {names} were collected: name one")
    return names[0]


def _read_table(
    data: Mapping, raw_dir: Path, manifest: Mapping, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(texts, labels) of one TSV/CSV file as string arrays, labels renamed by label_names."""
    if name not in manifest["files"]:
        raise DataError(
            f"{name!r} is not among the collected files {sorted(manifest['files'])}: "
            "check data.train_file / data.test_file, then re-run collect"
        )
    path = raw_dir / name
    source = source_of(data, path)
    blob = read_verified(path, manifest["files"][name])
    text = decode_text(blob, data["encoding"], source)
    columns = data.get("columns")
    try:
        table = pd.read_csv(
            io.StringIO(text),
            sep=data["delimiter"],
            header=None if columns else 0,
            names=list(columns) if columns else None,
            dtype=str,
            keep_default_na=False,  # a text "NA" or "null" is text
            quoting=csv.QUOTE_MINIMAL if data["quoted"] else csv.QUOTE_NONE,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(
            f"{source} can't be read as a table ({e}): check data.delimiter "
            f"({data['delimiter']!r}), data.quoted and data.columns"
        ) from e
    for key in ("text_column", "label_column"):
        if data[key] not in table.columns:
            raise DataError(
                f"{path} has no column data.{key}={data[key]!r}; its columns are "
                f"{list(table.columns)}"
            )
    if table.empty:
        raise DataError(f"{path} holds no rows")
    labels = table[data["label_column"]].str.strip()
    if (labels == "").any():
        row = int(np.flatnonzero(labels == "")[0])
        raise DataError(f"{path}: row {row + 1} has no label; fix or remove it")
    names = data.get("label_names")
    if names:
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise DataError(
                f"{path} has labels {unknown} that data.label_names {dict(names)} doesn't name"
            )
        labels = labels.map(dict(names))
    return table[data["text_column"]].to_numpy(str), labels.to_numpy(str)


def _label_ids(labels: np.ndarray, classes: list[str], split: str) -> np.ndarray:
    unseen = sorted(set(labels.tolist()) - set(classes))
    if unseen:
        raise DataError(
            f"the {split} split has labels {unseen} that the training split does not "
            f"({classes}): a model can't learn them. Fix the labels, or give those classes "
            "more rows (each needs some in training)"
        )
    return np.searchsorted(np.array(classes), labels).astype(np.int64)


def _validate(data: Mapping) -> None:
    fractions = ("val_fraction",) if data.get("test_file") else ("val_fraction", "test_fraction")
    for key in fractions:
        check_fraction(data, key)
    for key, smallest, example in (
        ("vocab_size", 3, 20000),
        ("max_len", 1, 64),
        ("min_frequency", 1, 1),
    ):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ValueError(
                f"data.{key}={value!r} must be an integer >= {smallest}, e.g. data.{key}={example}"
            )
    check_limit(data, 2, "texts")
