"""Fraud detection on the real credit-card data (a smoke-size slice): the chronological split,
the cost threshold and the focal loss checked against hand counts and the formula, balanced
batches, and creditcard_mlp / creditcard_ae through all six stages to a served model that takes
raw transaction rows and a per-request threshold."""

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dlpipe.data import load_array, load_meta, load_split
from dlpipe.formats.transactions import stratified_splits
from dlpipe.models import create_model, load_checkpoint
from dlpipe.modules.fraud import BalancedBatchIndices, FraudDataModule, focal_loss
from dlpipe.tasks.fraud import decision_rule, scores_of
from dlpipe.tasks.fraud_metrics import (
    calibrated,
    calibration_bins,
    cost_threshold,
    expected_cost,
    ranking_metrics,
)

COST = {"false_negative": 100.0, "false_positive": 5.0}


@pytest.fixture(scope="module")
def fraud(smoke_run) -> Path:
    """The processed smoke-size slice (20,000 rows) of the creditcard_mlp run: one preprocess
    of the 150 MB table serves every test here and tests/test_smoke.py."""
    return Path(smoke_run("creditcard_mlp").cfg.paths.processed)


def test_chronological_split_puts_the_test_period_last(fraud):
    meta = load_meta(fraud)
    assert meta["split"] == "chronological"
    assert sum(meta["sizes"].values()) == 20000
    assert meta["sizes"] == {"train": 14000, "val": 2000, "test": 4000}  # floor cuts 70/10/20
    ranges = meta["time_range"]
    assert ranges["train"][1] <= ranges["val"][0] <= ranges["val"][1] <= ranges["test"][0]
    assert all(n > 0 for n in meta["positives"].values())
    assert "Time" not in meta["columns"]["numeric"]  # the split key is not a feature
    # Scaling fitted on the training period only: its rows are standardized, the test's not.
    train_x, test_x = load_split(fraud, "train")[0], load_split(fraud, "test")[0]
    assert np.allclose(train_x.mean(0), 0, atol=1e-4)
    assert not np.allclose(test_x.mean(0), 0, atol=1e-2)


def test_stratified_split_stays_selectable():
    y = np.zeros(10_000, dtype=np.int64)
    y[::100] = 1
    data = {"val_fraction": 0.1, "test_fraction": 0.2}
    splits = stratified_splits(y, data, np.random.default_rng(0))
    assert {s: len(i) for s, i in splits.items()} == {"train": 7000, "val": 1000, "test": 2000}
    assert {s: int(y[i].sum()) for s, i in splits.items()} == {"train": 70, "val": 10, "test": 20}
    assert len(np.unique(np.concatenate(list(splits.values())))) == 10_000


def test_cost_threshold_minimizes_the_expected_cost():
    probs = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1, 0.05])
    y = np.array([1, 0, 1, 0, 1, 0, 0])
    # flag >= 0.3: 3 frauds caught, 2 legit reviewed = 10 < flag >= 0.7: 1 missed + 1 = 105
    threshold = cost_threshold(probs, y, COST)
    assert threshold == 0.3
    assert expected_cost(probs, y, threshold, COST)["cost"] == 10.0
    # Reviews dearer than frauds: only the sure top row is worth flagging (2 missed = 2)...
    dear = {"false_negative": 1.0, "false_positive": 50.0}
    assert cost_threshold(probs, y, dear) == 0.9
    # ...and when a legitimate row ranks first, flagging nothing (3) beats every threshold.
    threshold = cost_threshold(probs, y[::-1], dear)
    counts = expected_cost(probs, y[::-1], threshold, dear)
    assert counts["tp"] + counts["fp"] == 0 and counts["cost"] == 3.0


def test_calibration_bins_count_every_row_once():
    probs = np.array([0.00005, 0.00005, 0.5, 0.5, 0.5, 0.95])
    y = np.array([0, 0, 1, 0, 1, 1])
    bins = calibration_bins(probs, y)
    assert sum(n for *_, n in bins) == 6
    assert bins == [(0.00005, 0.0, 2), (0.5, pytest.approx(2 / 3), 3), (0.95, 1.0, 1)]


def test_ranking_metrics_agree_with_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.05).astype(np.int64)
    scores = rng.normal(size=2000) + 2.5 * y
    got = ranking_metrics(scores * 40, y)  # large logits: ranks, not a saturated sigmoid
    assert got["ap"] == pytest.approx(average_precision_score(y, scores), abs=1e-6)
    assert got["roc_auc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-6)
    order = np.argsort(-scores)
    tp = np.cumsum(y[order])
    precision = tp / np.arange(1, len(y) + 1)
    assert got["recall_at_p90"] == pytest.approx(tp[precision >= 0.9].max() / y.sum())


def test_focal_loss_is_the_formula_and_bce_at_gamma_zero():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    p = logits.sigmoid()
    p_t = torch.where(y == 1, p, 1 - p)
    alpha_t = torch.where(y == 1, 0.25, 0.75)
    expected = (-alpha_t * (1 - p_t) ** 2 * p_t.log()).mean()
    assert focal_loss(logits, y, 2.0, 0.25) == pytest.approx(expected.item(), rel=1e-6)
    bce = F.binary_cross_entropy_with_logits(logits, y)
    assert focal_loss(logits, y, 0.0, 0.5) == pytest.approx(0.5 * bce.item(), rel=1e-6)


def test_balanced_batches_draw_both_classes_equally():
    y = torch.zeros(10_000, dtype=torch.long)
    y[:20] = 1
    batches = list(BalancedBatchIndices(y, 500, seed=0))
    drawn = torch.cat(batches)
    assert len(drawn) == 10_000 and len(batches) == 20
    assert 0.45 < y[drawn].float().mean().item() < 0.55


def test_ft_transformer_reads_table_rows_and_learns_a_fixed_batch():
    torch.manual_seed(0)
    kwargs = {"d_model": 8, "nhead": 2, "num_layers": 1, "dim_feedforward": 16, "dropout": 0.0}
    net = create_model("ft_transformer", input_shape=(29,), num_classes=1, input_kind="features",
                       **kwargs)  # fmt: skip
    x, y = torch.randn(16, 29), (torch.arange(16) % 2).float()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert net(x).shape == (16, 1) and losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="one row of features"):
        create_model("ft_transformer", input_shape=(12,), num_classes=2, input_kind="tokens",
                     vocab_size=10, **kwargs)  # fmt: skip


def test_autoencoder_trains_on_legitimate_rows_only(fraud):
    data = FraudDataModule(fraud, batch_size=256, seed=0, sampling="shuffle", legit_only=True)
    data.setup()
    x, y = data.splits["train"].tensors
    assert len(x) == load_meta(fraud)["sizes"]["train"] - load_meta(fraud)["positives"]["train"]
    assert y.sum() == 0 and data.splits["val"].tensors[1].sum() > 0  # validation keeps frauds
    net = create_model("mlp_autoencoder", input_shape=(x.shape[1],), width=8, depth=2,
                       latent_dim=4, activation="gelu")  # fmt: skip
    errors = net.reconstruction_error(x[:5])
    assert errors.shape == (5,) and torch.allclose(errors, ((net(x[:5]) - x[:5]) ** 2).mean(-1))


def _raw_rows(cfg) -> pd.DataFrame:
    return pd.read_csv(Path(cfg.paths.raw) / "creditcard.csv")  # collect decompressed it


@pytest.mark.parametrize("experiment", ["creditcard_mlp", "creditcard_ae"])
def test_creditcard_reports_and_serves_raw_rows(smoke_run, experiment):
    cfg, results, champion = smoke_run(experiment)
    metrics = results["evaluate"]
    for key in ("ap", "roc_auc", "recall_at_p90", "recall_at_p80", "cost", "threshold"):
        assert 0 <= metrics[f"test/{key}"] and 0 <= metrics[f"baseline/{key}"]
    processed = Path(cfg.paths.processed)
    positives = load_meta(processed)["positives"]["test"]
    assert metrics["test/cost_flag_nothing"] == positives * cfg.task.cost.false_negative
    files = Path(cfg.paths.reports) / "evaluate" / "files"
    comparison = pd.read_csv(files / "comparison.csv", index_col="predictor")
    assert {"model", "logistic_regression", "gradient_boosting"} <= set(comparison.index)
    assert comparison.loc["model", "ap"] == pytest.approx(metrics["test/ap"])
    for plot in ("pr_curve.png", "calibration.png"):
        assert (files / plot).read_bytes()[:4] == b"\x89PNG"

    # The served model takes raw rows (Time and Class left in) and answers as evaluate scored.
    model = mlflow.pyfunc.load_model(str(champion))
    rows = _raw_rows(cfg).iloc[load_array(processed, "test_row")]
    served = model.predict(rows)
    net, _ = load_checkpoint(Path(cfg.paths.train) / "checkpoints" / "best.ckpt")
    rule = decision_rule(processed, net, cfg.task.cost)
    probs = calibrated(scores_of(net, load_split(processed, "test")[0]), rule["calibration"])
    assert np.allclose(served["probability"], probs, rtol=1e-4, atol=1e-9)
    assert (served["fraud"] == (served["probability"] >= rule["threshold"])).all()
    y = load_split(processed, "test")[1]
    counts = expected_cost(probs, y, rule["threshold"], cfg.task.cost)
    assert served["fraud"].sum() == counts["tp"] + counts["fp"]
    assert metrics["test/cost"] == pytest.approx(counts["cost"])
    # The threshold is a per-request param: 0 flags every row.
    assert model.predict(rows.head(50), params={"threshold": 0.0})["fraud"].all()
