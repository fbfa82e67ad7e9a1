"""Image generation with a DCGAN (model=dcgan), trained with Lightning's manual optimization and
judged by the Fréchet distance to real images in our own classifier's feature space
(`dlpipe.fid`): val/fid every epoch, test/fid against the test split next to its floor and a
classical baseline's (`baseline/fid`: a Gaussian over principal components), and the
classifier's class histogram of the samples."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from dlpipe import fid
from dlpipe.baselines import pca_gaussian_images
from dlpipe.data import load_split, write_json
from dlpipe.datamodule import make_datamodule
from dlpipe.models import create_model, load_checkpoint
from dlpipe.models.generative import Discriminator, dcgan_init, generate
from dlpipe.plots import image_grid, save_png, saved_figure
from dlpipe.serving import log_pyfunc
from dlpipe.serving.gan import GeneratorModel
from dlpipe.tasks import ExportTarget

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


def plot_class_histogram(counts: np.ndarray, classes: Sequence[str], path: Path) -> None:
    with saved_figure(path, figsize=(8, 4)) as (_, ax):
        ax.bar(range(len(classes)), counts / counts.sum())
        ax.axhline(1 / len(classes), color="gray", linestyle="--", label="uniform")
        ax.set(
            ylabel="share of generated samples", title="feature classifier's class of each sample"
        )
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.legend()


class GanTask:
    def divergence_hint(self, cfg: DictConfig) -> str:
        # Two Adam optimizers of its own (optim.lr is unused), and manual optimization, which
        # Lightning's gradient clipping does not support.
        return (
            f"Lower the learning rates (task.generator_optim.lr={cfg.task.generator_optim.lr}, "
            f"task.discriminator_optim.lr={cfg.task.discriminator_optim.lr})"
        )

    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        return make_datamodule(cfg, meta)  # (x, y) batches; the GAN ignores y

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        if cfg.model.name != "dcgan":
            raise ValueError(f"task=gan trains model=dcgan, not model={cfg.model.name}")
        feature_net, _ = self._feature_net(cfg)
        val_features, _ = fid.activations(feature_net, load_split(cfg.paths.processed, "val")[0])
        return GAN(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            net={"input_shape": list(meta["input_shape"])},
            generator_optim=OmegaConf.to_container(cfg.task.generator_optim, resolve=True),
            discriminator_optim=OmegaConf.to_container(cfg.task.discriminator_optim, resolve=True),
            label_smoothing=cfg.task.label_smoothing,
            fid_samples=cfg.task.fid_samples,
            sample_seed=cfg.task.sample_seed,
            feature_net=feature_net,
            reference=fid.gaussian(val_features),
        )

    def evaluate(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], out: Path
    ) -> dict[str, float]:
        generator, _ = load_checkpoint(checkpoint, prefix="generator.")
        feature_net, info = self._feature_net(cfg)
        images = generate(generator, cfg.task.eval_samples, cfg.task.sample_seed).numpy()
        generated, logits = fid.activations(feature_net, images)
        test, _ = fid.activations(feature_net, load_split(cfg.paths.processed, "test")[0])
        train_images = load_split(cfg.paths.processed, "train")[0]
        train, _ = fid.activations(feature_net, train_images)
        t0 = time.perf_counter()
        classical = pca_gaussian_images(
            train_images, cfg.task.eval_samples, cfg.task.baseline_components, cfg.task.sample_seed
        )
        baseline = {
            "name": f"Gaussian over {cfg.task.baseline_components} principal components",
            "fit_seconds": time.perf_counter() - t0,
        }
        test_gaussian = fid.gaussian(test)

        classes = meta["classes"]
        counts = fid.class_histogram(logits, len(classes))
        shares = counts / counts.sum()
        write_json(
            out / "class_histogram.json",
            {
                c: {"count": int(k), "share": float(s)}
                for c, k, s in zip(classes, counts, shares, strict=True)
            },
        )
        plot_class_histogram(counts, classes, out / "class_histogram.png")
        save_png(image_grid(images[:100], 10, frame=True), out / "samples.png")
        write_json(out / "feature_net.json", info)
        write_json(out / "baseline.json", baseline)
        return {
            "test/fid": fid.frechet_distance(fid.gaussian(generated), test_gaussian),
            # Real test images vs real training images: as close as a generator can hope to get.
            "test/fid_floor": fid.frechet_distance(test_gaussian, fid.gaussian(train)),
            "test/class_entropy_ratio": fid.entropy_ratio(counts),
            "baseline/fid": fid.frechet_distance(
                fid.gaussian(fid.activations(feature_net, classical)[0]), test_gaussian
            ),
        }

    def log_model(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], run_id: str
    ) -> str:
        generator, hparams = load_checkpoint(checkpoint, prefix="generator.")
        spec = {
            "model": hparams["model"],
            "net": hparams["net"],
            "input": "DataFrame with integer columns n (1..10000) and seed, one request per row",
            "output": "uint8 images (sum of n, *input_shape)",
        }
        example = pd.DataFrame({"n": [2], "seed": [0]})
        return log_pyfunc(run_id, GeneratorModel, spec, generator.state_dict(), example)

    def export_targets(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any]
    ) -> list[ExportTarget]:
        """The generator (noise (B, latent_dim) -> images (B, C, H, W) in [-1, 1]) on the
        evaluation's seeded noise: within 1e-4, an eightieth of one uint8 pixel step (2/255),
        so the served pixels agree (dlpipe.export)."""
        generator, _ = load_checkpoint(checkpoint, prefix="generator.")
        noise = torch.Generator().manual_seed(cfg.task.sample_seed)
        z = torch.randn(cfg.task.eval_samples, generator.latent_dim, generator=noise)
        return [ExportTarget("generator", generator, z, max_abs_error=1e-4)]

    @staticmethod
    def _feature_net(cfg: DictConfig) -> tuple[fid.FeatureNet, dict[str, Any]]:
        config = OmegaConf.to_container(cfg.task.feature_net, resolve=True)
        return fid.feature_net(cfg.paths.processed, config, cfg.task.feature_net_dir)


TASK = GanTask()
