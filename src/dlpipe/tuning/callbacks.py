"""What a trial's Lightning run reports to its study: the best score and the epochs it ran
(`TrialRecord`), prune decisions that hold for every DDP rank (`DDPPruning`), and a wall-clock
cap (`TrialTimeout`). Under DDP each rank is a spawned process, so rank zero writes what the
worker needs into the trial's system attributes in the storage, and the worker reads it back."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback
from optuna.storages import InMemoryStorage
from optuna.storages._cached_storage import _CachedStorage  # Optuna's RDB cache (no public name)
from optuna_integration import PyTorchLightningPruningCallback
from optuna_integration.pytorch_lightning.pytorch_lightning import _INTERMEDIATE_VALUE

# A trial system attr: {"best": float | None, "epochs": int, "timed_out": bool}
RECORD = "dlpipe:record"


def backend(trial: optuna.Trial) -> optuna.storages.BaseStorage:
    """The storage under Optuna's per-process cache: what another process wrote is there."""
    storage = trial.study._storage
    return storage._backend if isinstance(storage, _CachedStorage) else storage


class TrialRecord(Callback):
    """Best value of `monitor` over a trial's epochs (what the study optimizes) and the epochs
    it ran, written by rank zero into the trial (`read_record` gets it in the worker)."""

    def __init__(self, trial: optuna.Trial, monitor: str, maximize: bool):
        self.trial, self.monitor, self.maximize = trial, monitor, maximize
        self.best: float | None = None
        self.epochs = 0
        self.timed_out = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        score = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or score is None:
            return
        score = float(score)
        self.epochs = trainer.current_epoch + 1
        if self.best is None or (score > self.best if self.maximize else score < self.best):
            self.best = score

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            record = {"best": self.best, "epochs": self.epochs, "timed_out": self.timed_out}
            backend(self.trial).set_trial_system_attr(self.trial._trial_id, RECORD, record)


def read_record(trial: optuna.Trial) -> dict[str, Any]:
    """What `TrialRecord` wrote for `trial` (in this process or a DDP rank); {} if nothing."""
    return backend(trial).get_trial_system_attrs(trial._trial_id).get(RECORD, {})


class DDPPruning(PyTorchLightningPruningCallback):
    """optuna-integration's pruning callback, with the piece it lacks for this pool: under DDP
    it accepts any storage other processes can reach (a journal file as well as RDB), and
    `check_pruned` reads the decision rank zero broadcast from that storage. The library does
    the rest: rank zero reports and decides, every rank gets the decision by broadcast and
    stops at the same epoch, so no rank hangs in a collective the others left."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.is_ddp_backend = trainer._accelerator_connector.is_distributed
        if not self.is_ddp_backend:
            return
        if isinstance(backend(self._trial), InMemoryStorage):
            raise ValueError(
                "a DDP trial needs a storage its rank processes can reach: set tune.storage to "
                "a journal file (study.log) or an RDB URL"
            )
        if trainer.is_global_zero:
            backend(self._trial).set_trial_system_attr(
                self._trial._trial_id, _INTERMEDIATE_VALUE, {}
            )

    def check_pruned(self) -> None:
        """Raise optuna.TrialPruned in the worker when the DDP ranks pruned the trial (and copy
        their reported values into it); a no-op for a single-process trial."""
        attrs = backend(self._trial).get_trial_system_attrs(self._trial._trial_id)
        values = attrs.get(_INTERMEDIATE_VALUE)
        if values is None:
            return
        reported = self._trial.study._storage.get_trial(self._trial._trial_id)
        for epoch, score in values.items():
            if int(epoch) not in reported.intermediate_values:
                self._trial.report(score, step=int(epoch))
        if attrs.get("ddp_pl:pruned"):
            raise optuna.TrialPruned(f"Trial was pruned at epoch {attrs.get('ddp_pl:epoch')}.")


class TrialTimeout(Callback):
    """Stop a trial after `limit_s` seconds of training (tune.trial_timeout_s): it keeps the
    best epoch it validated; rank zero's clock decides for every DDP rank."""

    def __init__(self, limit_s: float, record: TrialRecord):
        self.limit_s, self.record = limit_s, record
        self.start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        over = time.monotonic() - self.start > self.limit_s
        over = trainer.strategy.broadcast(over)  # rank zero's clock, for every rank
        if over:
            trainer.should_stop = True
            self.record.timed_out = True
