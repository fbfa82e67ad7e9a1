"""Stage 4: Lightning training. `fit` is the one training path; tuning trials call it too."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from dlpipe.callbacks import (
    EpochHistory,
    EpochLine,
    FailOnDivergence,
    RecordRun,
    ServerLogger,
    StopWhenServerLost,
    SystemMetrics,
    Throughput,
)
from dlpipe.data import load_meta, write_json
from dlpipe.plots import history_curves
from dlpipe.run_labels import log_splits, name_run
from dlpipe.schema import ConfigError, check_config
from dlpipe.tasks import divergence_hint, get_task
from dlpipe.tracking import (
    TrackingServerError,
    artifact_location,
    bound_http_retries,
    check_reachable,
    check_store_location,
    flatten,
    provenance_tags,
    tracking_uri,
)

log = logging.getLogger(__name__)

# Lightning's start-up lines that nobody acts on (which accelerators exist, an advertisement for
# its cloud logger, a step estimate); its warnings and its other lines still show.
LIGHTNING_CHATTER = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "💡 Tip:",
    "Loading `train_dataloader` to estimate",
)


def _not_chatter(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(LIGHTNING_CHATTER)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def with_overrides(cfg: DictConfig, overrides: Mapping[str, Any]) -> DictConfig:
    """A copy of `cfg` with dotted keys set, e.g. {"optim.lr": 1e-3}; unknown keys are errors."""
    cfg = cfg.copy()
    for key, value in overrides.items():
        if not _has_key(cfg, key):
            raise ConfigError(f"override {key!r} names no config key; check the spelling")
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    node = OmegaConf.select(cfg, ".".join(parents)) if parents else cfg
    return isinstance(node, DictConfig) and leaf in node


def tuned_params(tune_dir: str | Path, cfg: DictConfig | None = None) -> dict[str, Any]:
    """The tune stage's best parameters ({} if it has not run). With `cfg`, ConfigError when
    they were tuned for another data, model or task (a stage run alone after another
    experiment's tuning), naming both and the fix."""
    path = Path(tune_dir) / "best_params.yaml"
    if not path.exists():
        return {}
    study = Path(tune_dir) / "study.json"
    if cfg is not None and study.exists():
        tuned_for = json.loads(study.read_text()).get("tuned_for")
        now = {"data": cfg.data.name, "model": cfg.model.name, "task": cfg.task.name}
        if tuned_for is not None and tuned_for != now:
            raise ConfigError(
                f"{path} was tuned for {tuned_for}, not {now}: run the tune stage for this "
                "config first (dvc repro does), or train without it: train.use_tuned=false"
            )
    return yaml.safe_load(path.read_text())


def fit(
    cfg: DictConfig,
    *,
    run_name: str,
    max_epochs: int | None = None,
    callbacks: Iterable[Callback] = (),
    tags: Mapping[str, str] | None = None,
    ckpt_dir: Path | None = None,
    ckpt_path: Path | None = None,
    run_id: str | None = None,
    named: bool = False,
) -> tuple[L.Trainer, MLFlowLogger]:
    """Train the configured model on the processed data, logging to a new MLflow run
    `run_name`, or continuing the run `run_id` (a resumed training). `named`: a new run is
    named `run_labels.run_title` (`<run_name> <model> <data> <short id>`), not `run_name`."""
    L.seed_everything(cfg.seed, workers=True)
    task = get_task(cfg.task.name)
    meta = load_meta(cfg.paths.processed)
    data = task.datamodule(cfg, meta)
    module = task.module(cfg, meta)
    monitor, mode = cfg.task.monitor, "max" if cfg.task.direction == "maximize" else "min"
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    check_reachable(uri)
    check_store_location(uri)
    bound_http_retries(uri)
    logger = ServerLogger(
        experiment_name=cfg.mlflow.experiment,
        artifact_location=artifact_location(uri, cfg.mlflow.experiment),
        run_name=run_name,
        tracking_uri=uri,
        tags={**provenance_tags(meta), **(tags or {})},
        run_id=run_id,
    )
    if run_id is None:
        # Rank-zero only (like every logger call): records the run's full resolved config.
        # A continued run has it already (MLflow params are write-once).
        logger.log_hyperparams(
            {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith("search.")}
        )
        if rank_zero_only.rank == 0:  # the splits it sees: the runs table's Dataset column
            client = logger.experiment
            log_splits(client, logger.run_id, meta, cfg.paths.processed, ("train", "val"))
            if named:
                name_run(client, logger.run_id, run_name, cfg.model.name, cfg.data.name)

    trainer_kwargs = to_dict(cfg.trainer)
    if max_epochs is not None:
        trainer_kwargs["max_epochs"] = max_epochs
    all_callbacks: list[Callback] = [
        FailOnDivergence(divergence_hint(task, cfg), cfg.train.divergence_factor),
        LearningRateMonitor("epoch"),
        Throughput(),
        StopWhenServerLost(),
    ]
    if cfg.mlflow.system_metrics_s:
        all_callbacks.append(SystemMetrics(cfg.mlflow.system_metrics_s, uri, run_id is not None))
    if trainer_kwargs.get("enable_progress_bar", True) and not sys.stderr.isatty():
        # A log file or a pipe, not a terminal: a progress bar would fill it with carriage
        # returns, so one line per epoch instead.
        trainer_kwargs["enable_progress_bar"] = False
        all_callbacks.append(EpochLine())
    if trainer_kwargs.get("enable_progress_bar", True):
        # Refreshing every step costs a host sync per step; a few updates per second is plenty.
        all_callbacks.append(TQDMProgressBar(refresh_rate=cfg.train.progress_refresh_steps))
    if cfg.train.ema_decay:
        # Validation, early stopping and every checkpoint's state_dict see the averaged weights
        # (the raw ones ride along for a resume), so evaluate and register ship the average.
        all_callbacks.append(EMAWeightAveraging(decay=cfg.train.ema_decay))
    if cfg.train.early_stopping_patience:
        all_callbacks.append(
            EarlyStopping(monitor, mode=mode, patience=cfg.train.early_stopping_patience)
        )
    if ckpt_dir is not None:
        # Saved at the end of each training epoch (after its validation), so the epoch's
        # history row and the divergence reference are in the checkpoint a resume starts from.
        # last.ckpt has a callback of its own: Lightning's save_last only rewrites it in an
        # epoch that also wrote best.ckpt, so a resume would redo every epoch since the best.
        all_callbacks += [
            ModelCheckpoint(
                ckpt_dir, filename="best", monitor=monitor, mode=mode, save_on_train_epoch_end=True
            ),  # first: trainer.checkpoint_callback, whose best_model_path train() hands on
            ModelCheckpoint(ckpt_dir, filename="last", save_on_train_epoch_end=True),
            RecordRun(ckpt_dir / RUN_RECORD, resume_identity(cfg)),
        ]
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_chatter)  # once: a filter is added only once
    trainer = L.Trainer(
        **trainer_kwargs,
        logger=logger,
        callbacks=all_callbacks + list(callbacks),
        enable_checkpointing=ckpt_dir is not None,
        enable_model_summary=False,
        log_every_n_steps=cfg.train.log_every_n_steps,
    )
    with warnings.catch_warnings():
        # Batches are slices of resident tensors: loader workers would only add IPC.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # Only epoch aggregates are logged, so Lightning's per-step logging interval is moot.
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        # A resume starts in the folder of the checkpoint it continues, by design.
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")
        # Lightning's own pytree helper trips a torch deprecation: nothing of ours to change.
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if logger.lost is not None:
        raise server_lost(logger, uri, trainer, ckpt_dir)
    return trainer, logger


def server_lost(
    logger: ServerLogger, uri: str, trainer: L.Trainer, ckpt_dir: Path | None
) -> TrackingServerError:
    """The one message of a training whose tracking server went away: what is kept and how to
    continue. The metrics it could not send wait beside the checkpoints for the resume."""
    if ckpt_dir is None:  # a tuning trial: nothing to resume, the study reruns it
        return TrackingServerError(
            f"MLflow tracking server {uri} went away during this run ({logger.lost}); start it "
            "again and rerun: finished trials are kept in the study"
        )
    write_json(ckpt_dir / UNSENT, logger.unsent)
    return TrackingServerError(
        f"MLflow tracking server {uri} went away during training ({logger.lost}). "
        f"{trainer.current_epoch} epoch(s) are checkpointed in {ckpt_dir} and MLflow run "
        f"{logger.run_id} is left open; once the server is back, continue that run with "
        "train.resume=true (e.g. `python pipelines/train.py train.resume=true`)"
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit with the tuned parameters; write checkpoints and `run.json` (the MLflow run id) for
    the stages that follow."""
    check_config(cfg)
    tuned = tuned_params(cfg.paths.tune, cfg) if cfg.train.use_tuned else {}
    if tuned:
        log.info("applying tuned parameters from %s: %s", cfg.paths.tune, tuned)
        cfg = with_overrides(cfg, tuned)
    out = Path(cfg.paths.train)
    ckpt_dir = out / "checkpoints"
    resume_from = ckpt_dir / "last.ckpt" if cfg.train.resume else None
    if resume_from is not None and not resume_from.exists():
        raise ConfigError(
            f"train.resume=true but {resume_from} does not exist: run without train.resume first"
        )
    record = read_run_record(ckpt_dir)
    run_id = None
    if resume_from is not None:
        run_id = check_resumable(record, cfg, resume_from)
        send_unsent(ckpt_dir, cfg, run_id)
    else:
        close_abandoned_run(record, cfg)
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # stale checkpoints of another run must not pass as this one's
    (out / "run.json").unlink(missing_ok=True)  # nor its run info, should this run fail

    history = EpochHistory()
    trainer, logger = fit(
        cfg,
        run_name="train",
        named=True,
        callbacks=[history],
        ckpt_dir=ckpt_dir,
        ckpt_path=resume_from,
        tags={"stage": "train"},
        run_id=run_id,
    )
    if not trainer.is_global_zero:
        return {}
    logger.experiment.log_dict(logger.run_id, to_dict(cfg), "config.yaml")
    if tuned:
        logger.experiment.log_dict(logger.run_id, tuned, "tuned_params.yaml")
    checkpoint = trainer.checkpoint_callback
    info = {
        "run_id": logger.run_id,
        "experiment_id": logger.experiment_id,
        "tracking_uri": tracking_uri(cfg.mlflow.tracking_uri),
        # relative to this file's folder, so the repo (and DVC's cache of it) can move
        "best_checkpoint": os.path.relpath(checkpoint.best_model_path, out),
        "monitor": cfg.task.monitor,
        "best_score": float(checkpoint.best_model_score),
        "epochs": trainer.current_epoch,
    }
    write_json(out / "run.json", info)
    reports = Path(cfg.paths.reports) / "train"
    history.write(reports / "history.csv")
    history_curves(history.rows, reports / "plots")  # for `dvc plots show`, offline too
    write_json(
        reports / "metrics.json", {info["monitor"]: info["best_score"], "epochs": info["epochs"]}
    )
    log.info(
        "best %s %.4f after %d epochs (run %s)",
        info["monitor"],
        info["best_score"],
        info["epochs"],
        info["run_id"],
    )
    return info


# --- one record for an interrupted and resumed training -------------------------------------

RUN_RECORD = "mlflow_run.json"  # beside the checkpoints: the run they belong to, and its setup
UNSENT = "mlflow_unsent.json"  # beside them too: metrics a lost tracking server did not get


def resume_identity(cfg: DictConfig) -> dict[str, Any]:
    """The settings a checkpoint is only valid with: what was learned, from what, and how."""
    return {
        "seed": cfg.seed,
        "data": to_dict(cfg.data),
        "model": to_dict(cfg.model),
        "task": to_dict(cfg.task),
        "optim": to_dict(cfg.optim),
        "train.batch_size": cfg.train.batch_size,
    }


def read_run_record(ckpt_dir: Path) -> dict[str, Any] | None:
    path = ckpt_dir / RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def check_resumable(record: dict[str, Any] | None, cfg: DictConfig, checkpoint: Path) -> str | None:
    """The MLflow run to continue; ConfigError naming every setting that differs from the
    checkpoint's, before anything is fitted. None when the checkpoint has no record (written
    by an older dlpipe): the resumed epochs then go to a new run."""
    if record is None:
        log.warning(
            "%s has no %s: the resumed epochs go to a new MLflow run", checkpoint, RUN_RECORD
        )
        return None
    then, now = flatten(record["identity"]), flatten(resume_identity(cfg))
    changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
    if changed:
        diffs = "; ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in changed[:8])
        raise ConfigError(
            f"train.resume=true, but {checkpoint} was trained with other settings ({diffs}): "
            "restore those values to continue it, or run without train.resume=true to start over"
        )
    return record["run_id"]


def send_unsent(ckpt_dir: Path, cfg: DictConfig, run_id: str | None) -> None:
    """Log the metrics a lost tracking server did not get (`UNSENT`, see `server_lost`) to the
    resumed run, so its history has no gap."""
    path = ckpt_dir / UNSENT
    if run_id is None or not path.is_file():
        return
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri = tracking_uri(cfg.mlflow.tracking_uri)
    check_reachable(uri)
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, value, now, entry["step"])
        for entry in json.loads(path.read_text())
        for key, value in entry["metrics"].items()
    ]
    MlflowClient(uri).log_batch(run_id, metrics=metrics)
    path.unlink()
    log.info("sent %d metric values the tracking server missed to run %s", len(metrics), run_id)


def close_abandoned_run(record: dict[str, Any] | None, cfg: DictConfig) -> None:
    """A fresh start abandons the interrupted run it replaces: close it (KILLED) rather than
    leave it RUNNING forever."""
    if record is None:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri(cfg.mlflow.tracking_uri))
    try:
        run = client.get_run(record["run_id"])
    except MlflowException:
        return  # deleted, or in another store: nothing of ours to close
    if run.info.status == "RUNNING":
        client.set_tag(run.info.run_id, "dlpipe.outcome", "interrupted, not resumed")
        client.set_terminated(run.info.run_id, status="KILLED")
        log.info("closed the interrupted training run %s (not resumed)", run.info.run_id)
