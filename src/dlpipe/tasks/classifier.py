"""Classification of images, spectrograms, token sequences or table rows: cross-entropy and
accuracy in training; accuracy, macro P/R/F1, ROC-AUC and a confusion matrix on the test split."""

from __future__ import annotations

import csv
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from dlpipe.baselines import chance_probs, classification_baseline, renamed
from dlpipe.data import load_split, write_json
from dlpipe.models import load_checkpoint, predict
from dlpipe.plots import saved_figure
from dlpipe.serving import log_adapted_model
from dlpipe.serving.classifier import ClassifierModel
from dlpipe.tasks import ExportTarget, net_args

if TYPE_CHECKING:  # type hints only
    import lightning as L

log = logging.getLogger(__name__)


def classification_report(
    logits: torch.Tensor, target: torch.Tensor, classes: Sequence[str]
) -> tuple[dict[str, float], dict[str, dict[str, float | None]], torch.Tensor]:
    """(summary metrics, per-class precision/recall/F1/ROC-AUC/support, confusion matrix
    [true, pred]) of logits (N, K) against int64 targets (N,).

    A class with no test samples has no recall or ROC-AUC (and a precision that only says it
    was predicted wrongly): its per-class metrics are null and the macro averages are over the
    classes the test split holds, with a warning naming the others."""
    k = len(classes)
    probs = logits.softmax(-1)
    support = torch.bincount(target, minlength=k)
    present = support > 0
    absent = [c for c, p in zip(classes, present.tolist(), strict=True) if not p]
    if absent:
        log.warning(
            "class(es) %s have no test samples: null in per_class.json and left out of the "
            "macro averages (over %d of %d classes)",
            absent,
            int(present.sum()),
            k,
        )
    with warnings.catch_warnings():
        # torchmetrics warns about the classes without positives, which we leave out below.
        warnings.filterwarnings("ignore", ".*(no positive samples|positive samples).*")
        per_metric = {
            "precision": multiclass_precision(probs, target, k, average=None),
            "recall": multiclass_recall(probs, target, k, average=None),
            "f1": multiclass_f1_score(probs, target, k, average=None),
            "roc_auc": multiclass_auroc(probs, target, k, average=None),
        }
    summary = {
        "test/loss": F.cross_entropy(logits, target).item(),
        "test/acc": multiclass_accuracy(probs, target, k, average="micro").item(),
    } | {
        f"test/{name}_macro": values[present].mean().item()
        for name, values in per_metric.items()
        if name != "roc_auc"
    }
    summary["test/roc_auc_ovr_macro"] = per_metric["roc_auc"][present].mean().item()
    per_class = {
        name: {m: values[i].item() if present[i] else None for m, values in per_metric.items()}
        | {"support": int(support[i])}
        for i, name in enumerate(classes)
    }
    return summary, per_class, multiclass_confusion_matrix(probs, target, k)


def plot_confusion(matrix: torch.Tensor, classes: Sequence[str], path: Path) -> None:
    with saved_figure(path, figsize=(8, 7)) as (fig, ax):
        image = ax.imshow(matrix.numpy(), cmap="Blues")
        ticks = range(len(classes))
        ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true")
        ax.set_xticklabels(classes, rotation=45, ha="right")
        ax.set_yticklabels(classes)
        for (i, j), n in np.ndenumerate(matrix.numpy()):
            color = "white" if n > matrix.max() / 2 else "black"
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color=color)
        fig.colorbar(image)


def write_confusion_rows(
    path: Path, classes: Sequence[str], target: np.ndarray, predicted: np.ndarray
) -> None:
    """One (actual, predicted) row per test sample, for `dvc plots`' confusion template."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows(
            (classes[t], classes[p])
            for t, p in zip(target.tolist(), predicted.tolist(), strict=True)
        )


def baseline_report(
    processed: Path, meta: dict[str, Any], y: np.ndarray, out: Path
) -> dict[str, float]:
    """The test metrics of the classical baseline (`baseline/...`, see dlpipe.baselines) and of
    chance, the training class frequencies for every input (`chance/...`); the baseline's name,
    fit time and val scores go to `out`/baseline.json."""
    classes = meta["classes"]
    fitted = classification_baseline(processed, meta["input_kind"], len(classes))
    write_json(out / "baseline.json", fitted.info())
    train_y = load_split(processed, "train")[1]
    target, metrics = torch.from_numpy(y), {}
    for prefix, probs in (
        ("baseline", fitted.test),
        ("chance", chance_probs(train_y, len(classes), len(y))),
    ):
        logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, None))).float()
        metrics |= renamed(classification_report(logits, target, classes)[0], prefix)
    log.info("baseline: %s (%.1f s to fit)", fitted.name, fitted.fit_seconds)
    return metrics


class ClassifierTask:
    # The Lightning side is imported where training asks for it, so that evaluate and register,
    # which use only the methods below these two, load no Lightning (dlpipe.modules).
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        from dlpipe.datamodule import make_datamodule

        return make_datamodule(cfg, meta)

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        from dlpipe.modules.classifier import Classifier

        if "classes" not in meta:
            raise ValueError(
                f"data={meta['name']} has no classes (its target is a number): use task=regressor"
            )
        return Classifier(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            net=net_args(meta),
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            label_smoothing=cfg.task.label_smoothing,
            compile=cfg.train.compile,
        )

    def evaluate(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], out: Path
    ) -> dict[str, float]:
        classes = meta["classes"]
        net, _ = load_checkpoint(checkpoint)
        x, y = load_split(cfg.paths.processed, "test")
        logits = predict(net, x)
        summary, per_class, matrix = classification_report(logits, torch.from_numpy(y), classes)
        write_json(out / "per_class.json", per_class)
        write_confusion_rows(out / "confusion.csv", classes, y, logits.argmax(-1).numpy())
        plot_confusion(matrix, classes, out / "confusion.png")
        return summary | baseline_report(Path(cfg.paths.processed), meta, y, out)

    def log_model(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], run_id: str
    ) -> str:
        fields = {"classes": list(meta["classes"])}
        return log_adapted_model(
            cfg.paths.processed, checkpoint, meta, run_id, ClassifierModel, fields
        )

    def export_targets(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any]
    ) -> list[ExportTarget]:
        """The network (raw batch -> logits) on the test inputs: logits within 1e-3, the same
        class on 99.9 % of them (dlpipe.export)."""
        net, _ = load_checkpoint(checkpoint)
        x, _ = load_split(cfg.paths.processed, "test")
        return [ExportTarget("net", net, torch.from_numpy(x), max_abs_error=1e-3, argmax=True)]


TASK = ClassifierTask()
