"""Character-level language modeling on the real Tiny Shakespeare text: causal models, the
positional split, batches of windows, generation, and each experiment through all six stages
down to the registered model generating text."""

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf

from dlpipe.data import load_array, load_meta
from dlpipe.models import create_model, load_checkpoint
from dlpipe.modules.language_model import TokenStreamDataModule, spread_offsets
from dlpipe.preprocess import preprocess
from dlpipe.serving.language_model import complete, encode_prompt, generate
from dlpipe.tasks.language_model import stream_loss

# The unit tests' networks, built without Hydra: two layers, so causality is checked through a
# stack (smoke size has one).
TINY = {
    "gpt": {"name": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0, "bias": False},
    "lstm": {
        "name": "lstm",
        "embed_dim": 8,
        "hidden_size": 16,
        "num_layers": 2,
        "bidirectional": False,
        "dropout": 0.0,
    },
}


def tiny_net(kind: str, vocab: int = 65, block: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model(
        **TINY[kind],
        input_shape=[block],
        input_kind="tokens",
        vocab_size=vocab,
        num_classes=vocab,
        per_step=True,
    )
    return net.eval()


def decode(ids: np.ndarray, chars: str) -> str:
    return "".join(np.asarray(list(chars))[ids])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny and generation runs them one step at a time: with two OpenMP
    threads each op waits on a sync, which on a busy 2-core machine made these tests 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shakespeare(dataset) -> Path:
    """The whole text, preprocessed (block_size 256, val and test 5 % each)."""
    return dataset("tinyshakespeare")


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_a_future_token_never_changes_earlier_logits(kind):
    net = tiny_net(kind)
    x = torch.randint(0, 65, (3, 16), generator=torch.Generator().manual_seed(0))
    for t in (0, 7, 15):
        changed = x.clone()
        changed[:, t] = (x[:, t] + 1) % 65
        with torch.no_grad():
            before, after = net(x), net(changed)
        assert before.shape == (3, 16, 65)
        assert torch.equal(before[:, :t], after[:, :t])
        assert not torch.allclose(before[:, t], after[:, t])  # position t does see token t


def test_lstm_language_model_refuses_bidirectional():
    with pytest.raises(ValueError, match="bidirectional=false"):
        create_model(
            **(TINY["lstm"] | {"bidirectional": True}),
            input_shape=[16],
            input_kind="tokens",
            vocab_size=65,
            num_classes=65,
            per_step=True,
        )


def test_split_is_nanogpt_train_head_then_val_then_test_tail(shakespeare):
    meta = load_meta(shakespeare)
    text = (shakespeare.parent / "raw" / "input.txt").read_text()
    n = len(text)
    assert (n, meta["vocab_size"], meta["chars"]) == (1115394, 65, "".join(sorted(set(text))))
    # Documented: train = first n - 2 * round(0.05 n) = nanoGPT's int(0.9 n); val, test = 5 % each.
    train_end, val_end = int(n * 0.9), n - round(0.05 * n)
    assert meta["bounds"] == {
        "train": [0, train_end],
        "val": [train_end, val_end],
        "test": [val_end, n],
    }
    assert meta["sizes"] == {"train": 1003854, "val": 55770, "test": 55770}
    streams = {s: load_array(shakespeare, f"{s}_x") for s in ("train", "val", "test")}
    assert all(a.dtype == np.uint8 and a.ndim == 1 for a in streams.values())
    decoded = {s: decode(a, meta["chars"]) for s, a in streams.items()}
    assert decoded["train"] == text[:train_end]
    assert decoded["val"] == text[train_end:val_end]
    assert decoded["test"] == text[val_end:]
    assert "".join(decoded.values()) == text  # no overlap, no gap
    assert meta["unseen_dropped"] == {"train": 0, "val": 0, "test": 0}
    assert meta["input_shape"] == [256] and meta["input_kind"] == "tokens"


def test_preprocessing_is_byte_identical(shakespeare, data_config, tmp_path):
    raw = shakespeare.parent / "raw"
    again = preprocess(data_config("tinyshakespeare"), raw, tmp_path / "again", seed=0)
    assert again == load_meta(shakespeare)
    for name in again["sha256"]:
        assert (tmp_path / "again" / name).read_bytes() == (shakespeare / name).read_bytes()


def test_characters_unseen_in_training_are_dropped_and_counted(dataset):
    processed = dataset("tinyshakespeare", limit=6000, block_size=32)
    meta = load_meta(processed)
    text = (processed.parent / "raw" / "input.txt").read_text()[:6000]
    chars = set(meta["chars"])
    assert chars == set(text[: meta["bounds"]["train"][1]])
    for split in ("val", "test"):
        start, end = meta["bounds"][split]
        expected = "".join(c for c in text[start:end] if c in chars)
        assert decode(load_array(processed, f"{split}_x"), meta["chars"]) == expected
        assert meta["unseen_dropped"][split] == end - start - len(expected)
    # In the first 6000 characters, "P" first occurs in val and "q" in test.
    assert meta["unseen_dropped"] == {"train": 0, "val": 1, "test": 1}
    with pytest.raises(ValueError, match="never saw in training: \\['Z'\\]"):
        encode_prompt("ZOUNDS", "".join(sorted(chars - {"Z"})))


def test_batches_are_windows_shifted_by_one(shakespeare):
    data = TokenStreamDataModule(
        shakespeare, block_size=64, batch_size=8, steps_per_epoch=3, eval_batches=2, seed=0
    )
    data.setup()
    batches = list(data.train_dataloader())
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == y.shape == (8, 64) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
    # A batch is one gather of windows: row i is stream[offset_i : offset_i + 65], split x | y.
    windows = data.windows["train"]
    stream = torch.from_numpy(load_array(shakespeare, "train_x")).long()
    offsets = torch.tensor([0, 12345, windows.max_offset])
    x, y = windows[offsets]
    for row, o in enumerate(offsets.tolist()):
        assert torch.equal(x[row], stream[o : o + 64]) and torch.equal(
            y[row], stream[o + 1 : o + 65]
        )
    assert windows.max_offset + 65 == len(stream)  # the last window ends at the stream's end
    assert not torch.equal(batches[0][0], batches[1][0])  # fresh random windows every step
    # Validation: the same evenly spread windows every time, the last ending at the stream's end.
    val = [b[0] for b in data.val_dataloader()]
    assert [v.shape for v in val] == [(8, 64)] * 2
    assert all(
        torch.equal(a, b) for a, b in zip(val, [b[0] for b in data.val_dataloader()], strict=True)
    )
    offsets = spread_offsets(data.windows["val"], 16)
    assert offsets[0] == 0 and offsets[-1] == len(load_array(shakespeare, "val_x")) - 65


def test_stream_loss_scores_every_character_after_the_first_once():
    net = tiny_net("gpt", block=16)
    stream = np.random.default_rng(0).integers(0, 65, 100).astype(np.uint8)
    loss, accuracy, count = stream_loss(net, stream, block_size=16, batch_size=4)
    assert count == 99 and 0 <= accuracy <= 1
    ids = torch.from_numpy(stream.astype(np.int64))
    with torch.no_grad():
        direct = [
            torch.nn.functional.cross_entropy(
                net(ids[s : s + 17][None, :-1])[0], ids[s + 1 : s + 17], reduction="sum"
            )
            for s in range(0, 99, 16)
        ]
    assert loss == pytest.approx(float(sum(direct)) / 99, rel=1e-5)


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_generation_length_seed_greedy_and_context_crop(kind):
    net, chars = tiny_net(kind, block=16), "".join(chr(c) for c in range(32, 97))
    prompts = ["TO BE", "OR NOT", "TO BE, THAT IS THE QUESTION"]  # the last one exceeds the context
    settings = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 0}
    out = complete(net, prompts, chars, 16, seed=3, **settings)
    assert [len(t) for t in out] == [12, 12, 12] and all(set(t) <= set(chars) for t in out)
    assert complete(net, prompts, chars, 16, seed=3, **settings) == out
    assert complete(net, prompts, chars, 16, seed=4, **settings) != out

    idx = torch.tensor([encode_prompt(prompts[2], chars)])
    greedy = idx
    with torch.no_grad():
        for _ in range(12):
            next_id = net(greedy[:, -16:])[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, next_id], 1)
    sampled = generate(net, idx, 12, 16, temperature=1.5, top_k=1)
    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize("experiment", ["shakespeare_gpt", "shakespeare_lstm"])
def test_experiment_reports_then_the_registered_model_writes(experiment, smoke_run, tmp_path):
    # All six stages at smoke size, run once per session: see tests/test_smoke.py.
    cfg, results, champion = smoke_run(experiment)
    assert cfg.register.model_name == "tinyshakespeare-language_model"
    test = results["evaluate"]
    # The gate promotes only a model better than chance (uniform over the characters): the GPT
    # gets there in its smoke-size steps; the 3-layer LSTM may not, and then stays challenger.
    beats_chance = test["test/loss"] < test["chance/loss"]
    expected = "promoted to champion" if beats_chance else "not promoted: no better than chance"
    assert results["register"]["decision"].startswith(expected)
    twins = {f"{p}/{k}" for p in ("test", "baseline", "chance") for k in ("loss", "bpc", "ppl")}
    assert set(test) == twins | {"test/acc"}
    # chance: uniform over the characters the (smoke-size) training text holds
    assert test["chance/loss"] == pytest.approx(
        math.log(load_meta(cfg.paths.processed)["vocab_size"])
    )
    if experiment == "shakespeare_gpt":
        assert beats_chance  # better than uniform after a few steps
    assert test["baseline/bpc"] < test["chance/bpc"]  # a character n-gram model learns too
    assert test["test/bpc"] == pytest.approx(test["test/loss"] / math.log(2))
    assert test["test/ppl"] == pytest.approx(math.exp(test["test/loss"]))
    samples = (Path(cfg.paths.reports) / "evaluate" / "files" / "samples.txt").read_text()
    assert samples.count("=== temperature") == 3 * 3
    assert "=== temperature 0.5, prompt 'ROMEO:' ===\nROMEO:" in samples

    run_id = results["train"]["run_id"]
    client = MlflowClient(cfg.mlflow.tracking_uri)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["val/bpc"] == pytest.approx(metrics["val/loss"] / math.log(2), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert "train/loss" in metrics
    sample_files = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert sample_files == ["samples/epoch_000.txt"]
    text = Path(client.download_artifacts(run_id, sample_files[0], str(tmp_path))).read_text()
    assert text.count("ROMEO:") == cfg.task.sample_count

    # The shipped network rebuilds from the checkpoint without Lightning.
    run = json.loads((Path(cfg.paths.train) / "run.json").read_text())
    net, hparams = load_checkpoint(Path(cfg.paths.train) / run["best_checkpoint"])
    assert hparams["model"]["name"] == OmegaConf.select(cfg, "model.name")

    model = mlflow.pyfunc.load_model(str(champion))
    params = {"max_new_tokens": 25, "temperature": 0.8, "top_k": 0, "seed": 7}
    out = model.predict(["ROMEO:", "JULIET:"], params=params)
    assert list(out.columns) == ["completion"] and [len(t) for t in out["completion"]] == [25, 25]
    again = model.predict(pd.DataFrame({"prompt": ["ROMEO:", "JULIET:"]}), params=params)
    assert again.equals(out)
    greedy = model.predict(["ROMEO:"], params={"max_new_tokens": 10, "top_k": 1, "seed": 0})
    chars = hparams["chars"]
    idx, block = torch.tensor([encode_prompt("ROMEO:", chars)]), cfg.data.block_size
    with torch.no_grad():
        for _ in range(10):
            idx = torch.cat([idx, net(idx[:, -block:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert greedy["completion"][0] == decode(idx[0, 6:].numpy(), chars)
    with pytest.raises(Exception, match="never saw in training"):
        model.predict(["ROMEO: ½"])
