"""Character-level language modeling: next-token cross-entropy on random windows of the token
stream (nanoGPT's get_batch), loss in nats/char with bits per character and perplexity, text
samples while training, and a pyfunc that generates text from prompts. The test metrics stand
next to a character n-gram model's (`baseline/...`) and the uniform distribution's
(`chance/...`)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler
from torchmetrics import MeanMetric

from dlpipe.baselines import char_ngram_loss
from dlpipe.data import load_array, write_json
from dlpipe.models import create_model, load_checkpoint
from dlpipe.optim import configure_optimizers
from dlpipe.serving import log_pyfunc
from dlpipe.serving.language_model import GENERATION_PARAMS, LanguageModel, complete
from dlpipe.tasks import ExportTarget, net_args

LN2 = math.log(2)
EXPORT_WINDOWS = 512  # test windows an export is checked on


class Windows:
    """A token stream whose items are whole batches: offsets (B,) -> (x, y), each (B, T), where
    y is x shifted by one token. One gather per batch, on the stream's device."""

    def __init__(self, stream: torch.Tensor, block_size: int):
        self.stream, self.block_size = stream, block_size
        self.span = torch.arange(block_size + 1, device=stream.device)
        self.max_offset = len(stream) - block_size - 1  # the last window still has a target

    def __getitem__(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.stream[offsets[:, None] + self.span].long()  # (B, T + 1)
        return window[:, :-1], window[:, 1:]


class RandomOffsets(Sampler[torch.Tensor]):
    """`steps` batches of uniformly random window offsets per epoch, drawn on `device` from a
    seeded generator that carries on across epochs (each epoch sees new windows)."""

    def __init__(self, windows: Windows, batch_size: int, steps: int, seed: int):
        self.high, self.batch_size, self.steps = windows.max_offset + 1, batch_size, steps
        self.device = windows.stream.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):
            yield torch.randint(
                self.high, (self.batch_size,), device=self.device, generator=self.generator
            )


def spread_offsets(windows: Windows, count: int) -> torch.Tensor:
    """`count` window offsets evenly spread over the whole stream: the same every validation."""
    return torch.linspace(0, windows.max_offset, count, device=windows.stream.device).long()


class TokenStreamDataModule(L.LightningDataModule):
    def __init__(
        self,
        processed_dir: str | Path,
        block_size: int,
        batch_size: int,
        steps_per_epoch: int,
        eval_batches: int,
        seed: int,
    ):
        super().__init__()
        self.processed_dir = Path(processed_dir)
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.steps_per_epoch, self.eval_batches = steps_per_epoch, eval_batches
        self.windows: dict[str, Windows] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.windows:
            return
        # The whole stream (~1 MB) lives on the device; a batch is one gather there.
        device = (
            self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        )
        for split in ("train", "val"):
            stream = torch.from_numpy(load_array(self.processed_dir, f"{split}_x")).to(device)
            self.windows[split] = Windows(stream, self.block_size)

    def train_dataloader(self) -> DataLoader:
        windows = self.windows["train"]
        order = RandomOffsets(windows, self.batch_size, self.steps_per_epoch, self.seed)
        # batch_size=None: each sampler item is a whole batch of offsets, fetched as one gather.
        return DataLoader(windows, sampler=order, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        windows = self.windows["val"]
        offsets = spread_offsets(windows, self.eval_batches * self.batch_size)
        return DataLoader(windows, sampler=list(offsets.split(self.batch_size)), batch_size=None)


class CharLM(L.LightningModule):
    """Trains `create_model(**model, **net)` to predict every next character; `self.net` alone
    is evaluated and shipped. Each validation epoch ends with a text sample logged to MLflow."""

    def __init__(
        self,
        model: Mapping[str, Any],
        net: Mapping[str, Any],
        optim: Mapping[str, Any],
        chars: str,
        sample: Mapping[str, Any],
        compile: bool = False,
    ):
        super().__init__()
        # Recorded in the checkpoint so it rebuilds on its own; MLflow gets the full config instead.
        self.save_hyperparameters(logger=False)
        self.net = create_model(**model, **net)
        # Kept out of the module tree so the state_dict keys stay those of `net`.
        self.__dict__["_forward"] = torch.compile(self.net) if compile else self.net
        self.val_loss = MeanMetric()  # windows are all full, so the mean of batch means is per char

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        loss = self.loss(batch)
        # Epoch aggregates only: values stay on the device, no host sync inside the loop.
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        self.val_loss.update(self.loss(batch))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # synced across DDP ranks
        self.val_loss.reset()
        # bpc and perplexity of the epoch's mean loss (perplexity is not a mean of batch values).
        self.log_dict(
            {"val/loss": loss, "val/bpc": loss / LN2, "val/ppl": loss.exp()},
            prog_bar=True,
        )
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self.log_sample()

    def log_sample(self) -> None:
        """A few continuations of the fixed prompt (one batch), as an MLflow text artifact."""
        sample = self.hparams.sample
        if not sample["tokens"] or not isinstance(self.logger, MLFlowLogger):
            return
        prompt = sample["prompt"]
        texts = complete(
            self.net,
            [prompt] * sample["count"],
            self.hparams.chars,
            self.hparams.net["input_shape"][0],
            max_new_tokens=sample["tokens"],
            temperature=sample["temperature"],
            top_k=0,
            seed=sample["seed"],
        )
        epoch = self.current_epoch
        body = "\n\n".join(f"--- sample {i} ---\n{prompt}{t}" for i, t in enumerate(texts))
        self.logger.experiment.log_text(
            self.logger.run_id, f"epoch {epoch}\n\n{body}\n", f"samples/epoch_{epoch:03d}.txt"
        )

    def configure_optimizers(self):
        return configure_optimizers(self, self.hparams.optim)


def lm_net_args(meta: Mapping[str, Any]) -> dict[str, Any]:
    """create_model's data-derived arguments: the context length is input_shape[0], and the
    network predicts one of vocab_size characters at every position."""
    return net_args(meta, num_classes=meta["vocab_size"], per_step=True)


@torch.inference_mode()
def stream_loss(
    net: torch.nn.Module, stream: np.ndarray, block_size: int, batch_size: int = 64
) -> tuple[float, float, int]:
    """(mean next-char cross-entropy in nats, next-char accuracy, characters scored) over a
    whole stream, cut into consecutive windows of `block_size` targets: every character after
    the first is predicted exactly once (the last window may be shorter)."""
    net.eval()
    device = next(net.parameters()).device
    ids = torch.from_numpy(stream.astype(np.int64))
    starts = list(range(0, len(ids) - 1, block_size))
    total = correct = torch.zeros((), device=device)
    count = 0
    groups = [starts[:-1], starts[-1:]]  # full windows batch together; the last may be short
    for group in groups:
        for i in range(0, len(group), batch_size):
            window = torch.stack(
                [ids[s : s + block_size + 1] for s in group[i : i + batch_size]]
            ).to(device)
            x, y = window[:, :-1], window[:, 1:]
            logits = net(x).float()
            total = total + F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
            correct = correct + (logits.argmax(-1) == y).sum()
            count += y.numel()
    return total.item() / count, correct.item() / count, count


def write_samples(
    net: torch.nn.Module,
    chars: str,
    block_size: int,
    prompts: list[str],
    temperatures: list[float],
    max_new_tokens: int,
    seed: int,
    path: Path,
) -> None:
    """Every prompt continued at every temperature (seeded), as one text file."""
    sections = []
    for temperature in temperatures:
        texts = complete(
            net, prompts, chars, block_size, max_new_tokens, temperature, top_k=0, seed=seed
        )
        for prompt, text in zip(prompts, texts, strict=True):
            sections.append(f"=== temperature {temperature}, prompt {prompt!r} ===\n{prompt}{text}")
    path.write_text("\n\n".join(sections) + "\n")


class LanguageModelTask:
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        return TokenStreamDataModule(
            cfg.paths.processed,
            block_size=meta["input_shape"][0],
            batch_size=cfg.train.batch_size,
            steps_per_epoch=cfg.task.steps_per_epoch,
            eval_batches=cfg.task.eval_batches,
            seed=cfg.seed,
        )

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        return CharLM(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            net=lm_net_args(meta),
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            chars=meta["chars"],
            sample={
                "prompt": cfg.task.sample_prompt,
                "count": cfg.task.sample_count,
                "tokens": cfg.task.sample_tokens,
                "temperature": cfg.task.sample_temperature,
                "seed": cfg.task.sample_seed,
            },
            compile=cfg.train.compile,
        )

    def evaluate(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], out: Path
    ) -> dict[str, float]:
        net, hparams = load_checkpoint(checkpoint)
        block_size = hparams["net"]["input_shape"][0]
        test = load_array(cfg.paths.processed, "test_x")
        loss, accuracy, _ = stream_loss(net, test, block_size)
        write_samples(
            net,
            hparams["chars"],
            block_size,
            list(cfg.task.report_prompts),
            list(cfg.task.report_temperatures),
            cfg.task.report_tokens,
            cfg.task.sample_seed,
            out / "samples.txt",
        )
        ngram_loss, order, seconds = char_ngram_loss(
            load_array(cfg.paths.processed, "train_x"),
            load_array(cfg.paths.processed, "val_x"),
            test,
            meta["vocab_size"],
            cfg.task.baseline_max_order,
        )
        name = f"interpolated Witten-Bell character {order + 1}-gram"
        write_json(out / "baseline.json", {"name": name, "fit_seconds": seconds})
        uniform = math.log(meta["vocab_size"])  # chance: every character equally likely
        return {
            f"{prefix}/{key}": value
            for prefix, nats in (("test", loss), ("baseline", ngram_loss), ("chance", uniform))
            for key, value in (("loss", nats), ("bpc", nats / LN2), ("ppl", math.exp(nats)))
        } | {"test/acc": accuracy}

    def log_model(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], run_id: str
    ) -> str:
        net, hparams = load_checkpoint(checkpoint)
        spec = {
            "model": hparams["model"],
            "net": hparams["net"],
            "chars": hparams["chars"],
            "block_size": hparams["net"]["input_shape"][0],
            "input": "prompts: a list of strings, or a DataFrame column 'prompt'",
        }
        return log_pyfunc(
            run_id,
            LanguageModel,
            spec,
            net.state_dict(),
            list(cfg.task.report_prompts[:2]),
            params=GENERATION_PARAMS,
        )

    def export_targets(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any]
    ) -> list[ExportTarget]:
        """The logits step (token ids (B, T) -> logits (B, T, V)) on consecutive windows of the
        test stream (at most EXPORT_WINDOWS): within 1e-3, the same next character at 99.9 %
        of the positions (dlpipe.export). Generation loops over it in the pyfunc."""
        net, hparams = load_checkpoint(checkpoint)
        block = hparams["net"]["input_shape"][0]
        stream = torch.from_numpy(load_array(cfg.paths.processed, "test_x").astype(np.int64))
        count = min(EXPORT_WINDOWS, len(stream) // block)
        windows = stream[: count * block].view(count, block)  # (N, T)
        return [ExportTarget("net", net, windows, max_abs_error=1e-3, argmax=True)]


TASK = LanguageModelTask()
