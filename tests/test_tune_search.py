"""Samplers, pruners, search-space syntax and several objectives, from the config: every
configured sampler explores the real conditional spaces, every pruner is built, a branch bound
is overridable from the command line, a multi-objective study keeps its Pareto front and picks
one trial by the documented rule, and a trial respects its time budget."""

import json
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from dlpipe.tune import open_storage, study_name, tune
from dlpipe.tuning.space import PRUNERS, SAMPLERS, make_pruner, make_sampler, suggest

LEARNS = ("model=mlp", "optim.scheduler=none", "optim.lr=0.03", "train.batch_size=128")
PRUNER_TYPES = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_explores_the_conditional_space(compose_conf, name):
    cfg = compose_conf("model=cnn", f"tune.sampler.name={name}", "tune.sampler.n_startup_trials=2")
    space = OmegaConf.to_container(cfg.search, resolve=True)
    n_objectives = 2 if name == "nsga2" else 1
    sampler = make_sampler(cfg.tune.sampler, cfg.seed, n_objectives)
    study = optuna.create_study(directions=["minimize"] * n_objectives, sampler=sampler)

    def objective(trial):
        params = suggest(trial, space)
        loss = abs(params["optim.lr"] - 0.01) + params["model.dropout"]
        return (loss, params["model.width"]) if n_objectives == 2 else loss

    with _quiet():
        study.optimize(objective, n_trials=5)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    for t in study.trials:  # the SGD branch has its own learning-rate range
        lr_name = "optim.lr__sgd" if t.params["optim.name"] == "sgd" else "optim.lr"
        assert lr_name in t.params


class _quiet:
    def __enter__(self):
        self.level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def __exit__(self, *exc):
        optuna.logging.set_verbosity(self.level)


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_is_built_and_multi_objective_never_prunes(compose_conf, name):
    cfg = compose_conf(f"tune.pruner.name={name}")
    assert type(make_pruner(cfg.tune.pruner, 1, 3)) is PRUNER_TYPES[name]
    assert type(make_pruner(cfg.tune.pruner, 2, 3)) is optuna.pruners.NopPruner


def test_branch_bounds_are_overridable_and_at_signs_are_refused(compose_conf):
    cfg = compose_conf("model=cnn", "search.optim.lr__sgd.low=0.05")
    assert cfg.search.optim.lr__sgd.low == 0.05
    study = optuna.create_study()
    with pytest.raises(ValueError, match="rename it optim.lr__sgd"):
        suggest(study.ask(), {"optim": {"lr@sgd": {"type": "float", "low": 0.1, "high": 1}}})


def test_two_objectives_keep_a_pareto_front_and_pick_by_the_rule(make_cfg, caplog):
    objectives = "[{metric:val/acc,direction:maximize},{metric:model/params,direction:minimize}]"
    cfg = make_cfg(*LEARNS, f"tune.objectives={objectives}", "tune.n_trials=3",
                   "tune.max_epochs=1", "tune.sampler.name=nsga2")  # fmt: skip
    space = {"model": {"width": {"type": "categorical", "choices": [8, 16, 64]}}}
    cfg.search = OmegaConf.create(space)
    small = 16 * 16 * 16  # the parameter count's order of a width-8 MLP: a bound it can meet
    cfg.tune.constraints = [f"model/params<={small * 100}"]
    with caplog.at_level("INFO"):
        summary = tune(cfg)
    assert "pruning is off" in caplog.text

    study = optuna.load_study(study_name=study_name(cfg), storage=open_storage(
        f"sqlite:///{cfg.paths.study_db}"))  # fmt: skip
    front = {t.number for t in study.best_trials}
    assert {row["trial"] for row in summary["pareto_front"]} == front
    chosen = study.trials[summary["best_trial"]]
    assert chosen.number in front and chosen.values[1] <= small * 100
    meeting = [t for t in study.best_trials if t.values[1] <= small * 100]
    assert chosen.values[0] == max(t.values[0] for t in meeting)
    for t in study.trials:  # the measured objective is the model's real size
        assert t.values[1] == t.user_attrs["model/params"] > 0

    client = MlflowClient(cfg.mlflow.tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert {"pareto_front.json", "pareto_front.png"} <= artifacts
    saved = json.loads((Path(cfg.paths.tune) / "study.json").read_text())
    assert saved["selection"]["constraints"] == list(cfg.tune.constraints)


def test_a_trial_over_its_time_budget_stops(make_cfg):
    cfg = make_cfg(*LEARNS, "tune.n_trials=1", "tune.max_epochs=3", "tune.trial_timeout_s=0.001")
    cfg.search = OmegaConf.create({"model": {"width": {"type": "categorical", "choices": [8]}}})
    summary = tune(cfg)
    study = optuna.load_study(study_name=study_name(cfg), storage=open_storage(
        f"sqlite:///{cfg.paths.study_db}"))  # fmt: skip
    (trial,) = study.trials
    # Stopped after its first batch; Lightning still validates that epoch, which it keeps.
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["outcome"] == "timed_out"
    assert trial.system_attrs["dlpipe:record"]["epochs"] == 1
    assert summary["best_value"] == trial.value
