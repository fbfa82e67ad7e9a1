"""The DCGAN's LightningModule: alternating discriminator and generator steps (manual
optimization), val/fid against the val split every epoch and a sample grid logged to MLflow
(see dlpipe.tasks.gan for its evaluation and serving)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger
from PIL import Image

from dlpipe import fid
from dlpipe.models import create_model
from dlpipe.models.generative import Discriminator, dcgan_init, generate
from dlpipe.plots import image_grid

GRID = 8  # the per-epoch sample grid is GRID x GRID images of the fixed validation noise


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, H, W[, C]) as the data stores them -> float (B, C, H, W) in [-1, 1]."""
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1


class GAN(L.LightningModule):
    """Alternating discriminator and generator steps; `self.generator` alone is shipped.

    `feature_net` and `reference` (the Gaussian of the val split's features) serve val/fid;
    they are inputs, not state: neither goes into the checkpoint."""

    def __init__(
        self,
        model: Mapping[str, Any],
        net: Mapping[str, Any],
        generator_optim: Mapping[str, Any],
        discriminator_optim: Mapping[str, Any],
        label_smoothing: float,
        fid_samples: int,
        sample_seed: int,
        feature_net: fid.FeatureNet,
        reference: fid.Gaussian,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["feature_net", "reference"], logger=False)
        self.automatic_optimization = False  # two optimizers, stepped in turn by training_step
        self.generator = create_model(**model, **net)
        self.discriminator = Discriminator(net["input_shape"], model["d_width"])
        self.generator.apply(dcgan_init)
        self.discriminator.apply(dcgan_init)
        # Kept out of the module tree: the checkpoint holds the GAN only.
        self.__dict__["feature_net"] = feature_net
        self.reference = reference

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        real = to_unit_range(batch[0])  # labels are not used
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), self.generator.latent_dim, device=self.device)
        fake = self.generator(z)

        # Discriminator: real -> 1 - label_smoothing (one-sided), fake -> 0.
        with self.toggled_optimizer(opt_d):
            d_real = self.discriminator(real)
            d_fake = self.discriminator(fake.detach())
            real_target = torch.full_like(d_real, 1.0 - self.hparams.label_smoothing)
            fake_target = torch.zeros_like(d_fake)
            d_loss = F.binary_cross_entropy_with_logits(d_real, real_target)
            d_loss = d_loss + F.binary_cross_entropy_with_logits(d_fake, fake_target)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()

        # Generator: the non-saturating loss, -log D(G(z)), on the just-updated discriminator.
        with self.toggled_optimizer(opt_g):
            d_on_fake = self.discriminator(fake)
            g_loss = F.binary_cross_entropy_with_logits(d_on_fake, torch.ones_like(d_on_fake))
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            opt_g.step()

        # Epoch aggregates only; train/loss (both losses) is what FailOnDivergence watches.
        metrics = {
            "train/loss": d_loss.detach() + g_loss.detach(),
            "train/d_loss": d_loss.detach(),
            "train/g_loss": g_loss.detach(),
            "train/d_real": d_real.detach().sigmoid().mean(),  # mean D(x)
            "train/d_fake": d_fake.detach().sigmoid().mean(),  # mean D(G(z)) before its step
        }
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # D(x) on held-out real images: a discriminator that memorizes the training split
        # shows here as val/d_real falling below train/d_real.
        d_real = self.discriminator(to_unit_range(batch[0])).sigmoid().mean()
        self.log("val/d_real", d_real, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return  # an untrained generator's distance is worth no feature-net pass
        # The same fixed noise every epoch (and on every DDP rank, whose weights are equal),
        # so val/fid moves only when the generator does.
        images = generate(self.generator, self.hparams.fid_samples, self.hparams.sample_seed)
        features, _ = fid.activations(self.feature_net.to(self.device), images)
        self.log("val/fid", fid.frechet_distance(fid.gaussian(features), self.reference))
        if self.trainer.is_global_zero and isinstance(self.logger, MLFlowLogger):
            self.logger.experiment.log_image(
                self.logger.run_id,
                Image.fromarray(image_grid(images[: GRID * GRID].cpu().numpy(), GRID, frame=True)),
                artifact_file=f"samples/epoch_{self.current_epoch:03d}.png",
            )

    def configure_optimizers(self):
        return [
            adam(self.generator.parameters(), self.hparams.generator_optim),
            adam(self.discriminator.parameters(), self.hparams.discriminator_optim),
        ]


def adam(parameters, opt: Mapping[str, Any]) -> torch.optim.Adam:
    return torch.optim.Adam(parameters, lr=opt["lr"], betas=tuple(opt["betas"]))
