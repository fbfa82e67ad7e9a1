"""Fraud detection on transactions (data format "transactions"): a binary classifier trained
with a class-weighted, focal or plain loss and shuffled or class-balanced batches, or an
autoencoder trained on legitimate rows only that scores by reconstruction error. Average
precision is the monitored metric; evaluation calibrates the scores and picks the decision
threshold of least expected cost on the validation period, then reports the test period at it,
beside logistic regression and gradient boosting fitted on the same rows."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sklearn
import torch
from omegaconf import DictConfig, OmegaConf

from dlpipe.data import load_split, write_json
from dlpipe.formats import format_module
from dlpipe.models import generative_models, load_checkpoint
from dlpipe.models.tabular import detector_score
from dlpipe.serving import log_pyfunc
from dlpipe.serving.fraud import FraudModel
from dlpipe.tasks import net_args
from dlpipe.tasks.fraud_metrics import (
    calibrated,
    confusion,
    cost_threshold,
    expected_cost,
    fit_baselines,
    fit_calibration,
    plot_calibration,
    plot_pr_curves,
    ranking_metrics,
)

if TYPE_CHECKING:  # type hints only: evaluate and register load no Lightning
    import lightning as L

log = logging.getLogger(__name__)

LOSSES = ("bce", "weighted", "focal")
SAMPLINGS = ("shuffle", "balanced")


def check_task(task: Mapping[str, Any], model: str) -> None:
    """ValueError naming the key and the allowed values for a bad task.* setting."""
    if task["loss"] not in LOSSES:
        raise ValueError(f"task.loss={task['loss']!r}: choose one of {list(LOSSES)}")
    if task["sampling"] not in SAMPLINGS:
        raise ValueError(f"task.sampling={task['sampling']!r}: choose one of {list(SAMPLINGS)}")
    for key in ("false_negative", "false_positive"):
        value = task["cost"][key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"task.cost.{key}={value!r} must be a positive cost, e.g. 5")
    pos_weight = task["pos_weight"]
    if pos_weight is not None and (
        isinstance(pos_weight, bool) or not isinstance(pos_weight, int | float) or pos_weight <= 0
    ):
        raise ValueError(f"task.pos_weight={pos_weight!r}: null (negatives / positives) or > 0")
    if model in generative_models() and model != "mlp_autoencoder":
        raise ValueError(
            f"model={model} does not read table rows: task=fraud trains a predictor (e.g. "
            "model=mlp, model=ft_transformer) or model=mlp_autoencoder"
        )


def scores_of(net: torch.nn.Module, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Fraud scores (N,) float64 of processed rows x (N, F), on the CPU."""
    net.eval()
    with torch.inference_mode():
        parts = [detector_score(net, torch.from_numpy(x[i : i + batch_size])) for i in
                 range(0, len(x), batch_size)]  # fmt: skip
    return torch.cat(parts).double().numpy()


def decision_rule(processed: Path, net: torch.nn.Module, cost: Mapping[str, float]) -> dict:
    """The calibration (a, b) and cost threshold fitted on the validation period."""
    x, y = load_split(processed, "val")
    scores = scores_of(net, x)
    calibration = fit_calibration(scores, y)
    threshold = cost_threshold(calibrated(scores, calibration), y, cost)
    return {"calibration": list(calibration), "threshold": threshold}


class FraudTask:
    # The Lightning side is imported where training asks for it (module(), datamodule()), so
    # evaluate and register load no Lightning (dlpipe.modules).
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        from dlpipe.modules.fraud import FraudDataModule

        reconstructs = cfg.model.name in generative_models()
        return FraudDataModule(
            cfg.paths.processed, cfg.train.batch_size, cfg.seed, cfg.task.sampling, reconstructs
        )

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        from dlpipe.modules.fraud import FraudDetector

        task = OmegaConf.to_container(cfg.task, resolve=True)
        check_task(task, cfg.model.name)
        if meta.get("format") != "transactions":
            raise ValueError(
                f"task=fraud reads data.format=transactions (e.g. data=creditcard_fraud), not "
                f"data={meta['name']} ({meta.get('format')})"
            )
        negatives = meta["sizes"]["train"] - meta["positives"]["train"]
        pos_weight = task["pos_weight"] or negatives / meta["positives"]["train"]
        if cfg.model.name in generative_models():
            net = {"input_shape": list(meta["input_shape"])}
        else:
            net = net_args(meta, num_classes=1)
        return FraudDetector(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            net=net,
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            loss=task["loss"],
            pos_weight=float(pos_weight),
            focal_gamma=task["focal_gamma"],
            focal_alpha=task["focal_alpha"],
            compile=cfg.train.compile,
        )

    def evaluate(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], out: Path
    ) -> dict[str, float]:
        processed, cost = Path(cfg.paths.processed), cfg.task.cost
        net, _ = load_checkpoint(checkpoint)
        rule = decision_rule(processed, net, cost)
        x, y = load_split(processed, "test")
        scores = scores_of(net, x)
        probs = calibrated(scores, rule["calibration"])
        summary = {f"test/{k}": v for k, v in ranking_metrics(scores, y).items()}
        at = expected_cost(probs, y, rule["threshold"], cost)
        nothing = expected_cost(probs, y, np.inf, cost)["cost"]
        summary |= {
            "test/threshold": rule["threshold"],
            "test/cost": at["cost"],
            "test/cost_flag_nothing": nothing,
            "test/cost_saved": nothing - at["cost"],
            "test/precision_at_threshold": at["tp"] / max(at["tp"] + at["fp"], 1),
            "test/recall_at_threshold": at["tp"] / max(at["tp"] + at["fn"], 1),
        }
        rows = {"model": summary_row(summary, "test/")}
        curves = {cfg.model.name: (scores, y)}
        best_val = _baselines(processed, cfg, cost, rows, curves)
        summary |= {f"baseline/{k}": v for k, v in rows[best_val].items() if k != "fit_s"}
        write_comparison(out / "comparison.csv", rows)
        matrix = confusion(probs, y, rule["threshold"])
        write_json(
            out / "decision.json",
            rule | {"confusion_test": matrix.tolist(), "labels": meta["classes"],
                    "baseline_chosen_on_val": best_val, "cost": dict(cost)},
        )  # fmt: skip
        plot_pr_curves(curves, out / "pr_curve.png")
        plot_calibration(probs, y, out / "calibration.png")
        return summary

    def log_model(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], run_id: str
    ) -> str:
        processed = Path(cfg.paths.processed)
        net, hparams = load_checkpoint(checkpoint)
        rule = decision_rule(processed, net, cfg.task.cost)
        fmt = format_module(meta["format"])
        spec = {
            "model": hparams["model"],
            "net": hparams["net"],
            **rule,
            "classes": meta["classes"],
            "format": meta["format"],
            "input": fmt.INPUT_DOC,
        }
        return log_pyfunc(
            run_id,
            FraudModel,
            spec,
            net.state_dict(),
            fmt.example_input(processed),
            files=fmt.serving_files(processed),
            params={"threshold": rule["threshold"]},
            extra_requirements=(f"scikit-learn=={sklearn.__version__}",),
            input_doc=fmt.INPUT_DOC,
        )


def _baselines(processed: Path, cfg: DictConfig, cost, rows: dict, curves: dict) -> str:
    """Fit the baselines on the training rows, calibrate and threshold each on validation as
    the network is, add their test rows and curves to `rows` and `curves`; returns the name of
    the one with the best validation AP (its figures are the `baseline/...` metrics)."""
    fitted = fit_baselines(load_split(processed, "train"), cfg.seed)
    (x_val, y_val), (x, y) = load_split(processed, "val"), load_split(processed, "test")
    val_ap = {}
    for name, (model, seconds) in fitted.items():
        val_scores, scores = (model.decision_function(v) if hasattr(model, "decision_function")
                              else model.predict_proba(v)[:, 1] for v in (x_val, x))  # fmt: skip
        val_ap[name] = ranking_metrics(val_scores, y_val)["ap"]
        calibration = fit_calibration(val_scores, y_val)
        threshold = cost_threshold(calibrated(val_scores, calibration), y_val, cost)
        probs = calibrated(scores, calibration)
        at = expected_cost(probs, y, threshold, cost)
        rows[name] = ranking_metrics(scores, y) | {
            "threshold": threshold,
            "cost": at["cost"],
            "cost_flag_nothing": expected_cost(probs, y, np.inf, cost)["cost"],
            "fit_s": seconds,
        }
        curves[name] = (scores, y)
    return max(val_ap, key=val_ap.get)


def summary_row(summary: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): v for k, v in summary.items() if k.startswith(prefix)}


def write_comparison(path: Path, rows: Mapping[str, Mapping[str, float]]) -> None:
    """One row per predictor (the network, each baseline), one column per metric."""
    metrics = sorted({m for row in rows.values() for m in row})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["predictor", *metrics])
        writer.writerows([name, *(row.get(m, "") for m in metrics)] for name, row in rows.items())


TASK = FraudTask()
