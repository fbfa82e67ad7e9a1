"""Spoken digits (format "fsdd"): the Free Spoken Digit Dataset's wavs as fixed-length log-mel
spectrograms, float32 (N, frames, n_mels), split by the official rule (recording index 0-4 is
test) or leaving one speaker out. A served model takes raw waveforms: its `Adapter` computes the
features with `log_mel`, the very function preprocessing uses, so training and serving agree."""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import pandas as pd
import soundfile as sf
import torch

from dlpipe.data import (
    DataError,
    check_class_coverage,
    check_fraction,
    check_limit,
    checked_manifest,
    fraction_count,
    load_array,
    members_digest,
    save_arrays,
    stratified_split,
    write_atomic,
    write_meta,
)

log = logging.getLogger(__name__)

CLASSES = [str(d) for d in range(10)]
RECORDINGS = "recordings"  # the data.files entry: a folder of `{digit}_{speaker}_{index}.wav`
NAME = re.compile(r"(\d)_([A-Za-z]+)_(\d+)\.wav")
TEST_INDICES = 5  # official split: recordings 0-4 of every speaker and digit are the test set
FEATURE_KEYS = ("sample_rate", "duration_s", "n_mels", "n_fft", "hop_length")
FEATURES = "features.json"  # the feature options, shipped with a served model
TOP_DB = 80.0  # dynamic range kept below each clip's loudest bin; silence is floored there
EXAMPLES = 4  # test waveforms kept for the served model's input example
COLUMN = "waveform"

INPUT_DOC = (
    "a DataFrame with one column 'waveform', one mono float waveform per row (any length, "
    "samples in [-1, 1], at the training sample rate: 8 kHz for FSDD; soundfile.read(path)[0]); "
    "the unwrapped model also takes a list of 1-D arrays or a 2-D array (N, samples)"
)


def feature_options(data: Mapping) -> dict[str, Any]:
    """The feature settings of `data`, validated: what `log_mel` needs."""
    options = {key: data.get(key) for key in FEATURE_KEYS}
    for key in ("sample_rate", "n_mels", "n_fft", "hop_length"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"data.{key}={value!r} must be a positive integer, e.g. data.{key}=80")
    duration = options["duration_s"]
    if isinstance(duration, bool) or not isinstance(duration, int | float) or duration <= 0:
        raise ValueError(f"data.duration_s={duration!r} must be positive seconds, e.g. 1.0")
    if options["hop_length"] > options["n_fft"]:
        raise ValueError(
            f"data.hop_length={options['hop_length']} exceeds data.n_fft={options['n_fft']}: "
            "frames would skip samples; use a hop of at most the window"
        )
    return options


def fixed_length(wave: np.ndarray, n: int) -> np.ndarray:
    """`wave` centered in `n` samples: padded with silence on both sides, or its middle kept."""
    if len(wave) >= n:
        start = (len(wave) - n) // 2
        return wave[start : start + n]
    before = (n - len(wave)) // 2
    return np.pad(wave, (before, n - len(wave) - before))


def log_mel(wave: np.ndarray, options: Mapping[str, Any]) -> np.ndarray:
    """(frames, n_mels) float32 log-mel spectrogram of one mono waveform at
    `options["sample_rate"]`: the one feature function of preprocessing and serving.

    Decibels relative to the clip's loudest bin make the features independent of recording
    gain; the floor at -TOP_DB keeps the padding's digital silence from becoming an outlier."""
    rate, n_fft = options["sample_rate"], options["n_fft"]
    wave = fixed_length(np.asarray(wave, np.float32), round(options["duration_s"] * rate))
    power = np.abs(librosa.stft(wave, n_fft=n_fft, hop_length=options["hop_length"])) ** 2
    mel = mel_basis(rate, n_fft, options["n_mels"]) @ power  # (n_mels, frames)
    return librosa.power_to_db(mel, ref=np.max, top_db=TOP_DB).T.astype(np.float32)


@functools.cache
def mel_basis(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """librosa's (Slaney) mel filter bank (n_mels, 1 + n_fft // 2), built once per setting:
    building it costs more than the spectrogram of a one-second clip."""
    return librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels)


def read_wave(path: Path, rate: int) -> np.ndarray:
    """A mono wav as float32 samples in [-1, 1] at `rate` Hz (resampled if recorded otherwise)."""
    try:
        wave, file_rate = sf.read(path, dtype="float32")
    except sf.LibsndfileError as e:
        raise DataError(f"{path} can't be decoded ({e}): re-run the collect stage") from e
    if wave.ndim != 1:
        raise DataError(f"{path} has {wave.shape[1]} channels; FSDD recordings are mono")
    if file_rate != rate:
        wave = librosa.resample(wave, orig_sr=file_rate, target_sr=rate)
    return wave


def verified_recordings(raw_dir: Path, manifest: Mapping) -> Path:
    """The collected folder of wavs, checked to hold exactly the bytes the manifest pins."""
    if RECORDINGS not in manifest["files"]:
        raise DataError(
            f"the manifest of {raw_dir} lists {sorted(manifest['files'])}, no {RECORDINGS!r}: "
            f"data.files needs a '{RECORDINGS}' folder entry (see conf/data/fsdd.yaml)"
        )
    folder = raw_dir / RECORDINGS
    if not folder.is_dir():
        raise DataError(f"{folder} is missing: re-run the collect stage")
    if members_digest(folder) != manifest["files"][RECORDINGS]:
        raise DataError(f"{folder} changed since it was collected: re-run the collect stage")
    return folder


def parse_names(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(file names, digits, speakers, recording indices) of the wavs in `folder`, sorted."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    parts = []
    for name in names:
        match = NAME.fullmatch(name)
        if match is None:
            raise DataError(
                f"{folder / name} is not named {{digit}}_{{speaker}}_{{index}}.wav: "
                "check data.files.recordings.members"
            )
        parts.append((int(match[1]), match[2], int(match[3])))
    digits, speakers, indices = zip(*parts, strict=True)
    return names, np.array(digits, np.int64), np.array(speakers), np.array(indices, np.int64)


def is_test_recording(data: Mapping, speakers: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Boolean mask (N,) of the test recordings: the official rule (recording index 0-4 of every
    speaker and digit) or, with data.test_speaker, every recording of that speaker. ValueError
    naming the speakers when data.test_speaker is not one of them."""
    test_speaker = data.get("test_speaker")
    if test_speaker is None:
        return indices < TEST_INDICES
    if test_speaker not in speakers:
        raise ValueError(
            f"data.test_speaker={test_speaker!r} is not a speaker of the data: choose one of "
            f"{sorted(set(speakers))} or null (official split)"
        )
    return speakers == test_speaker


def split_indices(
    data: Mapping, digits: np.ndarray, speakers: np.ndarray, indices: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    """Recording numbers per split: test by the official rule or the held-out speaker; then an
    optional stratified cap (data.limit) and a stratified, seeded validation share."""
    rng = np.random.default_rng(seed)
    is_test = is_test_recording(data, speakers, indices)
    test, rest = np.flatnonzero(is_test), np.flatnonzero(~is_test)
    limit = check_limit(data, 2 * len(CLASSES), "recordings", "train and val need every digit")
    if limit is not None and limit < len(rest):
        rest = rest[stratified_split(digits[rest], limit, rng)[0]]
    check_fraction(data, "val_fraction")
    val, train = stratified_split(
        digits[rest], fraction_count(data, "val_fraction", len(rest)), rng
    )
    return {"train": rest[train], "val": rest[val], "test": test}


def preprocess(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
    t0 = time.perf_counter()
    manifest = checked_manifest(data, raw_dir)
    options = feature_options(data)
    folder = verified_recordings(raw_dir, manifest)
    names, digits, speakers, indices = parse_names(folder)
    speaker_names = sorted(set(speakers.tolist()))
    splits = split_indices(data, digits, speakers, indices, seed)
    check_class_coverage({s: digits[i] for s, i in splits.items()}, CLASSES, "raise data.limit")

    arrays: dict[str, np.ndarray] = {}
    for split, idx in splits.items():
        waves = [read_wave(folder / names[i], options["sample_rate"]) for i in idx]
        arrays[f"{split}_x"] = np.stack([log_mel(w, options) for w in waves])
        arrays[f"{split}_y"] = digits[idx]
        arrays[f"{split}_speaker"] = np.searchsorted(speaker_names, speakers[idx]).astype(np.int64)
        arrays[f"{split}_file"] = np.array([names[i] for i in idx])  # provenance, e.g. 3_theo_7.wav
        if split == "test":
            n = round(options["duration_s"] * options["sample_rate"])
            arrays["example_wave"] = np.stack([fixed_length(w, n) for w in waves[:EXAMPLES]])
    sha256 = save_arrays(out_dir, arrays)
    write_atomic(Path(out_dir) / FEATURES, [json.dumps(options, indent=2).encode()])

    x_train = arrays["train_x"].reshape(-1, options["n_mels"]).astype(np.float64)
    meta = {
        "classes": CLASSES,
        "num_classes": len(CLASSES),
        "input_shape": list(arrays["train_x"].shape[1:]),
        "input_kind": "features",
        "mean": x_train.mean(0).tolist(),
        "std": x_train.std(0).tolist(),
        "speakers": speaker_names,
        "test_speaker": data.get("test_speaker"),
        "features": options,
        "sizes": {split: len(idx) for split, idx in splits.items()},
    }
    meta = write_meta(out_dir, meta, data, raw_dir, manifest, seed, sha256)
    log.info(
        "preprocessed %s: sizes %s, log-mel %s in %.2fs -> %s",
        data["name"],
        meta["sizes"],
        meta["input_shape"],
        time.perf_counter() - t0,
        out_dir,
    )
    return meta


def serving_files(processed_dir: Path) -> dict[str, str]:
    """The feature options: the served model computes its inputs' features with them."""
    path = Path(processed_dir) / FEATURES
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the preprocess stage first")
    return {"features": str(path)}


def example_input(processed_dir: Path, n: int = 2) -> pd.DataFrame:
    """Real test waveforms in the served form: a 'waveform' column of float64 arrays, so the
    signature (Array(double)) takes any length, and float32 or float64 samples."""
    waves = load_array(processed_dir, "example_wave")[:n].astype(np.float64)
    return pd.DataFrame({COLUMN: list(waves)})


def as_waveforms(model_input: Any) -> list[np.ndarray]:
    """The 1-D float32 waveforms of a served input (see INPUT_DOC), checked."""
    if isinstance(model_input, pd.DataFrame | Mapping):
        if COLUMN not in model_input:
            raise ValueError(f"expected a {COLUMN!r} column of waveforms, got {list(model_input)}")
        model_input = list(model_input[COLUMN])
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim != 2:
            raise ValueError(
                f"expected waveforms as a 2-D array (N, samples), got shape {model_input.shape}: "
                "wrap a single waveform as [waveform]"
            )
    elif not isinstance(model_input, Sequence | np.ndarray) or isinstance(model_input, str):
        raise ValueError(
            f"expected a list of 1-D waveforms or a 2-D array, got {type(model_input).__name__}"
        )
    if len(model_input) == 0:
        raise ValueError("expected at least one waveform, got none")
    return [_checked_wave(wave, i) for i, wave in enumerate(model_input)]


def _checked_wave(wave: Any, i: int) -> np.ndarray:
    x = np.asarray(wave)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"waveform {i} has shape {x.shape}: expected mono samples, 1-D, non-empty")
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"waveform {i} holds {x.dtype} values: expected float samples")
    if not np.isfinite(x).all():
        raise ValueError(f"waveform {i} contains NaN or infinite samples")
    peak = float(np.abs(x).max())
    if peak > 1.0:
        raise ValueError(
            f"waveform {i} reaches |x| = {peak:g}: expected float samples in [-1, 1]; scale "
            "16-bit PCM by 1/32768 (soundfile.read(path) does)"
        )
    return x.astype(np.float32)


class Adapter:
    """Raw waveforms -> the network's input, float32 (N, frames, n_mels), via `log_mel`."""

    def __init__(self, spec: dict[str, Any], files: dict[str, str]):
        self.options = json.loads(Path(files["features"]).read_text())

    def __call__(self, model_input: Any) -> torch.Tensor:
        waves = as_waveforms(model_input)
        return torch.from_numpy(np.stack([log_mel(w, self.options) for w in waves]))
