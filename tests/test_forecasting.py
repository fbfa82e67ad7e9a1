"""Next-day return forecasting on real S&P 500 prices: windows and targets match the raw
prices, nothing looks ahead (prices changed after a date leave everything before it
byte-identical; scaling comes from the training period alone), the naive baselines on a
hand-made series, and each sp500 experiment through all six stages to a served forecast."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from dlpipe.data import MANIFEST, load_array, load_meta, sha256_file
from dlpipe.formats.stocks import daily_features, file_name, windows
from dlpipe.models import load_checkpoint
from dlpipe.preprocess import preprocess
from dlpipe.tasks.forecaster import forecast_report
from dlpipe.tasks.regressor import predict_values

CONF = Path(__file__).resolve().parents[1] / "conf"
FEATURE_FILES = ("x", "y", "date", "ticker")


@pytest.fixture(scope="module")
def sp500(dataset) -> Path:
    """The default sp500 config (10 tickers, window 20), collected and preprocessed."""
    return dataset("sp500")


def _data(data_config, **overrides) -> dict:
    return data_config("sp500", **overrides)


def _prices(raw: Path, ticker: str) -> pd.DataFrame:
    rows = pd.read_csv(raw / file_name(ticker), parse_dates=["date"])
    return rows.sort_values("date").reset_index(drop=True)


def test_each_window_ends_the_day_before_its_target(sp500):
    raw, meta = sp500.parent / "raw", load_meta(sp500)
    val_start, test_start = (np.datetime64(meta["periods"][s][0]) for s in ("val", "test"))
    dates = {s: load_array(sp500, f"{s}_date") for s in ("train", "val", "test")}
    assert dates["train"].max() < val_start <= dates["val"].min()
    assert dates["val"].max() < test_start <= dates["test"].min()
    assert sum(meta["sizes"].values()) == 10 * (1259 - 1 - 20)  # every day with 20 before it

    x, y = load_array(sp500, "test_x"), load_array(sp500, "test_y")
    tickers = load_array(sp500, "test_ticker")
    for i in (0, 777, len(y) - 1):
        prices = _prices(raw, tickers[i])
        t = int(np.flatnonzero(prices["date"].to_numpy() == dates["test"][i])[0])
        close, volume = prices["close"].to_numpy(), prices["volume"].to_numpy()
        assert y[i] == np.float32(np.log(close[t] / close[t - 1]))  # the target day's return
        # The window: days t-20 .. t-1, each from that day and the one before.
        days = np.arange(t - 20, t)
        assert np.allclose(x[i, :, 0], np.log(close[days] / close[days - 1]), atol=1e-7)
        assert np.allclose(x[i, :, 1], np.log1p(volume[days]) - np.log1p(volume[days - 1]))


def test_prices_changed_after_a_date_change_nothing_before_it(sp500, data_config, tmp_path):
    meta = load_meta(sp500)
    raw = sp500.parent / "raw"

    def rerun_with_prices_changed_from(cut: str, name: str) -> Path:
        changed = tmp_path / name / "raw"
        changed.mkdir(parents=True)
        manifest = json.loads((raw / MANIFEST).read_text())
        rng = np.random.default_rng(1)
        for file in manifest["files"]:
            rows = pd.read_csv(raw / file)
            later = rows["date"] >= cut
            for column in ("open", "high", "low", "close", "volume"):
                rows[column] = rows[column].astype(np.float64)
                rows.loc[later, column] *= rng.uniform(0.5, 1.5, int(later.sum()))
            rows.to_csv(changed / file, index=False)
            manifest["files"][file] = sha256_file(changed / file)
        (changed / MANIFEST).write_text(json.dumps(manifest))
        out = tmp_path / name / "processed"
        preprocess(_data(data_config), changed, out, seed=0)
        return out

    # From the first validation day on: the training split and every statistic stay the same.
    out = rerun_with_prices_changed_from(meta["periods"]["val"][0], "from_val")
    after = load_meta(out)
    for key in FEATURE_FILES:
        assert after["sha256"][f"train_{key}.npy"] == meta["sha256"][f"train_{key}.npy"]
    assert after["sha256"]["val_y.npy"] != meta["sha256"]["val_y.npy"]
    assert (after["mean"], after["std"], after["target"]) == (
        meta["mean"],
        meta["std"],
        meta["target"],
    )

    # In the middle of the test period: every sample whose target comes before it is the same.
    cut = "2017-08-01"
    out = rerun_with_prices_changed_from(cut, "mid_test")
    after = load_meta(out)
    for split in ("train", "val"):
        for key in FEATURE_FILES:
            name = f"{split}_{key}.npy"
            assert after["sha256"][name] == meta["sha256"][name]
    before = load_array(sp500, "test_date") < np.datetime64(cut)
    assert 0 < before.sum() < len(before)
    for key in ("x", "y"):
        old, new = load_array(sp500, f"test_{key}"), load_array(out, f"test_{key}")
        assert old[before].tobytes() == new[before].tobytes()
        assert not np.array_equal(old[~before], new[~before])


def test_scaling_comes_from_the_training_period_alone(sp500):
    meta = load_meta(sp500)
    raw, val_start = sp500.parent / "raw", np.datetime64(meta["periods"]["val"][0])
    rows = []
    for ticker in meta["tickers"]:
        p = _prices(raw, ticker)
        p = p[p["date"].to_numpy() < val_start]  # the training period, nothing else
        close, volume = p["close"].to_numpy(), p["volume"].to_numpy()
        high, low, open_ = (p[c].fillna(p["close"]).to_numpy() for c in ("high", "low", "open"))
        rows.append(
            np.stack(
                [
                    np.diff(np.log(close)),
                    np.diff(np.log1p(volume)),
                    np.log(high / low)[1:],
                    np.log(close / open_)[1:],
                ],
                axis=1,
            )
        )
    rows = np.concatenate(rows)
    assert np.allclose(meta["mean"], rows.mean(0), rtol=1e-10, atol=1e-15)
    assert np.allclose(meta["std"], rows.std(0), rtol=1e-10)
    train_y = load_array(sp500, "train_y").astype(np.float64)
    assert meta["target"]["mean"] == pytest.approx(train_y.mean(), rel=1e-12)
    assert meta["target"]["std"] == pytest.approx(train_y.std(), rel=1e-12)


def test_tickers_must_have_a_files_entry(sp500, data_config):
    data = _data(data_config, tickers=["AAPL", "NFLX"])
    with pytest.raises(ValueError, match=r"NFLX_data\.csv.*python -m dlpipe\.formats\.stocks NFLX"):
        preprocess(data, sp500.parent / "raw", sp500.parent / "unused", seed=0)


def test_naive_baselines_on_a_hand_made_series():
    returns = [0.1, -0.2, 0.0, 0.3]
    close = 100 * np.exp(np.cumsum([0.0, *returns]))
    rows = pd.DataFrame(
        {
            "date": pd.date_range("2020-01-01", periods=5).to_numpy().astype("datetime64[D]"),
            "open": close,
            "high": close,
            "low": close,
            "close": close,
            "volume": 1000,
            "Name": "X",
        }
    )
    x, actual, _ = windows(daily_features(rows), window=1)
    last = x[:, -1, 0]
    assert np.allclose(last, [0.1, -0.2, 0.0]) and np.allclose(actual, [-0.2, 0.0, 0.3])

    report = forecast_report(actual.copy(), actual, last)  # a perfect model
    assert report["model"] == {"rmse": 0.0, "mae": 0.0, "dir_acc": 1.0}
    assert report["naive_zero"]["rmse"] == pytest.approx(np.sqrt((0.04 + 0.09) / 3))
    assert report["naive_zero"]["mae"] == pytest.approx(0.5 / 3)
    # yesterday's return again: errors 0.3, -0.2, -0.3; directions right on day 2 only
    assert report["naive_last"]["rmse"] == pytest.approx(np.sqrt((0.09 + 0.04 + 0.09) / 3))
    assert report["naive_last"]["mae"] == pytest.approx(0.8 / 3)
    assert report["naive_last"]["dir_acc"] == pytest.approx(1 / 3)
    assert report["always_up"]["dir_acc"] == pytest.approx(1 / 3)


SP500_EXPERIMENTS = sorted(p.stem for p in CONF.glob("experiment/sp500_*.yaml"))


@pytest.mark.parametrize("experiment", SP500_EXPERIMENTS)
def test_experiment_reports_and_serves_forecasts_from_raw_prices(experiment, smoke_run):
    # All six stages at smoke size (2 tickers), run once per session: see tests/test_smoke.py.
    cfg, results, champion = smoke_run(experiment)
    metrics = results["evaluate"]
    for key in ("test/rmse", "test/mae", "test/dir_acc", "test/naive_zero/rmse"):
        assert np.isfinite(metrics[key])
    assert 0.4 < metrics["test/always_up/dir_acc"] < 0.7
    files = Path(cfg.paths.reports) / "evaluate" / "files"
    comparison = pd.read_csv(files / "comparison.csv", index_col="predictor")
    assert list(comparison.index) == ["model", "naive_zero", "naive_last", "always_up"]
    assert comparison.loc["model", "rmse"] == pytest.approx(metrics["test/rmse"])
    forecast = pd.read_csv(files / "forecast.csv")
    assert len(forecast) == load_meta(cfg.paths.processed)["sizes"]["test"]
    assert (files / "forecast.png").read_bytes()[:4] == b"\x89PNG"

    model = mlflow.pyfunc.load_model(str(champion))
    # Raw rows of the window + 1 days up to 2017-06-01 (incl.) -> the forecast for 2017-06-02,
    # which must be the network's output for the test sample with that target date.
    tickers, days = sorted(cfg.data.tickers), cfg.data.window + 1
    prices = pd.concat(_prices(Path(cfg.paths.raw), t) for t in tickers)
    prices = prices[prices["date"] <= "2017-06-01"].groupby("Name").tail(days)
    prices = prices.assign(date=prices["date"].dt.strftime("%Y-%m-%d"))
    served = model.predict(prices)
    assert list(served.columns) == ["Name", "date", "predicted_log_return", "predicted_close"]
    assert served["Name"].tolist() == tickers
    assert served["date"].tolist() == ["2017-06-01"] * len(tickers)

    processed = Path(cfg.paths.processed)
    dates, test_tickers = load_array(processed, "test_date"), load_array(processed, "test_ticker")
    rows = [
        int(np.flatnonzero((dates == np.datetime64("2017-06-02")) & (test_tickers == t))[0])
        for t in tickers
    ]
    net, hparams = load_checkpoint(Path(cfg.paths.train) / "checkpoints" / "best.ckpt")
    expected = predict_values(net, load_array(processed, "test_x")[rows], hparams["target"])
    assert np.allclose(served["predicted_log_return"], expected, atol=1e-7)

    with pytest.raises(Exception, match=f"at least {days} consecutive trading days"):
        model.predict(prices.groupby("Name").tail(days - 1))  # one day short
