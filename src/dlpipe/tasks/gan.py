"""Image generation with a DCGAN (model=dcgan), trained with Lightning's manual optimization and
judged by the Fréchet distance to real images in our own classifier's feature space
(`dlpipe.fid`): val/fid every epoch, test/fid against the test split next to its floor and a
classical baseline's (`baseline/fid`: a Gaussian over principal components), and the
classifier's class histogram of the samples."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from dlpipe import fid
from dlpipe.baselines import pca_gaussian_images
from dlpipe.data import load_split, write_json
from dlpipe.models import load_checkpoint
from dlpipe.models.generative import generate
from dlpipe.plots import image_grid, save_png, saved_figure
from dlpipe.serving import log_pyfunc
from dlpipe.serving.gan import GeneratorModel
from dlpipe.tasks import ExportTarget

if TYPE_CHECKING:  # type hints only: evaluate and register load no Lightning
    import lightning as L


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

    # The Lightning side is imported where training asks for it (module(), datamodule()), so
    # evaluate and register load no Lightning (dlpipe.modules).
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        from dlpipe.datamodule import make_datamodule

        return make_datamodule(cfg, meta)  # (x, y) batches; the GAN ignores y

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        from dlpipe.modules.gan import GAN

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
