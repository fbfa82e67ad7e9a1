"""The classical baselines beside every test metric (dlpipe.baselines) and the champion gate's
floors (dlpipe.register): what each baseline reaches on data whose answer is known, and that a
model no better than chance or the baseline never takes @champion."""

import math
from pathlib import Path

import numpy as np
import pytest
import synthetic  # tests/synthetic.py
from mlflow import MlflowClient

from dlpipe.baselines import (
    chance_probs,
    char_ngram_loss,
    classification_baseline,
    regression_baseline,
)
from dlpipe.collect import collect
from dlpipe.data import load_split
from dlpipe.evaluate import evaluate
from dlpipe.preprocess import preprocess
from dlpipe.register import baseline_required, champion_gate, gate_floors, register
from dlpipe.train import train

# A setup that learns within an epoch on 1600 samples (see test_evaluate_register.py).
LEARNS = ("model=mlp", "optim.scheduler=none", "optim.lr=0.03", "train.batch_size=128")


def test_gate_promotes_only_above_every_floor_and_the_champion():
    floors = {"chance": 0.5, "baseline": 0.7}
    assert champion_gate(0.8, None, True, floors)  # no champion yet: the floors decide
    assert not champion_gate(0.65, None, True, floors)  # above chance, below the baseline
    assert not champion_gate(0.7, None, True, floors)  # a tie is no win
    assert not champion_gate(0.69, 0.6, True, floors)  # beats the champion, not the baseline
    assert champion_gate(0.72, 0.6, True, floors)
    assert not champion_gate(0.72, 0.75, True, floors)
    # A diverged run (val/acc 0.0) scores chance on the test split, or NaN: never promoted.
    assert not champion_gate(0.1, None, True, {"chance": 0.1})
    assert not champion_gate(math.nan, None, True, {})
    assert not champion_gate(math.nan, 0.5, True, {})
    # Lower is better: RMSE below the baseline's and the train mean's.
    assert champion_gate(0.9, None, False, {"chance": 1.2, "baseline": 1.0})
    assert not champion_gate(1.1, None, False, {"chance": 1.2, "baseline": 1.0})
    assert champion_gate(0.3, None, True, {"baseline": math.nan})  # no baseline value: no floor
    # Without floors: the champion alone, as before.
    assert champion_gate(0.1, None) and champion_gate(0.5, 0.4) and not champion_gate(0.4, 0.4)


def test_gate_floors_pair_the_test_metric_with_its_twins_by_suffix():
    metrics = {"test/acc": 0.8, "baseline/acc": 0.7, "chance/acc": 0.5, "baseline/loss": 0.6}
    assert gate_floors(metrics, "test/acc", True) == {"chance": 0.5, "baseline": 0.7}
    assert gate_floors(metrics, "test/acc", False) == {"chance": 0.5}
    assert gate_floors(metrics, "test/f1_macro", True) == {}


def _markov_stream(n: int, seed: int) -> tuple[np.ndarray, float]:
    """n symbols of a first-order Markov chain over 4 symbols, and its entropy rate in nats:
    sum_i pi_i H(P_i), pi the stationary distribution (Cover & Thomas, Theorem 4.2.4)."""
    p = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.25] * 4, [0.05, 0.05, 0.1, 0.8]])
    values, vectors = np.linalg.eig(p.T)
    pi = np.real(vectors[:, np.argmax(np.real(values))])
    pi /= pi.sum()
    rate = float(-(pi[:, None] * p * np.log(p)).sum())
    rng = np.random.default_rng(seed)
    stream = np.zeros(n, np.int64)
    for i in range(1, n):
        stream[i] = rng.choice(4, p=p[stream[i - 1]])
    return stream, rate


def test_char_ngram_baseline_reaches_a_markov_sources_entropy_rate():
    stream, rate = _markov_stream(60_000, seed=0)
    train, val, test = stream[:40_000], stream[40_000:50_000], stream[50_000:]
    loss, order, _ = char_ngram_loss(train, val, test, vocab_size=5, max_order=3)
    assert order >= 1  # context helps: the chain has memory
    assert loss == pytest.approx(rate, abs=0.02)
    # Without memory to find, no context beats the symbol frequencies: about ln 4 per symbol.
    noise = np.random.default_rng(1).integers(0, 4, 30_000)
    loss, _, _ = char_ngram_loss(noise[:20_000], noise[20_000:25_000], noise[25_000:], 4, 3)
    assert loss == pytest.approx(math.log(4), abs=0.01)


def _processed(tmp_path: Path, data: dict) -> Path:
    collect(data, tmp_path / "raw")
    preprocess(data, tmp_path / "raw", tmp_path / "processed", seed=0)
    return tmp_path / "processed"


def test_text_baseline_reads_the_words_that_give_the_class_away(tmp_path, data_config):
    path = synthetic.write_text_csv(tmp_path / "reviews.csv", n=300)
    processed = _processed(tmp_path, data_config("text_csv", path=str(path)))
    fitted = classification_baseline(processed, "tokens", num_classes=2)
    assert fitted.name.startswith("TF-IDF") and set(fitted.val_scores) >= {fitted.name}
    _, y = load_split(processed, "test")
    assert fitted.test.shape == (len(y), 2)
    assert np.mean(fitted.test.argmax(1) == y) > 0.95
    chance = chance_probs(load_split(processed, "train")[1], 2, len(y))
    assert chance.sum(1) == pytest.approx(1) and chance[0].max() == pytest.approx(0.5, abs=0.01)


def test_table_baseline_picks_linear_regression_for_a_linear_target(tmp_path, data_config):
    path = synthetic.write_table_csv(tmp_path / "table.csv")  # 3a - 2b + offset + noise 0.1
    processed = _processed(tmp_path, data_config("table_csv", path=str(path), target="target"))
    fitted = regression_baseline(processed)
    assert fitted.name == "linear regression"
    _, y = load_split(processed, "test")
    assert np.sqrt(np.mean((fitted.test - y) ** 2)) < 0.2


def test_a_model_below_the_baseline_never_takes_champion(make_cfg):
    # An untrained network (lr 1e-7) with no champion yet: registered, never @champion.
    cfg = make_cfg(*LEARNS, "optim.lr=1e-7")
    assert baseline_required(cfg)  # on by default for classifiers
    train(cfg)
    metrics = evaluate(cfg)
    assert metrics["baseline/acc"] > 0.9  # logistic regression / boosting on the pixels
    assert metrics["chance/acc"] == pytest.approx(0.1, abs=0.02)  # balanced classes
    result = register(cfg)
    assert result["decision"].startswith("not promoted: no better than")
    assert result["decision"].endswith("no champion yet") and result["champion_version"] is None
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert client.get_registered_model(cfg.register.model_name).aliases == {"challenger": 1}
    version = client.get_model_version(cfg.register.model_name, "1")
    margin = metrics["test/acc"] - metrics["baseline/acc"]
    assert float(version.tags["gate.baseline_margin"]) == pytest.approx(margin)
    assert f"missed it by {-margin:.4f}" in version.description

    # The same gate without the baseline requirement: a model that learned beats chance.
    cfg = make_cfg(*LEARNS, "register.require_beat_baseline=false")
    train(cfg)
    metrics = evaluate(cfg)
    result = register(cfg)
    assert metrics["test/acc"] > 2 * metrics["chance/acc"]
    assert result["decision"] == "promoted to champion" and result["champion_version"] == 2
    assert result["floors"] == {"chance": metrics["chance/acc"]}
