"""The transcriber's Lightning side: utterances in length-bucketed batches
(UtteranceDataModule) and the LightningModule (Transcriber) trained with CTC on SpecAugment-ed
batches, decoding greedily every validation epoch for val/wer and val/seq_acc (see
dlpipe.tasks.transcriber for its evaluation and serving)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric
from torchmetrics.text import WordErrorRate

from dlpipe.datamodule import LengthBuckets
from dlpipe.formats.digit_strings import PAD, load_utterances
from dlpipe.models import create_model
from dlpipe.models.acoustic import frame_logits, frame_mask
from dlpipe.optim import configure_optimizers
from dlpipe.serving.transcriber import BLANK, greedy_decode
from dlpipe.tasks.transcriber_report import as_words, references


class UtteranceBatches(Dataset):
    """Utterances stored back to back, frames (sum of lengths, F) with `lengths` (N,): item
    (indices, width) -> (x (B, width, F) zero-padded, lengths (B,), labels (B, max_digits)),
    gathered in one indexing op on the frames' device."""

    def __init__(self, frames: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor):
        self.frames, self.lengths, self.labels = frames, lengths, labels
        self.starts = torch.cumsum(lengths, 0) - lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, item: tuple[torch.Tensor, int]):
        indices, width = item
        lengths = self.lengths[indices]
        steps = torch.arange(width, device=lengths.device)
        real = steps[None, :] < lengths[:, None]  # (B, width)
        rows = (self.starts[indices, None] + steps).clamp(max=len(self.frames) - 1)
        x = self.frames[rows] * real[..., None]
        return x, lengths, self.labels[indices]


class UtteranceDataModule(L.LightningDataModule):
    """The processed train/val utterances, resident on the device, in length-bucketed batches
    (`LengthBuckets`: little compute spent on padding)."""

    def __init__(self, processed_dir: str | Path, batch_size: int, seed: int, pool_batches: int):
        super().__init__()
        self.processed_dir = Path(processed_dir)
        self.batch_size, self.seed, self.pool_batches = batch_size, seed, pool_batches
        self.splits: dict[str, UtteranceBatches] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        device = (
            self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        )
        for split in ("train", "val"):
            arrays = load_utterances(self.processed_dir, split)
            self.splits[split] = UtteranceBatches(*(torch.from_numpy(a).to(device) for a in arrays))

    def _loader(self, split: str, seed: int | None) -> DataLoader:
        batches = self.splits[split]
        order = LengthBuckets(batches.lengths, self.batch_size, seed, self.pool_batches)
        return DataLoader(batches, sampler=order, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", None)


SPEC_AUGMENT_KEYS = ("freq_masks", "freq_width", "time_masks", "time_width")


def check_spec_augment(settings: Mapping[str, Any]) -> dict[str, int]:
    """task.spec_augment, checked: a non-negative integer per key of SPEC_AUGMENT_KEYS."""
    if not isinstance(settings, Mapping) or set(settings) != set(SPEC_AUGMENT_KEYS):
        raise ValueError(
            f"task.spec_augment={settings!r} must set exactly {list(SPEC_AUGMENT_KEYS)}, e.g. "
            "{freq_masks: 2, freq_width: 8, time_masks: 2, time_width: 10} (0 masks: off)"
        )
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"task.spec_augment.{key}={value!r} must be an integer >= 0")
    return dict(settings)


def _spans(count: int, widest: int, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, ends) (B, count) of spans of width uniform in [0, min(widest, size)], placed
    uniformly within [0, size) per row (size (B,))."""
    rand = torch.rand(2, len(size), count, device=size.device)
    width = (rand[0] * (torch.clamp(size, max=widest)[:, None] + 1)).floor()
    start = (rand[1] * (size[:, None] - width + 1)).floor()
    return start, start + width


def spec_augment(
    x: torch.Tensor,
    lengths: torch.Tensor,
    fill: torch.Tensor,
    freq_masks: int,
    freq_width: int,
    time_masks: int,
    time_width: int,
) -> torch.Tensor:
    """SpecAugment's frequency and time masking (Park et al. 2019, without time warping) of a
    padded batch x (B, T, F) with `lengths` (B,) real frames: per utterance, `freq_masks` bands
    of 0..freq_width mel channels and `time_masks` spans of 0..time_width frames (within its real
    frames) are set to `fill` (F,) (the training mean, i.e. zero after standardization). Padded
    frames are left as they are. Draws from torch's global generator (seeded by Lightning)."""
    batch, steps, bands = x.shape
    masked = torch.zeros(batch, steps, bands, dtype=torch.bool, device=x.device)
    if freq_masks:
        start, end = _spans(freq_masks, freq_width, torch.full_like(lengths, bands))
        f = torch.arange(bands, device=x.device)
        band = ((f >= start[..., None]) & (f < end[..., None])).any(1)  # (B, F)
        masked |= band[:, None, :]
    if time_masks:
        start, end = _spans(time_masks, time_width, lengths)
        t = torch.arange(steps, device=x.device)
        span = ((t >= start[..., None]) & (t < end[..., None])).any(1)  # (B, T)
        masked |= span[:, :, None]
    masked &= frame_mask(lengths, steps)[:, :, None]
    return torch.where(masked, fill.to(x.dtype), x)


class Transcriber(L.LightningModule):
    """Trains `create_model(**model, **net)` with CTC on batches masked by `spec_augment`
    (task.spec_augment; training only); `self.net` alone is evaluated and shipped. Validation
    decodes greedily: `val/wer` (digit error rate) and `val/seq_acc` (whole strings right)."""

    def __init__(
        self,
        model: Mapping[str, Any],
        net: Mapping[str, Any],
        optim: Mapping[str, Any],
        augment: Mapping[str, int],
        compile: bool = False,
    ):
        super().__init__()
        # Recorded in the checkpoint so it rebuilds on its own; MLflow gets the full config instead.
        self.save_hyperparameters(logger=False)
        self.augment = check_spec_augment(augment)
        self.net = create_model(**model, **net)
        self.__dict__["_forward"] = torch.compile(self.net) if compile else self.net
        # zero_infinity: an utterance too short for its labels (never in our data) adds no inf.
        self.ctc = nn.CTCLoss(blank=BLANK, zero_infinity=True)
        self.val_wer = WordErrorRate()
        self.val_seq_acc = MeanMetric()

    def loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CTC loss averaged over utterances, each divided by its label count; log-probs
        (B, T', C); output lengths (B,))."""
        x, lengths, labels = batch
        logits, out_lengths = frame_logits(self._forward, x, lengths)
        log_probs = logits.float().log_softmax(-1)
        targets = torch.where(labels == PAD, 1, labels + 1)  # outputs: label k is k + 1
        label_lengths = (labels != PAD).sum(1)
        loss = self.ctc(log_probs.transpose(0, 1), targets, out_lengths, label_lengths)
        return loss, log_probs, out_lengths

    def augmented(self, batch):
        """The training batch with SpecAugment's masks on its real frames, filled with the
        standardization's mean (zero once standardized)."""
        x, lengths, labels = batch
        fill = self.net[0].mean  # the Standardize in front: the training split's mean per band
        return spec_augment(x, lengths, fill, **self.augment), lengths, labels

    def training_step(self, batch, batch_idx: int):
        loss, _, _ = self.loss(self.augmented(batch))
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx: int):
        loss, log_probs, out_lengths = self.loss(batch)
        hyps = [digits for digits, _ in greedy_decode(log_probs, out_lengths)]
        refs = references(batch[2])
        self.val_wer.update([as_words(h) for h in hyps], [as_words(r) for r in refs])
        right = torch.tensor([h == r for h, r in zip(hyps, refs, strict=True)], dtype=torch.float)
        self.val_seq_acc.update(right.to(loss.device))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(refs))
        self.log("val/wer", self.val_wer, prog_bar=True)
        self.log("val/seq_acc", self.val_seq_acc, prog_bar=True)

    def configure_optimizers(self):
        return configure_optimizers(self, self.hparams.optim)
