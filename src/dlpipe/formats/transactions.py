"""Timestamped transactions with a binary label (format "transactions", e.g. card fraud): one
CSV -> train/val/test rows split chronologically by `data.time_column` (a fraud model is
deployed on the future: train on the first period, validate on the next, test on the last) or,
for comparison, seeded and stratified by class. The table format's column transform (median
imputation, standardization, one-hot) is fitted on the training rows only and ships with the
model, so a served model takes raw rows. The time column is the split key, not a feature: its
test values lie beyond every training value.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dlpipe.data import (
    DataError,
    check_fraction,
    check_limit,
    checked_manifest,
    sample_rows,
    save_arrays,
    stratified_split,
    write_atomic,
    write_meta,
)
from dlpipe.formats.tabular import (
    EXAMPLE_ROWS,
    TRANSFORM,
    Adapter,
    coerce,
    columns_of,
    example_input,
    make_transform,
    read_table,
    serving_files,
    table_features,
)

__all__ = ["Adapter", "example_input", "preprocess", "serving_files"]

log = logging.getLogger(__name__)

SPLIT_KINDS = ("chronological", "stratified")
EXAMPLE_COUNT = 20  # raw test rows kept for the served model's input example

INPUT_DOC = (
    "pandas DataFrame of raw transaction rows with the table's feature columns (e.g. V1..V28 "
    "and Amount; Time and the label may be left in or out; missing values allowed)"
)


def preprocess(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
    t0 = time.perf_counter()
    manifest = checked_manifest(data, raw_dir)
    _validate(data)
    frame = read_table(data, raw_dir, manifest)
    target, clock = data["target"], data["time_column"]
    missing = [c for c in [target, clock, *data["drop"]] if c not in frame.columns]
    if missing:
        raise DataError(
            f"data.target/time_column/drop name columns {missing} that the table lacks; it has "
            f"{list(frame.columns)}"
        )
    rng = np.random.default_rng(seed)
    if (rows := sample_rows(len(frame), data.get("limit"), rng)) is not None:
        frame = frame.iloc[rows]
    y = (frame[target].astype(str) == str(data["positive"])).to_numpy(np.int64)
    if y.sum() == 0 or y.sum() == len(y):
        raise DataError(
            f"column {target!r} has {'no' if y.sum() == 0 else 'only'} rows equal to "
            f"data.positive={data['positive']!r}: name the value that marks the positive class"
        )
    if data["split"] == "chronological":
        splits = chronological_split(frame[clock].to_numpy(), data)
    else:
        splits = stratified_splits(y, data, rng)
    for split, idx in splits.items():
        if y[idx].sum() == 0:
            raise DataError(
                f"the {split} split holds no positive rows ({len(idx)} rows): use more rows "
                "(data.limit) or larger data.val_fraction / data.test_fraction"
            )

    features = frame.drop(columns=[target, clock, *data["drop"]])
    transform = make_transform(features)
    transform.fit(coerce(features.iloc[splits["train"]], *columns_of(transform)))
    arrays = {}
    for split, idx in splits.items():
        arrays[f"{split}_x"] = table_features(transform, features.iloc[idx])
        arrays[f"{split}_y"] = y[idx]
        arrays[f"{split}_row"] = frame.index.to_numpy(np.int64)[idx]  # data row numbers, from 0
    sha256 = save_arrays(out_dir, arrays)
    sha256[TRANSFORM] = write_atomic(Path(out_dir) / TRANSFORM, [pickle.dumps(transform, 5)])
    example = features.iloc[splits["test"][:EXAMPLE_COUNT]]
    rows = example.to_csv(index=False, lineterminator="\n").encode()
    sha256[EXAMPLE_ROWS] = write_atomic(Path(out_dir) / EXAMPLE_ROWS, [rows])

    times = frame[clock].to_numpy(np.float64)
    numeric, categorical = columns_of(transform)
    meta = {
        "input_shape": [arrays["train_x"].shape[1]],
        "input_kind": "features",
        "mean": None,  # the transform already standardizes
        "std": None,
        "columns": {"numeric": numeric, "categorical": categorical},
        "features": transform.get_feature_names_out().tolist(),
        "target_kind": "classification",
        "classes": list(data["class_names"]),
        "num_classes": 2,
        "split": data["split"],
        "sizes": {split: len(idx) for split, idx in splits.items()},
        "positives": {split: int(y[idx].sum()) for split, idx in splits.items()},
        "time_range": {
            split: [float(times[idx].min()), float(times[idx].max())]
            for split, idx in splits.items()
        },
    }
    meta = write_meta(out_dir, meta, data, raw_dir, manifest, seed, sha256)
    log.info(
        "preprocessed %s (%s split by %r): sizes %s, positives %s, %d features in %.2fs -> %s",
        data["name"],
        data["split"],
        clock,
        meta["sizes"],
        meta["positives"],
        meta["input_shape"][0],
        time.perf_counter() - t0,
        out_dir,
    )
    return meta


def chronological_split(times: np.ndarray, data: Mapping) -> dict[str, np.ndarray]:
    """Row indices in time order (ties in their table order): the first
    1 - val_fraction - test_fraction of the rows train, the next val_fraction validate, the
    last test_fraction test. The cuts are floor(n * share), so 284,807 rows at 0.7/0.1/0.2
    give 199,364 / 28,481 / 56,962."""
    n = len(times)
    order = np.argsort(times, kind="stable")
    train_end = int(n * (1 - data["val_fraction"] - data["test_fraction"]))
    val_end = int(n * (1 - data["test_fraction"]))
    if min(train_end, val_end - train_end, n - val_end) < 1:
        raise DataError(
            f"{n} rows leave a split empty at data.val_fraction={data['val_fraction']}, "
            f"data.test_fraction={data['test_fraction']}: use more rows or other fractions"
        )
    return {"train": order[:train_end], "val": order[train_end:val_end], "test": order[val_end:]}


def stratified_splits(
    y: np.ndarray, data: Mapping, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Seeded random test, then validation, rows with each class's share kept."""
    n = len(y)
    test, rest = stratified_split(y, round(data["test_fraction"] * n), rng)
    val, train = stratified_split(y[rest], round(data["val_fraction"] * n), rng)
    return {"train": rest[train], "val": rest[val], "test": test}


def _validate(data: Mapping) -> None:
    if data.get("split") not in SPLIT_KINDS:
        raise ValueError(f"data.split={data.get('split')!r}: choose one of {list(SPLIT_KINDS)}")
    for key in ("target", "time_column"):
        if data.get(key) in (None, "", "???"):
            raise ValueError(f"data.{key} is required: the name of a column of the table")
    names = data.get("class_names")
    if names is None or len(names) != 2 or len(set(map(str, names))) != 2:
        raise ValueError(
            f"data.class_names={names!r} must name the negative and the positive class, "
            "e.g. [legit, fraud]"
        )
    for key in ("val_fraction", "test_fraction"):
        check_fraction(data, key)
    if data["val_fraction"] + data["test_fraction"] >= 1:
        raise ValueError(
            f"data.val_fraction + data.test_fraction = "
            f"{data['val_fraction'] + data['test_fraction']} leaves no training rows: keep it < 1"
        )
    check_limit(data, 20, "rows")
