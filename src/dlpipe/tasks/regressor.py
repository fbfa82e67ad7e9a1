"""Regression of one real-valued target (a table's column; the forecaster's next-day return):
MSE on the standardized target in training; RMSE, MAE and R² in the target's own units on the
test split, side by side with classical baselines fitted on the same train split (linear
regression; the better of it and gradient boosting as `baseline/...`) and the train mean
(`chance/...`)."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sklearn
import torch
from omegaconf import DictConfig, OmegaConf

from dlpipe.baselines import regression_baseline
from dlpipe.data import load_split, write_json
from dlpipe.formats import format_module
from dlpipe.models import load_checkpoint, predict
from dlpipe.plots import saved_figure
from dlpipe.serving import log_adapted_model
from dlpipe.serving.regressor import RegressorModel
from dlpipe.tasks import ExportTarget, net_args

if TYPE_CHECKING:  # type hints only: evaluate and register load no Lightning
    import lightning as L


def regression_module(cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
    """The Regressor (dlpipe.modules.regressor, imported here: by training only) of `cfg` for
    the dataset of `meta`; ValueError where that dataset has classes or no numeric target."""
    from dlpipe.modules.regressor import Regressor

    if "target" not in meta or "classes" in meta:
        raise ValueError(
            f"data={meta['name']} is not a regression dataset (it has classes "
            f"{meta.get('classes')}): use task=classifier, or set data.target_kind=regression"
        )
    return Regressor(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        net=net_args(meta, num_classes=1),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        target=meta["target"],
        compile=cfg.train.compile,
    )


def predict_values(net: torch.nn.Module, x: np.ndarray, target: Mapping[str, Any]) -> np.ndarray:
    """The network's predictions for `x`, in the target's original units (float64, (N,))."""
    out = predict(net, x, batch_size=4096).squeeze(-1)
    return out.double().numpy() * target["std"] + target["mean"]


def regression_metrics(pred: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and R² (1 - SSE / total sum of squares around the actual mean)."""
    pred, actual = np.asarray(pred, np.float64), np.asarray(actual, np.float64)
    err = pred - actual
    total = np.sum((actual - actual.mean()) ** 2)
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "r2": float(1.0 - np.sum(err**2) / total) if total > 0 else float("nan"),
    }


def linear_baseline(processed: Path) -> np.ndarray:
    """Test-split predictions of an ordinary least-squares fit on the training split's
    (already transformed) features: what the network has to beat."""
    from sklearn.linear_model import LinearRegression

    x, y = load_split(processed, "train")
    x_test, _ = load_split(processed, "test")
    fit = LinearRegression().fit(x.reshape(len(x), -1), y.astype(np.float64))
    return fit.predict(x_test.reshape(len(x_test), -1))


def write_comparison(path: Path, rows: Mapping[str, Mapping[str, float]]) -> None:
    """One row per predictor (model, baselines), one column per metric."""
    metrics = sorted({m for row in rows.values() for m in row})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["predictor", *metrics])
        writer.writerows([name, *(row.get(m, "") for m in metrics)] for name, row in rows.items())


def plot_predicted_vs_actual(pred: np.ndarray, actual: np.ndarray, label: str, path: Path) -> None:
    with saved_figure(path, figsize=(6, 6)) as (_, ax):
        ax.scatter(actual, pred, s=4, alpha=0.3)
        low, high = min(actual.min(), pred.min()), max(actual.max(), pred.max())
        ax.plot([low, high], [low, high], color="black", linewidth=1, label="perfect")
        ax.set(xlabel=f"actual {label}", ylabel=f"predicted {label}", title="test split")
        ax.legend()


class RegressorTask:
    # The Lightning side is imported where training asks for it (module(), datamodule()), so
    # evaluate and register load no Lightning (dlpipe.modules).
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        from dlpipe.datamodule import make_datamodule

        return make_datamodule(cfg, meta)

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        if not hasattr(format_module(meta["format"]), "Adapter"):
            raise ValueError(
                f"data.format={meta['format']} has no served-input adapter for task=regressor: "
                "for stock prices use task=forecaster"
            )
        return regression_module(cfg, meta)

    def evaluate(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], out: Path
    ) -> dict[str, float]:
        processed = Path(cfg.paths.processed)
        x, actual, pred = predict_test_split(processed, checkpoint)
        fitted = regression_baseline(processed)
        write_json(out / "baseline.json", fitted.info())
        train_mean = float(load_split(processed, "train")[1].mean())
        rows = {
            "model": regression_metrics(pred, actual),
            "linear": regression_metrics(linear_baseline(processed), actual),
            "baseline": regression_metrics(fitted.test, actual),
            "chance": regression_metrics(np.full_like(actual, train_mean), actual),
        }
        write_comparison(out / "comparison.csv", rows)
        with open(out / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["actual", "predicted"])
            writer.writerows(zip(actual.tolist(), pred.tolist(), strict=True))
        name = meta["target"]["name"]
        plot_predicted_vs_actual(pred, actual, name, out / "predicted_vs_actual.png")
        return {f"test/{k}": v for k, v in rows["model"].items()} | {
            f"test/linear/{k}" if row == "linear" else f"{row}/{k}": v
            for row in ("linear", "baseline", "chance")
            for k, v in rows[row].items()
        }

    def log_model(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], run_id: str
    ) -> str:
        return log_regression_model(
            cfg,
            checkpoint,
            meta,
            run_id,
            RegressorModel,
            extra_requirements=(f"scikit-learn=={sklearn.__version__}",),
        )

    def export_targets(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any]
    ) -> list[ExportTarget]:
        return regression_export_targets(Path(cfg.paths.processed), checkpoint)


def predict_test_split(
    processed: Path, checkpoint: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test inputs, actual targets, the checkpoint's predictions), targets in their units."""
    net, hparams = load_checkpoint(checkpoint)
    x, actual = load_split(processed, "test")
    return x, actual.astype(np.float64), predict_values(net, x, hparams["target"])


def regression_export_targets(processed: Path, checkpoint: Path) -> list[ExportTarget]:
    """The network (raw features -> standardized prediction (B, 1)) on the test inputs, within
    1e-4 (a ten-thousandth of the target's standard deviation; dlpipe.export)."""
    net, _ = load_checkpoint(checkpoint)
    x, _ = load_split(processed, "test")
    return [ExportTarget("net", net, torch.from_numpy(x), max_abs_error=1e-4)]


def log_regression_model(
    cfg: DictConfig,
    checkpoint: Path,
    meta: dict[str, Any],
    run_id: str,
    python_model: type,
    extra_spec: dict[str, Any] | None = None,
    extra_requirements: tuple[str, ...] = (),
) -> str:
    """Log a regression checkpoint as `python_model`, with the target's training statistics
    (the pyfunc answers in the target's units) and the data format's serving files."""
    return log_adapted_model(
        cfg.paths.processed,
        checkpoint,
        meta,
        run_id,
        python_model,
        extra_spec,
        hparam_fields=("target",),
        extra_requirements=extra_requirements,
    )


TASK = RegressorTask()
