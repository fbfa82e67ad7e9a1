"""Team mode against real services: an `mlflow server` on PostgreSQL with proxied artifacts runs
the stages, holds the champion and answers the REST API; a training whose server is killed keeps
its checkpoints, ends with one message, and its resume continues the same run."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
import services  # tests/services.py
from omegaconf import OmegaConf

from dlpipe.train import UNSENT, train


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """(uri, pid, backend URL, folder): one tracking server for this module, on its own
    PostgreSQL database, artifacts under folder/artifacts. A test may kill it (the last)."""
    root = tmp_path_factory.mktemp("team_server")
    backend = postgres("mlflow")
    with services.mlflow_server(backend, root / "artifacts", root / "server.log") as (uri, pid):
        yield uri, pid, backend, root


def _rest(uri: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """GET (or POST `body`) /api/2.0/mlflow/<endpoint> of the server; the JSON answer."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _runs(uri: str, experiment: str) -> list[dict]:
    exp = _rest(uri, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    return _rest(uri, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_stages_log_to_a_tracking_server_and_serve_its_champion(
    server, make_cfg, run_stages, tmp_path
):
    uri, _, _, root = server
    # A forecaster: its naive baselines cost nothing at evaluation. System metrics sampled
    # every 0.5 s: a smoke training lasts a few seconds.
    overrides = ("experiment=sp500_gru", "smoke=true", "mlflow.system_metrics_s=0.5")
    cfg = make_cfg(
        *overrides, f"mlflow.tracking_uri={uri}", processed=tmp_path / "data" / "processed"
    )
    run_stages(cfg)

    # keyed by the stage word of the name ("train cnn fashion_mnist 3f2a9c" -> "train")
    runs = {r["info"]["run_name"].split()[0]: r for r in _runs(uri, cfg.mlflow.experiment)}
    assert {"tune", "trial-0", "train"} <= runs.keys()
    assert all(r["info"]["status"] == "FINISHED" for r in runs.values())
    assert _tags(runs["trial-0"])["mlflow.parentRunId"] == runs["tune"]["info"]["run_id"]
    train_run = runs["train"]
    metrics = {m["key"] for m in train_run["data"]["metrics"]}
    assert "perf/samples_per_s" in metrics
    # Every fit records system metrics, even one shorter than MLflow's 0.5 s sampling interval.
    for name in ("train", "trial-0"):
        keys = {m["key"] for m in runs[name]["data"]["metrics"]}
        assert "system/cpu_utilization_percentage" in keys, name

    # Artifacts go through the server into its own store: nothing under the client's folders.
    assert train_run["info"]["artifact_uri"].startswith("mlflow-artifacts:")
    listed = _rest(uri, "artifacts/list", run_id=train_run["info"]["run_id"])
    assert "config.yaml" in {f["path"] for f in listed["files"]}
    assert list((root / "artifacts").rglob("config.yaml"))
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "mlruns").exists()

    name = cfg.register.model_name
    model = _rest(uri, "registered-models/get", name=name)["registered_model"]
    aliases = {a["alias"]: a["version"] for a in model["aliases"]}
    assert aliases == {"champion": "1", "challenger": "1"}
    version = _rest(uri, "model-versions/get", name=name, version="1")["model_version"]
    assert version["run_id"] == train_run["info"]["run_id"]

    mlflow.set_tracking_uri(uri)  # make_cfg restores the global client afterwards
    local = mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path))
    champion = mlflow.pyfunc.load_model(local)
    example = champion.metadata.load_input_example(local)
    assert len(champion.predict(example)) > 0  # served from what the server stored


LEARNS = ("model=mlp", "optim.scheduler=none", "optim.lr=0.03", "trainer.max_epochs=4")
WORKER = """
import logging, sys
from omegaconf import OmegaConf
from dlpipe.train import train
logging.basicConfig(level=logging.INFO)  # as a stage script's Hydra logging does
train(OmegaConf.load(sys.argv[1]))
"""


def test_server_killed_during_training_keeps_checkpoints_and_resume_continues_the_run(
    server, make_cfg, tmp_path
):
    uri, pid, backend, root = server
    # Batch 16 makes epochs slow enough for the kill to land in epoch 1 or 2 of 4.
    cfg = make_cfg(*LEARNS, "train.batch_size=16", f"mlflow.tracking_uri={uri}")
    OmegaConf.save(cfg, tmp_path / "train.yaml")
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / "train.yaml")],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    ckpt_dir = Path(cfg.paths.train) / "checkpoints"
    deadline = time.monotonic() + 180
    while not (ckpt_dir / "last.ckpt").exists() and time.monotonic() < deadline:
        assert worker.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)  # the server, and its uvicorn worker, gone at once
    killed = time.monotonic()
    while "went away during training" not in log.read_text() and worker.poll() is None:
        assert time.monotonic() - killed < 300, log.read_text()[-3000:]
        time.sleep(0.2)
    took = time.monotonic() - killed  # until the stage said it (exiting takes a moment more)
    worker.wait(timeout=300)

    output = log.read_text()
    assert worker.returncode != 0, output[-3000:]
    said = [line for line in output.splitlines() if "went away during training" in line]
    assert len(said) == 1, output[-3000:]  # one message, naming the server and the way on
    assert f"MLflow tracking server {uri} went away" in said[0]
    assert "train.resume=true" in said[0]
    # Bounded: MLflow's own retries alone (7, backoff factor 2) hold one request for minutes;
    # here the retries, then the rest of the epoch and its checkpoint (seconds when idle).
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES=3" in output  # the bound, said
    assert took < 180, f"the training took {took:.0f} s to give up on the server"
    assert (ckpt_dir / UNSENT).is_file()  # the lost epoch's metrics wait for the resume

    # The server comes back (another port, same database and artifacts): resume that run.
    with services.mlflow_server(backend, root / "artifacts", root / "server2.log") as (back, _):
        info = train(make_cfg(*LEARNS, "train.batch_size=16", f"mlflow.tracking_uri={back}",
                              "train.resume=true"))  # fmt: skip
        (run,) = _runs(back, cfg.mlflow.experiment)
        history = _rest(back, "metrics/get-history", run_id=run["info"]["run_id"],
                        metric_key="val/loss")["metrics"]  # fmt: skip
    assert info["run_id"] == run["info"]["run_id"] and run["info"]["status"] == "FINISHED"
    steps = sorted(m["step"] for m in history)
    assert steps == sorted(set(steps)) and len(steps) == info["epochs"] == 4  # no gap, no repeat
    assert not (ckpt_dir / UNSENT).exists()
