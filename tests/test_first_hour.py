"""What a new user meets in the first hour: errors they can fix print as one line from the real
stage scripts (unexpected ones keep their traceback), runs stay clean after DVC rewrites
params.yaml, each task's curves are drawn as pictures, and MLflow shows what data a run saw."""

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from dlpipe.data import MIRROR_ENV
from dlpipe.plots import history_curves
from dlpipe.run_labels import log_splits, run_title, split_digest
from dlpipe.tracking import EXPERIMENT_KIND, git_commit, mark_experiment

REPO = Path(__file__).resolve().parents[1]


def stage(name: str, *overrides: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, f"pipelines/{name}.py", *overrides],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_data_error_is_one_line_and_exit_1(tmp_path):
    # A mirror whose files are not the published ones: collect's checksum check refuses them.
    mirror = tmp_path / "mirror" / "fashion-mnist"
    mirror.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (mirror / name).write_bytes(b"not the published file")
    done = stage("collect", f"paths.raw={tmp_path / 'raw'}", env={MIRROR_ENV: str(mirror.parent)})
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("collect: ChecksumError: "), done.stderr
    assert "sha256" in errors[0]
    assert "Traceback" not in done.stderr and "Error executing job" not in done.stderr
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").rglob("*.gz"))


def test_a_config_error_is_its_message_and_exit_1(tmp_path):
    done = stage("train", "train.batch_size=0", f"paths.train={tmp_path / 'train'}")
    assert done.returncode == 1
    assert done.stderr.startswith("train: ConfigError: bad config value(s)"), done.stderr
    assert "train.batch_size=0" in done.stderr
    assert "Traceback" not in done.stderr and "Error executing job" not in done.stderr


def test_an_unexpected_error_keeps_its_traceback(tmp_path):
    # No trained model where evaluate looks: not one of the project's errors, so the traceback
    # says where it happened.
    done = stage("evaluate", f"paths.train={tmp_path / 'nothing'}")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "run.json" in done.stderr


def test_git_dirty_ignores_what_dvc_writes(tmp_path, monkeypatch):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for name in ("params.yaml", "dvc.lock", "train.py"):
        (tmp_path / name).write_text("a: 1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "start")
    monkeypatch.chdir(tmp_path)
    assert git_commit()["git_dirty"] == "false"
    # `dvc exp run -S` rewrites params.yaml and DVC stages a new dvc.lock: not dirty code.
    (tmp_path / "params.yaml").write_text("a: 2\n")
    (tmp_path / "dvc.lock").write_text("a: 2\n")
    git("add", "dvc.lock")
    assert git_commit()["git_dirty"] == "false"
    (tmp_path / "train.py").write_text("a: 2\n")
    assert git_commit()["git_dirty"] == "true"


def test_history_curves_draw_what_the_task_logged(tmp_path):
    gan = [
        {"epoch": e, "train/d_loss": 1.0 - e / 10, "train/g_loss": 2.0, "val/fid": 50.0 - e}
        for e in range(3)
    ]
    out = tmp_path / "plots"
    out.mkdir()
    (out / "acc.png").write_bytes(b"a stale curve of another task")
    written = history_curves(gan, out)
    assert sorted(p.name for p in written) == ["d_loss.png", "fid.png", "g_loss.png"]
    assert sorted(p.name for p in out.iterdir()) == ["d_loss.png", "fid.png", "g_loss.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_runs_show_their_data_and_experiment_kind(tmp_path, mlflow_db_template):
    db = tmp_path / "mlflow.db"
    db.write_bytes(mlflow_db_template.read_bytes())
    client = MlflowClient(f"sqlite:///{db}")
    experiment_id = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    mark_experiment(client, client.get_experiment(experiment_id))
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]

    meta = {
        "name": "toy",
        "sha256": {"train_x.npy": "1" * 64, "train_y.npy": "2" * 64, "val_x.npy": "3" * 64},
    }
    run_id = client.create_run(experiment_id).info.run_id
    log_splits(client, run_id, meta, tmp_path / "processed", ("train", "val", "test"))
    inputs = client.get_run(run_id).inputs.dataset_inputs
    seen = {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}) for i in inputs}
    assert seen == {  # no test split recorded in meta: nothing claimed for it
        "toy-train": (split_digest(meta, "train"), {"mlflow.data.context": "train"}),
        "toy-val": (split_digest(meta, "val"), {"mlflow.data.context": "val"}),
    }
    assert str((tmp_path / "processed").resolve()) in inputs[0].dataset.source
    assert split_digest(meta, "train") != split_digest(meta, "val")
    assert run_title("train", "cnn", "toy", run_id) == f"train cnn toy {run_id[:6]}"
