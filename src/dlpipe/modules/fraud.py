"""The fraud detector's Lightning side: the LightningModule (FraudDetector: weighted, focal or
plain BCE, or an autoencoder's reconstruction MSE; val/ap) and the datamodule with shuffled or
class-balanced training batches (see dlpipe.tasks.fraud for its evaluation and serving)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAveragePrecision

from dlpipe.datamodule import BatchIndices, TensorDataModule
from dlpipe.models import create_model, generative_models
from dlpipe.models.tabular import detector_score
from dlpipe.optim import configure_optimizers


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """Lin et al., "Focal Loss for Dense Object Detection" (ICCV 2017), eq. 5: the mean over
    the batch of -alpha_t (1 - p_t)^gamma log(p_t), p_t the probability of the true class,
    alpha_t = alpha for positives and 1 - alpha for negatives (as torchvision's
    sigmoid_focal_loss)."""
    ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    p_t = torch.exp(-ce)
    alpha_t = alpha * y + (1 - alpha) * (1 - y)
    return (alpha_t * (1 - p_t) ** gamma * ce).mean()


class FraudDetector(L.LightningModule):
    """Trains `create_model(**model, **net)`: a predictor with one logit (loss `loss`), or an
    autoencoder (model=mlp_autoencoder) on reconstruction MSE. Validation logs val/ap of the
    fraud score (`detector_score`). `self.net` alone is evaluated and shipped."""

    def __init__(
        self,
        model: Mapping[str, Any],
        net: Mapping[str, Any],
        optim: Mapping[str, Any],
        loss: str,
        pos_weight: float,
        focal_gamma: float,
        focal_alpha: float,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = create_model(**model, **net)
        self.reconstructs = model["name"] in generative_models()
        self.__dict__["_forward"] = torch.compile(self.net) if compile else self.net
        self.val_ap = BinaryAveragePrecision()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.reconstructs:
            return F.mse_loss(self(x), x.flatten(1))
        logits, y = self(x).float().squeeze(-1), y.float()
        h = self.hparams
        if h.loss == "focal":
            return focal_loss(logits, y, h.focal_gamma, h.focal_alpha)
        weight = torch.tensor(h.pos_weight if h.loss == "weighted" else 1.0, device=self.device)
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=weight)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        loss = self.loss(*batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        self.log("val/loss", self.loss(x, y), sync_dist=True)
        # AP only depends on the scores' order; the sigmoid in float64 keeps logits up to ~36
        # apart (float32 would tie every logit above ~17 at 1.0).
        self.val_ap.update(detector_score(self.net, x).double().sigmoid(), y)
        self.log("val/ap", self.val_ap, prog_bar=True)

    def configure_optimizers(self):
        return configure_optimizers(self, self.hparams.optim)


class BalancedBatchIndices(BatchIndices):
    """Each epoch, `size` indices drawn with replacement so that both classes are drawn
    equally often (weights 1 / class count, as torch's WeightedRandomSampler), on the device,
    cut into batches: about half of every batch is fraud."""

    def __init__(self, y: torch.Tensor, batch_size: int, seed: int):
        super().__init__(len(y), batch_size, y.device, seed)
        counts = torch.bincount(y, minlength=2).double()
        self.weights = (1.0 / counts)[y]

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.multinomial(self.weights, self.size, True, generator=self.generator)
        yield from order.split(self.batch_size)


class FraudDataModule(TensorDataModule):
    """The processed splits, training rows shuffled or class-balanced (`sampling`); with
    `legit_only` (the autoencoder) the training split keeps its legitimate rows only."""

    def __init__(self, processed_dir, batch_size: int, seed: int, sampling: str, legit_only: bool):
        super().__init__(processed_dir, batch_size, seed)
        self.sampling, self.legit_only = sampling, legit_only

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        super().setup(stage)
        if self.legit_only:
            x, y = self.splits["train"].tensors
            keep = y == 0
            self.splits["train"] = torch.utils.data.TensorDataset(x[keep], y[keep])

    def train_dataloader(self):
        if self.sampling != "balanced":
            return super().train_dataloader()
        dataset = self.splits["train"]
        order = BalancedBatchIndices(dataset.tensors[1], self.batch_size, self.seed)
        return torch.utils.data.DataLoader(dataset, sampler=order, batch_size=None)
