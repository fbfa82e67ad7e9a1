"""Connected spoken digits (format "fsdd_digits"): utterances of 1-7 digits built from the FSDD
recordings, for transcription. Each utterance is one speaker's real recordings of its digits
concatenated with seeded silences (and optional light noise): a SYNTHETIC concatenation of real
isolated words, not natural continuous speech (no coarticulation between digits).

Recordings are split before utterances are built (official rule: index 0-4 is test; or one
speaker held out), so no recording is heard in two splits. Training utterances may be speed
perturbed (`speed_factors`, Ko et al. 2015); validation and test never are. Features are
`audio.log_mel`, the speech classifier's function, over each waveform's whole length; a served
model's `Adapter` computes them from raw waveforms of any length with that same function."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import pandas as pd
import torch

from dlpipe.data import (
    DataError,
    check_fraction,
    checked_manifest,
    load_array,
    save_arrays,
    stratified_split,
    write_atomic,
    write_meta,
)
from dlpipe.formats import audio
from dlpipe.formats.audio import COLUMN, as_waveforms, read_wave

log = logging.getLogger(__name__)

CLASSES = audio.CLASSES  # the digits "0".."9"; a transcriber adds the CTC blank
FEATURE_KEYS = ("sample_rate", "n_mels", "n_fft", "hop_length")
FEATURES = audio.FEATURES
PAD = -1  # fills {split}_y beyond an utterance's last digit
EXAMPLES = 2  # test utterances kept as waveforms: the served model's input example
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}  # one random stream per split
SPEED_STREAM = 3  # the train split's speed factors: a stream of their own, so the strings,
# silences and noise are those of an unperturbed build
INPUT_DOC = audio.INPUT_DOC  # the served model takes what the speech classifier takes


def feature_options(data: Mapping) -> dict[str, Any]:
    """The log-mel settings of `data`, validated as the classifier's are; no fixed duration:
    every utterance keeps its own length."""
    options = audio.feature_options({**data, "duration_s": 1.0})
    return {key: options[key] for key in FEATURE_KEYS}


def utterance_features(wave: np.ndarray, options: Mapping[str, Any]) -> np.ndarray:
    """(1 + samples // hop_length, n_mels) float32: `audio.log_mel` (the speech classifier's
    feature function) over the whole waveform, neither padded nor trimmed."""
    return audio.log_mel(wave, {**options, "duration_s": len(wave) / options["sample_rate"]})


def construction(data: Mapping) -> dict[str, Any]:
    """The utterance settings of `data`, checked: sizes per split, digits per string,
    silences in seconds as [low, high] ranges, noise SNR in dB (null = none)."""
    sizes = data.get("utterances")
    if not isinstance(sizes, Mapping) or set(sizes) != set(SPLIT_STREAMS):
        raise ValueError(
            f"data.utterances={sizes!r} must give a count per split, e.g. "
            "data.utterances={train: 4000, val: 400, test: 1000}"
        )
    for split, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"data.utterances.{split}={n!r} must be a positive integer")
    low, high = data.get("min_digits"), data.get("max_digits")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or not (
        1 <= low <= high
    ):
        raise ValueError(
            f"data.min_digits={low!r}, data.max_digits={high!r}: need integers "
            "1 <= min_digits <= max_digits, e.g. 1 and 7"
        )
    ranges = {}
    for key in ("gap_s", "edge_s"):
        value = data.get(key)
        if (
            not isinstance(value, list | tuple)
            or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] <= value[1]
        ):
            raise ValueError(
                f"data.{key}={value!r} must be seconds [low, high] with 0 <= low <= high, "
                f"e.g. data.{key}=[0.05,0.3]"
            )
        ranges[key] = [float(value[0]), float(value[1])]
    snr = data.get("noise_snr_db")
    if snr is not None and (isinstance(snr, bool) or not isinstance(snr, int | float)):
        raise ValueError(f"data.noise_snr_db={snr!r} must be a number of dB or null (no noise)")
    speeds = data.get("speed_factors")
    if speeds is not None and (
        not isinstance(speeds, list | tuple)
        or not speeds
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0.5 <= v <= 2 for v in speeds
        )
    ):
        raise ValueError(
            f"data.speed_factors={speeds!r} must be a list of speed factors in [0.5, 2], "
            "e.g. data.speed_factors=[0.9,1.0,1.1], or null (no speed perturbation)"
        )
    return {
        "utterances": dict(sizes),
        "min_digits": low,
        "max_digits": high,
        **ranges,
        "noise_snr_db": None if snr is None else float(snr),
        "speed_factors": None if speeds is None else [float(v) for v in speeds],
    }


def recording_splits(
    data: Mapping, digits: np.ndarray, speakers: np.ndarray, indices: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    """Recording numbers per split, disjoint: test by the official rule (index 0-4) or the
    held-out speaker (data.test_speaker); validation a seeded share (data.val_fraction) of the
    rest, stratified by (speaker, digit) so every speaker can say every digit in both."""
    is_test = audio.is_test_recording(data, speakers, indices)
    test, rest = np.flatnonzero(is_test), np.flatnonzero(~is_test)
    check_fraction(data, "val_fraction")
    strata = np.unique(speakers[rest], return_inverse=True)[1] * 10 + digits[rest]
    n_val = round(data["val_fraction"] * len(rest))
    if n_val < len(np.unique(strata)):
        raise ValueError(
            f"data.val_fraction={data['val_fraction']} leaves {n_val} validation recordings, "
            "fewer than the (speaker, digit) pairs: raise data.val_fraction"
        )
    val, train = stratified_split(strata, n_val, np.random.default_rng(seed))
    return {"train": rest[train], "val": rest[val], "test": test}


def build_utterances(
    waves: list[np.ndarray],
    digits: np.ndarray,
    speakers: np.ndarray,
    pool: np.ndarray,
    count: int,
    settings: Mapping[str, Any],
    rate: int,
    rng: np.random.Generator,
) -> list[tuple[np.ndarray, list[int], str, list[int]]]:
    """`count` utterances (waveform, digits, speaker, recording numbers) from the recordings
    `pool` only. Speakers take turns (balanced); each string's length is uniform in
    [min_digits, max_digits], its digits uniform, each digit a random recording of that
    speaker saying it; silences between digits (gap_s) and at both ends (edge_s) are uniform.
    Noise, if set, is white at `noise_snr_db` below the speech's mean power."""
    by_pair: dict[tuple[str, int], np.ndarray] = {}
    for i in pool:
        by_pair.setdefault((speakers[i], int(digits[i])), []).append(i)
    names = sorted({speakers[i] for i in pool})
    out = []
    for n in range(count):
        speaker = names[n % len(names)]
        length = int(rng.integers(settings["min_digits"], settings["max_digits"] + 1))
        said = rng.integers(0, 10, length).tolist()
        recs = [int(rng.choice(by_pair[(speaker, d)])) for d in said]
        gaps = rng.uniform(*settings["gap_s"], length - 1)
        edges = rng.uniform(*settings["edge_s"], 2)
        pieces = [np.zeros(round(edges[0] * rate), np.float32)]
        for k, rec in enumerate(recs):
            if k:
                pieces.append(np.zeros(round(gaps[k - 1] * rate), np.float32))
            pieces.append(waves[rec])
        pieces.append(np.zeros(round(edges[1] * rate), np.float32))
        wave = np.concatenate(pieces)
        if settings["noise_snr_db"] is not None:
            speech = np.concatenate([waves[r] for r in recs]).astype(np.float64)
            scale = np.sqrt(np.mean(speech**2)) * 10 ** (-settings["noise_snr_db"] / 20)
            wave = wave + (scale * rng.standard_normal(len(wave))).astype(np.float32)
        out.append((np.clip(wave, -1.0, 1.0).astype(np.float32), said, speaker, recs))
    return out


def speed_perturb(wave: np.ndarray, factor: float, rate: int) -> np.ndarray:
    """`wave` (samples,) at `rate` Hz played `factor` times as fast: tempo and pitch both scale
    by `factor`, the length by 1 / factor (ceil(samples / factor) samples). Speed perturbation
    (Ko et al. 2015, "Audio augmentation for speech recognition"): the samples, read as if
    recorded at rate * factor, resampled to `rate` with soxr (librosa's "soxr_hq")."""
    if factor == 1.0:
        return wave
    fast = librosa.resample(wave, orig_sr=rate * factor, target_sr=rate, res_type="soxr_hq")
    return np.clip(fast, -1.0, 1.0).astype(np.float32)


def preprocess(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
    t0 = time.perf_counter()
    manifest = checked_manifest(data, raw_dir)
    options = feature_options(data)
    settings = construction(data)
    folder = audio.verified_recordings(raw_dir, manifest)
    names, digits, speakers, indices = audio.parse_names(folder)
    speaker_names = sorted(set(speakers.tolist()))
    splits = recording_splits(data, digits, speakers, indices, seed)
    waves = [read_wave(folder / name, options["sample_rate"]) for name in names]

    arrays: dict[str, np.ndarray] = {}
    for split, pool in splits.items():
        rng = np.random.default_rng([seed, SPLIT_STREAMS[split]])
        count = settings["utterances"][split]
        utterances = build_utterances(
            waves, digits, speakers, pool, count, settings, options["sample_rate"], rng
        )
        if split == "train" and settings["speed_factors"] is not None:
            # One factor per utterance: the whole string sounds like a faster or slower,
            # higher or lower voice. Validation and test keep the recordings as they are.
            speeds = np.random.default_rng([seed, SPEED_STREAM]).choice(
                settings["speed_factors"], count
            )
            utterances = [
                (speed_perturb(wave, float(f), options["sample_rate"]), *rest)
                for (wave, *rest), f in zip(utterances, speeds, strict=True)
            ]
            arrays["train_speed"] = speeds.astype(np.float32)  # (N,) each utterance's factor
        features = [utterance_features(wave, options) for wave, *_ in utterances]
        labels = np.full((count, settings["max_digits"]), PAD, np.int64)
        for row, (_, said, _, _) in enumerate(utterances):
            labels[row, : len(said)] = said
        arrays[f"{split}_x"] = np.concatenate(features)  # (frames of all utterances, n_mels)
        arrays[f"{split}_frames"] = np.array([len(f) for f in features], np.int64)
        arrays[f"{split}_y"] = labels  # (N, max_digits), PAD after the last digit
        arrays[f"{split}_speaker"] = np.searchsorted(
            speaker_names, [s for _, _, s, _ in utterances]
        ).astype(np.int64)
        # provenance: the recordings each utterance is made of, e.g. "3_theo_7.wav 5_theo_12.wav"
        arrays[f"{split}_file"] = np.array(
            [" ".join(names[r] for r in recs) for *_, recs in utterances]
        )
        if split == "test":
            kept = [wave for wave, *_ in utterances[:EXAMPLES]]
            arrays["example_wave"] = np.concatenate(kept)
            arrays["example_samples"] = np.array([len(w) for w in kept], np.int64)
    sha256 = save_arrays(out_dir, arrays)
    write_atomic(Path(out_dir) / FEATURES, [json.dumps(options, indent=2).encode()])

    x_train = arrays["train_x"].astype(np.float64)
    meta = {
        "classes": CLASSES,
        "num_classes": len(CLASSES),
        "input_shape": [None, options["n_mels"]],  # (frames, n_mels); frames vary
        "input_kind": "features",
        "mean": x_train.mean(0).tolist(),
        "std": x_train.std(0).tolist(),
        "speakers": speaker_names,
        "test_speaker": data.get("test_speaker"),
        "features": options,
        "construction": settings,
        "recordings": {split: len(pool) for split, pool in splits.items()},
        "sizes": {split: settings["utterances"][split] for split in splits},
        "max_digits": settings["max_digits"],
        "synthetic": "each utterance concatenates one speaker's real FSDD recordings of its "
        "digits with seeded silences: not natural continuous speech",
    }
    meta = write_meta(out_dir, meta, data, raw_dir, manifest, seed, sha256)
    log.info(
        "preprocessed %s: utterances %s from recordings %s in %.2fs -> %s",
        data["name"],
        meta["sizes"],
        meta["recordings"],
        time.perf_counter() - t0,
        out_dir,
    )
    return meta


def load_utterances(processed_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames (sum of lengths, n_mels) float32, lengths (N,), digits (N, max_digits) with
    PAD after each utterance's last) of one split."""
    frames = load_array(processed_dir, f"{split}_x")
    lengths = load_array(processed_dir, f"{split}_frames")
    if lengths.sum() != len(frames):
        raise DataError(
            f"{processed_dir}: {split}_frames does not add up to {split}_x: re-run preprocess"
        )
    return frames, lengths, load_array(processed_dir, f"{split}_y")


def pad_features(features: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, longest, n_mels) float32 zero-padded, lengths (N,) int64) of feature sequences."""
    lengths = torch.tensor([len(f) for f in features], dtype=torch.int64)
    x = torch.zeros(len(features), int(lengths.max()), features[0].shape[1])
    for i, f in enumerate(features):
        x[i, : len(f)] = torch.from_numpy(f)
    return x, lengths


def serving_files(processed_dir: Path) -> dict[str, str]:
    return audio.serving_files(processed_dir)


def example_input(processed_dir: Path, n: int = EXAMPLES) -> pd.DataFrame:
    """Real test utterances in the served form: a 'waveform' column of float64 arrays."""
    flat = load_array(processed_dir, "example_wave").astype(np.float64)
    ends = np.cumsum(load_array(processed_dir, "example_samples"))
    return pd.DataFrame({COLUMN: np.split(flat, ends[:-1])[:n]})


class Adapter:
    """Raw waveforms of any length (the speech classifier's `waveform` contract, checked by
    the same `as_waveforms`) -> (x (N, longest, n_mels) zero-padded, lengths (N,)), via
    `utterance_features`."""

    def __init__(self, spec: dict[str, Any], files: dict[str, str]):
        self.options = json.loads(Path(files["features"]).read_text())

    def __call__(self, model_input: Any) -> tuple[torch.Tensor, torch.Tensor]:
        waves = as_waveforms(model_input)
        return pad_features([utterance_features(w, self.options) for w in waves])
