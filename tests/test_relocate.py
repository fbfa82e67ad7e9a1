"""A project folder that moves: its SQLite store's absolute artifact paths are detected before a
stage runs (naming the old folder and the fix), and `python -m dlpipe.tracking relocate` points
them at the new folder, after which the registered champion loads from the copy alone."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from dlpipe.tracking import StoreMovedError, check_store_location, setup_mlflow

MODEL = """
import mlflow


class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input * 2


mlflow.models.set_model(Doubler())
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with the embedded store (default artifact root) and a @champion."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "doubler.py").write_text(MODEL)
    code = (
        "import mlflow\n"
        "mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "mlflow.set_experiment('dlpipe-x')\n"
        "with mlflow.start_run():\n"
        "    info = mlflow.pyfunc.log_model(name='model', python_model='doubler.py',"
        " registered_model_name='x-classifier')\n"
        "mlflow.MlflowClient().set_registered_model_alias('x-classifier', 'champion', '1')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True)
    return root


@pytest.mark.parametrize("original", ["deleted", "kept"])
def test_moved_project_is_refused_then_relocated(project, tmp_path, monkeypatch, original):
    copy = tmp_path / "moved"
    shutil.copytree(project, copy)
    if original == "deleted":
        shutil.rmtree(project)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded default store
    state = "no longer exists" if original == "deleted" else "still exists"
    with pytest.raises(StoreMovedError, match=rf"under {project}/mlruns.*{state}.*relocate"):
        check_store_location("sqlite:///mlflow.db")  # the embedded default, as stages see it
    with pytest.raises(StoreMovedError):
        setup_mlflow(None, "dlpipe-x")  # ...checked at every stage's entry

    subprocess.run(
        [sys.executable, "-m", "dlpipe.tracking", "relocate", "--db", "mlflow.db"],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    check_store_location("sqlite:///mlflow.db")  # accepted now
    # Absolute URI from here: MLflow caches one store per URI, and this process saw two folders.
    setup_mlflow(f"sqlite:///{copy / 'mlflow.db'}", "dlpipe-x")
    if original == "kept":
        shutil.rmtree(project)  # the copy must not lean on the original any more
    model = mlflow.pyfunc.load_model("models:/x-classifier@champion")
    assert (model.predict(np.array([1.0, 2.0])) == [2.0, 4.0]).all()
    run = mlflow.search_runs(experiment_names=["dlpipe-x"]).iloc[0]
    assert run["artifact_uri"].startswith(str(copy / "mlruns"))


def test_store_in_place_is_accepted(project, monkeypatch):
    monkeypatch.chdir(project)
    check_store_location("sqlite:///mlflow.db")
