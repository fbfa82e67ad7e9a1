"""The device pool on real processes (CPU workers, the synthetic image slice): N workers started
together on a fresh checkout share one study and one budget; a worker killed with -9 loses only
its trial; a re-run neither repeats nor loses trials; PostgreSQL and optuna-dashboard are real
servers on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import psutil
import pytest
import services
import yaml
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from dlpipe.tune import open_storage, study_name, tune
from dlpipe.tuning.space import own_settings

LEARNS = ("model=mlp", "optim.scheduler=none", "optim.lr=0.03", "train.batch_size=128")
SPACE = {
    "optim": {"lr": {"type": "float", "low": 0.01, "high": 0.05, "log": True}},
    "model": {"width": {"type": "categorical", "choices": [8, 16]}},
}
STAGE = "import sys; from omegaconf import OmegaConf; from dlpipe.tune import tune; " \
        "tune(OmegaConf.load(sys.argv[1]))"  # fmt: skip


def _cfg(make_cfg, *extra: str) -> DictConfig:
    cfg = make_cfg(*LEARNS, *extra)
    cfg.search = OmegaConf.create(SPACE)
    return cfg


def _stage(cfg: DictConfig, tmp_path: Path) -> subprocess.Popen:
    """`python pipelines/tune.py` as a process: the stage with its pool of workers."""
    path = tmp_path / "stage.yaml"
    OmegaConf.save(cfg, path)
    return subprocess.Popen([sys.executable, "-c", STAGE, str(path)], cwd=tmp_path)


def _reap(proc: subprocess.Popen) -> None:
    """Kill `proc` and its workers if a failed test left them running."""
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
    proc.wait(timeout=60)


def _study(url: str, cfg: DictConfig) -> optuna.Study:
    return optuna.load_study(study_name=study_name(cfg), storage=open_storage(url))


def _children(cfg: DictConfig, parent_id: str) -> dict[int, list]:
    client = MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
    )
    by_trial: dict[int, list] = {}
    for run in runs:
        by_trial.setdefault(int(run.data.tags["optuna.trial"]), []).append(run)
    return by_trial


def _check_study(cfg: DictConfig, url: str, budget: int, workers: int) -> optuna.Study:
    """The invariants of a finished pool: the budget met exactly, unique trial numbers, every
    worker worked, one MLflow child run per trained trial under the one parent run, nothing
    left RUNNING, best parameters written = the study's best."""
    study = _study(url, cfg)
    trials = study.get_trials()
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == budget
    assert len({t.number for t in trials}) == len(trials)
    assert all(t.state != TrialState.RUNNING for t in trials)
    labels = {t.user_attrs["worker_label"] for t in trials if "worker_label" in t.user_attrs}
    assert len(labels) == workers, labels
    # Trial 0 is the experiment's own settings; lost with a worker, it runs again.
    own = [t for t in trials if t.user_attrs.get("origin") == "experiment"]
    assert own[0].number == 0 and all(t.params == own_settings(cfg) for t in own)
    (baseline,) = [t for t in own if t.state == TrialState.COMPLETE]

    parent_id = study.user_attrs["mlflow_run_id"]
    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    parents = client.search_runs([experiment_id], filter_string="tags.`optuna.parent` = 'true'")
    assert [r.info.run_id for r in parents] == [parent_id]
    children = _children(cfg, parent_id)
    trained = {t.number for t in trials if t.user_attrs.get("outcome") != "surplus"}
    assert set(children) == trained and all(len(r) == 1 for r in children.values())
    for number, (run,) in children.items():
        assert run.info.status != "RUNNING"
        assert run.data.tags["optuna.worker"] == study.trials[number].user_attrs["worker_label"]

    best = yaml.safe_load((Path(cfg.paths.tune) / "best_params.yaml").read_text())
    assert best == study.best_params
    summary = json.loads((Path(cfg.paths.tune) / "study.json").read_text())
    assert summary["baseline_trial"] == baseline.number
    assert summary["improvement"] == pytest.approx(study.best_value - baseline.value)
    return study


def test_pool_on_a_fresh_checkout_survives_a_killed_worker(make_cfg, tmp_path):
    # Nothing exists yet: no MLflow store, no study. Slow trials (batch 8, 3 epochs) so the
    # kill lands inside one.
    cfg = _cfg(make_cfg, "tune.workers=3", "tune.n_trials=4", "tune.max_epochs=3",
               "train.batch_size=8", "tune.study_name=pool")  # fmt: skip
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path}/fresh.db"  # make_cfg's store exists
    url = str(Path(cfg.paths.study_db).with_suffix(".log"))  # the pool's default: a journal
    stage = _stage(cfg, tmp_path)
    try:
        deadline = time.monotonic() + 600  # importing torch takes a minute on a busy machine
        victim = None
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.5)
            if not Path(url).exists():
                continue
            try:
                running = _study(url, cfg).get_trials(states=(TrialState.RUNNING,))
            except KeyError:
                continue
            started = [t for t in running if "worker_label" in t.user_attrs]
            if started:
                victim = started[0]
        assert victim is not None, "no worker started a trial"
        parent_id = _study(url, cfg).user_attrs["mlflow_run_id"]
        while victim.number not in _children(cfg, parent_id):  # inside its training
            assert time.monotonic() < deadline, f"trial {victim.number} never opened its run"
            time.sleep(0.5)
        os.kill(int(victim.user_attrs["worker"].rpartition(":")[2]), signal.SIGKILL)
        assert stage.wait(timeout=900) == 0  # minutes only on a machine busy with others
    finally:
        _reap(stage)

    study = _check_study(cfg, url, budget=4, workers=3)
    killed = study.trials[victim.number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["outcome"] == "killed"
    (run,) = _children(cfg, study.user_attrs["mlflow_run_id"])[victim.number]
    assert run.info.status == "KILLED" and run.data.tags["optuna.outcome"] == "killed"

    # Re-running the stage neither repeats nor loses a trial.
    before = [(t.number, t.state, t.params) for t in study.trials]
    assert _stage(cfg, tmp_path).wait(timeout=300) == 0
    assert [(t.number, t.state, t.params) for t in _study(url, cfg).trials] == before


def test_pool_of_three_workers_on_postgresql(make_cfg, postgres):
    url = postgres("pool")
    # Trials of a few seconds (batch 8, 3 epochs), twice as many as workers: a worker whose
    # imports finish last still finds trials left, on an idle machine too.
    cfg = _cfg(make_cfg, "tune.workers=3", "tune.n_trials=6", "tune.max_epochs=3",
               "train.batch_size=8", f"tune.storage={url}", "tune.study_name=pool")  # fmt: skip
    tune(cfg)
    study = _check_study(cfg, url, budget=6, workers=3)
    assert study._storage.__class__.__name__ == "_CachedStorage"  # Optuna's RDB storage


@pytest.mark.parametrize("storage", ["study.log", pytest.param("sqlite", marks=pytest.mark.slow)])
def test_ddp_trial_is_pruned_on_every_rank(make_cfg, tmp_path, storage):
    # A trial of 2 DDP ranks (the 2-process CPU preset), on a journal file or an RDB: a learning
    # trial, then a hopeless one, which rank zero prunes after epoch 0 and every rank stops
    # there (a rank that went on would wait forever in its next all-reduce).
    url = f"sqlite:///{tmp_path / 'study.db'}" if storage == "sqlite" else str(tmp_path / storage)
    cfg = _cfg(
        make_cfg, "trainer=ddp_cpu", "tune.devices_per_trial=2", "tune.n_trials=2",
        "tune.max_epochs=2", "tune.pruner.n_startup_trials=1", "tune.pruner.n_warmup_steps=0",
        f"tune.storage={url}",
    )  # fmt: skip
    cfg.search = OmegaConf.create(
        {"optim": {"lr": {"type": "categorical", "choices": [0.03, 1e-7]}}}
    )
    study = optuna.create_study(
        study_name=study_name(cfg), storage=open_storage(cfg.tune.storage), direction="maximize"
    )
    study.enqueue_trial({"optim.lr": 0.03})
    study.enqueue_trial({"optim.lr": 1e-7})
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    tune(cfg)
    good, hopeless = _study(cfg.tune.storage, cfg).trials
    assert (good.state, hopeless.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    assert sorted(good.intermediate_values) == [0, 1]
    assert sorted(hopeless.intermediate_values) == [0]
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())
    ]  # fmt: skip (multiprocessing's resource tracker lives as long as this process)
    assert left == []  # no rank process left behind


def test_dashboard_shows_a_finished_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="finished", storage=url)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=3)
    port = services.free_port()
    dashboard = subprocess.Popen(
        [Path(sys.executable).parent / "optuna-dashboard", url, "--host", "127.0.0.1",
         "--port", str(port), "--quiet"],
    )  # fmt: skip
    try:
        services.wait_for_port(port, 60, dashboard)
        base = f"http://127.0.0.1:{port}/api"
        with urllib.request.urlopen(f"{base}/studies", timeout=30) as response:
            studies = json.load(response)["study_summaries"]
        (found,) = [s for s in studies if s["study_name"] == "finished"]
        with urllib.request.urlopen(f"{base}/studies/{found['study_id']}", timeout=30) as r:
            trials = json.load(r)["trials"]
        assert sorted(t["number"] for t in trials) == [0, 1, 2]
        assert {t["state"] for t in trials} == {"Complete"}
    finally:
        services.stop(dashboard.pid)
        dashboard.wait(timeout=30)
