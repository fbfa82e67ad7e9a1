"""Networks that model the images themselves: the DCGAN generator (model=dcgan) and its
discriminator, and the convolutional autoencoder / VAE (model=autoencoder, model=vae) with its
losses (reconstruction BCE, KL term), which training and evaluation share.

Only torch here: a served generator or autoencoder rebuilds where Lightning is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlpipe.models.layers import activation_layer, norm_layer
from dlpipe.models.registry import InputSpec, register


def check_image_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """`input_shape` as a tuple; ValueError unless it is (H, W) or (H, W, C) with H and W
    divisible by 4 (two stride-2 stages each way)."""
    shape = tuple(input_shape)
    if len(shape) not in (2, 3) or shape[0] % 4 or shape[1] % 4:
        raise ValueError(
            f"the DCGAN needs images (H, W) or (H, W, C) with H and W divisible by 4, got "
            f"{shape}: resize them in the data config (e.g. data.image_size=[28,28])"
        )
    return shape


class Generator(nn.Module):
    """DCGAN generator: noise (B, latent_dim) -> images (B, C, H, W) in [-1, 1].

    A transposed conv grows the noise to a (H/4, W/4) map of 2*width channels, then two
    stride-2 transposed convs double the resolution twice (BatchNorm + ReLU between, tanh out)."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int, width: int):
        super().__init__()
        height, wide, *rest = check_image_shape(input_shape)
        channels = rest[0] if rest else 1
        self.latent_dim = latent_dim
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 2 * width, (height // 4, wide // 4), bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z[:, :, None, None])  # (B, latent, 1, 1) -> (B, C, H, W)


class Discriminator(nn.Module):
    """DCGAN discriminator: images (B, C, H, W) in [-1, 1] -> real/fake logits (B,).

    Two stride-2 convs (LeakyReLU; BatchNorm on the second) halve the resolution twice, and a
    conv over the whole (H/4, W/4) map gives one logit."""

    def __init__(self, input_shape: Sequence[int], width: int):
        super().__init__()
        height, wide, *rest = check_image_shape(input_shape)
        self.layers = nn.Sequential(
            nn.Conv2d(rest[0] if rest else 1, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, (height // 4, wide // 4)),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images).flatten()


@register("dcgan", generative=True)
def dcgan(*, spec: InputSpec, latent_dim: int, g_width: int, d_width: int) -> Generator:
    """The shipped half of a DCGAN: the generator of images of `spec.shape`. `d_width` sizes
    the `Discriminator`, which task=gan builds beside it and never ships."""
    return Generator(spec.shape, latent_dim, g_width)


def dcgan_init(module: nn.Module) -> None:
    """Radford et al. (2016): conv weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02)."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output (B, C, H, W) in [-1, 1] -> uint8 (B, H, W) or (B, H, W, C), the layout
    the data stores."""
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels[:, 0] if pixels.shape[1] == 1 else pixels.permute(0, 2, 3, 1)


@torch.inference_mode()
def generate(generator: Generator, n: int, seed: int, batch_size: int = 1000) -> torch.Tensor:
    """n uint8 images from noise drawn on the CPU with `seed`, on the generator's device.

    The noise depends only on (n, seed), so a seed gives the same images anywhere; the first k
    images of n are those of a request for k."""
    generator.eval()
    device = next(generator.parameters()).device
    z = torch.randn(n, generator.latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([to_uint8(generator(chunk.to(device))) for chunk in z.split(batch_size)])


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
        features = math.prod(bottleneck)
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


def reconstruction_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) of [0, 1] pixels under per-pixel Bernoullis, summed per image, batch mean."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(logits)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per image (closed form), batch mean."""
    return 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1).sum(dim=1).mean()


@torch.inference_mode()
def reconstruct(net: ConvAutoencoder, x: np.ndarray) -> np.ndarray:
    """uint8 images -> their uint8 reconstructions from the code (the VAE's posterior mean)."""
    inputs = torch.from_numpy(x).to(next(net.parameters()).device)
    return net.to_images(net.decode(net.encode(inputs)[0])).cpu().numpy()


@register("autoencoder", generative=True)
def autoencoder(
    *, spec: InputSpec, width: int, depth: int, latent_dim: int, activation: str, norm: str
) -> ConvAutoencoder:
    return ConvAutoencoder(spec.shape, width, depth, latent_dim, activation, norm, False)


@register("vae", generative=True)
def vae(
    *,
    spec: InputSpec,
    width: int,
    depth: int,
    latent_dim: int,
    activation: str,
    norm: str,
    beta: float,
) -> ConvAutoencoder:
    """The autoencoder's layout with a Gaussian posterior. `beta`, the weight of the KL term,
    is read by task=autoencoder's loss; the network itself does not use it."""
    return ConvAutoencoder(spec.shape, width, depth, latent_dim, activation, norm, True)
