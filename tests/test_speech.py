"""Spoken digits (FSDD) on real recordings: log-mel preprocessing (official and
leave-one-speaker-out splits), the served model's waveform adapter, and each experiment run
through all six stages, its registered model predicting from wavs read with soundfile."""

import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from mlflow.exceptions import MlflowException

from dlpipe.data import DataError, load_array, load_meta
from dlpipe.formats.audio import Adapter, log_mel, serving_files
from dlpipe.preprocess import preprocess

SMALL = {"limit": 100}  # 100 training recordings (90 train / 10 val) + the 300 official test ones
NAME = re.compile(r"(\d)_([a-z]+)_(\d+)\.wav")


@pytest.fixture(scope="module")
def small(dataset) -> Path:
    return dataset("fsdd", **SMALL)


def _names(processed: Path, split: str) -> list[tuple[int, str, int]]:
    files = load_array(processed, f"{split}_file")
    return [(int(d), s, int(i)) for d, s, i in (NAME.fullmatch(f).groups() for f in files)]


def test_official_split_features_and_train_only_stats(small):
    meta = load_meta(small)
    assert meta["input_kind"] == "features" and meta["classes"] == list("0123456789")
    assert meta["sizes"] == {"train": 90, "val": 10, "test": 300}
    assert meta["speakers"] == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    for split, size in meta["sizes"].items():
        x, y = load_array(small, f"{split}_x"), load_array(small, f"{split}_y")
        assert x.shape == (size, 101, 40) and x.dtype == np.float32  # 1 s / 10 ms hop, 40 mels
        assert np.isfinite(x).all() and x.max() <= 0 and x.min() >= -80  # dB below each clip's peak
        names = _names(small, split)
        # Labels and speaker ids are those the file names carry.
        assert y.tolist() == [d for d, _, _ in names]
        speakers = load_array(small, f"{split}_speaker")
        assert [meta["speakers"][s] for s in speakers] == [s for _, s, _ in names]
        # Official split: recordings 0-4 are the test set, and only there.
        assert all((i < 5) == (split == "test") for _, _, i in names)
    assert np.bincount(load_array(small, "val_y")).tolist() == [1] * 10  # stratified by digit
    assert meta["input_shape"] == [101, 40]

    train = load_array(small, "train_x").reshape(-1, 40).astype(np.float64)
    assert np.allclose(meta["mean"], train.mean(0)) and np.allclose(meta["std"], train.std(0))
    test = load_array(small, "test_x").reshape(-1, 40)
    assert not np.allclose(meta["mean"], np.concatenate([train, test]).mean(0))


def test_preprocessing_is_byte_identical_and_verifies_the_raw_folder(small, data_config, tmp_path):
    data = data_config("fsdd", **SMALL)
    raw = small.parent / "raw"
    again = preprocess(data, raw, tmp_path / "again", seed=0)
    assert again == load_meta(small)
    for name in again["sha256"]:
        assert (tmp_path / "again" / name).read_bytes() == (small / name).read_bytes()
    other = preprocess(data, raw, tmp_path / "other", seed=1)
    assert other["sha256"]["train_y.npy"] != again["sha256"]["train_y.npy"]  # the seed matters
    assert other["sha256"]["test_x.npy"] == again["sha256"]["test_x.npy"]  # the official test set

    tampered = tmp_path / "raw"
    shutil.copytree(raw, tampered)
    wav = tampered / "recordings" / "7_theo_30.wav"
    wav.write_bytes(wav.read_bytes()[:-2])
    with pytest.raises(DataError, match="changed since it was collected: re-run the collect"):
        preprocess(data, tampered, tmp_path / "bad", seed=0)
    with pytest.raises(ValueError, match=r"test_speaker='bob' is not a speaker.*'theo'"):
        preprocess({**data, "test_speaker": "bob"}, raw, tmp_path / "bad", seed=0)
    with pytest.raises(ValueError, match="data.n_mels=0 must be a positive integer"):
        preprocess({**data, "n_mels": 0}, raw, tmp_path / "bad", seed=0)


def test_leave_one_speaker_out_split(dataset):
    processed = dataset("fsdd", limit=100, test_speaker="theo")
    meta = load_meta(processed)
    assert meta["test_speaker"] == "theo" and meta["sizes"]["test"] == 500
    theo = meta["speakers"].index("theo")
    assert set(load_array(processed, "test_speaker").tolist()) == {theo}
    for split in ("train", "val"):
        assert theo not in load_array(processed, f"{split}_speaker")
    assert {i for _, _, i in _names(processed, "train")} & set(range(5))  # all indices used


def test_adapter_features_equal_preprocessing(small):
    adapter = Adapter({}, serving_files(small))
    raw = small.parent / "raw" / "recordings"
    files, test_x = load_array(small, "test_file")[:3], load_array(small, "test_x")
    waves = [sf.read(raw / f)[0] for f in files]  # float64, each its own length
    assert len({len(w) for w in waves}) == 3
    # Same function, same bytes: a list of varying lengths, a DataFrame column, one by one.
    assert np.array_equal(adapter(waves).numpy(), test_x[:3])
    assert np.array_equal(adapter(pd.DataFrame({"waveform": waves})).numpy(), test_x[:3])
    options = load_meta(small)["features"]
    assert np.array_equal(log_mel(waves[1], options), test_x[1])
    padded = np.stack([np.pad(w, (0, 9000 - len(w))) for w in waves])  # 2-D (N, samples)
    assert adapter(padded).shape == (3, 101, 40)

    with pytest.raises(ValueError, match="scale 16-bit PCM by 1/32768"):
        adapter([sf.read(raw / files[0], dtype="int16")[0]])
    with pytest.raises(ValueError, match=r"wrap a single waveform as \[waveform\]"):
        adapter(waves[0])
    with pytest.raises(ValueError, match="waveform 1 contains NaN"):
        adapter([waves[0], np.full(100, np.nan)])
    with pytest.raises(ValueError, match=r"waveform 0 has shape \(0,\)"):
        adapter([[]])
    with pytest.raises(ValueError, match="expected a 'waveform' column"):
        adapter(pd.DataFrame({"audio": waves}))


@pytest.mark.parametrize("experiment", ["fsdd_cnn", "fsdd_lstm", "fsdd_transformer"])
def test_experiment_serves_waveforms(experiment, smoke_run):
    # All six stages at smoke size (100 training recordings), run once per session: see
    # tests/test_smoke.py.
    cfg, results, champion = smoke_run(experiment)
    assert results["preprocess"]["sizes"] == {"train": 90, "val": 10, "test": 300}
    assert 0 <= results["evaluate"]["test/acc"] <= 1
    assert results["register"]["model_name"] == "fsdd-classifier"

    model = mlflow.pyfunc.load_model(str(champion))
    raw = Path(cfg.paths.raw) / "recordings"
    waves = [sf.read(raw / name, dtype="float32")[0] for name in ("4_theo_0.wav", "9_lucas_2.wav")]
    out = model.predict(pd.DataFrame({"waveform": waves}))
    classes = list("0123456789")
    assert list(out.columns) == ["label", *classes] and len(out) == 2
    probs = out[classes].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6)
    assert out["label"].tolist() == [classes[i] for i in probs.argmax(1)]
    # The unwrapped model takes a plain list too, with the same answer.
    inner = model.unwrap_python_model().predict(None, waves)
    assert np.allclose(inner[classes].to_numpy(), probs, atol=1e-6)
    # The signature names the column it needs.
    with pytest.raises(MlflowException, match="waveform"):
        model.predict(pd.DataFrame({"audio": waves}))
