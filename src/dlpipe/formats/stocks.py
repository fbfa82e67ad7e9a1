"""Daily stock prices (format "stock_prices"): per-ticker OHLCV CSVs (date, open, high, low,
close, volume, Name) -> windows of daily features x (N, window, F) whose target y is the next
trading day's log return, split by date.

No look-ahead: day t's features use only days t-1 and t; a window ending on day t predicts
t+1, and a sample belongs to the split that holds its target date, so a training window never
reaches into the validation or test period. The per-feature mean/std (applied by the
network's first layer) and the target's mean/std come from training-period days alone.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
import tarfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dlpipe.data import (
    MIRROR_ENV,
    DataError,
    check_fraction,
    checked_manifest,
    read_verified,
    save_arrays,
    write_atomic,
    write_meta,
)

log = logging.getLogger(__name__)

COLUMNS = ("date", "open", "high", "low", "close", "volume", "Name")
# Each from days t-1 and t only. log_return must stay first: it is also the target's series.
FEATURES = ("log_return", "log_volume_change", "log_range", "log_body")
EXAMPLE_ROWS = "example_rows.csv"  # the last window+1 raw rows per ticker, a served input
ARCHIVE = "individual_stocks_5yr.tar.gz"  # the mirror's archive of every ticker's CSV

INPUT_DOC = (
    "pandas DataFrame of daily rows with columns date (YYYY-MM-DD), open, high, low, close, "
    "volume, Name (the ticker), at least window+1 consecutive trading days per ticker "
    "(open/high/low may be empty)"
)


def file_name(ticker: str) -> str:
    return f"{ticker}_data.csv"


def preprocess(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
    t0 = time.perf_counter()
    manifest = checked_manifest(data, raw_dir)
    tickers, window = _validate(data, manifest)
    daily = {}
    for ticker in tickers:
        name = file_name(ticker)
        blob = read_verified(Path(raw_dir) / name, manifest["files"][name])
        daily[ticker] = daily_features(read_prices(io.BytesIO(blob), name))
    dates = np.unique(np.concatenate([d["date"].to_numpy() for d in daily.values()]))
    dates = dates.astype("datetime64[D]")
    val_start, test_start = split_dates(data, dates)

    # Statistics of the training period only: feature rows dated before val_start.
    train_rows = np.concatenate(
        [d.loc[d["date"] < val_start, list(FEATURES)].to_numpy() for d in daily.values()]
    )
    parts: dict[str, list] = {split: [] for split in ("train", "val", "test")}
    for ticker, d in daily.items():
        x, y, target_dates = windows(d, window)
        for split, keep in split_masks(target_dates, val_start, test_start).items():
            parts[split].append((x[keep], y[keep], target_dates[keep], [ticker] * int(keep.sum())))
    arrays, sizes = {}, {}
    for split, chunks in parts.items():
        arrays[f"{split}_x"] = np.concatenate([c[0] for c in chunks]).astype(np.float32)
        arrays[f"{split}_y"] = np.concatenate([c[1] for c in chunks]).astype(np.float32)
        arrays[f"{split}_date"] = np.concatenate([c[2] for c in chunks]).astype("datetime64[D]")
        arrays[f"{split}_ticker"] = np.array([t for c in chunks for t in c[3]], dtype="U16")
        sizes[split] = len(arrays[f"{split}_y"])
        if sizes[split] == 0:
            raise DataError(
                f"the {split} split is empty (val_start {val_start}, test_start {test_start}, "
                f"data from {dates[0]} to {dates[-1]}): change data.val_start / data.test_start"
            )
    sha256 = save_arrays(out_dir, arrays)
    sha256[EXAMPLE_ROWS] = write_atomic(
        Path(out_dir) / EXAMPLE_ROWS, [_example_rows(raw_dir, manifest, tickers, window)]
    )
    train_y = arrays["train_y"].astype(np.float64)
    meta = {
        "input_shape": [window, len(FEATURES)],
        "input_kind": "features",
        "mean": train_rows.mean(axis=0).tolist(),
        "std": train_rows.std(axis=0).tolist(),
        "features": list(FEATURES),
        "window": window,
        "tickers": tickers,
        "target": {
            "name": "next_day_log_return",
            "mean": float(train_y.mean()),
            "std": float(train_y.std()),
        },
        "periods": {
            "train": [str(dates[0]), str(val_start)],
            "val": [str(val_start), str(test_start)],
            "test": [str(test_start), str(dates[-1] + 1)],
        },
        "sizes": sizes,
    }
    meta = write_meta(out_dir, meta, data, raw_dir, manifest, seed, sha256)
    log.info(
        "preprocessed %s: %d tickers, window %d, periods %s, sizes %s in %.2fs -> %s",
        data["name"],
        len(tickers),
        window,
        meta["periods"],
        sizes,
        time.perf_counter() - t0,
        out_dir,
    )
    return meta


def read_prices(source, name: str = "rows") -> pd.DataFrame:
    """One ticker's CSV (a path or file object) with its dates parsed."""
    try:
        rows = pd.read_csv(source)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{name} is not a readable CSV ({e})") from e
    return _checked_rows(rows, name)


def _checked_rows(rows: pd.DataFrame, name: str) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise DataError(f"{name} lacks columns {missing}; expected {list(COLUMNS)}")
    rows = rows.assign(date=pd.to_datetime(rows["date"]).to_numpy().astype("datetime64[D]"))
    close = rows["close"].to_numpy(np.float64)
    if not np.all(close > 0):  # also catches missing closes (NaN)
        raise DataError(f"{name} has missing or non-positive closing prices")
    return rows


def daily_features(rows: pd.DataFrame) -> pd.DataFrame:
    """One ticker's rows -> a frame of date + FEATURES for every day but the first, each
    computed from that day and the one before only. A missing open/high/low (a few rows of the
    data have them) gives a neutral 0 for the features that need it."""
    rows = rows.sort_values("date")
    if rows["date"].duplicated().any():
        raise DataError(f"{rows['Name'].iloc[0]} has several rows for one date")
    close = rows["close"].to_numpy(np.float64)
    volume = rows["volume"].fillna(0).to_numpy(np.float64)
    high = rows["high"].fillna(rows["close"]).to_numpy(np.float64)
    low = rows["low"].fillna(rows["close"]).to_numpy(np.float64)
    open_ = rows["open"].fillna(rows["close"]).to_numpy(np.float64)
    columns = {
        "log_return": np.diff(np.log(close)),
        "log_volume_change": np.diff(np.log1p(volume)),  # log1p: a few days trade 0 shares
        "log_range": np.log(high / low)[1:],
        "log_body": np.log(close / open_)[1:],
    }
    return pd.DataFrame({"date": rows["date"].to_numpy()[1:], **columns})


def windows(daily: pd.DataFrame, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (N, window, F), y (N,) next-day log return, target dates (N,)): sample i is the
    window of days i..i+window-1 and predicts day i+window."""
    values = daily[list(FEATURES)].to_numpy(np.float64)  # (T, F)
    n = len(values) - window
    if n <= 0:
        return (np.empty((0, window, len(FEATURES))), np.empty(0), np.empty(0, "datetime64[D]"))
    # (T - window + 1, F, window) -> drop the last (it has no next day) -> (N, window, F)
    x = np.lib.stride_tricks.sliding_window_view(values, window, axis=0)[:n].transpose(0, 2, 1)
    return x, values[window:, 0], daily["date"].to_numpy()[window:]


def split_dates(data: Mapping, dates: np.ndarray) -> tuple[np.datetime64, np.datetime64]:
    """(val_start, test_start): data.val_start/test_start, or where the last
    data.test_fraction / data.val_fraction of the trading days begin."""
    if data.get("val_start") and data.get("test_start"):
        val_start, test_start = (
            np.datetime64(str(data[k]), "D") for k in ("val_start", "test_start")
        )
    else:
        n = len(dates)
        test_start = dates[n - round(data["test_fraction"] * n)]
        val_start = dates[n - round((data["test_fraction"] + data["val_fraction"]) * n)]
    if not val_start < test_start:
        raise ValueError(f"val_start {val_start} must come before test_start {test_start}")
    return val_start, test_start


def split_masks(
    target_dates: np.ndarray, val_start: np.datetime64, test_start: np.datetime64
) -> dict[str, np.ndarray]:
    return {
        "train": target_dates < val_start,
        "val": (target_dates >= val_start) & (target_dates < test_start),
        "test": target_dates >= test_start,
    }


def _example_rows(raw_dir: Path, manifest: Mapping, tickers: Sequence[str], window: int) -> bytes:
    frames = []
    for ticker in tickers:
        name = file_name(ticker)
        rows = pd.read_csv(io.BytesIO(read_verified(Path(raw_dir) / name, manifest["files"][name])))
        frames.append(rows.tail(window + 1))
    return pd.concat(frames).to_csv(index=False, lineterminator="\n").encode()


def _validate(data: Mapping, manifest: Mapping) -> tuple[list[str], int]:
    tickers = list(data.get("tickers") or [])
    if not tickers or len(set(tickers)) != len(tickers):
        raise ValueError(f"data.tickers={tickers!r} must list distinct tickers, e.g. [AAPL, MSFT]")
    absent = [t for t in tickers if file_name(t) not in manifest["files"]]
    if absent:
        raise ValueError(
            f"data.tickers lists {absent}, but data.files has no "
            f"{[file_name(t) for t in absent]}: add each as an entry of data.files in "
            f"conf/data/{data['name']}.yaml (`python -m dlpipe.formats.stocks {' '.join(absent)}` "
            "prints the entries), then re-run collect"
        )
    window = data.get("window")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"data.window={window!r} must be a positive number of days, e.g. 20")
    if not (data.get("val_start") and data.get("test_start")):
        for key in ("val_fraction", "test_fraction"):
            check_fraction(data, key, below=0.5)
    return tickers, window


# --- serving ---------------------------------------------------------------------------------


def serving_files(processed_dir: Path) -> dict[str, str]:
    """Nothing beyond the weights: the feature code ships as part of dlpipe, the scaling in
    the network's first layer."""
    return {}


def example_input(processed_dir: Path, n: int = 2) -> pd.DataFrame:
    """The last window+1 rows of the first `n` tickers, typed as `pd.read_csv` reads the
    data's CSVs (prices float, volume int, date text): the signature a served input must match."""
    rows = pd.read_csv(Path(processed_dir) / EXAMPLE_ROWS)
    return rows[rows["Name"].isin(rows["Name"].unique()[:n])].reset_index(drop=True)


def latest_windows(rows: pd.DataFrame, window: int) -> tuple[np.ndarray, pd.DataFrame]:
    """The features of each ticker's last `window` days, as preprocessing computes them:
    (x float32 (K, window, F), a frame of Name and the last date per ticker)."""
    if not isinstance(rows, pd.DataFrame):
        rows = pd.DataFrame(rows)
    rows = _checked_rows(rows, "the input rows")
    xs, last = [], []
    for ticker, group in rows.groupby("Name", sort=True):
        if len(group) < window + 1:
            raise ValueError(
                f"{ticker} has {len(group)} rows; the model needs at least {window + 1} "
                f"consecutive trading days (window {window} + 1) per ticker"
            )
        daily = daily_features(group)
        xs.append(daily[list(FEATURES)].to_numpy(np.float64)[-window:])
        last.append((ticker, str(daily["date"].iloc[-1].date())))
    return np.stack(xs).astype(np.float32), pd.DataFrame(last, columns=["Name", "date"])


# --- data.files entries for more tickers -----------------------------------------------------


def files_entry(ticker: str, url: str) -> str:
    """The conf/data/sp500.yaml `files` entry of `ticker`: its CSV's sha256 from the mirror's
    archive ($DLPIPE_DATA_MIRROR/sp500-stocks) when set, else downloaded from `url`."""
    name = file_name(ticker)
    member = f"individual_stocks_5yr/{name}"
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        with tarfile.open(Path(mirror) / "sp500-stocks" / ARCHIVE) as t:
            blob = t.extractfile(member).read()
    else:
        with urllib.request.urlopen(url + name, timeout=30) as response:
            blob = response.read()
    digest = hashlib.sha256(blob).hexdigest()
    return f"  {name}: {{sha256: {digest}, mirror: {ARCHIVE}, mirror_member: {member}}}"


if __name__ == "__main__":
    # python -m dlpipe.formats.stocks NFLX TSLA: entries to paste under data.files
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[3] / "conf" / "data" / "sp500.yaml"
    upstream = OmegaConf.load(conf).url
    for symbol in sys.argv[1:]:
        print(files_entry(symbol, upstream))
