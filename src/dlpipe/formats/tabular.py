"""Tables (format "table"): one CSV (or the CSV inside a .tgz/.zip) -> seeded train/val/test
rows, turned into float features by a scikit-learn ColumnTransformer fitted on the training
rows only (median imputation + standardization of numeric columns, one-hot encoding of the
others). The fitted transform ships with the model, so a served model takes raw rows.

The target is either classified (classes, int64 labels: task=classifier) or regressed (float
values in their own units, with the training mean/std in meta["target"]: task=regressor);
`data.target_kind` chooses, or "auto" infers it from the column.
"""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, QuantileTransformer, StandardScaler

from dlpipe.data import (
    DataError,
    check_class_coverage,
    check_fraction,
    check_limit,
    check_unique_members,
    checked_manifest,
    decode_text,
    read_verified,
    sample_rows,
    save_arrays,
    source_of,
    stratified_split,
    write_atomic,
    write_meta,
)

log = logging.getLogger(__name__)

TRANSFORM = "transform.pkl"  # the fitted ColumnTransformer (pickle), shipped with the model
EXAMPLE_ROWS = "test_rows.csv"  # the test split's raw feature rows, for examples and checks
TARGET_KINDS = ("auto", "classification", "regression")
SCALINGS = ("standard", "quantile")  # of numeric columns (make_transform)
DECIMAL_COMMA = r"-?\d+(\.\d{3})*,\d+"  # 3,5 or 1.000,25: a number from a comma-decimal locale

INPUT_DOC = (
    "pandas DataFrame of raw rows with the table's original feature columns (the target and "
    "dropped columns may be left out; missing values allowed)"
)


def preprocess(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
    t0 = time.perf_counter()
    manifest = checked_manifest(data, raw_dir)
    _validate(data)
    frame = read_table(data, raw_dir, manifest)
    target = data["target"]
    frame = _select(frame, data)
    kind = target_kind(frame[target], data["target_kind"], data["max_classes"])

    rng = np.random.default_rng(seed)
    if (rows := sample_rows(len(frame), data.get("limit"), rng)) is not None:
        frame = frame.iloc[rows]
    features = frame.drop(columns=[target])
    if kind == "classification":
        labels = frame[target].astype(str)
        classes = sorted(labels.unique(), key=_label_order)
        y = labels.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    else:
        y = pd.to_numeric(frame[target]).to_numpy(np.float64)
    splits = split_rows(y, data, kind, rng)
    if kind == "classification":
        check_class_coverage(
            {s: y[idx] for s, idx in splits.items()}, classes, "give those classes more rows"
        )

    train_rows = features.iloc[splits["train"]]
    transform = make_transform(train_rows, data.get("scaling", "standard"))
    transform.fit(coerce(train_rows, *columns_of(transform)))
    arrays = {}
    for split, idx in splits.items():
        arrays[f"{split}_x"] = table_features(transform, features.iloc[idx])
        arrays[f"{split}_y"] = y[idx] if kind == "classification" else y[idx].astype(np.float32)
        arrays[f"{split}_row"] = frame.index.to_numpy(np.int64)[idx]  # data row numbers, from 0
    sha256 = save_arrays(out_dir, arrays)
    sha256[TRANSFORM] = write_atomic(Path(out_dir) / TRANSFORM, [pickle.dumps(transform, 5)])
    rows = features.iloc[splits["test"]].to_csv(index=False, lineterminator="\n").encode()
    sha256[EXAMPLE_ROWS] = write_atomic(Path(out_dir) / EXAMPLE_ROWS, [rows])

    numeric, categorical = columns_of(transform)
    meta = {
        "input_shape": [arrays["train_x"].shape[1]],
        "input_kind": "features",
        "mean": None,  # the transform already standardizes
        "std": None,
        "columns": {"numeric": numeric, "categorical": categorical},
        "features": transform.get_feature_names_out().tolist(),
        "target_kind": kind,
        "sizes": {split: len(idx) for split, idx in splits.items()},
    }
    if kind == "classification":
        meta |= {"classes": classes, "num_classes": len(classes)}
    else:
        train_y = y[splits["train"]]
        meta["target"] = {"name": target, "mean": float(train_y.mean()), "std": _std(train_y)}
    meta = write_meta(out_dir, meta, data, raw_dir, manifest, seed, sha256)
    log.info(
        "preprocessed %s (%s of %r): sizes %s, %d features in %.2fs -> %s",
        data["name"],
        kind,
        target,
        meta["sizes"],
        meta["input_shape"][0],
        time.perf_counter() - t0,
        out_dir,
    )
    return meta


def read_table(data: Mapping, raw_dir: Path, manifest: Mapping) -> pd.DataFrame:
    """The one collected file as a DataFrame: a CSV, or the CSV member of a tar/zip archive
    (`data.member`, or the archive's only *.csv)."""
    files = manifest["files"]
    if len(files) != 1:
        raise DataError(f"format=table reads one file, but {raw_dir} holds {sorted(files)}")
    ((name, sha),) = files.items()
    blob = read_verified(Path(raw_dir) / name, sha)
    if name.endswith((".tgz", ".tar.gz", ".tar", ".zip")):
        blob = _archive_member(blob, name, data.get("member"))
    source = source_of(data, Path(raw_dir) / name)
    text = decode_text(blob, data["encoding"], source)
    try:
        frame = pd.read_csv(io.StringIO(text), sep=data["delimiter"], decimal=data["decimal"])
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(
            f"{source} is not a readable CSV ({e}): check data.delimiter "
            f"({data['delimiter']!r}) and data.decimal ({data['decimal']!r})"
        ) from e
    if frame.shape[1] == 1:
        (column,) = frame.columns
        found = [d for d in (";", "\t", "|") if d in str(column) and d != data["delimiter"]]
        if found:
            # Quoted for the shell: bash would eat the quotes of data.delimiter=';'.
            raise DataError(
                f"{source} reads as one column {str(column)[:60]!r}: its header is separated "
                f"by {found[0]!r}, not data.delimiter={data['delimiter']!r}. Add "
                f'"data.delimiter={found[0]!r}" (and "data.decimal=\',\'" if numbers are '
                "written 3,5)"
            )
    if data["decimal"] != ",":
        commas = [
            c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])
            and frame[c].dropna().astype(str).str.fullmatch(DECIMAL_COMMA).mean() > 0.9
        ]  # fmt: skip
        if commas:
            raise DataError(
                f"{source}: columns {commas[:5]} hold numbers written with a decimal comma "
                "(e.g. 3,5), read as text: add \"data.decimal=','\""
            )
    return frame


def _archive_member(blob: bytes, name: str, member: str | None) -> bytes:
    if name.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            names = [n for n in z.namelist() if n.endswith(".csv")]
            chosen = _member(names, member, name)
            return z.read(chosen)
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        names = [m.name for m in t.getmembers() if m.isfile() and m.name.endswith(".csv")]
        return t.extractfile(_member(names, member, name)).read()


def _member(names: list[str], member: str | None, archive: str) -> str:
    check_unique_members(names, archive)
    if member is not None:
        if member not in names:
            raise DataError(f"{archive} has no CSV member {member!r}; it has {names}")
        return member
    if len(names) != 1:
        raise DataError(f"{archive} holds CSVs {names}: name one with data.member")
    return names[0]


def _select(frame: pd.DataFrame, data: Mapping) -> pd.DataFrame:
    """The target plus the feature columns (all but data.drop), rows without a target left out."""
    target, drop = data["target"], list(data.get("drop") or [])
    unknown = [c for c in [target, *drop] if c not in frame.columns]
    if unknown:
        raise DataError(
            f"data.target/data.drop name columns {unknown} that the table lacks; it has "
            f"{list(frame.columns)}"
        )
    frame = frame.drop(columns=drop)
    if frame.shape[1] < 2:
        raise DataError(f"no feature columns left besides the target {target!r}: check data.drop")
    missing = frame[target].isna()
    if missing.any():
        log.warning("left out %d rows without a %r value", int(missing.sum()), target)
    return frame[~missing]


def target_kind(values: pd.Series, configured: str, max_classes: int) -> str:
    """classification when the target is text/bool, or whole numbers with at most
    `max_classes` distinct values; else regression. `configured` wins unless "auto"."""
    if configured != "auto":
        return configured
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return "classification"
    whole = np.all(np.mod(values.to_numpy(np.float64), 1) == 0)
    return "classification" if whole and values.nunique() <= max_classes else "regression"


def _label_order(label: str) -> tuple[int, float | str]:
    """Numeric labels in numeric order ("2" before "10"), then text labels alphabetically."""
    try:
        return 0, float(label)
    except ValueError:
        return 1, label


def split_rows(
    y: np.ndarray, data: Mapping, kind: str, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Seeded test, then validation, rows (stratified by class for classification)."""
    n = len(y)
    n_test, n_val = (round(data[k] * n) for k in ("test_fraction", "val_fraction"))
    if min(n_test, n_val, n - n_test - n_val) < 1:
        raise DataError(
            f"{n} rows give {n_test} test / {n_val} validation rows, leaving a split empty: "
            "use more rows or change data.test_fraction / data.val_fraction"
        )
    if kind == "classification":
        test, rest = stratified_split(y, n_test, rng)
        val, train = stratified_split(y[rest], n_val, rng)
        return {"train": rest[train], "val": rest[val], "test": test}
    order = rng.permutation(n)
    return {
        "train": order[n_test + n_val :],
        "val": order[n_test : n_test + n_val],
        "test": order[:n_test],
    }


def make_transform(features: pd.DataFrame, scaling: str = "standard") -> ColumnTransformer:
    """The unfitted transform of the columns of `features` (the rows it will be fitted on).
    Numeric columns: median-imputed, then standardized (`scaling="standard"`) or mapped
    through their quantiles to a standard normal (`"quantile"`: sklearn's QuantileTransformer,
    up to 1,000 quantiles; heavy tails and skew gone, as tabular networks prefer). Other
    columns: one-hot, unknown categories all-zero."""
    scaler = (
        StandardScaler()
        if scaling == "standard"
        else QuantileTransformer(
            n_quantiles=min(1000, len(features)),
            output_distribution="normal",
            subsample=None,
            random_state=0,
        )
    )
    numeric = [
        c
        for c in features.columns
        if pd.api.types.is_numeric_dtype(features[c])
        and not pd.api.types.is_bool_dtype(features[c])
    ]
    categorical = [c for c in features.columns if c not in numeric]
    return ColumnTransformer(
        [
            ("numeric", make_pipeline(SimpleImputer(strategy="median"), scaler), numeric),
            (
                "categorical",
                make_pipeline(
                    SimpleImputer(strategy="constant", fill_value="missing"),
                    OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                ),
                categorical,
            ),
        ],
        sparse_threshold=0.0,
    )


def columns_of(transform: ColumnTransformer) -> tuple[list[str], list[str]]:
    """(numeric, categorical) raw column names the transform reads."""
    columns = {name: list(cols) for name, _, cols in transform.transformers}
    return columns["numeric"], columns["categorical"]


def coerce(rows: pd.DataFrame, numeric: list[str], categorical: list[str]) -> pd.DataFrame:
    """Raw rows as the transform expects them: numbers as float64, every other column as
    strings, each missing value as NaN (what the imputers look for)."""
    missing = [c for c in numeric + categorical if c not in rows.columns]
    if missing:
        raise ValueError(
            f"the rows lack columns {missing}: pass every feature column {numeric + categorical}"
        )
    out = {}
    for c in numeric:
        try:
            out[c] = pd.to_numeric(rows[c]).astype(np.float64)
        except (ValueError, TypeError) as e:
            raise ValueError(f"column {c!r} must hold numbers (or be empty): {e}") from e
    for c in categorical:
        values = rows[c].astype(object)
        out[c] = values.map(str).where(values.notna(), np.nan)
    return pd.DataFrame(out, index=rows.index)


def table_features(transform: ColumnTransformer, rows: pd.DataFrame) -> np.ndarray:
    """float32 (N, F) network input of raw rows."""
    return transform.transform(coerce(rows, *columns_of(transform))).astype(np.float32)


def _std(values: np.ndarray) -> float:
    std = float(values.std())
    if std == 0:
        raise DataError("the target has the same value in every training row: nothing to regress")
    return std


def _validate(data: Mapping) -> None:
    if data.get("target") in (None, "", "???"):
        raise ValueError("data.target is required: the name of the column to predict")
    if data.get("target_kind") not in TARGET_KINDS:
        raise ValueError(
            f"data.target_kind={data.get('target_kind')!r}: choose one of {list(TARGET_KINDS)}"
        )
    if data.get("scaling", "standard") not in SCALINGS:
        raise ValueError(f"data.scaling={data.get('scaling')!r}: choose one of {list(SCALINGS)}")
    for key in ("val_fraction", "test_fraction"):
        check_fraction(data, key)
    check_limit(data, 10, "rows")


# --- serving ---------------------------------------------------------------------------------


def serving_files(processed_dir: Path) -> dict[str, str]:
    """The fitted transform: a served model applies it to the raw rows it is given."""
    return {"transform": str(Path(processed_dir) / TRANSFORM)}


def example_input(processed_dir: Path, n: int = 2) -> pd.DataFrame:
    """The first `n` raw test rows, typed as `pd.read_csv` reads the table: the signature a
    served input must match (an int column stays int; MLflow refuses floats there)."""
    return pd.read_csv(Path(processed_dir) / EXAMPLE_ROWS, nrows=n)


def load_transform(path: str | Path) -> ColumnTransformer:
    with open(path, "rb") as f:
        return pickle.load(f)


class Adapter:
    """Raw rows (a DataFrame, or anything `pd.DataFrame` takes: a list of dicts) -> the
    transformed float32 features (N, F) the network was trained on."""

    def __init__(self, spec: dict[str, Any], files: dict[str, str]):
        self.transform = load_transform(files["transform"])

    def __call__(self, model_input: Any) -> torch.Tensor:
        rows = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return torch.from_numpy(table_features(self.transform, rows))
