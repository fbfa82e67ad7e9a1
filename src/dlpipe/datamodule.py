"""Processed splits as resident tensors, served one whole batch per index lookup: no per-sample
collate, and on a GPU no host round trip (the batch order is drawn on the device).

Padded token sequences (text) are batched by length: each batch holds texts of similar length and
is trimmed to its longest, so little compute goes to padding (the models mask what remains)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from dlpipe.data import load_array, load_meta, load_split


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


class LengthBuckets(Sampler[tuple[torch.Tensor, int]]):
    """Yields (index tensor on the device, width) per batch: the batch's samples and the length
    of its longest, so the batch can be trimmed to `width` columns.

    Shuffled (`seed` set): each epoch a fresh seeded permutation is cut into pools of
    `pool_batches` batches, each pool is sorted by length and cut into batches, and the batch
    order is shuffled. Unshuffled: all samples sorted by length. The batch count is
    ceil(size / batch_size) either way. Everything runs on the device; the widths come to the
    host once per epoch."""

    def __init__(
        self,
        lengths: torch.Tensor,
        batch_size: int,
        seed: int | None,
        pool_batches: int,
    ):
        self.lengths, self.batch_size, self.pool_batches = lengths, batch_size, pool_batches
        self.span = int(lengths.max()) + 1  # > every length, for the (pool, length) sort key
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=lengths.device).manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        size, device = len(self.lengths), self.lengths.device
        if self.generator is None:
            order = torch.sort(self.lengths, stable=True).indices
        else:
            order = torch.randperm(size, device=device, generator=self.generator)
            # Sort by (pool, length): one stable sort instead of one per pool.
            pool = torch.arange(size, device=device) // (self.batch_size * self.pool_batches)
            key = pool * self.span + self.lengths[order]
            order = order[torch.sort(key, stable=True).indices]
        batches = order.split(self.batch_size)
        # (batches, batch_size) lengths, the last batch padded with zeros -> widths (batches,)
        lengths = self.lengths[order]
        widths = F.pad(lengths, (0, len(batches) * self.batch_size - size))
        widths = widths.view(len(batches), self.batch_size).amax(1)
        if self.generator is None:
            batch_order = torch.arange(len(batches), device=device)
        else:
            batch_order = torch.randperm(len(batches), device=device, generator=self.generator)
        picks, widths = torch.stack([batch_order, widths[batch_order]]).tolist()  # one sync
        for i, width in zip(picks, widths, strict=True):
            yield batches[i], width


class TrimmedBatches(Dataset):
    """Right-padded token ids x (N, max_len) and targets y: item (indices, width) is the batch
    (x[indices, :width], y[indices])."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, torch.Tensor]:
        indices, width = item
        return self.x[indices, :width], self.y[indices]


class TokenDataModule(TensorDataModule):
    """Padded token sequences in length-bucketed batches (see LengthBuckets), trimmed to their
    longest sequence. Under DDP, Lightning's DistributedSamplerWrapper deals each rank a
    disjoint share of the same batch list, as for TensorDataModule."""

    def __init__(
        self,
        processed_dir: str | Path,
        batch_size: int,
        seed: int,
        pool_batches: int,
        eval_batch_size: int = 1024,
    ):
        super().__init__(processed_dir, batch_size, seed, eval_batch_size)
        self.pool_batches = pool_batches
        self.lengths: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.lengths:
            return
        super().setup(stage)
        for split in ("train", "val"):
            lengths = load_array(self.processed_dir, f"{split}_lengths")
            self.lengths[split] = torch.from_numpy(lengths).long().to(self.device)

    def _loader(self, split: str, batch_size: int, seed: int | None) -> DataLoader:
        x, y = self.splits[split].tensors
        order = LengthBuckets(self.lengths[split], batch_size, seed, self.pool_batches)
        return DataLoader(TrimmedBatches(x, y), sampler=order, batch_size=None)


def make_datamodule(cfg, meta: dict) -> L.LightningDataModule:
    """The datamodule for a processed classification/regression dataset (x, y per split):
    length-bucketed batches for padded token sequences (meta "padded"), else TensorDataModule."""
    if meta.get("padded"):
        pool = cfg.data.get("bucket_pool")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(
                f"data.bucket_pool={pool!r} must be an integer >= 1 (batches per pool sorted by "
                "length), e.g. data.bucket_pool=50"
            )
        return TokenDataModule(cfg.paths.processed, cfg.train.batch_size, cfg.seed, pool)
    return TensorDataModule(cfg.paths.processed, cfg.train.batch_size, cfg.seed)
