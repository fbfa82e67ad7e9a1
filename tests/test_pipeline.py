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
    # @champion only above chance (smoke size: chance alone; conf/tiny/task), else none yet.
    promoted = registered["decision"] == "promoted to champion"
    assert promoted is (metrics["test/acc"] > metrics["chance/acc"])
    assert model.aliases == ({"champion": 1} if promoted else {}) | {"challenger": 1}
    study = json.loads((root / "models/tune/study.json").read_text())
    assert sum(study["trials"].values()) == 2

    shown = json.loads(run([*dvc, "metrics", "show", "--json"], root, env).splitlines()[-1])
    assert "test/acc" in json.dumps(shown) and "val/acc" in json.dumps(shown)
    # Plots are the pictures the stages drew for this task, so they draw offline, and none
    # of another task's is missing.
    plots = json.loads(run([*dvc, "plots", "show", "--json"], root, env).splitlines()[-1])
    assert not plots.get("errors"), plots["errors"]
    drawn = {name for name, shown in plots["data"].items() if shown[0]["type"] == "image"}
    assert {"reports/train/plots/loss.png", "reports/train/plots/acc.png"} <= drawn
    assert "reports/evaluate/plots/confusion.png" in drawn and len(drawn) == len(plots["data"])

    # Logs a user reads (not a terminal here): no start-up chatter, no progress-bar \r.
    for noise in ("GPU available", "litlogger", "LeafSpec", "Add type hints", "\r"):
        assert noise not in out, noise
    assert "epoch 1/1: " in out  # a line per epoch instead of the bar

    # MLflow: a model-training experiment; the training run named for what it trained, on
    # which data splits, and not dirty although `dvc exp run -S` rewrote params.yaml.
    train_run = client.get_run(json.loads((root / "models/train/run.json").read_text())["run_id"])
    experiment = client.get_experiment(train_run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert train_run.info.run_name == f"train cnn fashion_mnist {train_run.info.run_id[:6]}"
    assert train_run.data.tags["git_dirty"] == "false"
    inputs = train_run.inputs.dataset_inputs
    contexts = {t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert contexts == {"train", "val", "test"}
    tune_run = client.get_run(study["mlflow_run_id"])
    assert tune_run.data.tags["mlflow.user"] and tune_run.info.run_name.startswith("tune cnn ")
    # ...and the suite stays green after it: the params.yaml check compares what is committed.
    drift = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    run([*drift, "tests/test_models.py::test_params_yaml_is_the_default_composition"], root, env)

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
    assert registered["metric"] == "test/rmse" and registered["version"] == 1
    assert "baseline/rmse" in metrics and "chance/rmse" in metrics


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


def test_dvc_remote_push_then_a_fresh_clone_pulls_and_reruns_nothing(
    repo_copy: tuple[Path, dict[str, str]], tmp_path: Path
):
    """A team's DVC remote (a local folder here; any DVC remote works the same): the smoke
    pipeline's data, arrays, models and reports pushed, pulled into a fresh clone, where
    `dvc repro` finds everything up to date."""
    root, env = repo_copy
    dvc = [sys.executable, "-m", "dvc"]
    # A forecaster at smoke size: seconds to collect, and naive baselines to evaluate.
    run([*dvc, "exp", "run", "-S=experiment=sp500_gru", "-S=smoke=true"], root, env)
    remote = tmp_path / "remote"
    run([*dvc, "remote", "add", "-d", "team", str(remote)], root, env)
    run(["git", "add", "-A"], root, env)  # dvc.lock, params.yaml, .dvc/config
    run(["git", "commit", "-qm", "smoke run, team remote"], root, env)
    pushed = run([*dvc, "push"], root, env)
    assert "pushed" in pushed

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "models").exists()
    pulled = run([*dvc, "pull"], clone, env)
    assert "added" in pulled or "fetched" in pulled, pulled
    # Nothing re-downloaded or retrained: no stage runs, and the pulled files are the pushed ones.
    out = run([*dvc, "repro"], clone, env)
    assert ran_stages(out) == [], out
    for name in ("models/train/run.json", "reports/evaluate/metrics.json"):
        assert (clone / name).read_bytes() == (root / name).read_bytes()
    status = run([*dvc, "status", "-c"], clone, env)
    assert "Cache and remote 'team' are in sync" in status, status
