"""Text classification on real SST-2 and SMS Spam slices and a user's own CSV: deterministic
word-level tokenization fitted on the training split only, padding that never changes a
classification, length-bucketed batches, and each experiment through all six stages."""

import csv
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from tokenizers import Tokenizer

from dlpipe.collect import collect
from dlpipe.data import DataError, load_array, load_meta, load_split
from dlpipe.datamodule import (
    LengthBuckets,
    TensorDataModule,
    TokenDataModule,
    TrimmedBatches,
    make_datamodule,
)
from dlpipe.formats.text import PAD_ID, UNK_ID, Adapter, encode, serving_files
from dlpipe.models import create_model
from dlpipe.preprocess import preprocess
from dlpipe.tasks import net_args

SST2_LIMIT = 2000
# The padding test's networks, built without Hydra: two layers and both directions, where a pad
# could leak (smoke size has one layer).
TINY = {
    "lstm": {"name": "lstm", "embed_dim": 16, "hidden_size": 16, "num_layers": 2,
             "bidirectional": True, "dropout": 0.0},
    "gru": {"name": "gru", "embed_dim": 16, "hidden_size": 16, "num_layers": 1,
            "bidirectional": False, "dropout": 0.0},
    "transformer": {"name": "transformer", "d_model": 16, "nhead": 2, "num_layers": 2,
                    "dim_feedforward": 32, "dropout": 0.0, "pooling": "mean"},
    "fasttext": {"name": "fasttext", "embed_dim": 16, "hidden_size": 16, "word_ngrams": 2,
                 "char_ngram_min": 3, "char_ngram_max": 5, "buckets": 1000, "dropout": 0.0},
}  # fmt: skip


@pytest.fixture(scope="module")
def sst2(dataset) -> Path:
    """Processed SST-2: 2000 training rows (1900 train / 100 val) and the 872-row GLUE dev split
    as test."""
    return dataset("sst2", limit=SST2_LIMIT)


def _files(processed: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(processed.iterdir())}


def test_sst2_splits_and_meta(sst2: Path):
    meta = load_meta(sst2)
    assert meta["classes"] == ["negative", "positive"]
    assert meta["sizes"] == {"train": 1900, "val": 100, "test": 872}  # GLUE dev is the test
    assert (meta["input_kind"], meta["input_shape"], meta["pad_id"]) == ("tokens", [64], 0)
    x, y = load_split(sst2, "test")
    assert x.dtype == np.int32 and x.shape == (872, 64) and y.dtype == np.int64
    assert 420 < y.sum() < 450  # dev: 444 positive
    lengths = load_array(sst2, "test_lengths")
    assert (lengths == (x != PAD_ID).sum(1)).all() and lengths.min() >= 1
    cols = np.arange(64)
    assert (x[cols >= lengths[:, None]] == PAD_ID).all()  # right-padded
    assert (x[cols < lengths[:, None]] != PAD_ID).all()
    assert x.max() < meta["vocab_size"]
    # The token strings by id, for models that look inside words (fasttext's char n-grams).
    tokenizer = Tokenizer.from_file(serving_files(sst2)["tokenizer"])
    assert len(meta["vocab"]) == meta["vocab_size"] and meta["vocab"][:2] == ["[PAD]", "[UNK]"]
    assert [tokenizer.token_to_id(w) for w in meta["vocab"]] == list(range(meta["vocab_size"]))


def test_preprocess_twice_is_byte_identical(sst2: Path, tmp_path: Path, data_config):
    again = tmp_path / "processed"
    preprocess(data_config("sst2", limit=SST2_LIMIT), sst2.parent / "raw", again, seed=0)
    assert _files(again) == _files(sst2)  # arrays, tokenizer.json and meta.json


def test_tokenizer_knows_training_words_only(sst2: Path):
    """Words of the GLUE dev split (our test) that no row of train.tsv has are unknown, and so
    are frequent dev words outside the 1900-row training slice."""
    tokenizer = Tokenizer.from_file(serving_files(sst2)["tokenizer"])
    raw = sst2.parent / "raw"

    def words(name: str) -> set[str]:
        table = pd.read_csv(raw / name, sep="\t", quoting=csv.QUOTE_NONE, dtype=str)
        split = tokenizer.pre_tokenizer.pre_tokenize_str  # as the tokenizer splits words
        spaced = set(" ".join(table["sentence"]).lower().split())
        return {w for token in spaced for w, _ in split(token)}

    test_only = sorted(words("dev.tsv") - words("train.tsv"))
    assert len(test_only) > 10
    assert all(tokenizer.token_to_id(w) is None for w in test_only)
    assert (encode(tokenizer, test_only)[:, 0] == UNK_ID).all()
    # The 1900-row slice knows far fewer words than the whole file: it was fitted on the slice.
    assert tokenizer.get_vocab_size() < len(words("train.tsv")) / 2


def test_own_csv_quoting_classes_and_train_only_vocabulary(tmp_path: Path, data_config):
    """Each row has its own word `w<i>`: only training rows' words may enter the vocabulary."""
    path = tmp_path / "reviews.csv"
    rows = [(f"w{i} a fine, quoted day" if i % 2 else f"w{i} rain", "sun" if i % 2 else "rain")
            for i in range(60)]  # fmt: skip
    rows.append(("", "rain"))  # an empty text still gets one token
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    data = data_config("text_csv", path=str(path), test_fraction=0.2, val_fraction=0.25)
    collect(data, tmp_path / "raw")
    meta = preprocess(data, tmp_path / "raw", tmp_path / "processed", seed=3)
    assert meta["classes"] == ["rain", "sun"]
    assert meta["sizes"] == {"train": 37, "val": 12, "test": 12}
    tokenizer = Tokenizer.from_file(str(tmp_path / "processed" / "tokenizer.json"))
    assert tokenizer.token_to_id(",") is not None  # the quoted comma is text, not a separator
    for split in ("train", "val", "test"):
        x, y = load_split(tmp_path / "processed", split)
        first = x[:, 0]
        if split == "train":
            assert (first != UNK_ID).sum() >= len(x) - 1  # all but maybe the empty text
        else:
            assert (first == UNK_ID).all(), f"{split} words must not be in the vocabulary"
        known = {tokenizer.id_to_token(int(i)) for i in x[:, 1:].ravel()} - {"[PAD]"}
        assert known <= {"a", "fine", ",", "quoted", "day", "rain", "[UNK]"}


def test_own_csv_label_missing_from_training_is_an_error(tmp_path: Path, data_config):
    # 5 + 5 + 1 rows, test 5: the single "c" row gets the largest-remainder seat in test.
    path = tmp_path / "own.csv"
    rows = [("good", "a")] * 5 + [("bad", "b")] * 5 + [("odd", "c")]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    data = data_config("text_csv", path=str(path), test_fraction=0.45, val_fraction=0.35)
    collect(data, tmp_path / "raw")
    with pytest.raises(DataError, match=r"test split has labels \['c'\].*training split"):
        preprocess(data, tmp_path / "raw", tmp_path / "processed", seed=0)


def test_own_csv_wrong_column_names_the_columns(tmp_path: Path, data_config):
    path = tmp_path / "own.csv"
    pd.DataFrame({"review": ["x", "y"] * 10, "label": ["a", "b"] * 10}).to_csv(path, index=False)
    data = data_config("text_csv", path=str(path))
    collect(data, tmp_path / "raw")
    with pytest.raises(DataError, match=r"text_column='text'.*\['review', 'label'\]"):
        preprocess(data, tmp_path / "raw", tmp_path / "processed", seed=0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_padding_never_changes_a_classification(sst2: Path, name: str):
    meta = load_meta(sst2)
    torch.manual_seed(0)
    net = create_model(**TINY[name], **net_args(meta)).eval()
    x, y = (torch.from_numpy(a[:48]) for a in load_split(sst2, "val"))
    lengths = torch.from_numpy(load_array(sst2, "val_lengths")[:48]).long()
    with torch.inference_mode():
        full = net(x)  # padded to max_len
        trimmed = net(x[:, : int(lengths.max())])
        torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-4)
        data = TrimmedBatches(x, y)
        for indices, width in LengthBuckets(lengths, 16, seed=0, pool_batches=2):
            batch, _ = data[indices, width]
            alone = torch.cat([net(batch[i : i + 1, : lengths[j]]) for i, j in enumerate(indices)])
            torch.testing.assert_close(net(batch), alone, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(net(batch), full[indices], atol=1e-5, rtol=1e-4)


def test_length_buckets_cover_every_index_once_in_trimmed_batches():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (1000,), generator=generator)
    x = torch.zeros(1000, 40, dtype=torch.int32)
    x[torch.arange(40) < lengths[:, None]] = 7
    data = TrimmedBatches(x, torch.arange(1000))
    sampler = LengthBuckets(lengths, 32, seed=1, pool_batches=8)
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(sampler) == 32  # ceil(1000 / 32)
        seen = torch.cat([indices for indices, _ in batches])
        assert torch.equal(seen.sort().values, torch.arange(1000))
        for indices, width in batches:
            xb, yb = data[indices, width]
            assert width == int(lengths[indices].max()) and xb.shape == (len(indices), width)
            assert torch.equal(yb, indices)
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])  # a fresh order each epoch
    spread = np.mean([float(lengths[i].max() - lengths[i].min()) for i, _ in epochs[0]])
    random = np.mean([float(b.max() - b.min()) for b in lengths.split(32)])
    assert spread < random / 3, "batches should hold texts of similar length"
    # Unshuffled (validation): sorted by length, the same every time.
    ordered = LengthBuckets(lengths, 100, seed=None, pool_batches=8)
    assert [w for _, w in ordered] == [w for _, w in ordered]
    assert torch.equal(torch.cat([i for i, _ in ordered]), lengths.sort(stable=True).indices)


def test_length_buckets_under_ddp_deal_disjoint_shares():
    """Lightning wraps a custom sampler in DistributedSamplerWrapper on each rank: both ranks
    build the same batch list (same seed) and take alternate batches of it."""
    lengths = torch.randint(1, 30, (500,), generator=torch.Generator().manual_seed(0))
    ranks = [
        DistributedSamplerWrapper(
            LengthBuckets(lengths, 16, seed=5, pool_batches=4), num_replicas=2, rank=r, seed=5
        )
        for r in range(2)
    ]
    shares = [list(r) for r in ranks]
    assert len(shares[0]) == len(shares[1]) == 16  # 32 batches, dealt alternately
    seen = torch.cat([i for share in shares for i, _ in share])
    assert torch.equal(seen.sort().values, torch.arange(500))


def test_make_datamodule_buckets_padded_tokens_only(sst2: Path, make_cfg):
    cfg = make_cfg("experiment=sst2_lstm", processed=sst2)
    data = make_datamodule(cfg, load_meta(sst2))
    assert isinstance(data, TokenDataModule)
    data.setup("fit")
    widths = [x.shape[1] for x, _ in data.train_dataloader()]
    assert len(widths) == -(-1900 // cfg.train.batch_size) and max(widths) < 64
    plain = make_cfg()
    assert type(make_datamodule(plain, load_meta(plain.paths.processed))) is TensorDataModule


def test_adapter_takes_lists_frames_and_series(sst2: Path):
    adapter = Adapter({}, serving_files(sst2))
    texts = ["a gripping , funny film", "dull", "   "]
    x = adapter(texts)
    assert x.dtype == torch.int32 and x.shape == (3, 5) and x[2, 0] == UNK_ID
    assert torch.equal(adapter(pd.DataFrame({"text": texts})), x)
    assert torch.equal(adapter(pd.Series(texts)), x)
    assert torch.equal(adapter(pd.DataFrame({0: texts})), x)  # MLflow's frame of a plain list
    assert adapter(["word " * 200]).shape == (1, 64)  # cut at max_len
    for bad in ("just one string", [1, 2], [], pd.DataFrame({"a": texts, "b": texts})):
        with pytest.raises(ValueError, match="list of strings|text"):
            adapter(bad)


@pytest.mark.parametrize(
    "experiment", ["sms_gru", "sst2_lstm", "sst2_transformer", "sst2_fasttext"]
)
def test_experiment_serves_strings(experiment: str, smoke_run):
    # All six stages at smoke size, run once per session: see tests/test_smoke.py (which also
    # checks the gate's decision: a smoke-size model is @champion only above chance).
    cfg, results, champion = smoke_run(experiment)
    metrics = results["evaluate"]
    assert {"test/acc", "test/f1_macro", "test/roc_auc_ovr_macro"} <= set(metrics)
    # The TF-IDF baseline, fitted on the same train split, reads the texts better than chance.
    assert metrics["baseline/acc"] > metrics["chance/acc"]
    model = mlflow.pyfunc.load_model(str(champion))
    classes = load_meta(cfg.paths.processed)["classes"]
    texts = ["a gripping , funny film", "free entry ! text win to 80086 now", "dull"]
    out = model.predict(texts)
    assert list(out.columns) == ["label", *classes] and len(out) == 3
    assert set(out["label"]) <= set(classes)
    np.testing.assert_allclose(out[classes].sum(1), 1.0, rtol=1e-5)
    pd.testing.assert_frame_equal(model.predict(pd.DataFrame({"text": texts})), out)


@pytest.mark.slow
def test_ddp_cpu_trains_on_length_buckets(sst2: Path, tmp_path: Path):
    """Two gloo processes: Lightning wraps LengthBuckets in DistributedSamplerWrapper."""
    repo = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        str(repo / "pipelines" / "train.py"),
        "experiment=sst2_lstm",
        "trainer=ddp_cpu",
        "smoke=true",
        "train.use_tuned=false",
        f"paths.processed={sst2}",
        f"paths.train={tmp_path}/train",
        f"paths.reports={tmp_path}/reports",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"hydra.run.dir={tmp_path}/hydra",
    ]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    assert (tmp_path / "train" / "checkpoints" / "best.ckpt").exists()
