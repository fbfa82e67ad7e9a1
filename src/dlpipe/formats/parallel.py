"""Parallel text (format "parallel_text"): sentence pairs for translation -> subword token ids of
source and target, plus the `tokenizers` tokenizer trained on the training split only.

Three layouts: aligned line files, `<stem>.<lang>[.gz]` per split (line i of the source file
translates line i of the target file; Multi30k, Elliott et al. 2016); a user's own corpus as two
aligned line files (`data.path=[corpus.de,corpus.en]`, source first) or as one two-column CSV/TSV
(`data.path=pairs.csv`). An own corpus is split seeded into train/val/test.

One joint subword vocabulary (BPE or unigram) serves both languages, so a model can share one
embedding between encoder, decoder and output layer. Spaces are marked in the tokens (the
SentencePiece meta symbol), so decoding gives detokenized text that sacrebleu scores directly.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dlpipe.data import (
    DataError,
    check_fraction,
    check_limit,
    checked_manifest,
    decode_text,
    fraction_count,
    read_verified,
    sample_rows,
    save_arrays,
    source_of,
    write_atomic,
    write_meta,
)

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # the trainers number special tokens first, in order
TOKENIZER = "tokenizer.json"
TEXTS = "texts.json"  # the raw validation and test pairs: BLEU scores against these, untokenized
TOKENIZER_KINDS = ("bpe", "unigram")

INPUT_DOC = (
    'source-language sentences: a list of strings, e.g. ["Ein Hund läuft im Schnee."]; or a '
    "DataFrame with a `text` column (what MLflow serving sends)"
)


def preprocess(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
    """Read the pairs of each split, train the tokenizer on the training pairs (both sides),
    and write per split x = source ids int32 (N, max_len), y = [BOS] target [EOS] ids int32
    (N, max_len), both 0-padded on the right, and lengths = the longer of the two; plus the
    tokenizer and the raw validation/test pairs (texts.json)."""
    t0 = time.perf_counter()
    _validate(data)
    manifest = checked_manifest(data, raw_dir)
    rng = np.random.default_rng(seed)
    own = data.get("path")
    if own not in (None, "", "???"):
        pairs = (
            _read_table(data, raw_dir, manifest)
            if isinstance(own, str)
            else _read_aligned(data, raw_dir, manifest, [Path(p).name for p in own])
        )
        splits = _split_table(data, pairs, rng)
    else:
        splits = {s: _read_lines(data, raw_dir, manifest, stem) for s, stem in _stems(data)}
    splits["train"], dropped = _drop_empty(splits["train"])
    if (keep := sample_rows(len(splits["train"][0]), data.get("limit"), rng)) is not None:
        splits["train"] = tuple([side[i] for i in keep] for side in splits["train"])
    eval_limit = data.get("eval_limit")
    if eval_limit is not None:  # quick runs: the head of validation and test
        for split in ("val", "test"):
            splits[split] = tuple(side[:eval_limit] for side in splits[split])

    max_len = data["max_len"]
    source, target = splits["train"]
    tokenizer = fit_tokenizer(
        [*source, *target], data["tokenizer"], data["vocab_size"], data["min_frequency"]
    )
    arrays, truncated = {}, {}
    for split, (src, tgt) in splits.items():
        x = encode_source(tokenizer, src, max_len)
        y, cut = encode_target(tokenizer, tgt, max_len)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
        arrays[f"{split}_lengths"] = np.maximum((x != PAD_ID).sum(1), (y != PAD_ID).sum(1)).astype(
            np.int32
        )
        truncated[split] = int(((x != PAD_ID).sum(1) == max_len).sum() + cut)
    sha256 = save_arrays(out_dir, arrays)
    sha256[TOKENIZER] = write_atomic(out_dir / TOKENIZER, [tokenizer.to_str(pretty=True).encode()])
    texts = {s: {"source": splits[s][0], "target": splits[s][1]} for s in ("val", "test")}
    sha256[TEXTS] = write_atomic(out_dir / TEXTS, [json.dumps(texts, ensure_ascii=False).encode()])
    meta = {
        "input_kind": "tokens",
        "input_shape": [max_len],
        "vocab_size": tokenizer.get_vocab_size(),
        "pad_id": PAD_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "padded": True,
        "mean": None,
        "std": None,
        "tokenizer": data["tokenizer"],
        "languages": [data["source_lang"], data["target_lang"]],
        "truncated": truncated,  # sentences cut at max_len tokens (source or target side)
        "dropped_empty": dropped,  # training pairs with an empty side
        "sizes": {split: len(src) for split, (src, _) in splits.items()},
    }
    meta = write_meta(out_dir, meta, data, raw_dir, manifest, seed, sha256)
    log.info(
        "preprocessed %s (%s->%s): sizes %s, %s vocabulary %d, max_len %d (cut: %s) in %.2fs -> %s",
        data["name"],
        *meta["languages"],
        meta["sizes"],
        data["tokenizer"],
        meta["vocab_size"],
        max_len,
        truncated,
        time.perf_counter() - t0,
        out_dir,
    )
    return meta


def fit_tokenizer(
    texts: Sequence[str], kind: str, vocab_size: int, min_frequency: int
) -> Tokenizer:
    """A subword tokenizer (`kind` bpe or unigram) of `vocab_size` pieces trained on `texts`:
    NFKC-normalized, words marked with the meta symbol "▁" and punctuation split off, so
    `decode` restores the spacing (detokenized text). Special tokens: [PAD] [UNK] [BOS] [EOS]."""
    specials = [PAD, UNK, BOS, EOS]
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            show_progress=False,
        )
    else:
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token=UNK, show_progress=False
        )
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()]
    )
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.encode_special_tokens = True  # a typed "[EOS]" stays text
    return tokenizer


def _padded(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(rows), width), PAD_ID, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def encode_source(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Source ids int32 (N, max_len), cut at max_len, 0-padded; an empty text is one [UNK]."""
    rows = [e.ids[:max_len] or [UNK_ID] for e in tokenizer.encode_batch(list(texts))]
    return _padded(rows, max_len)


def encode_target(
    tokenizer: Tokenizer, texts: Sequence[str], max_len: int
) -> tuple[np.ndarray, int]:
    """([BOS] ids [EOS] int32 (N, max_len), 0-padded; how many were cut to fit max_len)."""
    encoded = [e.ids for e in tokenizer.encode_batch(list(texts))]
    rows = [[BOS_ID, *ids[: max_len - 2], EOS_ID] for ids in encoded]
    return _padded(rows, max_len), sum(len(ids) > max_len - 2 for ids in encoded)


def decode(tokenizer: Tokenizer, ids: torch.Tensor | np.ndarray) -> list[str]:
    """Detokenized text of each row of generated ids (N, T), read up to its first [EOS]."""
    rows = ids.tolist()
    return tokenizer.decode_batch([r[: r.index(EOS_ID)] if EOS_ID in r else r for r in rows])


def load_texts(processed_dir: Path, split: str) -> tuple[list[str], list[str]]:
    """(source sentences, reference translations) of the val or test split, as written."""
    texts = json.loads((Path(processed_dir) / TEXTS).read_text())
    return texts[split]["source"], texts[split]["target"]


def load_tokenizer(processed_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(processed_dir) / TOKENIZER))


# --- serving -------------------------------------------------------------------------------


def serving_files(processed_dir: Path) -> dict[str, str]:
    """The trained tokenizer: a served model takes and returns raw strings."""
    return {"tokenizer": str(Path(processed_dir) / TOKENIZER)}


def example_input(processed_dir: Path, n: int = 2) -> list[str]:
    """The first `n` test source sentences."""
    return load_texts(processed_dir, "test")[0][:n]


# --- reading the pairs ---------------------------------------------------------------------


def _stems(data: Mapping) -> list[tuple[str, str]]:
    stems = data.get("splits")
    if not isinstance(stems, Mapping) or set(stems) != {"train", "val", "test"}:
        raise ValueError(
            f"data.splits={stems!r} must name the file stem of train, val and test, e.g. "
            "{train: train, val: val, test: test_2016_flickr} for train.de.gz, train.en.gz ..."
        )
    return [(split, stems[split]) for split in ("train", "val", "test")]


def _read_lines(
    data: Mapping, raw_dir: Path, manifest: Mapping, stem: str
) -> tuple[list[str], list[str]]:
    """(source lines, target lines) of `<stem>.<lang>[.gz]`, checked to be aligned."""
    names = []
    for lang in (data["source_lang"], data["target_lang"]):
        candidates = (f"{stem}.{lang}.gz", f"{stem}.{lang}")
        name = next((n for n in candidates if n in manifest["files"]), None)
        if name is None:
            raise DataError(
                f"no {stem}.{lang}[.gz] among the collected files {sorted(manifest['files'])}: "
                "check data.splits, data.source_lang and data.target_lang, then re-run collect"
            )
        names.append(name)
    return _read_aligned(data, raw_dir, manifest, names)


def _read_aligned(
    data: Mapping, raw_dir: Path, manifest: Mapping, names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(source lines, target lines) of the collected files `names` = [source, target] (plain or
    .gz, one sentence per line), checked to be aligned. DataError naming both line counts."""
    if len(names) != 2:
        raise DataError(
            f"data.path names {len(names)} files: an aligned corpus is two, the source side "
            "first, e.g. data.path=[corpus.de,corpus.en] (or one two-column CSV)"
        )
    sides = []
    for name in names:
        path = Path(raw_dir) / name
        blob = read_verified(path, manifest["files"][name])
        if name.endswith(".gz"):
            blob = gzip.decompress(blob)
        text = decode_text(blob, data["encoding"], source_of(data, path))
        sides.append(text.rstrip("\n").split("\n"))
    (src_name, tgt_name), (src, tgt) = names, sides
    if len(src) != len(tgt):
        raise DataError(
            f"{src_name} has {len(src)} lines but {tgt_name} {len(tgt)}: line i of one must "
            "translate line i of the other; fix the files (one sentence per line)"
        )
    return [s.strip() for s in src], [t.strip() for t in tgt]


def _read_table(data: Mapping, raw_dir: Path, manifest: Mapping) -> tuple[list[str], list[str]]:
    """(source, target) columns of a user's own CSV/TSV (`data.path`)."""
    ((name, sha256),) = manifest["files"].items()
    path = Path(raw_dir) / name
    source = source_of(data, path)
    text = decode_text(read_verified(path, sha256), data["encoding"], source)
    try:
        table = pd.read_csv(
            io.StringIO(text),
            sep=data["delimiter"],
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_MINIMAL,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(
            f"{source} can't be read as a table ({e}): check data.delimiter ({data['delimiter']!r})"
        ) from e
    for key in ("source_column", "target_column"):
        if data.get(key) not in table.columns:
            raise DataError(
                f"{source} has no column data.{key}={data.get(key)!r}; its columns are "
                f"{list(table.columns)}: name the source and target columns"
            )
    return (
        table[data["source_column"]].str.strip().tolist(),
        table[data["target_column"]].str.strip().tolist(),
    )


def _split_table(
    data: Mapping, pairs: tuple[list[str], list[str]], rng: np.random.Generator
) -> dict[str, tuple[list[str], list[str]]]:
    """Seeded random train/val/test split of an own corpus by data.val/test_fraction."""
    n = len(pairs[0])
    order = rng.permutation(n)
    n_test = fraction_count(data, "test_fraction", n)
    n_val = fraction_count(data, "val_fraction", n - n_test)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val]}
    parts["train"] = order[n_test + n_val :]
    return {s: tuple([side[i] for i in idx] for side in pairs) for s, idx in parts.items()}


def _drop_empty(
    pairs: tuple[list[str], list[str]],
) -> tuple[tuple[list[str], list[str]], int]:
    keep = [i for i, (s, t) in enumerate(zip(*pairs, strict=True)) if s and t]
    if not keep:
        raise DataError("every training pair has an empty side: check the files")
    dropped = len(pairs[0]) - len(keep)
    if dropped:
        log.warning("dropped %d training pairs with an empty source or target", dropped)
    return tuple([side[i] for i in keep] for side in pairs), dropped


def _validate(data: Mapping) -> None:
    if data.get("tokenizer") not in TOKENIZER_KINDS:
        raise ValueError(
            f"data.tokenizer={data.get('tokenizer')!r}: choose one of {list(TOKENIZER_KINDS)}"
        )
    for key, smallest, example in (
        ("vocab_size", 8, 8000),
        ("max_len", 3, 64),
        ("min_frequency", 1, 2),
    ):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ValueError(
                f"data.{key}={value!r} must be an integer >= {smallest}, e.g. data.{key}={example}"
            )
    eval_limit = data.get("eval_limit")
    if eval_limit is not None and (
        isinstance(eval_limit, bool) or not isinstance(eval_limit, int) or eval_limit < 1
    ):
        raise ValueError(
            f"data.eval_limit={eval_limit!r} must be null (all) or a number of pairs >= 1"
        )
    if data.get("path") not in (None, "", "???"):
        for key in ("val_fraction", "test_fraction"):
            check_fraction(data, key, below=0.5)
    check_limit(data, 2, "sentence pairs")
