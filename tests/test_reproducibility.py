"""The same commit and data give the same model: the smoke pipeline (`dvc exp run -S smoke=true`,
all six stages) runs in two fresh copies of this checkout, and their metrics, processed data and
trained weights must be identical (CPU, trainer=cpu's deterministic setting). The version the
first run registered (its @challenger) then has its lineage chain walked back to the raw files'
sha256 and checked against the local data and dvc.lock (dlpipe.lineage), which must notice a
change."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from dlpipe.data import sha256_file
from dlpipe.lineage import main as lineage_main
from dlpipe.lineage import walk
from dlpipe.models import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
MODEL = "models:/fashion_mnist-classifier@challenger"  # this run's version: champion or not
SMOKE = ["smoke=true", "trainer.enable_progress_bar=false"]


def copy_checkout(root: Path) -> None:
    """This checkout's tracked and not-ignored files (uncommitted work included), committed
    into a fresh git repo at `root`: nothing the earlier runs here left behind comes along."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(["git", *args], cwd=root, env=ENV, check=True, capture_output=True)


ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@localhost",
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
}


@pytest.fixture(scope="module")
def two_runs(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two copies of the checkout, each through `dvc exp run -S smoke=true` (side by side)."""
    env = {**ENV, "DLPIPE_DATA_MIRROR": str(mirror)}
    env.pop("MLFLOW_TRACKING_URI", None)
    roots = [tmp_path_factory.mktemp(f"copy_{k}") for k in "ab"]
    for root in roots:
        copy_checkout(root)
    command = [sys.executable, "-m", "dvc", "exp", "run", *(f"-S={o}" for o in SMOKE)]
    # Own process groups: a timed-out run is killed with the stage processes it started.
    runs = [
        subprocess.Popen(
            command,
            cwd=r,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for r in roots
    ]
    try:
        for root, run in zip(roots, runs, strict=True):
            out = run.communicate(timeout=1800)[0].decode()  # a hang guard: ~1 min idle
            assert run.returncode == 0, f"dvc exp run in {root} failed:\n{out[-5000:]}"
    finally:  # a failed or timed-out run leaves no pipeline running behind the test
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    return roots[0], roots[1]


def outputs_to_compare(root: Path) -> list[str]:
    """The files that must be identical, relative to a copy's root, in pipeline order."""
    data = sorted(str(p.relative_to(root)) for p in (root / "data").rglob("*") if p.is_file())
    run = json.loads((root / "models/train/run.json").read_text())
    return [
        *data,  # data/raw/... then data/processed/...
        "models/tune/best_params.yaml",
        f"models/train/{run['best_checkpoint']}",
        "reports/train/metrics.json",
        "reports/evaluate/metrics.json",
    ]


def same(a: Path, b: Path) -> bool:
    """Byte-identical files; a checkpoint by its state dict (every tensor's bytes), since the
    file also records the run's own paths and callback state."""
    if a.suffix != ".ckpt":
        return sha256_file(a) == sha256_file(b)
    (state_a, _), (state_b, _) = read_checkpoint(a), read_checkpoint(b)

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).contiguous().view(torch.uint8)  # 1-D first: 0-dim counters too

    return state_a.keys() == state_b.keys() and all(
        state_a[k].dtype == state_b[k].dtype
        and state_a[k].shape == state_b[k].shape
        and raw(state_a[k]).equal(raw(state_b[k]))
        for k in state_a
    )


def first_difference(a: Path, b: Path) -> str | None:
    """The first output (pipeline order) that differs between two copies, or is missing in one."""
    names_a, names_b = outputs_to_compare(a), outputs_to_compare(b)
    for name in names_a:
        if name not in names_b or not same(a / name, b / name):
            return name
    extra = sorted(set(names_b) - set(names_a))
    return extra[0] if extra else None


def test_two_fresh_copies_give_identical_data_metrics_and_weights(two_runs):
    a, b = two_runs
    assert first_difference(a, b) is None, (
        f"{first_difference(a, b)} differs between two runs of the same commit and data"
    )
    metrics = json.loads((a / "reports/evaluate/metrics.json").read_text())
    assert 0.0 < metrics["test/acc"] <= 1.0
    # The comparison does notice a difference, and names it.
    (b / "reports/train/metrics.json").write_text("{}\n")
    try:
        assert first_difference(a, b) == "reports/train/metrics.json"
    finally:
        shutil.copy2(a / "reports/train/metrics.json", b / "reports/train/metrics.json")


def test_lineage_walks_from_the_champion_to_the_raw_files_and_notices_changes(
    two_runs, capsys, monkeypatch
):
    root = two_runs[0]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    chain = walk(client, MODEL, root)
    assert chain.differences == []
    tags, description = chain.tags, chain.version.description
    # The chain: train run -> the data files it saw, whose sha256 are the publisher's files.
    assert tags["lineage.train_run"] == chain.version.run_id
    pins = yaml.safe_load((REPO / "conf/data/fashion_mnist.yaml").read_text())["files"]
    raw = root / "data/raw/fashion_mnist"
    for name, sha in pins.items():  # conf/data pins the upstream files' sha256
        assert chain.data[name] == sha == sha256_file(raw / name)
    assert {p.parent for p in chain.files.values()} == {raw, root / "data/processed/fashion_mnist"}
    # ... and dvc.lock, the study, the metrics and the gate, as tags.
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert tags["lineage.dvc.train:models/train"] == lock["train"]["outs"][0]["md5"]
    assert "lineage.dvc.collect:data/raw/fashion_mnist" in tags
    study = json.loads((root / "models/tune/study.json").read_text())
    assert tags["lineage.optuna.study"] == study["study_name"]
    assert tags["lineage.optuna.best_trial"] == str(study["best_trial"])
    trial = client.get_run(tags["lineage.optuna.best_trial_run"])
    assert trial.data.tags["optuna.trial"] == str(study["best_trial"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    assert tags["lineage.git_commit"] == head.stdout.strip()
    # `dvc exp run -S` rewrote params.yaml (and wrote dvc.lock): the pipeline's own records,
    # which do not make the code dirty (dlpipe.tracking's git_dirty ignores them).
    assert tags["lineage.git_dirty"] == "false"
    assert tags["lineage.metric.test/acc"] and f"gate: {tags['gate.decision']}" in description
    assert "dvc.lock: train:models/train md5" in description
    # The same version from its train run's id.
    assert walk(client, chain.version.run_id, root).version.version == chain.version.version

    # The command line, in the project folder: everything matches...
    monkeypatch.chdir(root)
    assert lineage_main([MODEL, "--tracking-uri", "sqlite:///mlflow.db"]) == 0
    assert "OK: the local data files and dvc.lock match" in capsys.readouterr().out
    # ... then a processed file and dvc.lock change: both named, exit code 1.
    changed = root / "data/processed/fashion_mnist/test_y.npy"
    lock_text = (root / "dvc.lock").read_text()
    original = changed.read_bytes()
    try:
        changed.write_bytes(original + b"\0")
        md5 = lock["train"]["outs"][0]["md5"]
        (root / "dvc.lock").write_text(lock_text.replace(md5, "0" * 32 + ".dir"))
        assert lineage_main([MODEL, "--tracking-uri", "sqlite:///mlflow.db"]) == 1
        out = capsys.readouterr().out
        assert "DIFFERS (2)" in out and f"data file {changed.relative_to(root)}" in out
        assert "dvc.lock train:models/train is md5 " + "0" * 32 in out
    finally:
        changed.write_bytes(original)
        (root / "dvc.lock").write_text(lock_text)
