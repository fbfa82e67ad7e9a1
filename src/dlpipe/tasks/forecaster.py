"""Next-day return forecasting from windows of daily price features: trained like any
regressor (MSE on the standardized return, see tasks/regressor.py); judged on the test period
by RMSE, MAE and directional accuracy, side by side with naive baselines that a forecast has
to beat to be worth anything: zero return, and yesterday's return again. The one of the two
that is better on the validation period is also reported as `baseline/...`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig

from dlpipe.data import load_array, load_split, write_json
from dlpipe.formats.stocks import FEATURES
from dlpipe.plots import saved_figure
from dlpipe.serving.forecaster import ForecasterModel
from dlpipe.tasks import ExportTarget
from dlpipe.tasks.regressor import (
    log_regression_model,
    predict_test_split,
    regression_export_targets,
    regression_metrics,
    regression_module,
    write_comparison,
)

if TYPE_CHECKING:  # type hints only: evaluate and register load no Lightning
    import lightning as L

RETURN = FEATURES.index("log_return")


def direction_accuracy(pred: np.ndarray, actual: np.ndarray) -> float:
    """Share of days whose predicted move has the actual move's direction (a flat day, return
    exactly 0, counts as down)."""
    return float(np.mean((pred > 0) == (actual > 0)))


def forecast_report(
    pred: np.ndarray, actual: np.ndarray, last: np.ndarray
) -> dict[str, dict[str, float]]:
    """Metrics of the model and the naive baselines, per predictor: `last` is each sample's
    most recent known return (yesterday's, from the target day's point of view)."""

    def scores(p: np.ndarray) -> dict[str, float]:
        metrics = regression_metrics(p, actual)
        return {"rmse": metrics["rmse"], "mae": metrics["mae"]}

    return {
        "model": scores(pred) | {"dir_acc": direction_accuracy(pred, actual)},
        "naive_zero": scores(np.zeros_like(actual)),  # no direction to score
        "naive_last": scores(last) | {"dir_acc": direction_accuracy(last, actual)},
        "always_up": {"dir_acc": float(np.mean(actual > 0))},
    }


def naive_baseline(processed: Path) -> str:
    """The naive forecast with the lower RMSE on the validation split, "zero return" or
    "yesterday's return": the forecaster's `baseline/...` (chosen without the test period)."""
    x, actual = load_split(processed, "val")
    actual = actual.astype(np.float64)
    zero = regression_metrics(np.zeros_like(actual), actual)["rmse"]
    last = regression_metrics(x[:, -1, RETURN].astype(np.float64), actual)["rmse"]
    return "zero return" if zero <= last else "yesterday's return"


def plot_forecast(frame: dict[str, np.ndarray], path: Path, max_tickers: int = 4) -> None:
    """Actual vs predicted next-day log returns over the test period, one panel per ticker."""
    tickers = list(dict.fromkeys(frame["ticker"].tolist()))[:max_tickers]
    size = (10, 2.6 * len(tickers))
    with saved_figure(path, len(tickers), 1, figsize=size, squeeze=False) as (_, axes):
        for ax, ticker in zip(axes[:, 0], tickers, strict=True):
            mine = frame["ticker"] == ticker
            ax.plot(frame["date"][mine], frame["actual"][mine], linewidth=0.8, label="actual")
            ax.plot(frame["date"][mine], frame["predicted"][mine], linewidth=1.2, label="predicted")
            ax.axhline(0, color="black", linewidth=0.5)
            ax.set(title=ticker, ylabel="log return")
            ax.legend(loc="upper right", fontsize=8)


class ForecasterTask:
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        from dlpipe.datamodule import make_datamodule

        return make_datamodule(cfg, meta)

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        if meta["format"] != "stock_prices":
            raise ValueError(
                f"task=forecaster needs data.format=stock_prices (e.g. data=sp500), not "
                f"{meta['format']}: for other regression targets use task=regressor"
            )
        return regression_module(cfg, meta)

    def evaluate(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], out: Path
    ) -> dict[str, float]:
        processed = Path(cfg.paths.processed)
        x, actual, pred = predict_test_split(processed, checkpoint)
        last = x[:, -1, RETURN].astype(np.float64)
        report = forecast_report(pred, actual, last)
        write_comparison(out / "comparison.csv", report)
        frame = {
            "date": load_array(processed, "test_date"),
            "ticker": load_array(processed, "test_ticker"),
            "actual": actual,
            "predicted": pred,
            "naive_last": last,
        }
        with open(out / "forecast.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(list(frame))
            writer.writerows(zip(*(v.tolist() for v in frame.values()), strict=True))
        plot_forecast(frame, out / "forecast.png")
        naive = naive_baseline(processed)
        write_json(out / "baseline.json", {"name": naive, "fit_seconds": 0.0})
        metrics = {
            f"test/{metric}" if name == "model" else f"test/{name}/{metric}": value
            for name, row in report.items()
            for metric, value in row.items()
        }
        # No chance/...: a naive forecast is this task's "knows nothing" reference already.
        naive_row = report["naive_zero" if naive == "zero return" else "naive_last"]
        return metrics | {f"baseline/{metric}": value for metric, value in naive_row.items()}

    def log_model(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], run_id: str
    ) -> str:
        return log_regression_model(
            cfg,
            checkpoint,
            meta,
            run_id,
            ForecasterModel,
            extra_spec={"window": meta["window"], "features": meta["features"]},
        )

    def export_targets(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any]
    ) -> list[ExportTarget]:
        return regression_export_targets(Path(cfg.paths.processed), checkpoint)


TASK = ForecasterTask()
