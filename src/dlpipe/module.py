"""The LightningModule for classification: loss, metrics and optimizer around a registry network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from dlpipe.models import create_model

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "onecycle")


class Classifier(L.LightningModule):
    """Trains `create_model(**model)`; `self.net` alone is what gets evaluated and shipped."""

    def __init__(
        self,
        model: Mapping[str, Any],
        input_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        optim: Mapping[str, Any],
        label_smoothing: float,
        compile: bool = False,
    ):
        super().__init__()
        # Recorded in the checkpoint so it rebuilds on its own; MLflow gets the full config instead.
        self.save_hyperparameters(logger=False)
        self.net = create_model(
            input_shape=input_shape, num_classes=num_classes, mean=mean, std=std, **model
        )
        # Kept out of the module tree so the state_dict keys stay those of `net`.
        self.__dict__["_forward"] = torch.compile(self.net) if compile else self.net
        # validate_args=False: the default check calls torch.unique, a device sync every step.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_acc.update(logits, y)  # computed once per epoch, when logged
        # Epoch aggregates only: values stay on the device, no host sync inside the loop.
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        opt = self.hparams.optim
        name, lr, wd = opt["name"], opt["lr"], opt["weight_decay"]
        if name == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=lr, momentum=opt["momentum"], weight_decay=wd, nesterov=True
            )
        elif name == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=wd)
        elif name == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=wd)
        else:
            raise ValueError(f"unknown optim.name {name!r}: choose one of {OPTIMIZERS}")

        schedule = opt["scheduler"]
        if schedule == "none":
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        if schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        elif schedule == "onecycle":
            # OneCycleLR divides by (warm-up steps - 1) and by the steps after it: both need >= 2.
            warmup = max(2, round(opt["warmup_fraction"] * steps))
            if steps < warmup + 2:
                return optimizer  # a handful of steps (smoke runs): constant lr
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=lr, total_steps=steps, pct_start=warmup / steps
            )
        else:
            raise ValueError(f"unknown optim.scheduler {schedule!r}: choose one of {SCHEDULERS}")
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
