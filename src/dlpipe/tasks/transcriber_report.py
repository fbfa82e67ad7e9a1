"""The test-split report of a transcriber: WER and string accuracy overall, by string length
and by speaker, an edit-distance alignment into substitution / deletion / insertion counts,
examples of errors, and a classical baseline (energy segmentation + logistic regression)."""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.text import word_error_rate

from dlpipe.data import load_array, write_json
from dlpipe.formats.digit_strings import PAD, load_utterances, pad_features
from dlpipe.plots import saved_figure
from dlpipe.serving.transcriber import transcribe


def as_words(digits: Sequence[int]) -> str:
    """Digits as space-separated words, so word error rate counts digit errors: [4, 0] -> "4 0"."""
    return " ".join(str(d) for d in digits)


def references(labels: torch.Tensor) -> list[list[int]]:
    """Label rows (N, max_digits) padded with PAD -> the digit lists."""
    return [[d for d in row if d != PAD] for row in labels.tolist()]


def align(ref: Sequence[int], hyp: Sequence[int]) -> list[tuple[int | None, int | None]]:
    """A minimum-edit alignment (Levenshtein) of two label sequences as pairs: (r, h) a match or
    substitution, (r, None) a deletion, (None, h) an insertion."""
    n, m = len(ref), len(hyp)
    cost = np.zeros((n + 1, m + 1), np.int64)
    cost[:, 0], cost[0, :] = np.arange(n + 1), np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i, j] = min(
                cost[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]),
                cost[i - 1, j] + 1,
                cost[i, j - 1] + 1,
            )
    pairs: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i or j:
        if i and j and cost[i, j] == cost[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            pairs.append((ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif i and cost[i, j] == cost[i - 1, j] + 1:
            pairs.append((ref[i - 1], None))
            i -= 1
        else:
            pairs.append((None, hyp[j - 1]))
            j -= 1
    return pairs[::-1]


def error_counts(
    refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]], k: int
) -> np.ndarray:
    """(k + 1, k + 1) counts over all aligned pairs: [ref, hyp] for matches and substitutions,
    [ref, k] deletions of ref, [k, hyp] insertions of hyp."""
    counts = np.zeros((k + 1, k + 1), np.int64)
    for ref, hyp in zip(refs, hyps, strict=True):
        for r, h in align(ref, hyp):
            counts[k if r is None else r, k if h is None else h] += 1
    return counts


def grouped(
    keys: Sequence[Any], refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]
) -> dict[Any, dict[str, float]]:
    """WER, sequence accuracy and utterance count per value of `keys` (string length, speaker)."""
    out = {}
    for key in sorted(set(keys)):
        rows = [i for i, k in enumerate(keys) if k == key]
        out[key] = {
            "wer": word_error_rate(
                [as_words(hyps[i]) for i in rows], [as_words(refs[i]) for i in rows]
            ).item(),
            "seq_acc": float(np.mean([hyps[i] == refs[i] for i in rows])),
            "utterances": len(rows),
        }
    return out


def plot_errors(counts: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """The substitution / deletion / insertion counts, matches left out (the diagonal)."""
    shown = counts.copy()
    np.fill_diagonal(shown[:-1, :-1], 0)
    labels = [*classes, "-"]
    with saved_figure(path, figsize=(8, 7)) as (fig, ax):
        image = ax.imshow(shown, cmap="Reds")
        ticks = range(len(labels))
        ax.set(
            xticks=ticks,
            yticks=ticks,
            xlabel="recognized ('-': deleted)",
            ylabel="spoken ('-': inserted)",
        )
        ax.set_xticklabels(labels)
        ax.set_yticklabels(labels)
        for (i, j), n in np.ndenumerate(shown):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7)
        fig.colorbar(image)


def write_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def report_test_split(
    net: nn.Module,
    processed_dir: Path,
    meta: Mapping[str, Any],
    decoder: str,
    beam_size: int,
    examples: int,
    out: Path,
) -> dict[str, float]:
    """Test metrics ("test/..." keys) of `net` on the processed test utterances, decoded by
    `decoder` (and greedily, for comparison); report files into `out`."""
    frames, lengths, labels = load_utterances(processed_dir, "test")
    x, lengths_t = pad_features(np.split(frames, np.cumsum(lengths)[:-1]))
    refs = references(torch.from_numpy(labels))
    decoded = transcribe(net, x, lengths_t, decoder, beam_size)
    hyps = [digits for digits, _ in decoded]
    greedy = [digits for digits, _ in transcribe(net, x, lengths_t, "greedy", beam_size)]
    speakers = [meta["speakers"][s] for s in load_array(processed_dir, "test_speaker")]
    files = load_array(processed_dir, "test_file")

    def wer(h: Sequence[Sequence[int]]) -> float:
        return word_error_rate([as_words(d) for d in h], [as_words(r) for r in refs]).item()

    by_length = grouped([len(r) for r in refs], refs, hyps)
    by_speaker = grouped(speakers, refs, hyps)
    write_json(out / "by_length.json", {str(k): v for k, v in by_length.items()})
    write_json(out / "by_speaker.json", by_speaker)
    counts = error_counts(refs, hyps, len(meta["classes"]))
    labels_ = [*meta["classes"], "-"]
    write_rows(
        out / "substitutions.csv",
        ["spoken", *labels_],
        [[labels_[i], *row] for i, row in enumerate(counts.tolist())],
    )
    plot_errors(counts, meta["classes"], out / "substitutions.png")
    wrong = [i for i in range(len(refs)) if hyps[i] != refs[i]]
    write_rows(
        out / "errors.csv",
        ["utterance", "speaker", "spoken", "recognized", "confidence", "recordings"],
        [
            [i, speakers[i], as_words(refs[i]), as_words(hyps[i]), f"{decoded[i][1]:.4f}", files[i]]
            for i in wrong[:examples]
        ],
    )
    summary = {
        "test/wer": wer(hyps),
        "test/seq_acc": float(np.mean([h == r for h, r in zip(hyps, refs, strict=True)])),
        "test/wer_greedy": wer(greedy),
        "test/seq_acc_greedy": float(np.mean([h == r for h, r in zip(greedy, refs, strict=True)])),
        "test/mean_confidence": float(np.mean([c for _, c in decoded])),
    }
    summary |= {f"test/wer_len{k}": v["wer"] for k, v in by_length.items()}
    summary |= {f"test/wer_{speaker}": v["wer"] for speaker, v in by_speaker.items()}
    return summary


# --- the classical baseline: segment by energy, classify each segment -----------------------

SPEECH_DB = (-25.0, -30.0, -35.0, -40.0)  # candidate thresholds, dB below the utterance's peak
MIN_GAP = 3  # frames (30 ms): quieter stretches this short stay inside a word (stop closures)
MIN_WORD = 8  # frames (80 ms): shorter loud stretches are clicks, not digits


def segments(frames: np.ndarray, speech_db: float) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the words in one utterance's log-mel frames (T, F): runs of
    frames whose loudest band is above `speech_db` (dB re the utterance's peak), runs closer
    than MIN_GAP merged, runs shorter than MIN_WORD dropped."""
    loud = np.flatnonzero(frames.max(1) > speech_db)
    if not len(loud):
        return []
    breaks = np.flatnonzero(np.diff(loud) > MIN_GAP)
    starts = np.r_[loud[0], loud[breaks + 1]]
    ends = np.r_[loud[breaks], loud[-1]] + 1
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True) if b - a >= MIN_WORD]


def segment_features(frames: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """(words, 2F): each word's per-band mean and standard deviation over its frames."""
    return np.array([np.r_[frames[a:b].mean(0), frames[a:b].std(0)] for a, b in spans])


def _utterances(processed: Path, split: str) -> tuple[list[np.ndarray], list[list[int]]]:
    frames, lengths, labels = load_utterances(processed, split)
    return np.split(frames, np.cumsum(lengths)[:-1]), references(torch.from_numpy(labels))


def segment_baseline(processed: Path, out: Path) -> dict[str, float]:
    """`baseline/wer` and `baseline/seq_acc` of the classical pipeline: energy segmentation,
    then logistic regression on each segment's mean/std log-mel, trained on the train
    utterances whose segment count equals their digit count. The threshold (SPEECH_DB) is
    chosen by validation WER, so the test labels are never looked at; name, fit time and
    validation scores go to `out`/baseline.json."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    train, val, test = (_utterances(processed, s) for s in ("train", "val", "test"))

    def transcribe_all(model, utterances: list[np.ndarray], speech_db: float) -> list[list[int]]:
        hyps = []
        for frames in utterances:
            spans = segments(frames, speech_db)
            hyps.append(model.predict(segment_features(frames, spans)).tolist() if spans else [])
        return hyps

    fitted, val_scores = {}, {}
    for speech_db in SPEECH_DB:
        xs, ys = [], []
        for frames, digits in zip(*train, strict=True):
            spans = segments(frames, speech_db)
            if spans and len(spans) == len(digits):
                xs.append(segment_features(frames, spans))
                ys += digits
        if len(set(ys)) < 2:
            continue  # too few cleanly segmented utterances at this threshold
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        fitted[speech_db] = model.fit(np.concatenate(xs), ys)
        hyps = transcribe_all(model, val[0], speech_db)
        val_scores[f"{speech_db:g} dB"] = word_error_rate(
            [as_words(h) for h in hyps], [as_words(r) for r in val[1]]
        ).item()
    if not fitted:
        raise ValueError("the baseline segmented no training utterance into its digit count")
    speech_db = min(fitted, key=lambda db: val_scores[f"{db:g} dB"])
    hyps = transcribe_all(fitted[speech_db], test[0], speech_db)
    write_json(
        out / "baseline.json",
        {
            "name": f"energy segmentation ({speech_db:g} dB) + logistic regression on mean/std "
            "log-mel",
            "fit_seconds": time.perf_counter() - t0,
            "val_scores": val_scores,
        },
    )
    return {
        "baseline/wer": word_error_rate(
            [as_words(h) for h in hyps], [as_words(r) for r in test[1]]
        ).item(),
        "baseline/seq_acc": float(np.mean([h == r for h, r in zip(hyps, test[1], strict=True)])),
    }
