"""Two CPU processes over gloo run the real train stage script: one MLflow run, one set of files."""

import json
import subprocess
import sys
from pathlib import Path

import services  # tests/services.py
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf

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


# The train stage as each node's torchrun runs it, with each rank's final weights written to
# argv[2]/rank<N>.pt afterwards (train() returns them nowhere: rank zero's are in last.ckpt).
NODE = """
import sys
import torch
from omegaconf import OmegaConf
from dlpipe import train as stage

fit = stage.fit

def fit_and_keep_weights(*args, **kwargs):
    trainer, logger = fit(*args, **kwargs)
    torch.save(trainer.lightning_module.state_dict(), f"{sys.argv[2]}/rank{trainer.global_rank}.pt")
    return trainer, logger

stage.fit = fit_and_keep_weights
stage.train(OmegaConf.load(sys.argv[1]))
"""


def test_two_nodes_under_torchrun_train_one_run(make_cfg, tmp_path: Path):
    """Two "nodes" on this machine, one process each, joined by torchrun's static rendezvous
    on 127.0.0.1 over gloo: what `torchrun --nnodes=2` (or srun) does on a real cluster."""
    cfg = make_cfg("trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2",
                   "trainer.max_epochs=2")  # fmt: skip
    OmegaConf.save(cfg, tmp_path / "train.yaml")
    (tmp_path / "node.py").write_text(NODE)
    port = services.free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as out:
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                 "--nproc-per-node=1", f"--node-rank={rank}", "--master-addr=127.0.0.1",
                 f"--master-port={port}", str(tmp_path / "node.py"),
                 str(tmp_path / "train.yaml"), str(tmp_path)],
                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            ))  # fmt: skip
    for node, log in zip(nodes, logs, strict=True):
        assert node.wait(timeout=300) == 0, log.read_text()[-3000:]

    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    (run,) = client.search_runs([experiment.experiment_id])  # one run, from global rank zero
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2
    ckpts = Path(cfg.paths.train) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt", "mlflow_run.json"]
    info = json.loads((Path(cfg.paths.train) / "run.json").read_text())
    assert info["run_id"] == run.info.run_id and info["epochs"] == 2

    weights = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    saved = torch.load(ckpts / "last.ckpt", weights_only=False)["state_dict"]
    assert weights[0].keys() == weights[1].keys() == saved.keys()
    for key in saved:
        assert torch.equal(weights[0][key], weights[1][key]), key  # DDP kept the ranks in step
        assert torch.equal(weights[0][key], saved[key]), key
