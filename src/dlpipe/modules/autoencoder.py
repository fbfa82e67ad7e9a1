"""The autoencoder's and VAE's LightningModule: the Bernoulli reconstruction loss (plus beta
times the KL term for the VAE) and a per-epoch grid of reconstructions logged to MLflow (see
dlpipe.tasks.autoencoder for its evaluation and serving)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger

from dlpipe.models import create_model
from dlpipe.models.generative import kl_to_standard_normal, reconstruct, reconstruction_bce
from dlpipe.optim import configure_optimizers
from dlpipe.plots import image_grid


class Autoencoder(L.LightningModule):
    """Trains `create_model(**model, **net)` on images only (a batch's labels are never read);
    `self.net` alone is evaluated and shipped."""

    def __init__(
        self,
        model: Mapping[str, Any],
        net: Mapping[str, Any],
        optim: Mapping[str, Any],
        recon_images: int,
    ):
        super().__init__()
        # Recorded in the checkpoint so it rebuilds on its own; MLflow gets the full config instead.
        self.save_hyperparameters(logger=False)
        self.net = create_model(**model, **net)
        self.beta = model.get("beta")  # weight of the KL term; vae only
        self.shown: torch.Tensor | None = None  # validation images of the per-epoch grid

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, mean, logvar = self.net(x)
        recon = reconstruction_bce(logits, self.net.pixels(x))
        if logvar is None:
            return {"loss": recon, "recon": recon}
        kl = kl_to_standard_normal(mean, logvar)
        return {"loss": recon + self.beta * kl, "recon": recon, "kl": kl}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, _ = batch  # unsupervised: the labels stay unread
        loss = self.losses(x)["loss"]
        # Epoch aggregates only: values stay on the device, no host sync inside the loop.
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, _ = batch
        if batch_idx == 0:
            self.shown = x[: self.hparams.recon_images]
        for name, value in self.losses(x).items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        """Logs originals over reconstructions of the first validation images (rank zero, once
        per epoch: one small decode and one PNG)."""
        if (
            self.trainer.sanity_checking
            or not self.trainer.is_global_zero
            or not isinstance(self.logger, MLFlowLogger)
            or self.shown is None
            or len(self.shown) == 0
        ):
            return
        originals = self.shown.cpu().numpy()
        rows = np.concatenate([originals, reconstruct(self.net, originals)])
        grid = image_grid(rows, cols=len(originals), fill=255)  # originals over reconstructions
        self.logger.experiment.log_image(
            self.logger.run_id, grid, f"reconstructions/epoch_{self.current_epoch:03d}.png"
        )

    def configure_optimizers(self):
        return configure_optimizers(self, self.hparams.optim)
