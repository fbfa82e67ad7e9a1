"""Stage 3: an Optuna study over the model's search space; each trial is `train.fit` on train/val.

The study lives in persistent storage (SQLite by default, any Optuna RDB URL or a `.log` journal
file), so a re-run resumes it until `tune.n_trials` trials have finished in total. Trial 0 is the
experiment's own settings, so tuning can only match or improve on them. `tune.workers=N` runs
the trials on a pool of N processes (`dlpipe.tuning.pool`); several `tune.objectives` keep a
Pareto front and pick one trial from it (`dlpipe.tuning.objectives`). Run as
`python -m dlpipe.tune <config.yaml> <label> <storage>`, this module is one worker of the pool.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from dlpipe.callbacks import DivergedError
from dlpipe.data import write_json
from dlpipe.errors import UserError
from dlpipe.run_labels import name_run, source_tags
from dlpipe.schema import check_config
from dlpipe.tracking import setup_mlflow
from dlpipe.train import fit, with_overrides
from dlpipe.tuning.callbacks import DDPPruning, TrialRecord, TrialTimeout, read_record
from dlpipe.tuning.cost import check_cost
from dlpipe.tuning.objectives import MEASURED, constraints, log_front, measure, objectives, select
from dlpipe.tuning.pool import run_pool
from dlpipe.tuning.space import config_key, make_pruner, make_sampler, own_settings, suggest
from dlpipe.tuning.study import (
    ORIGIN,
    close_stale_trials,
    dead_here,
    differs_from_siblings,
    identity,
    improvement,
    lost,
    mark_child,
    open_mlflow,
    open_storage,
    parent_run,
    running_alive,
    shown_storage,
    spent_budget,
    storage_url,
    study_name,
    worker_name,
)

# Re-exported: the stage's public names (tests and notebooks open a study with them).
__all__ = ["open_storage", "study_name", "suggest", "tune"]

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class NoCompletedTrialError(UserError, RuntimeError):
    """Every trial of the study was pruned or failed: there are no parameters to hand on."""


def tune(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg)
    goals = objectives(cfg)
    limits = constraints(cfg)
    out = Path(cfg.paths.tune)
    url = storage_url(cfg)
    experiment_id = open_mlflow(cfg)
    client = MlflowClient()
    if len(goals) > 1 and cfg.tune.pruner.name != "none":
        log.info(
            "%d objectives: pruning is off (Optuna prunes single-objective studies only), so "
            "tune.pruner=%s does not apply", len(goals), cfg.tune.pruner.name,
        )  # fmt: skip

    storage = open_storage(url)
    fresh = study_name(cfg) not in optuna.get_all_study_names(storage)
    if fresh and (siblings := differs_from_siblings(storage, cfg)) is not None:
        log.warning("%s", siblings)
    # A fresh study: say what its costliest trial costs (or refuse) before any is drawn.
    cost = check_cost(cfg) if fresh and cfg.tune.cost.check else None
    study = optuna.create_study(
        study_name=study_name(cfg),
        storage=storage,
        directions=[g.direction for g in goals],
        sampler=make_sampler(cfg.tune.sampler, cfg.seed, len(goals)),
        pruner=make_pruner(cfg.tune.pruner, len(goals), cfg.tune.max_epochs),
        load_if_exists=True,
    )
    if fresh:
        study.set_user_attr("identity", identity(cfg))
    if cost is not None:
        study.set_user_attr("cost", cost)
    if not study.trials:
        # Trial 0: the experiment's own settings (skip_if_exists: workers starting together).
        study.enqueue_trial(own_settings(cfg), {"origin": ORIGIN}, skip_if_exists=True)
    # One MLflow parent run per study, reopened when the study resumes.
    parent_id = parent_run(study, client, experiment_id, url)
    parent = client.get_run(parent_id)
    if "mlflow.user" not in parent.data.tags:  # client.create_run records no source or user
        for key, value in source_tags().items():
            client.set_tag(parent_id, key, value)
        name_run(client, parent_id, "tune", cfg.model.name, cfg.data.name)
    if "search_space.yaml" not in {a.path for a in client.list_artifacts(parent_id)}:
        client.log_dict(parent_id, _plain(cfg.search), "search_space.yaml")
    if parent.info.status != "RUNNING":
        client.update_run(parent_id, status="RUNNING")
    close_stale_trials(study, client, parent_id)

    log.info(
        "study %s on %s: %d trials finished of %d; %d worker(s), sampler %s, pruner %s",
        study.study_name, url, _spent(study), cfg.tune.n_trials, cfg.tune.workers,
        cfg.tune.sampler.name, "none" if len(goals) > 1 else cfg.tune.pruner.name,
    )  # fmt: skip
    if cfg.tune.workers > 1:
        run_pool(cfg, url, study, client)
    else:
        work(cfg, url, "0@" + ("cpu" if cfg.trainer.accelerator == "cpu" else "local"))
    close_stale_trials(study, client, parent_id)

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        client.set_terminated(parent_id, status="FAILED")
        raise NoCompletedTrialError(
            f"study {study.study_name} has no completed trial (all pruned or failed): check the "
            "trial runs in MLflow, widen the search space or raise tune.n_trials"
        )
    chosen = select(study, goals, limits) if len(goals) > 1 else study.best_trial
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in FINISHED}
    summary = {
        "study_name": study.study_name,
        "tuned_for": {"data": cfg.data.name, "model": cfg.model.name, "task": cfg.task.name},
        "storage": shown_storage(url),
        "best_trial": chosen.number,
        "best_value": chosen.values[0],
        "metric": goals[0].metric,
        "trials": counts,
        "mlflow_run_id": parent_id,
        **improvement(study, chosen, goals[0].direction),
        "cost": study.user_attrs.get("cost"),  # the space's costliest trial, estimated
    }
    metrics = [Metric(f"trials/{state}", n, _now(), 0) for state, n in counts.items()]
    for goal, value in zip(goals, chosen.values, strict=True):
        metrics.append(Metric(f"best/{goal.metric}", value, _now(), 0))
    for key in ("params", "epoch_s", "trial_s"):
        if summary["cost"] is not None and summary["cost"][key] is not None:
            metrics.append(Metric(f"cost/{key}", summary["cost"][key], _now(), 0))
    if summary.get("improvement") is not None:
        metrics.append(Metric("best/improvement", summary["improvement"], _now(), 0))
    if len(goals) > 1:
        summary["objectives"] = [{"metric": g.metric, "direction": g.direction} for g in goals]
        summary["pareto_front"] = log_front(client, parent_id, study, goals, chosen.number)
        summary["selection"] = {"rule": "best first objective on the front", "constraints":
                                list(cfg.tune.constraints)}  # fmt: skip
    client.log_batch(
        parent_id,
        # Tags, not params: MLflow params are write-once, and a resumed study may find a new best.
        tags=[RunTag(f"best.{k}", str(v)) for k, v in chosen.params.items()],
        metrics=metrics,
    )
    client.set_terminated(parent_id)

    out.mkdir(parents=True, exist_ok=True)
    best = {config_key(k): v for k, v in chosen.params.items()}
    (out / "best_params.yaml").write_text(yaml.safe_dump(best, sort_keys=True))
    write_json(out / "study.json", summary)
    log.info(
        "best %s %.4f (trial %d)%s: %s",
        goals[0].metric, chosen.values[0], chosen.number,
        "" if summary.get("improvement") is None
        else f", {summary['improvement']:+.4f} on trial 0 (the experiment's own settings)",
        chosen.params,
    )  # fmt: skip
    return summary


def _spent(study: optuna.Study) -> int:
    return sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True)


def _now() -> int:
    return int(time.time() * 1000)


def trial_config(cfg: DictConfig) -> DictConfig:
    """The training config every trial starts from: tune.devices_per_trial devices; with more
    than one, DDP ranks are spawned by the worker (`ddp_spawn`), because Lightning's default
    launcher would re-execute the worker's whole script once per rank."""
    k = cfg.tune.devices_per_trial
    strategy = cfg.trainer.get("strategy", "auto")
    if k > 1 and strategy in ("auto", "ddp"):
        strategy = "ddp_spawn"
    return with_overrides(
        cfg,
        {"trainer.devices": k, "trainer.strategy": strategy if k > 1 else "auto",
         "trainer.enable_progress_bar": False},
    )  # fmt: skip


def load(cfg: DictConfig, url: str) -> optuna.Study:
    """The stage's study, with the configured sampler and pruner (Optuna does not store them)."""
    n = len(objectives(cfg))
    return optuna.load_study(
        study_name=study_name(cfg),
        storage=open_storage(url),
        sampler=make_sampler(cfg.tune.sampler, cfg.seed, n),
        pruner=make_pruner(cfg.tune.pruner, n, cfg.tune.max_epochs),
    )


def budget_left(study: optuna.Study, n_trials: int) -> int:
    """Trials still to start: the budget less what counts and what live workers are running."""
    return n_trials - spent_budget(study) - running_alive(study)


def work(cfg: DictConfig, url: str, label: str) -> None:
    """Run trials of the study (already created by the stage) until its budget is spent."""
    study = load(cfg, url)
    parent_id = study.user_attrs["mlflow_run_id"]
    client = MlflowClient()
    goals = objectives(cfg)
    single = len(goals) == 1
    maximize = goals[0].direction == "maximize"
    base = trial_config(cfg)
    devices = os.environ.get("CUDA_VISIBLE_DEVICES") or str(cfg.trainer.accelerator)
    seeded_once = cfg.tune.sampler.name == "qmc"  # one scrambled sequence for the whole study

    def objective(trial: optuna.Trial) -> float | list[float]:
        trial.set_user_attr("worker", worker_name())
        trial.set_user_attr("worker_label", label)
        trial.set_user_attr("device", devices)
        if not _within_budget(study, trial.number, cfg.tune.n_trials):
            # Two workers asked at the same moment for the budget's last trial: this one is
            # surplus. Failed at once, untrained, so the budget is met exactly.
            trial.set_user_attr("outcome", "surplus")
            raise Surplus(f"trial {trial.number} is beyond the budget of {cfg.tune.n_trials}")
        log.info("trial %d: worker %s, device %s", trial.number, label, devices)
        # Seeded by the trial's number, which the storage hands out once: a lone worker
        # replays the same trials, and parallel workers (or a resumed study) never draw the
        # same random start twice. The samplers read the finished trials from the storage.
        seed = cfg.seed if seeded_once else cfg.seed + trial.number
        study.sampler = make_sampler(cfg.tune.sampler, seed, len(goals))
        params = suggest(trial, OmegaConf.to_container(cfg.search, resolve=True))
        record = TrialRecord(trial, cfg.tune.metric, maximize)
        callbacks: list[Any] = [record]
        pruning = None
        if single and cfg.tune.pruner.name != "none":
            pruning = DDPPruning(trial, monitor=cfg.tune.metric)
            callbacks.append(pruning)
        if cfg.tune.trial_timeout_s:
            callbacks.append(TrialTimeout(cfg.tune.trial_timeout_s, record))
        tags = {
            "mlflow.parentRunId": parent_id, "stage": "tune", "optuna.trial": str(trial.number),
            "optuna.worker": label, "optuna.device": devices,
        }  # fmt: skip
        start = time.perf_counter()
        try:
            trainer, logger = fit(
                with_overrides(base, params),
                run_name=f"trial-{trial.number}",
                max_epochs=cfg.tune.max_epochs,
                callbacks=callbacks,
                tags=tags,
            )
            if pruning is not None:
                pruning.check_pruned()  # the decision of the DDP ranks, if any
        except optuna.TrialPruned:
            mark_child(client, parent_id, trial.number, "pruned")
            raise
        except DivergedError:
            # The user's failure (the config diverges): it counts against the budget.
            trial.set_user_attr("outcome", "diverged")
            mark_child(client, parent_id, trial.number, "diverged")
            raise
        fit_s = time.perf_counter() - start
        done = read_record(trial) or {"best": record.best, "epochs": record.epochs}
        if done.get("timed_out"):
            trial.set_user_attr("outcome", "timed_out")
            client.set_tag(logger.run_id, "optuna.outcome", "timed_out")
        if done["best"] is None:
            if done.get("timed_out"):
                mark_child(client, parent_id, trial.number, "timed_out")
                raise optuna.TrialPruned(
                    f"trial {trial.number} reached tune.trial_timeout_s="
                    f"{cfg.tune.trial_timeout_s} before its first validation"
                )
            raise RuntimeError(f"trial {trial.number} never reported {cfg.tune.metric}")
        if single:
            return done["best"]
        wanted = [g.metric for g in goals]
        measured = measure(
            trainer, trainer.lightning_module, trainer.datamodule, fit_s, done["epochs"], wanted
        )
        for name, value in measured.items():
            trial.set_user_attr(name, value)
            client.log_metric(logger.run_id, name, value)
        values = []
        for goal in goals:
            if goal.metric == cfg.tune.metric:
                values.append(done["best"])
            elif goal.metric in measured:
                values.append(measured[goal.metric])
            elif goal.metric in trainer.callback_metrics:
                values.append(float(trainer.callback_metrics[goal.metric]))
            else:
                raise ValueError(
                    f"tune.objectives names {goal.metric!r}, which trial {trial.number} did not "
                    f"log: use a metric the task logs per epoch or one of {MEASURED}"
                )
        return values

    if budget_left(study, cfg.tune.n_trials) <= 0:
        return

    def stop_at_budget(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # Other workers sharing the storage count towards the same total budget, their
        # running trials included: a worker does not start a trial the others will fill.
        if budget_left(study, cfg.tune.n_trials) <= 0:
            study.stop()

    study.optimize(
        objective,
        n_trials=cfg.tune.n_trials,  # an upper bound: stop_at_budget ends it sooner
        timeout=cfg.tune.timeout_s,
        callbacks=[stop_at_budget],
        catch=(DivergedError, Surplus),  # a diverged trial fails; the study goes on
        gc_after_trial=True,
    )


class Surplus(RuntimeError):
    """A trial created after the budget was already taken by other workers."""


def _within_budget(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Trial numbers are handed out once, in order: trial `number` is within the budget when
    fewer than `n_trials` trials before it count or may still count (not lost or surplus)."""
    ahead = 0
    for t in study.get_trials(deepcopy=False):
        if t.number >= number:
            continue
        gone = lost(t) or (t.state == TrialState.RUNNING and dead_here(t.user_attrs.get("worker")))
        ahead += not gone
    return ahead < n_trials


def worker_main() -> None:
    """`python -m dlpipe.tune <config.yaml> <label> <storage>`: one worker of the pool."""
    config, label = sys.argv[1], sys.argv[2]
    logging.basicConfig(
        level=logging.INFO, format=f"[worker {label}] %(levelname)s %(name)s: %(message)s"
    )
    cfg = OmegaConf.load(config)
    setup_mlflow(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)  # the store exists already
    work(cfg, sys.argv[3], label)


if __name__ == "__main__":
    worker_main()
