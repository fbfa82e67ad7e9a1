"""The classifier's LightningModule: cross-entropy (with label smoothing) and accuracy, logged
as epoch aggregates (see dlpipe.tasks.classifier for its evaluation and serving)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from dlpipe.models import create_model
from dlpipe.models.layers import DeepEnsemble
from dlpipe.optim import configure_optimizers


class Classifier(L.LightningModule):
    """Trains `create_model(**model, **net)`; `self.net` alone is evaluated and shipped."""

    def __init__(
        self,
        model: Mapping[str, Any],
        net: Mapping[str, Any],
        optim: Mapping[str, Any],
        label_smoothing: float,
        compile: bool = False,
    ):
        super().__init__()
        # Recorded in the checkpoint so it rebuilds on its own; MLflow gets the full config instead.
        self.save_hyperparameters(logger=False)
        self.net = create_model(**model, **net)
        # Kept out of the module tree so the state_dict keys stay those of `net`.
        self.__dict__["_forward"] = torch.compile(self.net) if compile else self.net
        self.__dict__["_member_logits"] = None
        if isinstance(self.net[-1], DeepEnsemble):
            front, ensemble = self.net
            member_logits = lambda x: ensemble.member_logits(front(x))  # noqa: E731
            self.__dict__["_member_logits"] = (
                torch.compile(member_logits) if compile else member_logits
            )
        num_classes = net["num_classes"]
        # validate_args=False: the default check calls torch.unique, a device sync every step.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        if self._member_logits is not None:
            # A deep ensemble: each member learns from its own cross-entropy alone. The loss
            # has the value of their mean (train/loss and the divergence check stay on one
            # network's scale) and the gradient of their sum (each member takes the step it
            # would take alone, under any optimizer). train/acc measures the ensemble's vote.
            members = self._member_logits(x)  # (K, B, C)
            mean = F.cross_entropy(
                members.flatten(0, 1),
                y.repeat(len(members)),
                label_smoothing=self.hparams.label_smoothing,
            )
            loss = mean + (len(members) - 1) * (mean - mean.detach())
            logits = members.detach().log_softmax(-1).logsumexp(0)
        else:
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
        return configure_optimizers(self, self.hparams.optim)
