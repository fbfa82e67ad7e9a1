"""Tasks: what a model learns and how it is judged and shipped.

The stages are task-agnostic: `train.fit` asks the task for its LightningModule and
LightningDataModule, `evaluate` for its test metrics and report files, `register` for its MLflow
pyfunc. A task is a module `dlpipe.tasks.<name>` exposing `TASK`, an object with the methods of
`Task`; `conf/task/<name>.yaml` holds its settings (`cfg.task`). Its LightningModule (and its
own LightningDataModule, where it has one) lives in `dlpipe.modules.<name>`, imported inside
`module()` and `datamodule()`, so that evaluate and register load no Lightning
(tests/test_layout.py checks it for every task). A task whose training is steered by other keys
than `optim.lr` also defines `divergence_hint(cfg)` (see `divergence_hint`).
A task whose shipped network is a plain tensor function defines
`export_targets(cfg, checkpoint, meta) -> list[ExportTarget]`, which `register` exports (ONNX or
`torch.export`) and checks against the eager network (`dlpipe.export`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from omegaconf import DictConfig

from dlpipe.errors import ConfigError

if TYPE_CHECKING:  # type hints only: evaluate and register import this without Lightning
    import lightning as L

TASKS = (
    "classifier",
    "language_model",
    "gan",
    "autoencoder",
    "forecaster",
    "regressor",
    "fraud",
    "translator",
    "transcriber",
)


class Task(Protocol):
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        """The processed train/val splits of `cfg.paths.processed`, batched."""

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        """A fresh LightningModule for `cfg.model`; it logs `cfg.task.monitor` every epoch."""

    def evaluate(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], out: Path
    ) -> dict[str, float]:
        """Test metrics of `checkpoint` ("test/..." keys). Report files (plots, tables,
        samples) go into `out`, which the evaluate stage logs to MLflow as they are.

        Beside them, the same metrics of the strongest cheap classical model fitted on the
        same train split (`dlpipe.baselines`) under the same suffix: "baseline/<suffix>" for
        "test/<suffix>" (test/acc <-> baseline/acc), and where chance has a value, the
        input-blind predictor's as "chance/<suffix>"; the baseline's name and fit time go to
        `out`/baseline.json. The champion gate pairs them by that suffix (`register`)."""

    def log_model(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], run_id: str
    ) -> str:
        """Log `checkpoint` as an MLflow pyfunc under the run `run_id`; returns its model URI."""


@dataclass(frozen=True)
class ExportTarget:
    """One network a task ships as a tensor function, and how an export of it is checked.

    `net` (eval mode, CPU) maps a batch (B, ...) to a tensor (B, ...); `inputs` are test
    inputs as `net` takes them (uint8 images, float features, int64 token ids, noise);
    `max_abs_error` is the stated tolerance on the outputs; `argmax` also requires the same
    argmax over the last axis on at least 99.9 % of the output rows (a classifier's logits,
    every position of a language model's)."""

    name: str
    net: torch.nn.Module
    inputs: torch.Tensor
    max_abs_error: float
    argmax: bool = False


class NotExportable(Exception):
    """A task's network cannot be exported as a plain tensor function; the message says why."""


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(
            f"unknown task {name!r}: choose one of {list(TASKS)} (e.g. task=classifier)"
        )
    return importlib.import_module(f"dlpipe.tasks.{name}").TASK


def divergence_hint(task: Task, cfg: DictConfig) -> str:
    """What to change when `task`'s training loss stops being finite: the task's own
    `divergence_hint(cfg)` where it has one, else the learning rate and gradient clipping."""
    own = getattr(task, "divergence_hint", None)
    if own is not None:
        return own(cfg)
    return f"Lower the learning rate (optim.lr={cfg.optim.lr}), set trainer.gradient_clip_val=1.0"


def net_args(meta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The data-derived arguments of `create_model` (input kind and shape, classes, training
    statistics, vocabulary size and, where the format stores them, the token strings) from a
    processed dataset's meta.json."""
    args = {
        "input_shape": list(meta["input_shape"]),
        "num_classes": meta.get("num_classes", 1),
        "input_kind": meta["input_kind"],
        "mean": meta.get("mean"),
        "std": meta.get("std"),
    }
    if "vocab_size" in meta:
        args |= {"vocab_size": meta["vocab_size"], "pad_id": meta.get("pad_id", 0)}
    if "vocab" in meta:
        args["vocab"] = meta["vocab"]
    return args | extra
