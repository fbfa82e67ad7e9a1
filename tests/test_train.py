"""Stage 4 on the real Fashion-MNIST slice: outputs, MLflow provenance, determinism, divergence,
resuming and tuned parameters."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from dlpipe.callbacks import DivergedError
from dlpipe.data import load_meta
from dlpipe.errors import ConfigError
from dlpipe.modules.classifier import Classifier
from dlpipe.train import to_dict, train

# A setup that learns within an epoch or two on 1600 samples (the default onecycle schedule
# barely leaves warm-up in 13 steps).
LEARNS = ("model=mlp", "optim.scheduler=none", "optim.lr=0.03", "train.batch_size=128")
STEPS_PER_EPOCH = 13  # ceil(1600 / 128)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_train_writes_outputs_and_a_complete_mlflow_run(make_cfg):
    cfg = make_cfg(*LEARNS, "trainer.max_epochs=2")
    info = train(cfg)

    out = Path(cfg.paths.train)
    assert json.loads((out / "run.json").read_text()) == info
    checkpoints = {p.name for p in (out / "checkpoints").iterdir()}
    assert checkpoints == {"best.ckpt", "last.ckpt", "mlflow_run.json"}
    record = json.loads((out / "checkpoints" / "mlflow_run.json").read_text())
    assert record["run_id"] == info["run_id"]
    assert (out / info["best_checkpoint"]).samefile(out / "checkpoints" / "best.ckpt")
    assert info["epochs"] == 2 and 0.3 < info["best_score"] <= 1
    history = (Path(cfg.paths.reports) / "train" / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,train/acc,train/loss,val/acc,val/loss" and len(history) == 3
    curves = {p.name for p in (Path(cfg.paths.reports) / "train" / "plots").iterdir()}
    assert {"acc.png", "loss.png"} <= curves  # what a classifier logs, drawn for dvc plots
    module = Classifier.load_from_checkpoint(out / info["best_checkpoint"], map_location="cpu")
    assert module.hparams.model == to_dict(cfg.model)

    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert info["tracking_uri"] == cfg.mlflow.tracking_uri
    run = client.get_run(info["run_id"])
    assert run.info.run_name == f"train {cfg.model.name} {cfg.data.name} {run.info.run_id[:6]}"
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == cfg.mlflow.experiment

    # Params: the full resolved config, flattened.
    params = run.data.params
    assert params["model.name"] == "mlp" and params["model.width"] == "8"
    assert float(params["optim.lr"]) == 0.03 and params["data.name"] == "fashion_mnist"
    assert not any(key.startswith("search.") for key in params)
    # The resolved config as an artifact.
    config_yaml = client.download_artifacts(info["run_id"], "config.yaml", str(out.parent))
    assert yaml.safe_load(Path(config_yaml).read_text()) == to_dict(cfg)

    # Provenance: the code's commit and the exact data.
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    tags = run.data.tags
    assert tags["git_commit"] == head.stdout.strip() == tags["mlflow.source.git.commit"]
    assert tags["git_dirty"] in ("true", "false") and tags["stage"] == "train"
    meta = load_meta(cfg.paths.processed)
    for name, sha in {**meta["raw_sha256"], **meta["sha256"]}.items():
        assert tags[f"data.sha256.{name}"] == sha
    assert "data.sha256.train_x.npy" in tags

    # Per-epoch metrics, namespaced, one value per epoch at the epoch's last step.
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        steps = [step for step, _ in _history(client, info["run_id"], key)]
        assert len(steps) == 2, key
    val_acc = [v for _, v in _history(client, info["run_id"], "val/acc")]
    assert info["best_score"] == pytest.approx(max(val_acc))
    train_loss = [v for _, v in _history(client, info["run_id"], "train/loss")]
    assert train_loss[1] < train_loss[0]


def test_same_seed_same_metrics(make_cfg):
    first = train(make_cfg(*LEARNS))
    again = train(make_cfg(*LEARNS))
    other_seed = train(make_cfg(*LEARNS, "seed=7"))
    client = MlflowClient(make_cfg().mlflow.tracking_uri)
    for key in ("val/acc", "val/loss", "train/loss"):
        assert _history(client, first["run_id"], key) == _history(client, again["run_id"], key)
    # ... and the seed is what fixes them.
    assert _history(client, first["run_id"], "val/loss") != _history(
        client, other_seed["run_id"], "val/loss"
    )


def test_diverging_run_fails_and_names_the_fix(make_cfg):
    cfg = make_cfg("model=mlp", "optim.name=sgd", "optim.lr=1e12")
    with pytest.raises(DivergedError, match=r"optim\.lr=1000000000000\.0"):
        train(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id]
    )
    assert run.info.status == "FAILED"


def test_resume_continues_from_last_checkpoint(make_cfg):
    first = train(make_cfg(*LEARNS))
    last = Path(make_cfg().paths.train) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (0, STEPS_PER_EPOCH)

    resumed = train(make_cfg(*LEARNS, "train.resume=true", "trainer.max_epochs=2"))
    # One training, one record: the resumed epoch continues the same MLflow run.
    assert resumed["run_id"] == first["run_id"] and resumed["epochs"] == 2
    client = MlflowClient(make_cfg().mlflow.tracking_uri)
    # Only the second epoch ran, counting steps on from where the checkpoint stopped.
    losses = _history(client, resumed["run_id"], "train/loss")
    assert [s for s, _ in losses] == [STEPS_PER_EPOCH - 1, 2 * STEPS_PER_EPOCH - 1]
    # The weights came from the checkpoint: a fresh start with this seed and data order would
    # repeat the first epoch's loss exactly; the resumed epoch is already past it.
    assert losses[1][1] < 0.95 * losses[0][1]
    assert client.get_run(resumed["run_id"]).info.status == "FINISHED"


def test_resume_without_a_checkpoint_says_so(make_cfg):
    with pytest.raises(ConfigError, match="train.resume=true"):
        train(make_cfg("train.resume=true"))


def test_tuned_params_are_applied(make_cfg):
    cfg = make_cfg(*LEARNS)
    tuned = {"model.width": 12, "optim.lr": 0.01, "model.depth": 1}
    Path(cfg.paths.tune).mkdir(parents=True)
    (Path(cfg.paths.tune) / "best_params.yaml").write_text(yaml.safe_dump(tuned))

    info = train(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    params = client.get_run(info["run_id"]).data.params
    assert (params["model.width"], params["optim.lr"], params["model.depth"]) == ("12", "0.01", "1")
    artifact = client.download_artifacts(info["run_id"], "tuned_params.yaml", cfg.paths.tune)
    assert yaml.safe_load(Path(artifact).read_text()) == tuned
    best = Path(cfg.paths.train) / info["best_checkpoint"]
    hparams = Classifier.load_from_checkpoint(best, map_location="cpu").hparams
    assert (hparams.model["width"], hparams.model["depth"], hparams.optim["lr"]) == (12, 1, 0.01)

    # train.use_tuned=false ignores them.
    plain = train(make_cfg(*LEARNS, "train.use_tuned=false"))
    assert client.get_run(plain["run_id"]).data.params["model.width"] == "8"


def test_tuned_params_with_an_unknown_key_fail(make_cfg):
    cfg = make_cfg()
    Path(cfg.paths.tune).mkdir(parents=True)
    (Path(cfg.paths.tune) / "best_params.yaml").write_text("model.widht: 12\n")
    with pytest.raises(ConfigError, match="model.widht"):
        train(cfg)


def test_ema_weights_are_what_is_validated_checkpointed_and_shipped(make_cfg):
    """train.ema_decay: validation, early stopping and best.ckpt see the moving average of the
    weights (Lightning's EMAWeightAveraging); the raw weights ride along for a resume."""
    cfg = make_cfg(*LEARNS, "trainer.max_epochs=2", "train.ema_decay=0.9")
    info = train(cfg)
    best = Path(cfg.paths.train) / info["best_checkpoint"]
    saved = torch.load(best, map_location="cpu", weights_only=False)
    average, raw = saved["state_dict"], saved["current_model_state"]
    assert average.keys() == raw.keys()
    assert any(not torch.equal(average[k], raw[k]) for k in average)
    # The module evaluate and register load is the average, and it scores the recorded val/acc.
    module = Classifier.load_from_checkpoint(best, map_location="cpu").eval()
    processed = Path(cfg.paths.processed)
    x = torch.from_numpy(np.load(processed / "val_x.npy"))
    y = torch.from_numpy(np.load(processed / "val_y.npy")).long()
    with torch.no_grad():
        accuracy = (module.net(x).argmax(1) == y).float().mean().item()
    assert accuracy == pytest.approx(info["best_score"], abs=1e-6)
    for k in average:
        assert torch.equal(module.state_dict()[k], average[k])
