"""A search space states its cost before a study draws from it: the stage builds the space's
costliest point, times a few real batches, logs the estimate and keeps it with the study; it
warns when those trials would be cut by tune.trial_timeout_s, and refuses, before any trial,
a space whose costliest trial is over tune.cost.max_trial_s, naming the leaves to narrow."""

import json
import math
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from dlpipe.tune import open_storage, study_name, tune
from dlpipe.tuning.cost import SpaceTooCostlyError, costliest_point, main

LEARNS = ("model=mlp", "optim.scheduler=none", "optim.lr=0.03", "train.batch_size=128")
SPACE = {
    "optim": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
    "model": {
        "width": {"type": "categorical", "choices": [8, 96]},
        "depth": {"type": "int", "low": 1, "high": 3},
        "norm": {"type": "categorical", "choices": ["none", "layer"]},
    },
    "train": {"batch_size": {"type": "categorical", "choices": [200, 400]}},
}


def mlp_params(width: int, depth: int, pixels: int = 28 * 28, classes: int = 10) -> int:
    """The MLP's trainable parameters with layer norm, counted by hand: depth x (linear without
    bias, layer norm's scale and shift), then the output layer."""
    first = pixels * width + 2 * width
    hidden = (depth - 1) * (width * width + 2 * width)
    return first + hidden + width * classes + classes


def test_the_costliest_point_tops_every_size_and_takes_the_smallest_batch(make_cfg):
    cfg = make_cfg(*LEARNS)
    cfg.search = OmegaConf.create(SPACE)
    # norm is chosen by parameters (layer norm has some, none has none); lr is not a size.
    assert costliest_point(cfg) == {
        "model.width": 96, "model.depth": 3, "model.norm": "layer", "train.batch_size": 200,
    }  # fmt: skip
    # How the check runs is not what the study is: the same study resumes under any setting.
    stricter = cfg.copy()
    stricter.tune.cost.max_trial_s = 60
    assert study_name(stricter) == study_name(cfg)


def test_a_space_over_its_cost_limit_is_refused_before_any_trial(make_cfg):
    cfg = make_cfg(*LEARNS, "tune.n_trials=1", "tune.cost.max_trial_s=0.001")
    cfg.search = OmegaConf.create(SPACE)
    with pytest.raises(SpaceTooCostlyError) as refused:
        tune(cfg)
    message = str(refused.value)
    assert f"{mlp_params(96, 3):,} parameters" in message
    assert "model.width=96, model.depth=3" in message and "tune.cost.max_trial_s=0.001" in message
    # The fix names the leaves that make it costly, the widest first.
    assert message.index("search.model.width (x") < message.index("search.model.depth (x")
    url = f"sqlite:///{cfg.paths.study_db}"
    assert study_name(cfg) not in optuna.get_all_study_names(open_storage(url))


def test_the_estimate_is_kept_with_the_study_and_warns_over_the_trial_timeout(make_cfg, caplog):
    cfg = make_cfg(*LEARNS, "tune.n_trials=1", "tune.max_epochs=2", "tune.trial_timeout_s=0.001")
    cfg.search = OmegaConf.create(SPACE)
    with caplog.at_level("INFO"):
        summary = tune(cfg)
    assert "over tune.trial_timeout_s=0.001: trials near that point stop after" in caplog.text
    cost = json.loads((Path(cfg.paths.tune) / "study.json").read_text())["cost"]
    assert cost == summary["cost"]
    assert cost["params"] == mlp_params(96, 3)
    assert cost["train_batches"] == math.ceil(1600 / 200) and cost["val_batches"] >= 1
    assert cost["step_s"] > 0 and cost["val_step_s"] > 0
    assert cost["trial_s"] == pytest.approx(2 * cost["epoch_s"])
    assert cost["epoch_s"] == pytest.approx(
        cost["step_s"] * cost["train_batches"] + cost["val_step_s"] * cost["val_batches"]
    )
    study = optuna.load_study(
        study_name=study_name(cfg), storage=open_storage(f"sqlite:///{cfg.paths.study_db}")
    )
    assert study.user_attrs["cost"] == cost


def test_the_cost_command_asks_without_tuning(synthetic_processed, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # it composes ./conf
    given = [
        "model=mlp",
        f"paths.processed={synthetic_processed}",
        "trainer.enable_progress_bar=false",
    ]
    assert main(given) == 0
    said = capsys.readouterr().out
    assert "s per trial of 3 epoch(s); tune.n_trials=10 trials that costly:" in said
    with pytest.raises(SystemExit) as refused:
        main([*given, "tune.cost.max_trial_s=0.001"])
    assert refused.value.code == 1
    assert "SpaceTooCostlyError" in capsys.readouterr().err
