"""The study's persistent state: its name, its storage (SQLite, any RDB URL, or a journal file),
its budget, its one MLflow parent run, and the clean-up of trials whose worker died."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from dlpipe.tracking import setup_mlflow, tracking_uri

log = logging.getLogger(__name__)

# Keys of `tune` that say how a study runs or which trial is picked, not what it finds: a
# change resumes the same study.
ORIGIN = "experiment"  # user attr `origin` of trial 0: the experiment's own settings
NOT_IDENTITY = (
    "n_trials", "timeout_s", "storage", "workers", "devices", "devices_per_trial", "constraints",
    "cost",
)  # fmt: skip


def worker_name() -> str:
    """host:pid of this process: which worker runs a trial (user attr), and whether it lives."""
    return f"{socket.gethostname()}:{os.getpid()}"


def study_name(cfg: DictConfig) -> str:
    """Same data, model, search space and training setup -> same study (so a re-run resumes it);
    any change to those starts a new one. The budget, storage and pool are not its identity."""
    if cfg.tune.study_name:
        return cfg.tune.study_name
    digest = hashlib.sha256(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.data.name}-{cfg.model.name}-{digest}"


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What makes a study (resolved, plain): data, model, optimizer, training, search space,
    the tune keys not in NOT_IDENTITY, and the seed. Kept as the study's user attr `identity`."""
    tune = OmegaConf.to_container(cfg.tune, resolve=True)
    found = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in
             ("data", "model", "optim", "train", "search")}  # fmt: skip
    return found | {"tune": {k: v for k, v in tune.items() if k not in NOT_IDENTITY},
                    "seed": cfg.seed}  # fmt: skip


def differs_from_siblings(storage: optuna.storages.BaseStorage, cfg: DictConfig) -> str | None:
    """For a study about to be created: which studies of the same data and model the storage
    already holds, and in which keys their config differs from this one. Workers started by
    hand share a study only if their configs agree; one that differs in a key silently starts
    a study of its own, and this says which key. None when there is no such sibling."""
    name = study_name(cfg)
    prefix = f"{cfg.data.name}-{cfg.model.name}-"
    own = _flat(identity(cfg))
    found = []
    for other in optuna.get_all_study_names(storage):
        if other == name or not other.startswith(prefix):
            continue
        theirs = optuna.load_study(study_name=other, storage=storage).user_attrs.get("identity")
        if theirs is None:
            continue
        theirs = _flat(theirs)
        keys = sorted(k for k in own.keys() | theirs.keys() if own.get(k) != theirs.get(k))
        shown = ", ".join(f"{k}={theirs.get(k)!r} there, {own.get(k)!r} here" for k in keys[:4])
        more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
        found.append(f"{other} ({shown}{more})")
    if not found:
        return None
    return (
        f"a new study {name}: the storage already holds {'; '.join(found)}. To add trials to one "
        "of those instead, give the same config or tune.study_name=<its name>"
    )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= _flat(value, f"{prefix}{key}.")
    return flat


def storage_url(cfg: DictConfig) -> str:
    """tune.storage, or the default: the SQLite file `paths.study_db` for one worker; for
    several, a journal file beside it (`.log`), because SQLite locks up under concurrent
    writers (Optuna's docs advise against it). The choice is logged."""
    if cfg.tune.storage:
        url = str(cfg.tune.storage)
        if cfg.tune.workers > 1 and url.startswith("sqlite:"):
            log.warning(
                "tune.storage=%s with %d workers: SQLite serializes every write and may fail "
                "with 'database is locked'; prefer a journal file (tune.storage=study.log) or "
                "PostgreSQL", url, cfg.tune.workers,
            )  # fmt: skip
        return url
    if cfg.tune.workers > 1:
        url = str(Path(cfg.paths.study_db).with_suffix(".log"))
        log.info(
            "%d workers share the study through the journal file %s (SQLite is for one worker)",
            cfg.tune.workers, url,
        )  # fmt: skip
        return url
    return f"sqlite:///{cfg.paths.study_db}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A journal file (`*.log`: works on a shared file system without a database) or an RDB
    URL (sqlite:///, postgresql+psycopg://, mysql://) with heartbeats: a trial whose worker
    stops beating for 90 s is failed by the next worker that looks."""
    if url.endswith(".log"):
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("postgresql://"):
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)  # the [postgres] extra
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created) between processes on this machine: workers
    started together must not create one SQLite store's schema at the same time (MLflow's
    migrations fail with 'Online migration expected to match one row')."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def improvement(study: optuna.Study, chosen: FrozenTrial, direction: str) -> dict[str, Any]:
    """How much the chosen trial improved the first objective on trial 0 (the experiment's own
    settings), signed so that positive is better; None when trial 0 did not complete."""
    own = [t for t in study.trials if t.user_attrs.get("origin") == ORIGIN]
    first = next((t for t in own if t.state == TrialState.COMPLETE), None)
    if first is None:
        return {"baseline_trial": None, "baseline_value": None, "improvement": None}
    gain = chosen.values[0] - first.values[0]
    return {
        "baseline_trial": first.number,
        "baseline_value": first.values[0],
        "improvement": gain if direction == "maximize" else -gain,
    }


def open_mlflow(cfg: DictConfig) -> str:
    """Point MLflow at the store, creating a SQLite store's schema under a lock: workers that
    start together would otherwise race through MLflow's migrations and crash."""
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    if uri.startswith("sqlite:///"):
        with file_lock(Path(uri.removeprefix("sqlite:///") + ".lock")):
            return setup_mlflow(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    return setup_mlflow(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)


def spent_budget(study: optuna.Study) -> int:
    """Trials that count against tune.n_trials: complete, pruned, or failed by the config
    (diverged). A trial killed with its worker or crashed by an error is not the config's
    result, so it does not count and another trial takes its place."""
    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and t.user_attrs.get("outcome") == "diverged")
        for t in study.get_trials(deepcopy=False)
    )


def running_alive(study: optuna.Study) -> int:
    """RUNNING trials whose worker may still finish them (not a dead process on this host)."""
    return sum(
        not dead_here(t.user_attrs.get("worker"))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    )


def shown_storage(url: str) -> str:
    """A storage as it may be recorded (MLflow tags, study.json): an RDB URL's password masked."""
    if "://" not in url:
        return url  # a journal file's path
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def parent_run(study: optuna.Study, client: MlflowClient, experiment_id: str, storage: str) -> str:
    """The study's one MLflow parent run, created by whichever worker comes first.

    Race-free without a lock: every worker that finds none creates a candidate tagged with
    the study and its storage, then all agree on the earliest candidate (start time, then run
    id) and delete their own if it lost. A later candidate always sees the earlier ones, so all
    pick the same. The storage is part of the match: two studies of one name in two storages
    (say two journal files) logging to one MLflow experiment are two studies.

    A study resumed against another MLflow store than the one holding its recorded parent run
    (mlflow.db deleted, or `mlflow.tracking_uri` changed while the Optuna storage was kept)
    gets a new parent run in this store, with a warning: the earlier trials' runs stay where
    they were logged, the study itself loses nothing."""
    from mlflow.exceptions import MlflowException

    known = study.user_attrs.get("mlflow_run_id")
    if known is not None:
        try:
            client.get_run(known)
            return known
        except MlflowException:
            log.warning(
                "study %s: its MLflow parent run %s is not in this store (%s); its trials so far "
                "keep their runs where they were logged, this invocation's go under a new parent",
                study.study_name, known, client.tracking_uri,
            )  # fmt: skip
    storage = shown_storage(storage)
    filter_string = (
        f"tags.`optuna.study` = '{study.study_name}' and tags.stage = 'tune' "
        f"and tags.`optuna.storage` = '{storage}'"
    )
    own = client.create_run(
        experiment_id, run_name="tune",
        tags={"stage": "tune", "optuna.study": study.study_name, "optuna.storage": storage,
              "optuna.parent": "true"},
    ).info.run_id  # fmt: skip
    candidates = client.search_runs(
        [experiment_id], filter_string=filter_string + " and tags.`optuna.parent` = 'true'"
    )
    winner = min(candidates, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    if winner != own:
        client.delete_run(own)
    # Every worker records the same winner (idempotent), so none depends on the winner's worker
    # having written it first.
    study.set_user_attr("mlflow_run_id", winner)
    return winner


def close_stale_trials(study: optuna.Study, client: MlflowClient, parent_id: str) -> list[int]:
    """Fail the RUNNING trials whose worker is gone, and close their MLflow runs; returns
    their numbers. A worker on this machine is gone when its process is; a worker elsewhere,
    when its heartbeat stops (RDB storages, after the grace period)."""
    storage = study._storage  # Optuna has no public getter; its methods are public API
    if isinstance(storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
    stale = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if dead_here(trial.user_attrs.get("worker")):
            storage.set_trial_user_attr(trial._trial_id, "outcome", "killed")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            stale.append(trial.number)
    # The MLflow runs of trials no longer running (killed mid-trial: their process never
    # closed them) are closed too, in one query.
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    for run in trial_runs(client, parent_id, "attributes.status = 'RUNNING'"):
        number = int(run.data.tags.get("optuna.trial", -1))
        if states.get(number, TrialState.RUNNING) != TrialState.RUNNING:
            client.set_tag(run.info.run_id, "optuna.outcome", "killed")
            client.set_terminated(run.info.run_id, status="KILLED")
    if stale:
        log.warning(
            "trials %s of study %s lost their worker: failed, not counted", stale, study.study_name
        )
    # Trial 0 (the experiment's own settings) lost with its worker runs again: the study must
    # know the value it is to improve on.
    own = [
        t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("origin") == "experiment"
    ]
    if own and all(lost(t) for t in own):
        study.enqueue_trial(own[0].params, {"origin": ORIGIN})
    return stale


def lost(trial: FrozenTrial) -> bool:
    """A trial failed by something else than its config (killed, crashed, surplus)."""
    return trial.state == TrialState.FAIL and trial.user_attrs.get("outcome") != "diverged"


def trial_runs(client: MlflowClient, parent_id: str, condition: str = "") -> list:
    """The MLflow runs of the study's trials (children of `parent_id`), optionally filtered."""
    filter_string = f"tags.`mlflow.parentRunId` = '{parent_id}'"
    if condition:
        filter_string += f" and {condition}"
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=filter_string, max_results=50000)


def mark_child(client: MlflowClient, parent_id: str, number: int, outcome: str) -> None:
    """Tag a trial's MLflow run with why it stopped early (Lightning marks it FAILED)."""
    for run in trial_runs(client, parent_id, f"tags.`optuna.trial` = '{number}'"):
        client.set_tag(run.info.run_id, "optuna.outcome", outcome)
        client.set_terminated(run.info.run_id, status="KILLED")


def dead_here(worker: object) -> bool:
    host, _, pid = str(worker or "").rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
