"""The regressor's (and the forecaster's) LightningModule: MSE on the standardized target, RMSE
and MAE in the target's own units on validation (see dlpipe.tasks.regressor for its evaluation
and serving)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from dlpipe.models import create_model
from dlpipe.optim import configure_optimizers


class Regressor(L.LightningModule):
    """Trains `create_model(**model, **net)` (one output) to predict the target standardized
    with the training split's `target` mean/std; the processed `y` stays in original units,
    so validation RMSE/MAE read in those units. `self.net` alone is evaluated and shipped."""

    def __init__(
        self,
        model: Mapping[str, Any],
        net: Mapping[str, Any],
        optim: Mapping[str, Any],
        target: Mapping[str, Any],
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = create_model(**model, **net)
        self.__dict__["_forward"] = torch.compile(self.net) if compile else self.net
        self.mean, self.std = float(target["mean"]), float(target["std"])
        self.val_rmse = MeanSquaredError(squared=False)
        self.val_mae = MeanAbsoluteError()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x).float().squeeze(-1)  # (B,) standardized predictions

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.mse_loss(self(x), (y - self.mean) / self.std)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        out = self(x)
        self.log("val/loss", F.mse_loss(out, (y - self.mean) / self.std), sync_dist=True)
        pred = out * self.std + self.mean
        self.val_rmse.update(pred, y)
        self.val_mae.update(pred, y)
        self.log("val/rmse", self.val_rmse, prog_bar=True)
        self.log("val/mae", self.val_mae)

    def configure_optimizers(self):
        return configure_optimizers(self, self.hparams.optim)
