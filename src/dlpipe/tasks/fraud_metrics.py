"""What task=fraud measures and decides: ranking metrics of fraud scores (average precision,
ROC-AUC, recall at a fixed precision; torchmetrics), the probability calibration fitted on the
validation period, the decision threshold of least expected cost there, the cost of a threshold
against flagging nothing, the classical baselines and the report plots."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_confusion_matrix,
    binary_precision_recall_curve,
    binary_recall_at_fixed_precision,
)

from dlpipe.plots import saved_figure

PRECISIONS = (0.9, 0.8)  # recall is reported at precision >= each
CALIBRATION_EDGES = (0.0, 1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 0.6, 1.0 + 1e-9)  # probability bins


def ranking_metrics(scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """AP (area under precision-recall, step-wise), ROC-AUC and recall at precision >= 0.9
    and 0.8 (keys ap, roc_auc, recall_at_p90, recall_at_p80) of scores (N,) (any monotone
    scale: logits, log errors, probabilities) against labels y (N,) in {0, 1}."""
    # Ranks, not values, decide every metric here: the sigmoid torchmetrics applies to scores
    # outside [0, 1] would squash large logits to ties in float32, so rank them first.
    ranks = torch.from_numpy(_ranks(scores))
    target = torch.from_numpy(np.asarray(y, np.int64))
    out = {
        "ap": binary_average_precision(ranks, target).item(),
        "roc_auc": binary_auroc(ranks, target).item(),
    }
    for p in PRECISIONS:
        recall, _ = binary_recall_at_fixed_precision(ranks, target, min_precision=p)
        out[f"recall_at_p{round(p * 100)}"] = recall.item()
    return out


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Scores mapped to (0, 1] keeping their order and ties (the dense rank / count)."""
    _, dense = np.unique(np.asarray(scores, np.float64), return_inverse=True)
    return ((dense + 1) / (dense.max() + 1)).astype(np.float32)


def fit_calibration(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling (Platt 1999): (a, b) of P(fraud | s) = sigmoid(a * s + b), a logistic
    regression of the validation labels on the scores. Class-weighted or focal training and
    reconstruction errors all give scores that are not probabilities; this makes them so."""
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(np.asarray(scores)[:, None], y)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def calibrated(scores: np.ndarray, calibration: tuple[float, float]) -> np.ndarray:
    a, b = calibration
    return 1.0 / (1.0 + np.exp(-(a * np.asarray(scores, np.float64) + b)))


def expected_cost(
    probs: np.ndarray, y: np.ndarray, threshold: float, cost: Mapping[str, float]
) -> dict[str, float]:
    """Counts and cost of flagging the rows with probability >= `threshold`: each missed fraud
    costs cost["false_negative"], each flagged legitimate row cost["false_positive"]."""
    flagged = np.asarray(probs) >= threshold
    y = np.asarray(y).astype(bool)
    tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
    fn, tn = int((~flagged & y).sum()), int((~flagged & ~y).sum())
    total = fn * cost["false_negative"] + fp * cost["false_positive"]
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "cost": float(total)}


def cost_threshold(probs: np.ndarray, y: np.ndarray, cost: Mapping[str, float]) -> float:
    """The threshold of least expected cost on (validation) probabilities: each distinct
    probability is a candidate (flag it and everything above), plus 1.0 + eps (flag nothing);
    ties in cost go to the higher threshold (fewer reviews)."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y).astype(bool)
    order = np.argsort(-probs, kind="stable")
    sorted_probs, sorted_y = probs[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(sorted_probs)), len(probs) - 1]  # end of each tie group
    tp = np.cumsum(sorted_y)[last]
    fp = (last + 1) - tp
    costs = (y.sum() - tp) * cost["false_negative"] + fp * cost["false_positive"]
    nothing = y.sum() * cost["false_negative"]
    best = int(np.argmin(costs))
    if nothing <= costs[best]:
        return float(np.nextafter(1.0, 2.0))  # flagging nothing is cheapest
    return float(sorted_probs[last[best]])


def fit_baselines(
    train: tuple[np.ndarray, np.ndarray], seed: int
) -> dict[str, tuple[object, float]]:
    """{name: (fitted model, seconds to fit)} of the classical baselines on the training rows:
    logistic regression and histogram gradient boosting (scikit-learn defaults, seeded)."""
    x, y = train
    models = {
        "logistic_regression": LogisticRegression(max_iter=2000),
        "gradient_boosting": HistGradientBoostingClassifier(random_state=seed),
    }
    fitted = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        model.fit(x, y)
        fitted[name] = (model, time.perf_counter() - t0)
    return fitted


def plot_pr_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Precision-recall curves of several predictors on the test split: {name: (scores, y)}."""
    with saved_figure(path, figsize=(6, 5)) as (_, ax):
        for name, (scores, y) in curves.items():
            precision, recall, _ = binary_precision_recall_curve(
                torch.from_numpy(_ranks(scores)), torch.from_numpy(np.asarray(y, np.int64))
            )
            ax.plot(recall.numpy(), precision.numpy(), label=name)
        for p in PRECISIONS:
            ax.axhline(p, color="gray", linewidth=0.5, linestyle=":")
        ax.set(xlabel="recall", ylabel="precision", title="test split", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(loc="lower left")


def calibration_bins(
    probs: np.ndarray, y: np.ndarray, edges: tuple[float, ...] = CALIBRATION_EDGES
) -> list[tuple[float, float, int]]:
    """(mean predicted probability, observed fraud rate, rows) per non-empty bin of
    probabilities between consecutive `edges`. Log-spaced bins: with 0.17% frauds nearly every
    row sits near 0, so uniform or quantile bins (sklearn's calibration_curve) say nothing
    about the flagged tail."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y, np.float64)
    which = np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, len(edges) - 2)
    return [
        (float(probs[which == b].mean()), float(y[which == b].mean()), int((which == b).sum()))
        for b in range(len(edges) - 1)
        if (which == b).any()
    ]


def plot_calibration(probs: np.ndarray, y: np.ndarray, path: Path) -> None:
    """Reliability diagram of test probabilities on log axes, each bin labelled with its rows."""
    bins = calibration_bins(probs, y)
    with saved_figure(path, figsize=(6, 5)) as (_, ax):
        ax.plot([1e-5, 1], [1e-5, 1], color="black", linewidth=1, label="perfect")
        pred, true, rows = zip(*bins, strict=True)
        # An observed rate of 0 has no log: drawn at the axis floor.
        ax.plot(pred, np.maximum(true, 1e-5), marker="o", label="model")
        for p, t, n in bins:
            ax.annotate(str(n), (p, max(t, 1e-5)), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)  # fmt: skip
        ax.set(xlabel="mean predicted probability", ylabel="observed fraud rate",
               title="calibration, test split (rows per bin)", xscale="log", yscale="log",
               xlim=(1e-5, 1.2), ylim=(1e-5, 1.2))  # fmt: skip
        ax.legend(loc="upper left")


def confusion(probs: np.ndarray, y: np.ndarray, threshold: float) -> torch.Tensor:
    """2x2 counts [actual, predicted] (0 = legit, 1 = fraud) at `threshold`."""
    flagged = torch.from_numpy((np.asarray(probs) >= threshold).astype(np.int64))
    return binary_confusion_matrix(flagged, torch.from_numpy(np.asarray(y, np.int64)))
