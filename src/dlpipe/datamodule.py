"""Processed splits as resident tensors, served a whole batch per index lookup (no per-sample
collate)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from dlpipe.preprocess import load_meta, load_split


class TensorDataModule(L.LightningDataModule):
    def __init__(
        self, processed_dir: str | Path, batch_size: int, seed: int, eval_batch_size: int = 1024
    ):
        super().__init__()
        self.processed_dir = Path(processed_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.meta = load_meta(self.processed_dir)
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        # On an accelerator the whole dataset moves there once; batches are then slices on-device.
        device = (
            self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        )
        for split in ("train", "val"):
            x, y = load_split(self.processed_dir, split)
            self.splits[split] = TensorDataset(
                torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            )

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = self.splits[split]
        if shuffle:
            # Same seed on every DDP rank: Lightning's DistributedSamplerWrapper then hands each
            # rank a disjoint share of the same batch order.
            generator = torch.Generator().manual_seed(self.seed)
            order = RandomSampler(dataset, generator=generator)
        else:
            order = SequentialSampler(dataset)
        batches = BatchSampler(order, batch_size, drop_last=False)
        # batch_size=None: each sampler item is a list of indices, fetched as one tensor slice.
        return DataLoader(dataset, sampler=batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)
