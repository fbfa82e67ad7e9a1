"""What an interrupted or diverging training leaves behind: `kill -9` then `train.resume=true`
reads as one training (whole history, one MLflow run, nothing RUNNING); a resume with other
settings is refused before fitting; a blow-up without NaN is stopped and never handed on."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from dlpipe.callbacks import DivergedError
from dlpipe.train import train

LEARNS = ("model=mlp", "optim.scheduler=none", "optim.lr=0.03", "train.batch_size=128")
WORKER = """
import sys
from omegaconf import OmegaConf
from dlpipe.train import train
train(OmegaConf.load(sys.argv[1]))
"""


def _runs(cfg) -> list:
    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    return client.search_runs([experiment.experiment_id])


def _kill_after_first_checkpoint(cfg, tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    OmegaConf.save(cfg, path)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(path)], cwd=tmp_path)
    last = Path(cfg.paths.train) / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker.poll() is None, "training ended before it could be killed"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()


def test_kill_then_resume_reads_as_one_training(make_cfg, tmp_path):
    # Slow epochs (batch 16) so the kill lands mid-run, after the first checkpoint.
    cfg = make_cfg(*LEARNS, "train.batch_size=16", "trainer.max_epochs=4")
    _kill_after_first_checkpoint(cfg, tmp_path)
    (killed,) = _runs(cfg)
    assert killed.info.status == "RUNNING"  # what kill -9 leaves

    info = train(make_cfg(*LEARNS, "train.batch_size=16", "trainer.max_epochs=4",
                          "train.resume=true"))  # fmt: skip

    assert info["run_id"] == killed.info.run_id  # the same run, continued
    (run,) = _runs(cfg)
    assert run.info.status == "FINISHED"
    with open(Path(cfg.paths.reports) / "train" / "history.csv") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == list(range(info["epochs"]))  # from epoch 0, none missing or repeated
    steps = [m.step for m in MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(
        run.info.run_id, "val/loss")]  # fmt: skip
    assert len(steps) == len(set(steps)) == info["epochs"]


def test_fresh_start_after_a_kill_closes_the_interrupted_run(make_cfg, tmp_path):
    cfg = make_cfg(*LEARNS, "train.batch_size=16", "trainer.max_epochs=4")
    _kill_after_first_checkpoint(cfg, tmp_path)
    train(make_cfg(*LEARNS))
    statuses = sorted(r.info.status for r in _runs(cfg))
    assert statuses == ["FINISHED", "KILLED"]


def test_resume_with_other_settings_is_refused_before_fitting(make_cfg):
    train(make_cfg(*LEARNS))
    with pytest.raises(ValueError, match=r"model.width: 8 then, 16 now.*without train.resume"):
        train(make_cfg(*LEARNS, "model.width=16", "train.resume=true"))
    assert len(_runs(make_cfg())) == 1  # nothing was fitted or logged


def test_blow_up_without_nan_stops_the_run_and_hands_nothing_on(make_cfg):
    cfg = make_cfg("model=mlp", "optim.lr=1000", "trainer.max_epochs=3")
    with pytest.raises(DivergedError, match=r"diverged.*optim\.lr"):
        train(cfg)
    assert not (Path(cfg.paths.train) / "run.json").exists()
    (run,) = _runs(cfg)
    assert run.info.status == "FAILED"


def test_tuned_params_of_another_experiment_are_refused(make_cfg):
    cfg = make_cfg(*LEARNS)
    tune_dir = Path(cfg.paths.tune)
    tune_dir.mkdir(parents=True)
    (tune_dir / "best_params.yaml").write_text("model.norm: batch\n")
    tuned_for = {"data": "table_csv", "model": "mlp", "task": "regressor"}
    (tune_dir / "study.json").write_text(json.dumps({"tuned_for": tuned_for}))
    with pytest.raises(ValueError, match=r"tuned for .*table_csv.*train.use_tuned=false"):
        train(cfg)
    assert not _runs(cfg)  # refused before anything was fitted or logged
