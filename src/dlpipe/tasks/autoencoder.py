"""Unsupervised image representations: a convolutional autoencoder (model=autoencoder) or VAE
(model=vae) trained on the images alone. The reconstruction loss is the Bernoulli negative
log-likelihood (BCE) of the pixels scaled to [0, 1], summed per image (nats); the VAE adds
beta * KL(q(z|x) || N(0, I)). Judged on the test split by reconstruction error, the VAE's ELBO,
and how well k-means on the latent codes recovers the hidden classes (NMI, ARI), against
k-means on the raw pixels (`baseline/nmi`, `baseline/ari`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from dlpipe.data import load_split
from dlpipe.models import load_checkpoint
from dlpipe.models.generative import (
    ConvAutoencoder,
    kl_to_standard_normal,
    reconstruct,
    reconstruction_bce,
)
from dlpipe.plots import image_grid, saved_figure
from dlpipe.serving import log_pyfunc
from dlpipe.serving.autoencoder import AutoencoderModel
from dlpipe.tasks import ExportTarget

if TYPE_CHECKING:  # type hints only: evaluate and register load no Lightning
    import lightning as L


@torch.inference_mode()
def reconstruction_scores(
    net: ConvAutoencoder, x: np.ndarray, batch_size: int = 1024
) -> tuple[dict[str, float], np.ndarray]:
    """Per-image means of the reconstruction error (MSE per pixel on [0, 1], BCE in nats) and,
    for the VAE, of the KL and the one-sample ELBO estimate (nats); plus the codes (N, d)."""
    totals: dict[str, float] = defaultdict(float)
    codes = []
    for i in range(0, len(x), batch_size):
        batch = torch.from_numpy(x[i : i + batch_size])
        target = net.pixels(batch)
        mean, logvar = net.encode(batch)
        logits = net.decode(mean)
        n = len(batch)
        totals["test/recon_mse"] += F.mse_loss(logits.sigmoid(), target).item() * n
        totals["test/recon_bce"] += reconstruction_bce(logits, target).item() * n
        if logvar is not None:
            sampled, _, _ = net(batch)  # the ELBO's reconstruction term is over z ~ q(z|x)
            kl = kl_to_standard_normal(mean, logvar).item()
            totals["test/kl"] += kl * n
            totals["test/elbo"] -= (reconstruction_bce(sampled, target).item() + kl) * n
        codes.append(mean)
    return {k: v / len(x) for k, v in totals.items()}, torch.cat(codes).numpy()


def cluster_scores(
    features: np.ndarray, labels: np.ndarray, k: int, n_init: int, seed: int
) -> tuple[float, float]:
    """(NMI, adjusted Rand index) of k-means clusters of `features` against the true labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    clusters = KMeans(k, n_init=n_init, random_state=seed).fit_predict(features)
    return (
        float(normalized_mutual_info_score(labels, clusters)),
        float(adjusted_rand_score(labels, clusters)),
    )


def plot_latents(
    codes: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    path: Path,
    seed: int,
    tsne_samples: int,
) -> None:
    """PCA of the codes to 2-D, coloured by true class; beside it a t-SNE of a seeded subsample
    of `tsne_samples` codes (0: PCA only)."""
    from matplotlib import colormaps
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    panels = [("PCA", PCA(2, random_state=seed).fit_transform(codes), labels)]
    if tsne_samples:
        rng = np.random.default_rng(seed)
        keep = rng.permutation(len(codes))[:tsne_samples]
        embedded = TSNE(2, init="pca", random_state=seed).fit_transform(codes[keep])
        panels.append((f"t-SNE ({len(keep)} samples)", embedded, labels[keep]))
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    with saved_figure(path, 1, len(panels), figsize=(7 * len(panels), 6), squeeze=False) as (
        _,
        axes,
    ):
        for ax, (title, points, y) in zip(axes[0], panels, strict=True):
            for c, name in enumerate(classes):
                chosen = y == c
                ax.scatter(*points[chosen].T, s=3, alpha=0.6, color=cmap(c % cmap.N), label=name)
            ax.set(title=f"latent codes: {title}", xticks=[], yticks=[])
        axes[0][-1].legend(markerscale=4, fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))


def per_class_examples(labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` samples of each class, class-major."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)])


class AutoencoderTask:
    # The Lightning side is imported where training asks for it (module(), datamodule()), so
    # evaluate and register load no Lightning (dlpipe.modules).
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        from dlpipe.datamodule import make_datamodule

        return make_datamodule(cfg, meta)

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        from dlpipe.modules.autoencoder import Autoencoder

        kind = meta["input_kind"]
        if kind != "image":
            raise ValueError(
                f"task=autoencoder needs image data, but data={meta['name']} holds {kind!r} "
                "inputs: pick an image dataset (e.g. data=fashion_mnist)"
            )
        if cfg.model.name not in ("autoencoder", "vae"):
            raise ValueError(
                "task=autoencoder trains model=autoencoder or model=vae, "
                f"not model={cfg.model.name}"
            )
        return Autoencoder(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            net={"input_shape": list(meta["input_shape"])},
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            recon_images=cfg.task.recon_images,
        )

    def evaluate(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], out: Path
    ) -> dict[str, float]:
        net, _ = load_checkpoint(checkpoint)
        x, y = load_split(cfg.paths.processed, "test")
        torch.manual_seed(cfg.seed)  # the VAE's sampled z in the ELBO estimate
        summary, codes = reconstruction_scores(net, x)
        k, n_init = cfg.task.clusters, cfg.task.kmeans_n_init
        summary["test/nmi"], summary["test/ari"] = cluster_scores(codes, y, k, n_init, cfg.seed)
        pixels = x.reshape(len(x), -1).astype(np.float32) / 255.0
        nmi, ari = cluster_scores(pixels, y, k, n_init, cfg.seed)
        summary["baseline/nmi"], summary["baseline/ari"] = nmi, ari

        classes = meta["classes"]
        plot_latents(codes, y, classes, out / "latents.png", cfg.seed, cfg.task.tsne_samples)
        shown = x[per_class_examples(y, len(classes), per_class=2)]
        grid = image_grid(np.concatenate([shown, reconstruct(net, shown)]), len(shown), fill=255)
        Image.fromarray(grid).save(out / "reconstructions.png")
        return summary

    def log_model(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], run_id: str
    ) -> str:
        net, hparams = load_checkpoint(checkpoint)
        spec = {"model": hparams["model"], "net": hparams["net"], "format": meta["format"]}
        example = load_split(cfg.paths.processed, "test")[0][:2]
        # One tensor signature cannot describe both modes (images in for encode, latents in for
        # decode), so only `mode` is declared; the model itself checks inputs and says what it
        # expects.
        mode = ParamSpec("mode", "string", "encode")
        return log_pyfunc(
            run_id,
            AutoencoderModel,
            spec,
            net.state_dict(),
            example,
            params={"mode": "encode"},
            signature=ModelSignature(params=ParamSchema([mode])),
        )

    def export_targets(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any]
    ) -> list[ExportTarget]:
        """The two halves the pyfunc serves (dlpipe.export): the encoder (uint8 images ->
        latent codes or posterior means (B, latent_dim)) on the test images, within 1e-4, and
        the decoder (latents -> pixel logits (B, C, H, W)) on their codes, within 1e-3."""
        net, _ = load_checkpoint(checkpoint)
        x = torch.from_numpy(load_split(cfg.paths.processed, "test")[0])
        encoder, decoder = Method(net, "encode", index=0), Method(net, "decode")
        with torch.inference_mode():
            codes = torch.cat([encoder(chunk) for chunk in x.split(1024)])
        return [
            ExportTarget("encoder", encoder, x, max_abs_error=1e-4),
            ExportTarget("decoder", decoder, codes, max_abs_error=1e-3),
        ]


class Method(torch.nn.Module):
    """`net.<method>(x)` as a module (what an exporter traces), the `index`-th output where
    the method returns a tuple (encode: (mean, logvar))."""

    def __init__(self, net: torch.nn.Module, method: str, index: int | None = None):
        super().__init__()
        self.net, self.method, self.index = net, method, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self.net, self.method)(x)
        return out if self.index is None else out[self.index]


TASK = AutoencoderTask()
