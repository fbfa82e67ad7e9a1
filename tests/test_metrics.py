"""What the test metrics mean when a class is missing from the test split: it is left out of
the macro averages (null per class, with a warning), never counted as a score of 0."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from dlpipe.tasks.classifier import classification_report


def test_a_class_absent_from_test_is_left_out_of_macro_averages(caplog):
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(200, 3)).astype(np.float32))
    target = torch.from_numpy(rng.choice([0, 2], 200))  # "neutral" (1) never occurs in test
    with caplog.at_level("WARNING"):
        summary, per_class, _ = classification_report(logits, target, ["neg", "neutral", "pos"])
    assert "['neutral'] have no test samples" in caplog.text

    probs, y = logits.softmax(-1).numpy(), target.numpy()
    pred = probs.argmax(1)
    present = [0, 2]
    expected_auc = np.mean([roc_auc_score(y == c, probs[:, c]) for c in present])
    assert summary["test/roc_auc_ovr_macro"] == pytest.approx(expected_auc, abs=1e-6)
    for name, metric in (
        ("recall", recall_score),
        ("precision", precision_score),
        ("f1", f1_score),
    ):
        expected = metric(y, pred, labels=present, average="macro", zero_division=0)
        assert summary[f"test/{name}_macro"] == pytest.approx(expected, abs=1e-6), name
    assert per_class["neutral"] == {
        "precision": None,
        "recall": None,
        "f1": None,
        "roc_auc": None,
        "support": 0,
    }
    assert per_class["pos"]["roc_auc"] == pytest.approx(roc_auc_score(y == 2, probs[:, 2]))


def test_with_every_class_present_macro_is_the_plain_mean():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(300, 4)).astype(np.float32))
    target = torch.from_numpy(rng.integers(0, 4, 300))
    summary, per_class, _ = classification_report(logits, target, list("abcd"))
    probs, y = logits.softmax(-1).numpy(), target.numpy()
    assert summary["test/roc_auc_ovr_macro"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-6
    )
    assert summary["test/recall_macro"] == pytest.approx(
        recall_score(y, probs.argmax(1), average="macro"), abs=1e-6
    )
