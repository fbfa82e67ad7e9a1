"""The whole pipeline through DVC, in a temporary copy of the repo, at smoke size."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
QUICK = [
    "smoke=true",
    "tiny.tune.n_trials=2",  # a smoke size wins over tune.n_trials: two trials, to count them
    "trainer.enable_progress_bar=false",
]


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


@pytest.fixture
def repo_copy(tmp_path: Path, mirror: Path) -> tuple[Path, dict[str, str]]:
    """Tracked and not-ignored files of this checkout, committed into a fresh git repo."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    root = tmp_path / "repo"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DLPIPE_DATA_MIRROR": str(mirror),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@localhost",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    for args in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "copy"],
    ):
        run(args, root, env)
    return root, env


def ran_stages(output: str) -> list[str]:
    return [
        s
        for s in ("collect", "preprocess", "tune", "train", "evaluate", "register")
        if f"Running stage '{s}'" in output
    ]


def test_dvc_repro_end_to_end(repo_copy: tuple[Path, dict[str, str]]):
    root, env = repo_copy
    dvc = [sys.executable, "-m", "dvc"]
    # `dvc exp run -S` is DVC's Hydra composition: conf/ + overrides -> params.yaml, then repro.
    out = run([*dvc, "exp", "run", *(f"-S={o}" for o in QUICK)], root, env)
    assert ran_stages(out) == ["collect", "preprocess", "tune", "train", "evaluate", "register"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["smoke"] is True and params["tiny"]["tune"]["n_trials"] == 2

    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0 and "test/roc_auc_ovr_macro" in metrics
    registered = json.loads((root / "reports/register.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    model = client.get_registered_model(registered["model_name"])
    assert model.aliases == {"champion": 1, "challenger": 1}
    study = json.loads((root / "models/tune/study.json").read_text())
    assert sum(study["trials"].values()) == 2

    shown = json.loads(run([*dvc, "metrics", "show", "--json"], root, env).splitlines()[-1])
    assert "test/acc" in json.dumps(shown) and "val/acc" in json.dumps(shown)
    plots = run([*dvc, "plots", "show", "--json"], root, env)
    assert "Loss by epoch" in plots and "Confusion matrix (test)" in plots

    # Nothing changed: nothing runs.
    out = run([*dvc, "repro"], root, env)
    assert ran_stages(out) == []

    # One training key changed (at smoke size, the epochs are tiny.trainer.max_epochs): only
    # train and what depends on it.
    more_epochs = "-S=tiny.trainer.max_epochs=2"
    out = run([*dvc, "exp", "run", *(f"-S={o}" for o in QUICK), more_epochs], root, env)
    assert ran_stages(out) == ["train", "evaluate", "register"]
    assert yaml.safe_load((root / "params.yaml").read_text())["tiny"]["trainer"]["max_epochs"] == 2
    run_info = json.loads((root / "models/train/run.json").read_text())
    assert run_info["epochs"] == 2
    versions = client.search_model_versions(f"name='{registered['model_name']}'")
    assert len(versions) == 2
    assert client.get_registered_model(registered["model_name"]).aliases["challenger"] == 2


def test_dvc_exp_run_a_named_experiment(repo_copy: tuple[Path, dict[str, str]]):
    # Another dataset, model and task in one switch: the stages, metrics and registered model
    # follow the experiment (a regression on table rows, not image classification).
    root, env = repo_copy
    quick = ["experiment=housing_mlp", "smoke=true", "trainer.enable_progress_bar=false"]
    out = run([sys.executable, "-m", "dvc", "exp", "run", *(f"-S={o}" for o in quick)], root, env)
    assert ran_stages(out) == ["collect", "preprocess", "tune", "train", "evaluate", "register"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert (params["data"]["name"], params["model"]["name"], params["task"]["name"]) == (
        "california_housing",
        "mlp",
        "regressor",
    )
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
    assert metrics["test/rmse"] > 0 and "test/r2" in metrics
    registered = json.loads((root / "reports/register.json").read_text())
    assert registered["model_name"] == "california_housing-regressor"
    assert registered["metric"] == "test/rmse" and registered["champion_version"] == 1


@pytest.mark.slow
def test_dvc_exp_run_switches_model(repo_copy: tuple[Path, dict[str, str]]):
    root, env = repo_copy
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "exp", "run", *(f"-S={o}" for o in QUICK), "-S=model=mlp"], root, env)
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["model"]["name"] == "mlp" and "norm" in params["search"]["model"]
    checkpoint = json.loads((root / "models/train/run.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    assert client.get_run(checkpoint["run_id"]).data.params["model.name"] == "mlp"
