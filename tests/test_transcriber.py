"""Connected-digit transcription (data=fsdd_digits, task=transcriber) on real FSDD recordings:
utterances built from disjoint recordings, deterministically; the acoustic models' padding
invariance; CTC decoding against CTCLoss; the error alignment; and experiment fsdd_ctc through
all six stages, its registered model transcribing waveforms of any length. Speaker robustness:
speed perturbation of the train split only, SpecAugment masks on real frames in training only."""

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from mlflow.exceptions import MlflowException

from dlpipe.data import load_array, load_meta
from dlpipe.formats.digit_strings import PAD, Adapter, serving_files, utterance_features
from dlpipe.models import create_model
from dlpipe.models.acoustic import frame_logits, frame_mask, utterance_normalize
from dlpipe.modules.transcriber import Transcriber, spec_augment
from dlpipe.preprocess import preprocess
from dlpipe.serving.transcriber import beam_decode, collapse, greedy_decode
from dlpipe.tasks.transcriber_report import align, error_counts

SMALL = {"utterances": {"train": 30, "val": 12, "test": 12}, "speed_factors": [0.9, 1.0, 1.1]}
NAME = re.compile(r"(\d)_([a-z]+)_(\d+)\.wav")


@pytest.fixture(scope="module")
def small(dataset) -> Path:
    return dataset("fsdd_digits", **SMALL)


def _recordings(processed: Path, split: str) -> list[list[tuple[int, str, int]]]:
    return [
        [(int(d), s, int(i)) for d, s, i in (NAME.fullmatch(f).groups() for f in row.split())]
        for row in load_array(processed, f"{split}_file")
    ]


def test_utterances_are_built_from_disjoint_recordings(small):
    meta = load_meta(small)
    assert meta["sizes"] == SMALL["utterances"] and meta["input_shape"] == [None, 40]
    assert meta["recordings"] == {"train": 2430, "val": 270, "test": 300}
    used = {}
    for split, size in meta["sizes"].items():
        x, frames = load_array(small, f"{split}_x"), load_array(small, f"{split}_frames")
        y, speakers = load_array(small, f"{split}_y"), load_array(small, f"{split}_speaker")
        assert x.dtype == np.float32 and x.shape == (frames.sum(), 40) and len(frames) == size
        assert np.isfinite(x).all() and x.max() <= 0 and x.min() >= -80
        for row, recs, speaker in zip(y, _recordings(small, split), speakers, strict=True):
            digits = row[row != PAD].tolist()
            assert 1 <= len(digits) <= 7 and (row[len(digits) :] == PAD).all()
            # The labels are the digits the recordings say, all by the utterance's one speaker.
            assert digits == [d for d, _, _ in recs]
            assert {s for _, s, _ in recs} == {meta["speakers"][speaker]}
            # Official rule: recordings 0-4 are heard in the test split only.
            assert all((i < 5) == (split == "test") for _, _, i in recs)
            used.setdefault(split, set()).update(recs)
        assert len(set(speakers.tolist())) == 6  # speakers take turns
    assert not used["train"] & used["val"]
    # The served model computes the features of the example waveforms as preprocessing did.
    example = load_array(small, "example_wave")
    first = example[: load_array(small, "example_samples")[0]]
    assert np.array_equal(
        utterance_features(first, meta["features"]),
        load_array(small, "test_x")[: len(utterance_features(first, meta["features"]))],
    )


def test_construction_is_deterministic_and_checked(small, data_config, tmp_path):
    data = data_config("fsdd_digits", **SMALL)
    raw = small.parent / "raw"
    again = preprocess(data, raw, tmp_path / "again", seed=0)
    assert again == load_meta(small)
    for name in again["sha256"]:
        assert (tmp_path / "again" / name).read_bytes() == (small / name).read_bytes()
    other = preprocess(data, raw, tmp_path / "other", seed=1)
    assert other["sha256"]["train_y.npy"] != again["sha256"]["train_y.npy"]

    for bad, message in [
        ({"utterances": {"train": 10}}, "data.utterances=.* must give a count per split"),
        ({"max_digits": 0}, "1 <= min_digits <= max_digits"),
        ({"gap_s": [0.3, 0.1]}, r"data.gap_s=\[0.3, 0.1\] must be seconds \[low, high\]"),
        ({"test_speaker": "bob"}, r"test_speaker='bob' is not a speaker.*'theo'"),
        ({"speed_factors": [0.0]}, r"data.speed_factors=\[0.0\] must be a list of speed"),
    ]:
        with pytest.raises(ValueError, match=message):
            preprocess({**data, **bad}, raw, tmp_path / "bad", seed=0)


def test_leave_one_speaker_out(dataset):
    processed = dataset("fsdd_digits", **SMALL, test_speaker="theo")
    meta = load_meta(processed)
    theo = meta["speakers"].index("theo")
    assert set(load_array(processed, "test_speaker").tolist()) == {theo}
    assert meta["recordings"]["test"] == 500
    for split in ("train", "val"):
        assert theo not in load_array(processed, f"{split}_speaker")
        assert {i for recs in _recordings(processed, split) for _, _, i in recs} & set(range(5))


def test_speed_perturbation_changes_train_lengths_only(small, data_config, tmp_path):
    data = data_config("fsdd_digits", **SMALL)
    plain = tmp_path / "plain"
    preprocess({**data, "speed_factors": None}, small.parent / "raw", plain, seed=0)
    # Validation and test (and the served example) are byte-identical to an unperturbed build,
    # and so are the training strings: only the training waveforms change.
    for name in (
        *(f"{split}_{a}" for split in ("val", "test") for a in ("x", "frames", "y", "file")),
        "example_wave",
        "train_y",
        "train_file",
        "train_speaker",
    ):
        assert (plain / f"{name}.npy").read_bytes() == (small / f"{name}.npy").read_bytes(), name
    assert not (plain / "train_speed.npy").exists()
    speeds = load_array(small, "train_speed").astype(np.float64)
    assert set(np.round(speeds, 3).tolist()) == {0.9, 1.0, 1.1}
    before, after = load_array(plain, "train_frames"), load_array(small, "train_frames")
    # 1 + samples // 80 frames; played f times as fast, samples / f: the length scales by 1 / f.
    assert np.abs((after - 1) * speeds - (before - 1)).max() < 1.2
    assert (after[speeds < 1] > before[speeds < 1]).all()
    assert (after[speeds > 1] < before[speeds > 1]).all()
    same = np.isclose(speeds, 1.0)
    assert (after[same] == before[same]).all()
    x_before = np.split(load_array(plain, "train_x"), np.cumsum(before)[:-1])
    x_after = np.split(load_array(small, "train_x"), np.cumsum(after)[:-1])
    assert all(np.array_equal(x_before[i], x_after[i]) for i in np.flatnonzero(same))


def test_spec_augment_masks_real_frames_only():
    torch.manual_seed(0)
    lengths = torch.tensor([50, 30, 7, 1])
    x = torch.randn(4, 50, 12) * frame_mask(lengths, 50)[..., None]
    fill = torch.arange(12.0) + 100  # values x never takes
    for _ in range(200):
        out = spec_augment(x, lengths, fill, freq_masks=2, freq_width=4, time_masks=2, time_width=5)
        changed = out != x
        assert (out[changed] == fill.expand_as(x)[changed]).all()  # masked cells hold the fill
        for i, n in enumerate(lengths.tolist()):
            assert (out[i, n:] == 0).all()  # padded frames untouched
            bands = changed[i, :n].all(0)  # (F,) channels masked on every real frame
            frames = changed[i, :n].all(1)  # (n,) frames masked on every channel
            # Every masked cell belongs to a masked band or a masked span, no more of either.
            assert (changed[i, :n] == (bands[None, :] | frames[:, None])).all()
            assert frames.sum() <= 2 * 5 and (frames.all() or bands.sum() <= 2 * 4)
    # One mask each: widths are uniform in 0..widest, both ends included.
    widths = set()
    for _ in range(200):
        out = spec_augment(x, lengths, fill, freq_masks=1, freq_width=4, time_masks=1, time_width=5)
        changed = out[0] != x[0]
        widths.add((int(changed.all(0).sum()), int(changed.all(1).sum())))
    assert {f for f, _ in widths} == set(range(5)) and {t for _, t in widths} == set(range(6))
    off = spec_augment(x, lengths, fill, freq_masks=0, freq_width=4, time_masks=0, time_width=5)
    assert torch.equal(off, x)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\(\)`")
def test_spec_augment_applies_to_training_steps_only():
    torch.manual_seed(0)
    augment = {"freq_masks": 2, "freq_width": 6, "time_masks": 2, "time_width": 5}
    net = {
        "input_shape": [None, 12],
        "num_classes": 11,
        "mean": [-40.0] * 12,
        "std": [10.0] * 12,
        "input_kind": "features",
        "per_step": True,
    }
    model = {"name": "crnn", "channels": 4, "conv_layers": 1, "time_stride": 2, "cell": "gru"}
    model |= {"hidden_size": 8, "num_layers": 1, "dropout": 0.0}
    module = Transcriber(model, net, {"name": "adamw", "lr": 1e-3}, augment)
    seen = []
    module.net[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    lengths = torch.tensor([40, 25])
    x = (-40 + 10 * torch.randn(2, 40, 12)) * frame_mask(lengths, 40)[..., None]
    batch = (x, lengths, torch.tensor([[3, 1, PAD], [7, PAD, PAD]]))
    module.training_step(batch, 0)
    with torch.no_grad():  # as Lightning validates
        module.validation_step(batch, 0)
    trained, validated = seen
    assert torch.equal(validated, x)  # validation sees the batch as it is
    changed = trained != x
    assert changed.any() and (trained[changed] == -40).all()  # masked to the training mean
    assert not changed[1, 25:].any()
    with pytest.raises(ValueError, match="task.spec_augment.time_width=-1 must be an integer"):
        Transcriber(model, net, {"name": "adamw", "lr": 1e-3}, {**augment, "time_width": -1})


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("crnn", {"cell": "lstm", "hidden_size": 8, "num_layers": 2}),
        ("crnn", {"cell": "gru", "hidden_size": 8, "num_layers": 1, "utterance_norm": "mean"}),
        ("conv_transformer", {"d_model": 8, "nhead": 2, "num_layers": 1, "dim_feedforward": 16}),
        (
            "conv_transformer",
            {
                "d_model": 8,
                "nhead": 2,
                "num_layers": 1,
                "dim_feedforward": 16,
                "utterance_norm": "mean_var",
            },
        ),
    ],
)
def test_acoustic_models_ignore_padding(name, sizes):
    torch.manual_seed(0)
    kwargs = {
        "input_shape": [None, 12],
        "num_classes": 11,
        "mean": [0.0] * 12,
        "std": [1.0] * 12,
        "input_kind": "features",
        "channels": 4,
        "conv_layers": 2,
        "time_stride": 4,
        "dropout": 0.0,
        **sizes,
    }
    net = create_model(name, per_step=True, **kwargs).eval()
    x = torch.randn(3, 37, 12)
    lengths = torch.tensor([37, 21, 9])
    with torch.no_grad():
        logits, out_lengths = frame_logits(net, x, lengths)
        assert logits.shape == (3, 10, 11) and out_lengths.tolist() == [10, 6, 3]  # ceil(T / 4)
        for i, n in enumerate(lengths.tolist()):
            # Alone, unpadded, and padded with noise: the same outputs on the real frames.
            alone, _ = frame_logits(net, x[i : i + 1, :n], lengths[i : i + 1])
            assert torch.allclose(logits[i, : out_lengths[i]], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match="use it with task=transcriber"):
        create_model(name, per_step=False, **kwargs)
    with pytest.raises(ValueError, match="time_stride=3 must be a power of two"):
        create_model(name, per_step=True, **{**kwargs, "time_stride": 3})


def test_utterance_normalization_uses_real_frames_only():
    x = torch.randn(2, 10, 4) * 3 + 5
    lengths = torch.tensor([10, 6])
    for kind in ("mean", "mean_var"):
        y = utterance_normalize(x, lengths, kind)
        real = y[1, :6]
        assert torch.allclose(real.mean(0), torch.zeros(4), atol=1e-5)
        assert y[1, 6:].abs().max() == 0  # padding stays zero
        # the same utterance without padding normalizes to the same frames
        assert torch.allclose(utterance_normalize(x[1:, :6], lengths[1:], kind)[0], real, atol=1e-6)
    y = utterance_normalize(x, lengths, "mean_var")
    assert torch.allclose(y[1, :6].std(0, unbiased=False), torch.ones(4), atol=1e-4)
    assert utterance_normalize(x, lengths, "none") is x
    with pytest.raises(ValueError, match="model.utterance_norm='cmvn': choose one of"):
        utterance_normalize(x, lengths, "cmvn")


def test_decoders_agree_with_ctc():
    assert collapse([0, 3, 3, 0, 3, 5, 5, 0]) == [2, 2, 4]  # output k is label k - 1
    # Peaked emissions of the frame path 4 4 _ 4 _ 1 -> labels [3, 3, 0]
    path = [0, 4, 4, 0, 4, 0, 1, 0]
    logits = torch.full((1, len(path), 11), -4.0)
    logits[0, torch.arange(len(path)), path] = 4.0
    log_probs = logits.log_softmax(-1)
    lengths = torch.tensor([len(path)])
    ((greedy, p_path),) = greedy_decode(log_probs, lengths)
    ((beam, p_beam),) = beam_decode(log_probs, lengths, beam_size=8)
    assert greedy == beam == [3, 3, 0]
    # The beam sums the string's alignments: at least the best path's probability, and close
    # to P(string | x) = exp(-CTC loss).
    ctc = torch.nn.functional.ctc_loss(
        log_probs.transpose(0, 1),
        torch.tensor([[4, 4, 1]]),
        lengths,
        torch.tensor([3]),
        reduction="sum",
    )
    assert p_path <= p_beam + 1e-6 and p_beam == pytest.approx(float(torch.exp(-ctc)), rel=0.05)


def test_alignment_counts_substitutions_deletions_insertions():
    assert align([1, 2, 3], [1, 4, 3]) == [(1, 1), (2, 4), (3, 3)]
    assert align([1, 2, 3], [1, 3]) == [(1, 1), (2, None), (3, 3)]
    assert align([5], [5, 5]) in ([(5, 5), (None, 5)], [(None, 5), (5, 5)])
    counts = error_counts([[1, 2, 3, 6], [7]], [[1, 4, 3], [7, 8]], k=10)
    assert counts[1, 1] == counts[3, 3] == counts[7, 7] == 1 and counts[2, 4] == 1
    assert counts[6, 10] == 1 and counts[10, 8] == 1  # a deletion, an insertion
    assert counts.sum() == 6


def test_fsdd_ctc_runs_all_stages_and_serves_waveforms(smoke_run):
    cfg, results, champion = smoke_run("fsdd_ctc")
    assert results["preprocess"]["sizes"] == {"train": 48, "val": 12, "test": 12}
    metrics = results["evaluate"]
    assert {"test/wer", "test/seq_acc", "test/wer_greedy", "test/wer_len1"} <= set(metrics)
    assert 0 <= metrics["test/seq_acc"] <= 1 and metrics["test/wer"] >= 0
    assert results["register"]["model_name"] == "fsdd-transcriber"
    files = Path(cfg.paths.reports) / "evaluate" / "files"
    by_speaker = json.loads((files / "by_speaker.json").read_text())
    assert sum(v["utterances"] for v in by_speaker.values()) == 12
    for name in ("by_length.json", "substitutions.csv", "substitutions.png", "errors.csv"):
        assert (files / name).is_file()

    model = mlflow.pyfunc.load_model(str(champion))
    raw = Path(cfg.paths.raw) / "recordings"
    said = "4071936"
    seven = np.concatenate(
        [sf.read(raw / f"{d}_theo_{i}.wav", dtype="float32")[0] for i, d in enumerate(said)]
    )
    one = sf.read(raw / "9_lucas_2.wav", dtype="float32")[0]
    out = model.predict(pd.DataFrame({"waveform": [seven, one]}))
    assert list(out.columns) == ["transcript", "confidence"] and len(out) == 2
    assert all(re.fullmatch(r"\d{0,80}", t) for t in out["transcript"])
    assert ((out["confidence"] >= 0) & (out["confidence"] <= 1)).all()
    # Batched or one by one, the same answer; the unwrapped model takes a plain list.
    alone = model.unwrap_python_model().predict(None, [one])
    assert alone["transcript"][0] == out["transcript"][1]
    with pytest.raises(MlflowException, match="waveform"):
        model.predict(pd.DataFrame({"audio": [one]}))
    # The adapter pads a batch of different lengths with their own frame counts.
    x, lengths = Adapter({}, serving_files(Path(cfg.paths.processed)))([seven, one])
    assert lengths.tolist() == [1 + len(seven) // 80, 1 + len(one) // 80]
