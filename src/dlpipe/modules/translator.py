"""The translator's Lightning side: sentence pairs in length-bucketed batches
(ParallelDataModule) and the LightningModule (Translator) trained with teacher forcing, scoring
greedy translations of the validation split (val/bleu) every epoch (see dlpipe.tasks.translator
for its evaluation and serving)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import tokenizers
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric, SumMetric

from dlpipe.datamodule import LengthBuckets, TokenDataModule
from dlpipe.formats.parallel import PAD_ID, decode
from dlpipe.models import create_model
from dlpipe.models.translation import translate_ids
from dlpipe.optim import configure_optimizers
from dlpipe.serving.translator import SPECIAL_IDS
from dlpipe.tasks.translator_bleu import bleu, gathered


class PairBatches(Dataset):
    """Source ids x (N, max_len), target ids y (N, max_len): item (indices, width) is the batch
    (x[indices, :width], y[indices, :width], indices), width being the longest side of the
    batch (datamodule.LengthBuckets), so both sides are trimmed to it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, ...]:
        indices, width = item
        return self.x[indices, :width].long(), self.y[indices, :width].long(), indices


class ParallelDataModule(TokenDataModule):
    """Sentence pairs in length-bucketed batches (the text classifiers' bucketing), each side
    trimmed to the batch's longest sentence. Validation batches carry their row indices, so
    greedy translations line up with the raw references."""

    def _loader(self, split: str, batch_size: int, seed: int | None) -> DataLoader:
        x, y = self.splits[split].tensors
        order = LengthBuckets(self.lengths[split], batch_size, seed, self.pool_batches)
        return DataLoader(PairBatches(x, y), sampler=order, batch_size=None)


class Translator(L.LightningModule):
    """Trains `create_model(**model, **net)` on (source, [BOS] target [EOS]) pairs with
    teacher forcing; `self.net` alone is evaluated and shipped. Every validation epoch ends with
    val/bleu of greedy translations, val/loss (per target token, no smoothing) and a few sample
    translations logged to MLflow."""

    def __init__(
        self,
        model: Mapping[str, Any],
        net: Mapping[str, Any],
        optim: Mapping[str, Any],
        label_smoothing: float,
        max_len: int,
        sample_count: int,
        val_bleu_limit: int | None = None,
        tokenizer: tokenizers.Tokenizer | None = None,
        references: Sequence[str] = (),
        sources: Sequence[str] = (),
    ):
        super().__init__()
        # The tokenizer and the validation texts are data, not settings: kept out of the
        # checkpoint's hyperparameters (the network rebuilds from `model` and `net` alone).
        self.save_hyperparameters(ignore=["tokenizer", "references", "sources"], logger=False)
        self.net = create_model(**model, **net)
        self.tokenizer, self.references, self.sources = tokenizer, list(references), list(sources)
        self.val_loss = MeanMetric()  # weighted by target tokens: a per-token mean
        self.train_tokens = SumMetric()
        self.hypotheses: dict[int, list[int]] = {}
        self.epoch_start = 0.0

    def loss(
        self, src: torch.Tensor, tgt: torch.Tensor, smoothing: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy per target token, number of target tokens) of a batch: the
        network reads tgt[:, :-1] and predicts tgt[:, 1:]; padding is ignored."""
        logits = self.net(src, tgt[:, :-1])  # (B, T-1, V)
        target = tgt[:, 1:]
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            target.flatten(),
            ignore_index=PAD_ID,
            label_smoothing=smoothing,
        )
        return loss, (target != PAD_ID).sum()

    def on_train_epoch_start(self) -> None:
        self.epoch_start = time.perf_counter()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        src, tgt, _ = batch
        loss, tokens = self.loss(src, tgt, self.hparams.label_smoothing)
        self.train_tokens.update(tokens)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        # Target tokens per second of training (validation excluded): the throughput docs quote.
        seconds = time.perf_counter() - self.epoch_start
        self.log("train/tokens_per_s", self.train_tokens.compute() / seconds)
        self.train_tokens.reset()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        src, tgt, indices = batch
        loss, tokens = self.loss(src, tgt, 0.0)
        self.val_loss.update(loss, tokens)
        if self.tokenizer is not None and not self.trainer.sanity_checking:
            limit = self.hparams.val_bleu_limit
            if limit is not None:  # BLEU of the first `limit` validation sentences only
                keep = indices < limit
                src, indices = src[keep], indices[keep]
            if len(src):
                generated = translate_ids(self.net, src, SPECIAL_IDS, self.hparams.max_len)
                self.hypotheses.update(zip(indices.tolist(), generated, strict=True))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        metrics = {"val/loss": loss, "val/ppl": loss.exp()}
        if self.tokenizer is not None and not self.trainer.sanity_checking:
            # Under DDP every rank decoded its share: BLEU is a corpus score, of all of them.
            generated = gathered(self.hypotheses)
            self.hypotheses = {}
        else:
            generated = {}
        if generated:
            order = sorted(generated)
            hypotheses = decode(self.tokenizer, _pad([generated[i] for i in order]))
            references = [self.references[i] for i in order]
            metrics["val/bleu"] = bleu(hypotheses, references).score
            if self.trainer.is_global_zero:
                self.log_samples(order, hypotheses)
        self.log_dict(metrics, prog_bar=True)

    def log_samples(self, order: list[int], hypotheses: list[str]) -> None:
        """The first sample_count validation sentences with reference and translation, as an
        MLflow text artifact samples/epoch_NNN.txt."""
        if not self.hparams.sample_count or not isinstance(self.logger, MLFlowLogger):
            return
        position = {i: p for p, i in enumerate(order)}
        rows = [i for i in range(len(self.references)) if i in position]
        lines = [
            f"src: {self.sources[i]}\nref: {self.references[i]}\nhyp: {hypotheses[position[i]]}"
            for i in rows[: self.hparams.sample_count]
        ]
        epoch = self.current_epoch
        self.logger.experiment.log_text(
            self.logger.run_id,
            f"epoch {epoch} (greedy)\n\n" + "\n\n".join(lines) + "\n",
            f"samples/epoch_{epoch:03d}.txt",
        )

    def configure_optimizers(self):
        return configure_optimizers(self, self.hparams.optim)


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(1, *(len(r) for r in rows))
    return torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
