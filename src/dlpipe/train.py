"""Stage 4: Lightning training. `fit` is the one training path; tuning trials call it too."""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from dlpipe.data import load_meta, write_json
from dlpipe.tasks import get_task
from dlpipe.tracking import check_reachable, flatten, provenance_tags, tracking_uri

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class FailOnNonFinite(Callback):
    """Stops a diverged run with a message that says what to change (checked once per epoch,
    from the already-aggregated epoch loss, so the training loop itself never syncs)."""

    def __init__(self, lr: float):
        self.lr = lr

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"train/loss became {float(loss)} in epoch {trainer.current_epoch}: training "
                f"diverged. Lower the learning rate (optim.lr={self.lr}; for task=gan "
                "task.generator_optim.lr / task.discriminator_optim.lr), set "
                "trainer.gradient_clip_val=1.0 (not with task=gan), "
                "or check the data for NaN/inf values."
            )


class EpochHistory(Callback):
    """Per-epoch train/ and val/ metrics as rows, for `dvc plots` (MLflow gets the same values
    from the logger)."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

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


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def with_overrides(cfg: DictConfig, overrides: Mapping[str, Any]) -> DictConfig:
    """A copy of `cfg` with dotted keys set, e.g. {"optim.lr": 1e-3}; unknown keys are errors."""
    cfg = cfg.copy()
    for key, value in overrides.items():
        if not _has_key(cfg, key):
            raise KeyError(f"override {key!r} names no config key; check the spelling")
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    node = OmegaConf.select(cfg, ".".join(parents)) if parents else cfg
    return isinstance(node, DictConfig) and leaf in node


def tuned_params(tune_dir: str | Path) -> dict[str, Any]:
    path = Path(tune_dir) / "best_params.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def fit(
    cfg: DictConfig,
    *,
    run_name: str,
    max_epochs: int | None = None,
    callbacks: Iterable[Callback] = (),
    tags: Mapping[str, str] | None = None,
    ckpt_dir: Path | None = None,
    ckpt_path: Path | None = None,
) -> tuple[L.Trainer, MLFlowLogger]:
    """Train the configured model on the processed data, logging to an MLflow run `run_name`."""
    L.seed_everything(cfg.seed, workers=True)
    task = get_task(cfg.task.name)
    meta = load_meta(cfg.paths.processed)
    data = task.datamodule(cfg, meta)
    module = task.module(cfg, meta)
    monitor, mode = cfg.task.monitor, "max" if cfg.task.direction == "maximize" else "min"
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    check_reachable(uri)
    logger = MLFlowLogger(
        experiment_name=cfg.mlflow.experiment,
        run_name=run_name,
        tracking_uri=uri,
        tags={**provenance_tags(meta), **(tags or {})},
    )
    # Rank-zero only (like every logger call): records the run's full resolved config.
    logger.log_hyperparams(
        {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith("search.")}
    )

    trainer_kwargs = to_dict(cfg.trainer)
    if max_epochs is not None:
        trainer_kwargs["max_epochs"] = max_epochs
    all_callbacks: list[Callback] = [FailOnNonFinite(cfg.optim.lr), LearningRateMonitor("epoch")]
    if trainer_kwargs.get("enable_progress_bar", True):
        # Refreshing every step costs a host sync per step; a few updates per second is plenty.
        all_callbacks.append(TQDMProgressBar(refresh_rate=cfg.train.progress_refresh_steps))
    if cfg.train.early_stopping_patience:
        all_callbacks.append(
            EarlyStopping(monitor, mode=mode, patience=cfg.train.early_stopping_patience)
        )
    if ckpt_dir is not None:
        all_callbacks.append(
            ModelCheckpoint(ckpt_dir, filename="best", monitor=monitor, mode=mode, save_last=True)
        )
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
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, logger


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit with the tuned parameters; write checkpoints and `run.json` (the MLflow run id) for
    the stages that follow."""
    tuned = tuned_params(cfg.paths.tune) if cfg.train.use_tuned else {}
    if tuned:
        log.info("applying tuned parameters from %s: %s", cfg.paths.tune, tuned)
        cfg = with_overrides(cfg, tuned)
    out = Path(cfg.paths.train)
    ckpt_dir = out / "checkpoints"
    resume_from = ckpt_dir / "last.ckpt" if cfg.train.resume else None
    if resume_from is not None and not resume_from.exists():
        raise FileNotFoundError(
            f"train.resume=true but {resume_from} does not exist: run without train.resume first"
        )
    if resume_from is None and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # stale checkpoints of another run must not pass as this run's
    (out / "run.json").unlink(missing_ok=True)  # nor its run info, should this run fail

    history = EpochHistory()
    trainer, logger = fit(
        cfg,
        run_name="train",
        callbacks=[history],
        ckpt_dir=ckpt_dir,
        ckpt_path=resume_from,
        tags={"stage": "train"},
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
