"""The Lightning callbacks of the one training path (`train.fit`): divergence, the per-epoch
history for `dvc plots`, the record that lets a resumed training continue its MLflow run,
throughput and system metrics, and the MLflow logger that outlives its tracking server.
Each keeps what a resume needs in the checkpoint (`state_dict`)."""

from __future__ import annotations

import csv
import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.data import extract_batch_size

from dlpipe.data import write_json
from dlpipe.errors import UserError
from dlpipe.tracking import server_down

log = logging.getLogger(__name__)


class DivergedError(UserError, RuntimeError):
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


class EpochLine(Callback):
    """One log line per epoch with its train/ and val/ metrics: what a log file gets instead
    of a progress bar."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        shown = ", ".join(
            f"{k}={float(metrics[k]):.4g}"
            for k in sorted(metrics)
            if k.startswith(("train/", "val/"))
        )
        log.info("epoch %d/%d: %s", trainer.current_epoch + 1, trainer.max_epochs, shown)


class RecordRun(Callback):
    """Writes the MLflow run id and `resume_identity` next to the checkpoints when fitting
    starts, so a resume continues that run and can check it is resuming the same setup."""

    def __init__(self, path: Path, identity: dict[str, Any]):
        self.path, self.identity = path, identity

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            write_json(self.path, {"run_id": trainer.logger.run_id, "identity": self.identity})


class ServerLogger(MLFlowLogger):
    """An MLFlowLogger that batches its metrics and outlives its tracking server.

    Batching: `log_metrics` only queues; `flush` sends the queue in one `log_batch` request
    (MLflow takes up to 1,000 metrics a request). `StopWhenServerLost` flushes at the end of
    every training epoch, `log_metrics` when the queue is older than `flush_s` seconds (so a long
    epoch still shows its progress), and `finalize` before the run is closed. One request per
    epoch instead of one per logging call (validation, epoch aggregates, learning rate, ...):
    about 10 ms each on the SQLite store, which is what a tiny model's epoch costs.

    Server loss: a flush that fails after MLflow's (bounded: `tracking.bound_http_retries`)
    retries while the server's /health does not answer marks the server lost: those and later
    metrics are kept in `unsent` instead of sent, and the run is left RUNNING for
    `train.resume=true` to continue; `StopWhenServerLost` ends the training after that epoch's
    checkpoint. Any other failure is raised as before."""

    BATCH = 1000  # metrics per log_batch request: MLflow's limit

    def __init__(self, *args, flush_s: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.flush_s = flush_s
        self.lost: str | None = None  # why the server stopped answering
        self.unsent: list[dict[str, Any]] = []  # [{"step": 3, "metrics": {"val/loss": 0.4}}]
        self._queue: list[tuple[dict[str, float], int, int]] = []  # (metrics, step, time ms)
        self._queued_at = 0.0

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._queue:
            self._queued_at = time.monotonic()
        values = {k: float(v) for k, v in metrics.items() if not isinstance(v, str)}
        self._queue.append((values, step or 0, int(time.time() * 1000)))
        if time.monotonic() - self._queued_at >= self.flush_s:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Send the queued metrics (one request per 1,000); on a lost server, keep them in
        `unsent`. Raises what MLflow raises for a failure that is not a lost server."""
        queue, self._queue = self._queue, []
        if not queue:
            return
        from mlflow.entities import Metric

        metrics = [
            Metric(key=_metric_key(self._prefix, k), value=v, timestamp=ms, step=step)
            for values, step, ms in queue
            for k, v in values.items()
        ]
        start = 0
        if self.lost is None:
            try:
                for start in range(0, len(metrics), self.BATCH):
                    batch = metrics[start : start + self.BATCH]
                    self.experiment.log_batch(self.run_id, metrics=batch, **self._log_batch_kwargs)
                return
            except Exception as err:  # MlflowException, or a connection error under it
                self.lost = server_down(self._tracking_uri)
                if self.lost is None:
                    raise
                log.warning(
                    "MLflow tracking server %s stopped answering (%s; %s): training stops after "
                    "this epoch's checkpoint, metrics are kept for the resumed run",
                    self._tracking_uri, self.lost, type(err).__name__,
                )  # fmt: skip
        self.unsent += [{"step": m.step, "metrics": {m.key: m.value}} for m in metrics[start:]]

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self.flush()
        if self.lost is None:  # a lost server's run stays RUNNING, to be resumed
            super().finalize(status)


def _metric_key(prefix: str, key: str) -> str:
    """MLFlowLogger's naming: `prefix-key`, with characters MLflow refuses dropped."""
    key = f"{prefix}{MLFlowLogger.LOGGER_JOIN_CHAR}{key}" if prefix else key
    return re.sub("[^a-zA-Z0-9_/. -]+", "", key)


class StopWhenServerLost(Callback):
    """Sends the epoch's queued metrics (`ServerLogger.flush`) and ends training at the end of
    the epoch in which the tracking server went away; the epoch is checkpointed first
    (ModelCheckpoint, a monitoring callback, runs after this one). All ranks agree, so DDP ranks
    stop together."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flush = getattr(trainer.logger, "flush", None)
        if flush is not None:
            flush()
        lost = getattr(trainer.logger, "lost", None) is not None
        if trainer.strategy.reduce_boolean_decision(lost, all=False):
            trainer.should_stop = True


class Throughput(Callback):
    """`perf/samples_per_s` (training samples of all ranks per second of the epoch's training
    batches, validation excluded) and, on CUDA, `perf/peak_memory_mb` (the epoch's peak of
    `torch.cuda.max_memory_allocated`, MiB) per epoch, logged with the epoch's other metrics.
    Counts batch sizes as they pass (no host sync); the clock is read at the epoch's start and
    when its validation starts (or its end)."""

    def __init__(self):
        self.samples, self.start, self.stop = 0, 0.0, None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.samples, self.start, self.stop = 0, time.perf_counter(), None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += extract_batch_size(batch)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self.stop is None:
            self.stop = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = (self.stop or time.perf_counter()) - self.start
        metrics = {"perf/samples_per_s": self.samples * trainer.world_size / max(seconds, 1e-9)}
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            metrics["perf/peak_memory_mb"] = peak
        pl_module.log_dict(metrics, rank_zero_only=True)


class SystemMetrics(Callback):
    """MLflow's system metrics (`system/cpu_utilization_percentage`, memory, disk, network and,
    with pynvml and an NVIDIA GPU, `system/gpu_*`) for the run, sampled every `interval_s` s
    by MLflow's own monitor thread on rank zero; a resumed run continues their steps. The
    samples taken since the last logged step are logged when fit ends, so a fit shorter than
    one interval still records one step (MLflow's monitor alone would drop them)."""

    def __init__(self, interval_s: float, uri: str, resumed: bool):
        self.interval_s, self.uri, self.resumed, self.monitor = interval_s, uri, resumed, None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # Its start/stop/"Skip logging GPU metrics" lines, four per run; its warnings still show.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self.monitor = _final_step_monitor()(
            trainer.logger.run_id,
            sampling_interval=self.interval_s,
            resume_logging=self.resumed,
            tracking_uri=self.uri,
        )
        self.monitor.start()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, err) -> None:
        self._finish(trainer)

    def _finish(self, trainer: L.Trainer) -> None:
        if self.monitor is None:
            return
        # With the server lost there is nothing to flush to: the monitor's thread (a daemon)
        # ends at its next failed request instead.
        if getattr(trainer.logger, "lost", None) is None:
            self.monitor.finish()  # stops the thread, flushes the last samples
        self.monitor = None


def _final_step_monitor() -> type:
    """MLflow's `SystemMetricsMonitor` whose `finish` also logs the samples its thread took
    after its last logged step (it publishes only after a full interval without a stop)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class FinalStepMonitor(SystemMetricsMonitor):
        def finish(self) -> None:
            if self._process is not None:
                self._shutdown_event.set()
                self._process.join()
                if any(monitor.metrics for monitor in self.monitors):
                    self.collect_metrics()
                    self.publish_metrics(self.aggregate_metrics())
            super().finish()  # flushes what is queued

    return FinalStepMonitor
