"""Stage 3 on the real Fashion-MNIST slice: a persistent Optuna study that resumes, prunes, survives
diverging trials, and mirrors every trial as an MLflow child run of one parent run."""

import json
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from dlpipe.train import train
from dlpipe.tune import open_storage, study_name, tune

# A setup that learns within an epoch on 1600 samples (see test_train.py).
LEARNS = ("model=mlp", "optim.scheduler=none", "optim.lr=0.03", "train.batch_size=128")
GOOD_LR, HOPELESS_LR, DIVERGING_LR = 0.03, 1e-7, 1e12


def _with_space(cfg: DictConfig, space: dict) -> DictConfig:
    """`cfg` searching only `space` (in the format of conf/search/*.yaml), to keep trials cheap."""
    cfg.search = OmegaConf.create(space)
    return cfg


def _lr_choices(*choices: float) -> dict:
    return {"optim": {"lr": {"type": "categorical", "choices": list(choices)}}}


SMALL_SPACE = {
    "optim": {"lr": {"type": "float", "low": 0.01, "high": 0.05, "log": True}},
    "model": {"width": {"type": "categorical", "choices": [8, 16]}},
}


def _storage_url(cfg: DictConfig) -> str:
    return cfg.tune.storage or f"sqlite:///{cfg.paths.study_db}"


def _study(cfg: DictConfig) -> optuna.Study:
    return optuna.load_study(study_name=study_name(cfg), storage=open_storage(_storage_url(cfg)))


def _enqueued(cfg: DictConfig, *params: dict) -> DictConfig:
    """Pre-create `cfg`'s study and queue trials with fixed params, so the trial order (and so
    what the pruner sees) is by construction, not by the sampler's luck."""
    study = optuna.create_study(
        study_name=study_name(cfg),
        storage=open_storage(_storage_url(cfg)),
        direction=cfg.tune.direction,
    )
    for p in params:
        study.enqueue_trial(p)
    return cfg


def _children(client: MlflowClient, parent_id: str) -> dict[int, Run]:
    """Trial number -> its MLflow run, for the runs whose parent is `parent_id`."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    return {int(run.data.tags["optuna.trial"]): run for run in runs}


def _states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_study_resumes_to_its_budget(make_cfg, tmp_path, storage):
    extra = [f"tune.storage={tmp_path / 'study.log'}"] if storage == "journal" else []

    def compose(n_trials: int) -> DictConfig:
        cfg = make_cfg(*LEARNS, *extra, "tune.max_epochs=1", f"tune.n_trials={n_trials}")
        return _with_space(cfg, SMALL_SPACE)

    first = tune(compose(2))
    assert sum(first["trials"].values()) == 2
    second = tune(compose(3))
    third = tune(compose(3))
    cfg = compose(3)

    assert first["study_name"] == second["study_name"] == third["study_name"] == study_name(cfg)
    assert first["storage"] == second["storage"] == _storage_url(cfg)
    if storage == "journal":
        assert (tmp_path / "study.log").is_file() and not Path(cfg.paths.study_db).exists()
    study = _study(cfg)
    assert [t.number for t in study.trials] == [0, 1, 2]
    # The resumed invocation explores on; it does not replay the points the first one tried.
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3
    assert sum(third["trials"].values()) == 3 and third == second | {"storage": third["storage"]}

    # One parent run for the whole study, one child run per trial: the re-runs reopened it.
    assert first["mlflow_run_id"] == second["mlflow_run_id"] == third["mlflow_run_id"]
    client = MlflowClient(cfg.mlflow.tracking_uri)
    parent = client.get_run(third["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("tune")
    assert parent.data.tags["optuna.study"] == study.study_name
    assert parent.data.metrics[f"best/{cfg.tune.metric}"] == pytest.approx(study.best_value)
    children = _children(client, parent.info.run_id)
    assert sorted(children) == [0, 1, 2]
    everything = client.search_runs([parent.info.experiment_id])
    assert {r.info.run_id for r in everything} == {parent.info.run_id} | {
        r.info.run_id for r in children.values()
    }
    assert all(run.data.tags["stage"] == "tune" for run in children.values())
    assert {run.info.run_name for run in children.values()} == {"trial-0", "trial-1", "trial-2"}

    out = Path(cfg.paths.tune)
    assert yaml.safe_load((out / "best_params.yaml").read_text()) == study.best_params
    assert set(study.best_params) == {"optim.lr", "model.width"}
    assert json.loads((out / "study.json").read_text()) == third


def test_a_study_resumed_against_another_mlflow_store_gets_a_parent_there(
    make_cfg, tmp_path, caplog
):
    """mlflow.db deleted (or mlflow.tracking_uri changed) while the Optuna study is kept: the
    resumed study used to fail with MLflow's "Run with id=... not found"."""

    def compose(n_trials: int, db: str) -> DictConfig:
        cfg = make_cfg(*LEARNS, "tune.max_epochs=1", f"tune.n_trials={n_trials}")
        cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path / db}"  # after composing: see fixture
        return _with_space(cfg, SMALL_SPACE)

    first = tune(compose(1, "first.db"))
    with caplog.at_level("WARNING", logger="dlpipe.tuning.study"):
        second = tune(compose(2, "second.db"))
    assert "is not in this store" in caplog.text
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    assert [t.number for t in _study(compose(2, "second.db")).trials] == [0, 1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'second.db'}")
    assert client.get_run(second["mlflow_run_id"]).data.tags["optuna.parent"] == "true"
    assert sorted(_children(client, second["mlflow_run_id"])) == [1]


def test_train_picks_up_the_best_trial(make_cfg):
    cfg = _with_space(make_cfg(*LEARNS, "tune.n_trials=1", "tune.max_epochs=1"), SMALL_SPACE)
    tune(cfg)
    best = _study(cfg).best_params
    info = train(make_cfg(*LEARNS))
    params = MlflowClient(cfg.mlflow.tracking_uri).get_run(info["run_id"]).data.params
    assert {k: params[k] for k in best} == {k: str(v) for k, v in best.items()}


def test_hopeless_trial_is_pruned(make_cfg):
    cfg = make_cfg(
        *LEARNS,
        "tune.n_trials=2",
        "tune.max_epochs=2",
        "tune.pruner.n_startup_trials=1",
        "tune.pruner.n_warmup_steps=0",
    )
    cfg = _with_space(cfg, _lr_choices(GOOD_LR, HOPELESS_LR))
    # A learning trial runs all its epochs first; one that can't learn then falls below its median
    # after epoch 0 and must stop there.
    summary = tune(_enqueued(cfg, {"optim.lr": GOOD_LR}, {"optim.lr": HOPELESS_LR}))

    study = _study(cfg)
    assert _states(study) == [TrialState.COMPLETE, TrialState.PRUNED]
    good, hopeless = study.trials
    assert sorted(good.intermediate_values) == [0, 1]
    assert sorted(hopeless.intermediate_values) == [0]
    assert hopeless.intermediate_values[0] < good.intermediate_values[0]
    assert summary["trials"] == {"complete": 1, "pruned": 1, "fail": 0}
    assert summary["best_trial"] == 0

    client = MlflowClient(cfg.mlflow.tracking_uri)
    pruned_run = _children(client, summary["mlflow_run_id"])[1]
    assert pruned_run.data.tags["optuna.outcome"] == "pruned"
    assert pruned_run.info.status == "KILLED"


def test_diverging_trial_fails_and_the_study_goes_on(make_cfg):
    cfg = make_cfg(*LEARNS, "optim.name=sgd", "tune.n_trials=2", "tune.max_epochs=1")
    cfg = _with_space(cfg, _lr_choices(DIVERGING_LR, GOOD_LR))
    summary = tune(_enqueued(cfg, {"optim.lr": DIVERGING_LR}, {"optim.lr": GOOD_LR}))

    study = _study(cfg)
    assert _states(study) == [TrialState.FAIL, TrialState.COMPLETE]
    assert summary["trials"] == {"complete": 1, "pruned": 0, "fail": 1}
    assert summary["best_trial"] == 1 and study.best_params == {"optim.lr": GOOD_LR}

    client = MlflowClient(cfg.mlflow.tracking_uri)
    children = _children(client, summary["mlflow_run_id"])
    assert children[0].data.tags["optuna.outcome"] == "diverged"
    assert children[0].info.status == "KILLED"
    assert children[1].info.status == "FINISHED"


def test_study_without_a_completed_trial_fails_loudly(make_cfg):
    cfg = make_cfg("model=mlp", "optim.name=sgd", "tune.n_trials=1", "tune.max_epochs=1")
    cfg = _with_space(cfg, _lr_choices(DIVERGING_LR))
    with pytest.raises(RuntimeError, match="no completed trial"):
        tune(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    parent_id = _study(cfg).user_attrs["mlflow_run_id"]
    assert client.get_run(parent_id).info.status == "FAILED"
    assert not (Path(cfg.paths.tune) / "best_params.yaml").exists()


def test_a_config_that_differs_from_a_sibling_study_says_in_which_key(compose_conf):
    """Workers started by hand share a study only if their configs agree: one that differs
    starts its own study, and the stage names the key (the study keeps its identity)."""
    from dlpipe.tuning.study import differs_from_siblings, identity

    storage = optuna.storages.InMemoryStorage()
    first = compose_conf("model=mlp")
    assert differs_from_siblings(storage, first) is None  # nothing to differ from
    study = optuna.create_study(study_name=study_name(first), storage=storage)
    study.set_user_attr("identity", identity(first))
    assert differs_from_siblings(storage, first) is None  # the same study: it resumes
    second = compose_conf("model=mlp", "tune.pruner.n_warmup_steps=2")
    said = differs_from_siblings(storage, second)
    assert said is not None and study_name(first) in said
    assert "tune.pruner.n_warmup_steps=0 there, 2 here" in said
    assert differs_from_siblings(storage, compose_conf("model=cnn")) is None  # another model
