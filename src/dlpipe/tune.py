"""Stage 3: an Optuna study over the model's search space; each trial is `train.fit` on train/val.

The study lives in persistent storage (SQLite by default, any Optuna RDB URL or a `.log` journal
file), so a re-run resumes it until `tune.n_trials` trials have finished in total.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import yaml
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from dlpipe.callbacks import DivergedError
from dlpipe.data import write_json
from dlpipe.schema import check_config
from dlpipe.tracking import setup_mlflow
from dlpipe.train import fit, to_dict, with_overrides

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process runs a trial (user attr)
SAMPLE_TYPES = ("float", "int", "categorical")


def suggest(
    trial: optuna.Trial,
    space: Mapping[str, Any],
    prefix: str = "",
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample every leaf of a (nested) search space; returns {"optim.lr": 0.003, ...}.

    A leaf with `when: {"optim.name": [sgd]}` is sampled only if the parameters sampled before
    it (in file order) have one of those values: a conditional space, e.g. momentum for SGD only.
    `lr@sgd` sets the config key `lr` under its own Optuna name, so one key can have a range
    per branch.
    """
    params = {} if params is None else params
    for key, spec in space.items():
        name = f"{prefix}{key}"
        if "type" not in spec:
            suggest(trial, spec, f"{name}.", params)
            continue
        if not _applies(spec.get("when"), params, name):
            continue
        key = config_key(name)
        if spec["type"] == "float":
            params[key] = trial.suggest_float(
                name, spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step")
            )
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(
                name,
                spec["low"],
                spec["high"],
                log=spec.get("log", False),
                step=spec.get("step", 1),
            )
        elif spec["type"] == "categorical":
            params[key] = trial.suggest_categorical(name, list(spec["choices"]))
        else:
            raise ValueError(
                f"search.{name}.type is {spec['type']!r}: choose one of {SAMPLE_TYPES}"
            )
    return params


def config_key(name: str) -> str:
    """The config key an Optuna parameter sets: "optim.lr@sgd" -> "optim.lr"."""
    return name.split("@", 1)[0]


def _applies(when: Mapping[str, Any] | None, params: Mapping[str, Any], name: str) -> bool:
    if not when:
        return True
    for key, allowed in when.items():
        if key not in params:
            raise ValueError(
                f"search.{name}.when refers to {key!r}, which is not sampled before it: put "
                f"{key} earlier in the search space"
            )
        if params[key] not in (allowed if isinstance(allowed, list | tuple) else [allowed]):
            return False
    return True


def study_name(cfg: DictConfig) -> str:
    """Same data, model, search space and training setup -> same study (so a re-run resumes it);
    any change to those starts a new one. The budget and storage are not part of the identity."""
    if cfg.tune.study_name:
        return cfg.tune.study_name
    tune = {
        k: v for k, v in to_dict(cfg.tune).items() if k not in ("n_trials", "timeout_s", "storage")
    }
    identity = {k: to_dict(cfg[k]) for k in ("data", "model", "optim", "train", "search")}
    identity |= {"tune": tune, "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.data.name}-{cfg.model.name}-{digest}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    if url.endswith(".log"):  # a journal file: works on shared file systems without a database
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # Heartbeats let a resumed study mark trials of a killed process as failed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)


class BestScore(Callback):
    """Best value of `monitor` over a trial's epochs: what the study maximizes."""

    def __init__(self, monitor: str, maximize: bool):
        self.monitor, self.maximize, self.value = monitor, maximize, None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        score = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or score is None:
            return
        score = float(score)
        if self.value is None or (score > self.value if self.maximize else score < self.value):
            self.value = score


def tune(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg)
    out = Path(cfg.paths.tune)
    storage_url = cfg.tune.storage or f"sqlite:///{cfg.paths.study_db}"
    experiment_id = setup_mlflow(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    client = MlflowClient()
    maximize = cfg.tune.direction == "maximize"

    study = optuna.create_study(
        study_name=study_name(cfg),
        storage=open_storage(storage_url),
        direction=cfg.tune.direction,
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=cfg.tune.pruner.n_startup_trials,
            n_warmup_steps=cfg.tune.pruner.n_warmup_steps,
        ),
        load_if_exists=True,
    )
    # One MLflow parent run per study, reopened when the study resumes.
    parent_id = study.user_attrs.get("mlflow_run_id")
    if parent_id is None:
        parent_id = client.create_run(
            experiment_id, run_name="tune", tags={"stage": "tune", "optuna.study": study.study_name}
        ).info.run_id
        study.set_user_attr("mlflow_run_id", parent_id)
        client.log_dict(parent_id, to_dict(cfg.search), "search_space.yaml")
    else:
        client.update_run(parent_id, status="RUNNING")
    close_stale_trials(study, client, parent_id)

    # Trials run on one device: a DDP launcher would re-execute this whole script per rank.
    trial_base = with_overrides(
        cfg,
        {"trainer.devices": 1, "trainer.strategy": "auto", "trainer.enable_progress_bar": False},
    )

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", WORKER)
        # Seeded by the trial's number, which the storage hands out once: a lone worker
        # replays the same trials, and parallel workers (or a resumed study) never draw the
        # same random start twice. TPE itself is stateless: it reads the finished trials.
        study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + trial.number)
        params = suggest(trial, to_dict(cfg.search))
        best = BestScore(cfg.tune.metric, maximize)
        tags = {"mlflow.parentRunId": parent_id, "stage": "tune", "optuna.trial": str(trial.number)}
        trainer, logger = None, None
        try:
            trainer, logger = fit(
                with_overrides(trial_base, params),
                run_name=f"trial-{trial.number}",
                max_epochs=cfg.tune.max_epochs,
                callbacks=[PyTorchLightningPruningCallback(trial, monitor=cfg.tune.metric), best],
                tags=tags,
            )
        except optuna.TrialPruned:
            _mark_child(client, parent_id, trial.number, "pruned")
            raise
        except DivergedError:
            # The user's failure (the config diverges): it counts against the budget.
            trial.set_user_attr("outcome", "diverged")
            _mark_child(client, parent_id, trial.number, "diverged")
            raise
        if best.value is None:
            raise RuntimeError(f"trial {trial.number} never reported {cfg.tune.metric}")
        return best.value

    done = spent_budget(study)
    remaining = cfg.tune.n_trials - done
    if remaining > 0:
        log.info("study %s: %d trials done, running %d more", study.study_name, done, remaining)

        def stop_at_budget(study: optuna.Study, trial: FrozenTrial) -> None:
            # Other workers sharing the storage count towards the same total budget, their
            # running trials included: a worker does not start a trial the others will fill.
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if spent_budget(study) + running >= cfg.tune.n_trials:
                study.stop()

        study.optimize(
            objective,
            n_trials=remaining,
            timeout=cfg.tune.timeout_s,
            callbacks=[stop_at_budget],
            catch=(DivergedError,),  # a diverged trial fails; the study goes on
            gc_after_trial=True,
        )
    else:
        log.info("study %s already has %d finished trials; nothing to run", study.study_name, done)
    close_stale_trials(study, client, parent_id)

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        client.set_terminated(parent_id, status="FAILED")
        raise RuntimeError(
            f"study {study.study_name} has no completed trial (all pruned or failed): check the "
            "trial runs in MLflow, widen the search space or raise tune.n_trials"
        )
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in FINISHED}
    summary = {
        "study_name": study.study_name,
        "tuned_for": {"data": cfg.data.name, "model": cfg.model.name, "task": cfg.task.name},
        "storage": storage_url,
        "best_trial": study.best_trial.number,
        "best_value": study.best_value,
        "metric": cfg.tune.metric,
        "trials": counts,
        "mlflow_run_id": parent_id,
    }
    now = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        # Tags, not params: MLflow params are write-once, and a resumed study may find a new best.
        tags=[RunTag(f"best.{k}", str(v)) for k, v in study.best_params.items()],
        metrics=[Metric(f"best/{cfg.tune.metric}", study.best_value, now, 0)]
        + [Metric(f"trials/{state}", n, now, 0) for state, n in counts.items()],
    )
    client.set_terminated(parent_id)

    out.mkdir(parents=True, exist_ok=True)
    best = {config_key(k): v for k, v in study.best_params.items()}
    (out / "best_params.yaml").write_text(yaml.safe_dump(best, sort_keys=True))
    write_json(out / "study.json", summary)
    log.info(
        "best %s %.4f (trial %d): %s",
        cfg.tune.metric,
        study.best_value,
        study.best_trial.number,
        study.best_params,
    )
    return summary


def spent_budget(study: optuna.Study) -> int:
    """Trials that count against tune.n_trials: complete, pruned, or failed by the config
    (diverged). A trial killed with its worker or crashed by an error is not the config's
    result, so it does not count and another trial takes its place."""
    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and t.user_attrs.get("outcome") == "diverged")
        for t in study.get_trials(deepcopy=False)
    )


def close_stale_trials(study: optuna.Study, client: MlflowClient, parent_id: str) -> list[int]:
    """Fail the RUNNING trials whose worker is gone, and close their MLflow runs; returns
    their numbers. A worker on this machine is gone when its process is; a worker elsewhere,
    when its heartbeat stops (RDB storages, after the grace period)."""
    storage = study._storage  # Optuna has no public getter; its methods are public API
    if isinstance(storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
    stale = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            storage.set_trial_user_attr(trial._trial_id, "outcome", "killed")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            stale.append(trial.number)
    # The MLflow runs of trials no longer running (killed mid-trial: their process never
    # closed them) are closed too, in one query.
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    orphans = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' "
        "and attributes.status = 'RUNNING'",
    )
    for run in orphans:
        number = int(run.data.tags.get("optuna.trial", -1))
        if states.get(number, TrialState.RUNNING) != TrialState.RUNNING:
            client.set_tag(run.info.run_id, "optuna.outcome", "killed")
            client.set_terminated(run.info.run_id, status="KILLED")
    if stale:
        log.warning(
            "trials %s of study %s lost their worker: failed, not counted", stale, study.study_name
        )
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _mark_child(client: MlflowClient, parent_id: str, number: int, outcome: str) -> None:
    """Tag a trial's MLflow run with why it stopped early (Lightning marks it FAILED)."""
    runs = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' "
        f"and tags.`optuna.trial` = '{number}'",
    )
    for run in runs:
        client.set_tag(run.info.run_id, "optuna.outcome", outcome)
        client.set_terminated(run.info.run_id, status="KILLED")
