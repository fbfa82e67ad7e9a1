"""Stage 5: test-split metrics of the best checkpoint, for `dvc metrics/plots` and the MLflow
run. What is measured is the task's business (`Task.evaluate`); this stage writes the metrics
to reports/evaluate/metrics.json, the task's report files to reports/evaluate/files/ (its
pictures also to reports/evaluate/plots/, for `dvc plots`), and logs both to the training run."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric
from omegaconf import DictConfig

from dlpipe.data import load_meta, write_json
from dlpipe.run_labels import log_splits
from dlpipe.schema import check_config
from dlpipe.tasks import get_task
from dlpipe.tracking import setup_mlflow

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    check_config(cfg)
    run = json.loads((Path(cfg.paths.train) / "run.json").read_text())
    meta = load_meta(cfg.paths.processed)
    task = get_task(cfg.task.name)
    out = Path(cfg.paths.reports) / "evaluate"
    files = out / "files"
    shutil.rmtree(files, ignore_errors=True)  # no stale report of another task or run
    files.mkdir(parents=True)
    summary = task.evaluate(cfg, Path(cfg.paths.train) / run["best_checkpoint"], meta, files)
    write_json(out / "metrics.json", summary)
    # The task's pictures (confusion matrix, samples, forecasts) also in a folder of images
    # only, which `dvc plots show` draws offline; its tables stay in files/ for MLflow.
    plots = out / "plots"
    shutil.rmtree(plots, ignore_errors=True)
    plots.mkdir()
    for image in sorted(files.rglob("*.png")):
        shutil.copy2(image, plots / image.relative_to(files).as_posix().replace("/", "_"))

    setup_mlflow(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(
        run["run_id"], metrics=[Metric(k, v, now, run["epochs"]) for k, v in summary.items()]
    )
    client.log_artifacts(run["run_id"], str(files), artifact_path="evaluate")
    log_splits(client, run["run_id"], meta, cfg.paths.processed, ("test",))  # what it was tested on
    log.info("test: %s", ", ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return summary
