"""Stages 5 and 6 on the real Fashion-MNIST slice: test-split reports, the champion gate of the
MLflow model registry, and the registered pyfunc loaded in-process and served over HTTP."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from PIL import Image

from dlpipe.data import load_meta, load_split
from dlpipe.evaluate import evaluate
from dlpipe.formats.images import fit_image
from dlpipe.models import predict
from dlpipe.modules.classifier import Classifier
from dlpipe.register import register
from dlpipe.train import train

# A setup that learns within an epoch on 1600 samples (see test_train.py).
LEARNS = ("model=mlp", "optim.scheduler=none", "optim.lr=0.03", "train.batch_size=128")
# The champion-vs-champion gate alone: the classical baseline's floor has its own tests
# (test_baselines.py); the linear baseline reads these synthetic images almost perfectly.
CHAMPION_ONLY = "register.require_beat_baseline=false"
TEST_METRICS = {
    "test/loss",
    "test/acc",
    "test/precision_macro",
    "test/recall_macro",
    "test/f1_macro",
    "test/roc_auc_ovr_macro",
}


def _pipeline(cfg: DictConfig) -> dict:
    """train -> evaluate -> register, as `dvc repro` runs them."""
    train(cfg)
    evaluate(cfg)
    return register(cfg)


@pytest.fixture(scope="module")
def champion(cfg_factory, tmp_path_factory) -> Iterator[DictConfig]:
    """One trained, evaluated and registered model, shared by the read-only tests below."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    cfg = cfg_factory(tmp_path_factory.mktemp("champion"), *LEARNS, CHAMPION_ONLY)
    _pipeline(cfg)
    yield cfg
    mlflow.set_tracking_uri(before)


def _run_info(cfg: DictConfig) -> dict:
    return json.loads((Path(cfg.paths.train) / "run.json").read_text())


def test_evaluate_writes_reports_and_logs_them_to_the_train_run(champion):
    cfg = champion
    out = Path(cfg.paths.reports) / "evaluate" / "files"
    meta = load_meta(cfg.paths.processed)
    classes, n_test = meta["classes"], meta["sizes"]["test"]

    metrics = json.loads((out.parent / "metrics.json").read_text())
    twins = {k.replace("test/", p) for k in TEST_METRICS for p in ("baseline/", "chance/")}
    assert set(metrics) == TEST_METRICS | twins  # the classical baseline's and chance's too
    assert all(0 <= v <= 1 for k, v in metrics.items() if not k.endswith("/loss"))
    assert metrics["chance/roc_auc_ovr_macro"] == 0.5 and metrics["chance/acc"] < 0.15
    assert metrics["test/acc"] > 0.25 and metrics["test/roc_auc_ovr_macro"] > 0.7  # it learned

    per_class = json.loads((out / "per_class.json").read_text())
    assert set(per_class) == set(classes)
    assert all(
        set(v) == {"precision", "recall", "f1", "roc_auc", "support"} for v in per_class.values()
    )
    assert sum(v["support"] for v in per_class.values()) == n_test
    recall = np.mean([v["recall"] for v in per_class.values()])
    assert recall == pytest.approx(metrics["test/recall_macro"], abs=1e-6)

    with open(out / "confusion.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_test
    assert {r["actual"] for r in rows} == set(classes)
    _, y = load_split(cfg.paths.processed, "test")
    assert [r["actual"] for r in rows] == [classes[i] for i in y]
    accuracy = np.mean([r["actual"] == r["predicted"] for r in rows])
    assert accuracy == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = _run_info(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    logged = client.get_run(run["run_id"]).data.metrics
    assert {k: pytest.approx(v) for k, v in metrics.items()} == {k: logged[k] for k in metrics}
    artifacts = {a.path for a in client.list_artifacts(run["run_id"], "evaluate")}
    assert artifacts == {f"evaluate/{p.name}" for p in out.iterdir()}
    assert artifacts == {
        "evaluate/baseline.json",
        "evaluate/per_class.json",
        "evaluate/confusion.png",
        "evaluate/confusion.csv",
    }


def test_champion_gate(make_cfg):
    name = make_cfg().register.model_name
    client = MlflowClient(make_cfg().mlflow.tracking_uri)

    def aliases() -> dict[str, int]:
        return {k: int(v) for k, v in client.get_registered_model(name).aliases.items()}

    first = _pipeline(make_cfg(*LEARNS, CHAMPION_ONLY))
    assert (first["version"], first["decision"]) == (1, "promoted to champion")
    assert first["champion_value_before"] is None
    assert aliases() == {"champion": 1, "challenger": 1}

    # A model that cannot learn: registered, a challenger, but not the champion (and said so
    # differently when it is no better than chance either).
    worse = _pipeline(make_cfg(*LEARNS, CHAMPION_ONLY, "optim.lr=1e-7"))
    assert worse["value"] < first["value"] == worse["champion_value_before"]
    kept = "kept v1 as champion"
    if worse["value"] <= worse["floors"]["chance"]:
        kept = "not promoted: no better than chance; v1 stays champion"
    assert (worse["version"], worse["decision"]) == (2, kept)
    assert worse["champion_version"] == 1
    assert aliases() == {"champion": 1, "challenger": 2}
    tags = client.get_model_version(name, "2").tags
    assert tags["gate.decision"] == kept
    assert tags["gate.champion_version"] == "1"
    assert float(tags["gate.champion_value"]) == pytest.approx(first["value"])
    assert float(tags["test/acc"]) == pytest.approx(worse["value"])

    better = _pipeline(make_cfg(*LEARNS, CHAMPION_ONLY, "model.width=32", "trainer.max_epochs=2"))
    assert better["value"] > first["value"]
    assert (better["version"], better["decision"]) == (3, "promoted to champion over v1")
    assert aliases() == {"champion": 3, "challenger": 3}
    report = Path(make_cfg().paths.reports) / "register.json"
    assert json.loads(report.read_text()) == better
    # Each version points at the run that trained it.
    assert client.get_model_version(name, "3").run_id == _run_info(make_cfg())["run_id"]


def test_champion_pyfunc_predicts_from_raw_images(champion):
    cfg = champion
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.register.model_name}@champion")
    classes = load_meta(cfg.paths.processed)["classes"]
    x, y = load_split(cfg.paths.processed, "test")
    x = x[:500]  # (N, 28, 28) uint8, as stored

    out = model.predict(x)
    assert list(out.columns) == ["label", *classes] and len(out) == len(x)
    probs = out[classes].to_numpy()
    assert (probs >= 0).all() and np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert out["label"].tolist() == [classes[i] for i in probs.argmax(axis=1)]
    # The shipped network is the evaluated checkpoint, preprocessing included.
    best = Path(cfg.paths.train) / _run_info(cfg)["best_checkpoint"]
    net = Classifier.load_from_checkpoint(best, map_location="cpu").net
    assert np.allclose(probs, predict(net, x).softmax(-1).numpy(), atol=1e-5)

    # The model owns its input contract (no lossy signature conversion before it): pixels
    # scaled to [0, 1] are refused with the fix, not cut to 0 and answered with confidence ...
    with pytest.raises(MlflowException, match=r"scaled to \[0, 1\].*\(x \* 255\)"):
        model.predict(x[:4] / 255.0)
    with pytest.raises(MlflowException, match=r"wrap a single image as \[image\]"):
        model.predict(x[0])
    with pytest.raises(MlflowException, match=r"must be 0-255"):
        model.predict(x[:2].astype(np.int64) * 2)
    # ... whole-number floats and ints are the same pixels ...
    assert np.allclose(model.predict(x[:4].astype(np.float64))[classes], probs[:4], atol=1e-6)
    # ... and images of another size or colour go through preprocessing's own conversion.
    rgb_big = np.stack(
        [np.asarray(Image.fromarray(i).convert("RGB").resize((56, 56))) for i in x[:4]]
    )
    again = [fit_image(Image.fromarray(i), (28, 28), 1) for i in rgb_big]
    assert np.allclose(
        model.predict(rgb_big)[classes], model.predict(np.stack(again))[classes], atol=1e-6
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_invocations(champion, tmp_path):
    cfg = champion
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "models", "serve"),
                *("-m", f"models:/{cfg.register.model_name}@champion"),
                *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)),
            ],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the workers go down with it
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited ({server.returncode}):\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {url}/ping after 90 s:\n{log.read_text()}")
            time.sleep(0.25)

        x, _ = load_split(cfg.paths.processed, "test")
        status, body = _post(f"{url}/invocations", {"inputs": x[:4].tolist()})
        assert status == 200, body
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        local = mlflow.pyfunc.load_model(f"models:/{cfg.register.model_name}@champion").predict(
            x[:4]
        )
        served = body["predictions"]
        assert [row["label"] for row in served] == local["label"].tolist()
        classes = load_meta(cfg.paths.processed)["classes"]
        assert np.allclose([[row[c] for c in classes] for row in served], local[classes], atol=1e-6)

        # Pixels scaled to [0, 1] are refused in one line naming the fix, not cut to 0 and
        # answered "Sneaker" with confidence. (MLflow's server puts its own "Failed to predict
        # data '<input, abridged>'" line before the model's error.)
        status, body = _post(f"{url}/invocations", {"inputs": (x[:4] / 255.0).tolist()})
        error = body["message"].rsplit("Error: ", 1)[-1]
        assert status == 400 and "(x * 255)" in error
        assert "\n" not in error and len(error) < 300
        status, body = _post(f"{url}/invocations", {"inputs": []})
        assert status == 400 and "expected raw pixel values" in body["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
