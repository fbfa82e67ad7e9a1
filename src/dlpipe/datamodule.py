"""Processed splits as resident tensors, served one whole batch per index lookup: no per-sample
collate, and on a GPU no host round trip (the batch order is drawn on the device)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from dlpipe.preprocess import load_meta, load_split


class BatchIndices(Sampler[torch.Tensor]):
    """Yields one index tensor per batch, on `device`: a fresh seeded permutation each epoch
    when shuffling, else in order."""

    def __init__(self, size: int, batch_size: int, device: torch.device, seed: int | None):
        self.size, self.batch_size, self.device = size, batch_size, device
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.generator is None:
            order = torch.arange(self.size, device=self.device)
        else:
            order = torch.randperm(self.size, device=self.device, generator=self.generator)
        yield from order.split(self.batch_size)


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
        self.device = (
            self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        )
        for split in ("train", "val"):
            x, y = load_split(self.processed_dir, split)
            self.splits[split] = TensorDataset(
                torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
            )

    def _loader(self, split: str, batch_size: int, seed: int | None) -> DataLoader:
        dataset = self.splits[split]
        # Same seed on every DDP rank: Lightning's DistributedSamplerWrapper then hands each
        # rank a disjoint share of the same batch order. batch_size=None: each sampler item is a
        # whole batch of indices, fetched as one tensor slice.
        order = BatchIndices(len(dataset), batch_size, self.device, seed)
        return DataLoader(dataset, sampler=order, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, seed=None)


def make_datamodule(cfg, meta: dict) -> L.LightningDataModule:
    """The datamodule for a processed classification/regression dataset (x, y per split)."""
    return TensorDataModule(cfg.paths.processed, cfg.train.batch_size, cfg.seed)
