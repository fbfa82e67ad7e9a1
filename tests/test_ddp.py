"""Two CPU processes over gloo run the real train stage script: one MLflow run, one set of files."""

import json
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def test_ddp_cpu_trains_and_logs_once(fmnist_processed: Path, tmp_path: Path):
    db = f"sqlite:///{tmp_path}/mlflow.db"
    command = [
        sys.executable,
        str(REPO / "pipelines" / "train.py"),
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "model.width=8",
        "train.use_tuned=false",
        f"paths.processed={fmnist_processed}",
        f"paths.train={tmp_path}/train",
        f"mlflow.tracking_uri={db}",
        f"hydra.run.dir={tmp_path}/hydra",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr

    client = MlflowClient(tracking_uri=db)
    experiment = client.get_experiment_by_name("dlpipe-fashion_mnist")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "only rank zero may create an MLflow run"
    history = client.get_metric_history(runs[0].info.run_id, "val/acc")
    assert len(history) == 2, "one val/acc per epoch, logged by one rank"

    info = json.loads((tmp_path / "train" / "run.json").read_text())
    assert info["run_id"] == runs[0].info.run_id
    assert (tmp_path / "train" / "checkpoints" / "best.ckpt").exists()
    # Lightning relaunches the Hydra script for rank 1 into the same run directory.
    logs = sorted(p.name for p in (tmp_path / "hydra").glob("*.log"))
    assert logs == ["train.log", "train_ddp_process_1.log"]
