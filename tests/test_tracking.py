"""MLflow plumbing: an unreachable tracking server fails fast and says how to fix it."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dlpipe.tracking import (
    TrackingServerError,
    artifact_location,
    check_reachable,
    flatten,
    setup_mlflow,
    tracking_uri,
)
from dlpipe.train import train


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_named_with_the_fix():
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(TrackingServerError, match="unreachable.*MLFLOW_TRACKING_URI.*sqlite"):
        check_reachable(uri, timeout_s=2)


def test_healthy_server_passes():
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def test_train_fails_before_training_when_the_server_is_down(make_cfg):
    cfg = make_cfg()
    # Set after composing: the fixture itself talks to the configured store.
    cfg.mlflow.tracking_uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(TrackingServerError):
        train(cfg)
    assert not list(Path(cfg.paths.train).glob("**/*.ckpt")), "nothing was trained"


def test_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking_uri(None) == "http://example:5000"
    assert tracking_uri("sqlite:///other.db") == "sqlite:///other.db"


def test_flatten_gives_override_keys():
    assert flatten({"optim": {"lr": 0.1, "name": "sgd"}, "seed": 1, "empty": {}}) == {
        "optim.lr": 0.1,
        "optim.name": "sgd",
        "seed": 1,
        "empty": {},
    }


def test_system_metrics_of_a_fit_shorter_than_one_interval_are_logged(tmp_path):
    """MLflow's monitor publishes only after a full interval; a short fit still records a step."""
    import mlflow

    from dlpipe.callbacks import _final_step_monitor

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("short", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    monitor = _final_step_monitor()(run_id, sampling_interval=60, tracking_uri=uri)
    monitor.start()
    monitor.finish()  # at once: MLflow's own monitor logs nothing here
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in history] == [0]


def test_metrics_go_in_one_request_per_epoch_and_all_arrive(make_cfg, monkeypatch):
    """ServerLogger queues what Lightning logs (validation, epoch aggregates, learning rate,
    throughput) and sends it once per epoch, plus once when the run closes."""
    from mlflow import MlflowClient

    requests = []
    real = MlflowClient.log_batch

    def counted(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            requests.append(len(metrics))
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    cfg = make_cfg("model=mlp", "trainer.max_epochs=3", "mlflow.system_metrics_s=null")
    info = train(cfg)
    assert len(requests) <= 3 + 1, requests  # Lightning alone makes 3 calls per epoch
    client = MlflowClient(cfg.mlflow.tracking_uri)
    for key in ("train/loss", "val/loss", "val/acc", "perf/samples_per_s"):
        steps = [m.step for m in client.get_metric_history(info["run_id"], key)]
        assert len(steps) == 3 and len(set(steps)) == 3, (key, steps)


def test_a_store_elsewhere_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    """MLflow's default artifact root is ./mlruns of the working directory; a SQLite store in
    another folder gets its experiments' artifacts in <its folder>/mlruns instead."""
    import mlflow

    work, store = tmp_path / "work", tmp_path / "store"
    work.mkdir()
    store.mkdir()
    monkeypatch.chdir(work)
    before = mlflow.get_tracking_uri()
    try:
        experiment_id = setup_mlflow(f"sqlite:///{store / 'mlflow.db'}", "dlpipe-my data/v1")
        with mlflow.start_run(experiment_id=experiment_id):
            mlflow.log_text("hello", "note.txt")
        assert len(list(store.glob("mlruns/dlpipe-my_data_v1/*/artifacts/note.txt"))) == 1
        assert not (work / "mlruns").exists()
        # a second process finds the experiment as it is
        assert (
            setup_mlflow(f"sqlite:///{store / 'mlflow.db'}", "dlpipe-my data/v1") == experiment_id
        )
    finally:
        mlflow.set_tracking_uri(before)
    # the embedded default (a store in the working directory) and servers: MLflow's own layout
    assert artifact_location("sqlite:///mlflow.db", "x") is None
    assert artifact_location("http://127.0.0.1:5000", "x") is None


def test_train_logs_beside_a_store_elsewhere(make_cfg, tmp_path):
    cfg = make_cfg()
    cfg.mlflow.experiment = "fresh"  # after composing: the fixture pre-creates its experiment
    info = train(cfg)
    db = Path(cfg.mlflow.tracking_uri.removeprefix("sqlite:///"))
    assert (db.parent / "mlruns" / "fresh" / info["run_id"] / "artifacts" / "config.yaml").is_file()


def test_a_store_in_a_subfolder_is_not_taken_for_a_moved_project(tmp_path, monkeypatch):
    """sqlite:///models/mlflow.db: the second stage's check used to see MLflow's "Default"
    experiment (made with the store, at ./mlruns of the first stage) as another project."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    before = mlflow.get_tracking_uri()
    try:
        for _ in range(2):  # two stages
            experiment_id = setup_mlflow("sqlite:///models/mlflow.db", "sub")
            with mlflow.start_run(experiment_id=experiment_id):
                mlflow.log_text("x", "a.txt")
    finally:
        mlflow.set_tracking_uri(before)
    assert len(list((tmp_path / "models" / "mlruns" / "sub").glob("*/artifacts/a.txt"))) == 2
