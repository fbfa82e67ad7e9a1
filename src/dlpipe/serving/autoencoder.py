"""The convolutional autoencoder / VAE and the MLflow pyfunc that ships it: uint8 images in,
latent vectors out (`mode="encode"`), or latent vectors in, uint8 images out (`mode="decode"`).

The networks live here rather than in the task module: the pyfunc rebuilds them where only
torch, numpy and mlflow are installed (no Lightning, no scikit-learn).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch
from torch import nn

from dlpipe.models import activation_layer, norm_layer
from dlpipe.serving import load_artifacts

MODELS = ("autoencoder", "vae")
MODES = ("encode", "decode")


class ConvAutoencoder(nn.Module):
    """uint8 images (B, H, W) or (B, H, W, C) -> latent codes (B, latent_dim) -> per-pixel
    Bernoulli logits (B, C, H, W) of the images scaled to [0, 1].

    Each of the `depth` encoder stages halves the resolution (3x3 conv, stride 2, channels
    `width * 2**stage`); the decoder mirrors them with transposed convs back to the exact input
    size, the last one giving the logits. `variational`: the encoder gives the mean and
    log-variance of q(z|x), and `forward` samples z from it (reparameterization), as the ELBO
    needs."""

    def __init__(
        self,
        input_shape: Sequence[int],
        width: int,
        depth: int,
        latent_dim: int,
        activation: str,
        norm: str,
        variational: bool,
    ):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.variational = variational
        self.latent_dim = latent_dim
        channels = input_shape[2] if len(input_shape) == 3 else 1
        sizes = [tuple(input_shape[:2])]  # (H, W) before each stage, then the bottleneck's
        for _ in range(depth):
            sizes.append(tuple((s + 1) // 2 for s in sizes[-1]))
        widths = [channels] + [width * 2**stage for stage in range(depth)]

        encoder: list[nn.Module] = []
        for c_in, c_out in pairwise(widths):
            encoder += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=norm == "none"),
                norm_layer(norm, c_out, conv=True),
                activation_layer(activation),
            ]
        bottleneck = (widths[-1], *sizes[-1])  # (C, h, w)
        features = int(np.prod(bottleneck))
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        self.to_latent = nn.Linear(features, latent_dim * (2 if variational else 1))

        decoder: list[nn.Module] = [
            nn.Linear(latent_dim, features),
            activation_layer(activation),
            nn.Unflatten(1, bottleneck),
        ]
        for stage in reversed(range(depth)):  # sizes[stage + 1] -> sizes[stage]
            (h_in, w_in), (h_out, w_out) = sizes[stage + 1], sizes[stage]
            # A stride-2 3x3 transposed conv gives 2n - 1; output_padding adds the odd pixel.
            extra = (h_out - 2 * h_in + 1, w_out - 2 * w_in + 1)
            last = stage == 0  # emits the logits: no norm, no activation
            decoder.append(
                nn.ConvTranspose2d(
                    widths[stage + 1],
                    widths[stage],
                    3,
                    stride=2,
                    padding=1,
                    output_padding=extra,
                    bias=last or norm == "none",
                )
            )
            if not last:
                decoder += [
                    norm_layer(norm, widths[stage], conv=True),
                    activation_layer(activation),
                ]
        self.decoder = nn.Sequential(*decoder)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W[, C]) -> float (B, C, H, W) in [0, 1]: the reconstruction target."""
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return x.float() / 255.0

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(code or posterior mean (B, latent_dim), posterior log-variance or None)."""
        h = self.to_latent(self.encoder(self.pixels(x)))
        if not self.variational:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (B, C, H, W) logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits (B, C, H, W), mean, logvar); the VAE decodes a sample z ~ q(z|x)."""
        mean, logvar = self.encode(x)
        z = mean
        if logvar is not None:
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        return self.decode(z), mean, logvar

    def to_images(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, H, W) -> uint8 images in the data's layout (B, H, W[, C])."""
        pixels = (logits.float().sigmoid() * 255.0).round().to(torch.uint8)
        return pixels[:, 0] if len(self.input_shape) == 2 else pixels.permute(0, 2, 3, 1)


def build_autoencoder(model: Mapping[str, Any], net: Mapping[str, Any]) -> ConvAutoencoder:
    """The network of a `model:` config (autoencoder or vae) for the data's `input_shape`."""
    if model["name"] not in MODELS:
        raise ValueError(
            f"task=autoencoder trains model=autoencoder or model=vae, not model={model['name']}"
        )
    return ConvAutoencoder(
        input_shape=net["input_shape"],
        width=model["width"],
        depth=model["depth"],
        latent_dim=model["latent_dim"],
        activation=model["activation"],
        norm=model["norm"],
        variational=model["name"] == "vae",
    )


class AutoencoderModel(mlflow.pyfunc.PythonModel):
    """params `{"mode": "encode"}` (the default): uint8 images (N, *input_shape), e.g.
    (N, 28, 28), in; float32 latent vectors (N, latent_dim) out (the VAE's posterior means).
    params `{"mode": "decode"}`: latent vectors (N, latent_dim) in; uint8 images out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.spec, self.net = load_artifacts(context, build_autoencoder)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        mode = (params or {}).get("mode", "encode")
        with torch.inference_mode():
            if mode == "encode":
                return self.net.encode(self._images(model_input))[0].float().numpy()
            if mode == "decode":
                return self.net.to_images(self.net.decode(self._latents(model_input))).numpy()
        raise ValueError(f"params mode={mode!r}: choose one of {MODES}")

    def _images(self, model_input: Any) -> torch.Tensor:
        x = np.asarray(model_input)
        shape = self.net.input_shape
        if x.shape[1:] != shape:
            expected = ", ".join(map(str, shape))
            raise ValueError(f"mode=encode expects images of shape (N, {expected}), got {x.shape}")
        if not np.issubdtype(x.dtype, np.integer) or x.min(initial=0) < 0 or x.max(initial=0) > 255:
            raise ValueError("mode=encode expects uint8 pixel values 0-255 (raw images)")
        return torch.from_numpy(x.astype(np.uint8))

    def _latents(self, model_input: Any) -> torch.Tensor:
        z = np.asarray(model_input)
        dim = self.net.latent_dim
        if z.ndim != 2 or z.shape[1] != dim or not np.issubdtype(z.dtype, np.number):
            raise ValueError(
                f"mode=decode expects latent vectors of shape (N, {dim}), got {z.shape} {z.dtype}"
            )
        if not np.isfinite(z).all():
            raise ValueError("mode=decode expects finite latent values (no NaN/inf)")
        return torch.from_numpy(z.astype(np.float32))


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(AutoencoderModel())
