"""The Lightning callbacks of the one training path (`train.fit`): divergence, the per-epoch
history for `dvc plots`, and the record that lets a resumed training continue its MLflow run.
Each keeps what a resume needs in the checkpoint (`state_dict`)."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from dlpipe.data import write_json


class DivergedError(RuntimeError):
    """Training blew up (a non-finite loss, or one far above where it started): the run is
    stopped before it writes anything the next stages would take for a trained model."""


class FailOnDivergence(Callback):
    """Stops a diverged run with a message that says what to change. Checked once per epoch
    from the already-aggregated epoch losses, so the training loop itself never syncs; the one
    reference, the first batch's loss (what the untrained model scores), is read once.

    Diverged means non-finite, or train/val loss above `factor` times that first loss
    (train.divergence_factor): a run whose loss went 2.3 -> 1.8e6 is not learning, NaN or not.
    """

    def __init__(self, hint: str, factor: float | None):
        self.hint = hint  # what to change, from the task (`tasks.divergence_hint`)
        self.factor = factor
        self.reference: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.reference is None and isinstance(outputs, Mapping) and "loss" in outputs:
            self.reference = abs(float(outputs["loss"]))  # once per run: one host sync

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        for key in ("train/loss", "val/loss"):
            value = trainer.callback_metrics.get(key)
            if value is None:
                continue
            value = float(value)
            if not math.isfinite(value):
                raise DivergedError(
                    f"{key} became {value} in epoch {epoch}: training diverged. {self.hint}, "
                    "or check the data for NaN/inf values."
                )
            limit = None if self.factor is None or not self.reference else self.factor
            if limit is not None and value > limit * self.reference:
                raise DivergedError(
                    f"{key} reached {value:.4g} in epoch {epoch}, over {limit:g}x the "
                    f"{self.reference:.4g} it started at: training diverged. {self.hint} "
                    "(train.divergence_factor sets this limit; null turns it off)."
                )

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}  # a resumed run keeps its starting point

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")


class EpochHistory(Callback):
    """Per-epoch train/ and val/ metrics as rows, for `dvc plots` (MLflow gets the same values
    from the logger). The rows ride in the checkpoint, so a resumed run's history is whole."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch}
        keys = sorted(k for k in metrics if k.startswith(("train/", "val/")))
        self.rows.append(row | {k: round(float(metrics[k]), 6) for k in keys})

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for row in self.rows for k in row} - {"epoch"})
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch", *keys])
            writer.writeheader()
            writer.writerows(self.rows)


class RecordRun(Callback):
    """Writes the MLflow run id and `resume_identity` next to the checkpoints when fitting
    starts, so a resume continues that run and can check it is resuming the same setup."""

    def __init__(self, path: Path, identity: dict[str, Any]):
        self.path, self.identity = path, identity

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            write_json(self.path, {"run_id": trainer.logger.run_id, "identity": self.identity})
