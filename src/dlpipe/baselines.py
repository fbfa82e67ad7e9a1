"""Classical baselines: the cheap model a practitioner fits first, on the same train split, so a
network's test metrics always stand next to what ten lines of scikit-learn reach (and next to
chance). Each task's evaluate reports them as `baseline/<metric>` and `chance/<metric>` beside
its `test/<metric>`; the champion gate can require beating them (dlpipe.register).

Candidates are compared on the validation split and the best one is scored on the test split,
so choosing the baseline never looks at the test labels."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data import load_array, load_split


@dataclass
class Baseline:
    """The chosen candidate: its `name`, test-split output (class probabilities (N, K) or
    predictions (N,)), seconds to fit it on the train split, and every candidate's val score."""

    name: str
    test: np.ndarray
    fit_seconds: float
    val_scores: dict[str, float] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """What reports/evaluate/files/baseline.json records (the register stage reads `name`)."""
        return {"name": self.name, "fit_seconds": self.fit_seconds, "val_scores": self.val_scores}


def renamed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """{"test/acc": v} -> {"<prefix>/acc": v}: a baseline's metrics under the test metric's
    suffix, so `baseline/acc` sits next to `test/acc` (the champion gate pairs them so)."""
    return {f"{prefix}/{key.split('/', 1)[1]}": value for key, value in metrics.items()}


def chance_probs(train_y: np.ndarray, num_classes: int, n: int) -> np.ndarray:
    """(n, K) float64: the training split's class frequencies for every sample: the predictor
    that knows nothing about the input (its accuracy is the majority-class share)."""
    prior = np.bincount(train_y, minlength=num_classes) / len(train_y)
    return np.tile(prior, (n, 1))


def classification_baseline(processed: Path, input_kind: str, num_classes: int) -> Baseline:
    """The classical classifier for `input_kind` with the best val accuracy, each candidate
    fitted on the train split only: TF-IDF word 1-2-grams + character 2-5-grams with logistic
    regression for "tokens" (the texts as the tokenizer reads them back); logistic regression
    and histogram gradient boosting on pixels ("image"), on per-band mean and std over time of
    (T, F) features (log-mel spectrograms) or on table rows ("features").

    Raises ValueError for an input kind without a baseline."""
    x, y = load_split(processed, "train")
    x_val, y_val = load_split(processed, "val")
    x_test, _ = load_split(processed, "test")
    if input_kind == "tokens":
        decode = _token_decoder(processed)
        candidates, x, x_val, x_test = _text_candidates(), decode(x), decode(x_val), decode(x_test)
    elif input_kind in ("image", "features"):
        flat = _summary_features if input_kind == "features" and x.ndim == 3 else _flat
        candidates, x, x_val, x_test = _dense_classifiers(), flat(x), flat(x_val), flat(x_test)
    else:
        raise ValueError(f"no classical baseline for input_kind={input_kind!r}")
    return _pick_classifier(candidates, num_classes, x, y, x_val, y_val, x_test)


def regression_baseline(processed: Path) -> Baseline:
    """Linear least squares or histogram gradient boosting on the (already transformed) table
    features, whichever has the lower val RMSE; test predictions in the target's units."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import LinearRegression

    candidates = {
        "linear regression": LinearRegression,
        "histogram gradient boosting": lambda: HistGradientBoostingRegressor(random_state=0),
    }
    x, y = load_split(processed, "train")
    x_val, y_val = load_split(processed, "val")
    x, x_val, x_test = _flat(x), _flat(x_val), _flat(load_array(processed, "test_x"))
    scores, fitted = {}, {}
    for name, make in candidates.items():
        t0 = time.perf_counter()
        model = make().fit(x, y.astype(np.float64))
        fitted[name] = (model, time.perf_counter() - t0)
        err = model.predict(x_val) - y_val
        scores[name] = float(np.sqrt(np.mean(err**2)))
    best = min(scores, key=scores.__getitem__)
    model, seconds = fitted[best]
    return Baseline(best, model.predict(x_test), seconds, scores)


def char_ngram_loss(
    train: np.ndarray, val: np.ndarray, test: np.ndarray, vocab_size: int, max_order: int
) -> tuple[float, int, float]:
    """(test nats per character, the chosen context length, seconds) of an interpolated
    Witten-Bell character n-gram model (Chen & Goodman 1998, "An empirical study of smoothing
    techniques for language modeling", eq. 18) counted on the `train` id stream: the context
    length 0..max_order with the lowest val loss is scored on `test`. Every character of a
    stream after the first is predicted, from up to that many preceding characters; the base
    of the interpolation is the uniform distribution over `vocab_size` characters."""
    t0 = time.perf_counter()
    stream = np.concatenate([train, val, test]).astype(np.int64)
    bounds = np.cumsum([0, len(train), len(val), len(test)])
    val_pos, test_pos = np.arange(bounds[1] + 1, bounds[2]), np.arange(bounds[2] + 1, bounds[3])
    val_p = np.full(len(val_pos), 1.0 / vocab_size)
    test_p = np.full(len(test_pos), 1.0 / vocab_size)
    context = np.zeros(len(stream), np.int64)  # id of the k preceding characters, per position
    best = (-np.mean(np.log(val_p)), 0, -np.mean(np.log(test_p)))
    for k in range(1, max_order + 1):
        # Extend each context one character to the left; ids stay < len(stream).
        shifted = np.full(len(stream), vocab_size, np.int64)  # vocab_size: before the stream
        shifted[k:] = stream[:-k]
        _, context = np.unique(context * (vocab_size + 1) + shifted, return_inverse=True)
        train_pos = np.arange(k, bounds[1])
        val_p = _witten_bell(context, stream, train_pos, val_pos, val_p, vocab_size)
        test_p = _witten_bell(context, stream, train_pos, test_pos, test_p, vocab_size)
        val_loss = -np.mean(np.log(val_p))
        if val_loss < best[0]:
            best = (val_loss, k, -np.mean(np.log(test_p)))
    return float(best[2]), best[1], time.perf_counter() - t0


def _witten_bell(
    context: np.ndarray,
    stream: np.ndarray,
    train_pos: np.ndarray,
    at: np.ndarray,
    lower: np.ndarray,
    vocab_size: int,
) -> np.ndarray:
    """P(stream[i] | context[i]) for i in `at`, interpolated with `lower` (the same
    probabilities one order shorter): (c(h, w) + T(h) P_lower) / (c(h) + T(h)), T(h) the
    distinct characters seen after h; an unseen context keeps P_lower."""
    pairs = context[train_pos] * vocab_size + stream[train_pos]
    pair_keys, pair_counts = np.unique(pairs, return_counts=True)
    ctx_keys, ctx_counts = np.unique(context[train_pos], return_counts=True)
    ctx_types = np.bincount(
        np.searchsorted(ctx_keys, pair_keys // vocab_size), minlength=len(ctx_keys)
    )
    c_hw = _lookup(pair_keys, pair_counts, context[at] * vocab_size + stream[at])
    where = np.searchsorted(ctx_keys, context[at]).clip(max=len(ctx_keys) - 1)
    seen = ctx_keys[where] == context[at]
    c_h = np.where(seen, ctx_counts[where], 0)
    t_h = np.where(seen, ctx_types[where], 0)
    return np.where(seen, (c_hw + t_h * lower) / np.maximum(c_h + t_h, 1), lower)


def _lookup(keys: np.ndarray, counts: np.ndarray, query: np.ndarray) -> np.ndarray:
    where = np.searchsorted(keys, query).clip(max=len(keys) - 1)
    return np.where(keys[where] == query, counts[where], 0)


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32)


def _summary_features(x: np.ndarray) -> np.ndarray:
    """(N, T, F) -> (N, 2F): each band's mean and standard deviation over time."""
    x = x.astype(np.float32)
    return np.concatenate([x.mean(1), x.std(1)], axis=1)


def _token_decoder(processed: Path) -> Callable[[np.ndarray], list[str]]:
    from tokenizers import Tokenizer

    from dlpipe.formats.text import TOKENIZER

    tokenizer = Tokenizer.from_file(str(Path(processed) / TOKENIZER))
    return lambda ids: tokenizer.decode_batch(ids.tolist())  # special tokens ([PAD]) dropped


def _text_candidates() -> dict[str, Callable[[], Any]]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    def make(c: float) -> Callable[[], Any]:
        return lambda: make_pipeline(
            make_union(
                TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
            ),
            LogisticRegression(C=c, max_iter=1000),
        )

    return {
        f"TF-IDF word 1-2 + char 2-5 grams, logistic regression C={c:g}": make(c) for c in (1, 10)
    }


def _dense_classifiers() -> dict[str, Callable[[], Any]]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logistic regression": lambda: make_pipeline(
            StandardScaler(), LogisticRegression(C=0.1, max_iter=300)
        ),
        "histogram gradient boosting": lambda: HistGradientBoostingClassifier(
            max_iter=100, random_state=0
        ),
    }


def _pick_classifier(
    candidates: dict[str, Callable[[], Any]],
    num_classes: int,
    x: Sequence | np.ndarray,
    y: np.ndarray,
    x_val: Sequence | np.ndarray,
    y_val: np.ndarray,
    x_test: Sequence | np.ndarray,
) -> Baseline:
    scores, fitted = {}, {}
    for name, make in candidates.items():
        t0 = time.perf_counter()
        model = make().fit(x, y)
        fitted[name] = (model, time.perf_counter() - t0)
        scores[name] = float(np.mean(model.predict(x_val) == y_val))
    best = max(scores, key=scores.__getitem__)
    model, seconds = fitted[best]
    probs = np.zeros((len(x_test), num_classes))
    probs[:, model.classes_] = model.predict_proba(x_test)  # classes the train split lacks: 0
    return Baseline(best, probs, seconds, scores)


def pca_gaussian_images(train: np.ndarray, n: int, components: int, seed: int) -> np.ndarray:
    """`n` uint8 images shaped like `train` (N, H, W[, C]), drawn from a Gaussian over the
    training images' first `components` principal components (probabilistic PCA without its
    noise term; Tipping & Bishop 1999): the classical generative model a GAN has to beat."""
    from sklearn.decomposition import PCA

    flat = train.reshape(len(train), -1).astype(np.float32)
    pca = PCA(min(components, *flat.shape), random_state=seed).fit(flat)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, pca.n_components_)) * np.sqrt(pca.explained_variance_)
    images = pca.inverse_transform(z.astype(np.float32)).clip(0, 255).round()
    return images.astype(np.uint8).reshape(n, *train.shape[1:])
