"""The character language model's Lightning side: windows of the token stream as batches
(TokenStreamDataModule) and the LightningModule (CharLM) that learns next-character
cross-entropy, logging bits per character, perplexity and a text sample every validation epoch
(see dlpipe.tasks.language_model for its evaluation and serving)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader, Sampler
from torchmetrics import MeanMetric

from dlpipe.data import load_array
from dlpipe.models import create_model
from dlpipe.optim import configure_optimizers
from dlpipe.serving.language_model import complete

LN2 = math.log(2)


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
