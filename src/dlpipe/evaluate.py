"""Stage 5: test-split metrics of the best checkpoint, for `dvc metrics/plots` and the MLflow
run."""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from mlflow.entities import Metric
from omegaconf import DictConfig
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from dlpipe.preprocess import load_meta, load_split
from dlpipe.serving import load_checkpoint
from dlpipe.tracking import setup_mlflow, write_json

log = logging.getLogger(__name__)


@torch.inference_mode()
def predict_logits(net: torch.nn.Module, x: np.ndarray, batch_size: int = 2048) -> torch.Tensor:
    net.eval()
    device = next(net.parameters()).device
    inputs = torch.from_numpy(x)
    return torch.cat(
        [
            net(inputs[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(inputs), batch_size)
        ]
    )


def classification_report(
    logits: torch.Tensor, target: torch.Tensor, classes: Sequence[str]
) -> tuple[dict[str, float], dict[str, dict[str, float]], torch.Tensor]:
    """(summary metrics, per-class precision/recall/F1/support, confusion matrix [true, pred])."""
    k = len(classes)
    probs = logits.softmax(-1)
    summary = {
        "test/loss": F.cross_entropy(logits, target).item(),
        "test/acc": multiclass_accuracy(probs, target, k, average="micro").item(),
        "test/precision_macro": multiclass_precision(probs, target, k, average="macro").item(),
        "test/recall_macro": multiclass_recall(probs, target, k, average="macro").item(),
        "test/f1_macro": multiclass_f1_score(probs, target, k, average="macro").item(),
        "test/roc_auc_ovr_macro": multiclass_auroc(probs, target, k, average="macro").item(),
    }
    per_metric = {
        "precision": multiclass_precision(probs, target, k, average=None),
        "recall": multiclass_recall(probs, target, k, average=None),
        "f1": multiclass_f1_score(probs, target, k, average=None),
        "roc_auc": multiclass_auroc(probs, target, k, average=None),
    }
    support = torch.bincount(target, minlength=k)
    per_class = {
        name: {m: values[i].item() for m, values in per_metric.items()}
        | {"support": int(support[i])}
        for i, name in enumerate(classes)
    }
    return summary, per_class, multiclass_confusion_matrix(probs, target, k)


def plot_confusion(matrix: torch.Tensor, classes: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set(
        xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true"
    )
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    for (i, j), n in np.ndenumerate(matrix.numpy()):
        ax.text(
            j,
            i,
            str(n),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if n > matrix.max() / 2 else "black",
        )
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    run = json.loads((Path(cfg.paths.train) / "run.json").read_text())
    meta = load_meta(cfg.paths.processed)
    classes = meta["classes"]
    net, _ = load_checkpoint(Path(cfg.paths.train) / run["best_checkpoint"])
    x, y = load_split(cfg.paths.processed, "test")
    target = torch.from_numpy(y)
    logits = predict_logits(net, x)
    summary, per_class, matrix = classification_report(logits, target, classes)

    out = Path(cfg.paths.reports) / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", summary)
    write_json(out / "per_class.json", per_class)
    predicted = logits.argmax(-1)
    with open(
        out / "confusion.csv", "w", newline=""
    ) as f:  # rows for `dvc plots`' confusion template
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows(
            (classes[t], classes[p]) for t, p in zip(y.tolist(), predicted.tolist(), strict=True)
        )
    plot_confusion(matrix, classes, out / "confusion.png")

    setup_mlflow(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(
        run["run_id"], metrics=[Metric(k, v, now, run["epochs"]) for k, v in summary.items()]
    )
    for name in ("per_class.json", "confusion.png"):
        client.log_artifact(run["run_id"], str(out / name), artifact_path="evaluate")
    log.info("test: %s", ", ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return summary
