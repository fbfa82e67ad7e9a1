"""Config values of the wrong type or range stop every stage at entry with one message naming
each key, its value and what is allowed, before anything runs or is logged."""

from pathlib import Path

import pytest

from dlpipe.evaluate import evaluate
from dlpipe.register import register
from dlpipe.schema import ConfigError, check_config
from dlpipe.train import train
from dlpipe.tune import tune


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=abc", r"optim.lr='abc': must be a valid number"),
        ("train.batch_size=0", r"train.batch_size=0: must be greater than 0"),
        ("trainer.max_epochs=0", r"trainer.max_epochs=0: must be greater than 0"),
        ("seed=true", r"seed=True: must be a valid integer"),
        ("model.dropout=1.5", r"model.dropout=1.5: must be less than 1"),
        ("optim.name=rmsprop", r"optim.name='rmsprop': must be 'sgd', 'adam' or 'adamw'"),
        ("model.members=0", r"model.members=0: must be greater than 0"),
        # A deep ensemble averages class probabilities: nothing else has them.
        ("experiment=housing_plr model.members=3", r"task=classifier only, not task=regressor"),
    ],
)
@pytest.mark.parametrize("stage", [tune, train, evaluate, register])
def test_bad_value_stops_the_stage_before_anything_is_logged(
    compose_conf, tmp_path: Path, override, message, stage
):
    db = tmp_path / "mlflow.db"
    cfg = compose_conf(
        *override.split(), f"mlflow.tracking_uri=sqlite:///{db}", f"paths.tune={tmp_path}"
    )
    with pytest.raises(ConfigError, match=message):
        stage(cfg)
    assert not db.exists()  # no MLflow run (FAILED or otherwise) was created


def test_every_error_is_listed_at_once(compose_conf):
    cfg = compose_conf("optim.lr=-1", "tune.n_trials=0")
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert "optim.lr=-1" in str(info.value) and "tune.n_trials=0" in str(info.value)


EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"


@pytest.mark.parametrize("experiment", sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")))
def test_every_shipped_experiment_passes(compose_conf, experiment):
    check_config(compose_conf(f"experiment={experiment}"))


def test_smoke_checks_the_values_given_before_its_sizes_replace_them(compose_conf, caplog):
    from dlpipe.smoke import sized

    with pytest.raises(ConfigError, match=r"trainer.max_epochs=0"):
        sized(compose_conf("smoke=true", "trainer.max_epochs=0"))
    with caplog.at_level("INFO"):
        sized(compose_conf("smoke=true", "trainer.max_epochs=5"))
    assert "trainer.max_epochs=1 (was 5)" in caplog.text
