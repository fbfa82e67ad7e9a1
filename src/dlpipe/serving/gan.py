"""The MLflow pyfunc that ships a DCGAN generator: a number of samples and a seed in, uint8
images out. The generator network lives here too, so the served model needs no Lightning."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from torch import nn

from dlpipe.serving import load_artifacts

MAX_SAMPLES = 10_000  # per request row: bounds the memory one request can take on a server


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


def check_image_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if len(shape) not in (2, 3) or shape[0] % 4 or shape[1] % 4:
        raise ValueError(
            f"the DCGAN needs images (H, W) or (H, W, C) with H and W divisible by 4, got "
            f"{shape}: resize them in the data config (e.g. data.image_size=[28,28])"
        )
    return shape


def build_generator(model: Mapping[str, Any], net: Mapping[str, Any]) -> Generator:
    """The generator of a `model=dcgan` config for images of `net["input_shape"]`."""
    return Generator(net["input_shape"], model["latent_dim"], model["g_width"])


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


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with integer columns `n` (samples, 1..10000) and `seed`, one request
    per row; at /invocations `{"dataframe_records": [{"n": 16, "seed": 0}]}`. Output: uint8
    images (sum of n, H, W), the rows' samples in order. The same (n, seed), the same images."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.spec, self.generator = load_artifacts(context, build_generator)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        requests = pd.DataFrame(model_input)
        if not {"n", "seed"} <= set(requests.columns) or requests.empty:
            raise ValueError(
                f"expected rows with columns 'n' and 'seed', e.g. "
                f"pd.DataFrame({{'n': [16], 'seed': [0]}}), got columns {list(requests.columns)}"
            )
        images = []
        for n, seed in zip(requests["n"], requests["seed"], strict=True):
            if int(n) != n or not 1 <= n <= MAX_SAMPLES or int(seed) != seed:
                raise ValueError(
                    f"n={n} must be an integer in 1..{MAX_SAMPLES} and seed={seed} an integer"
                )
            images.append(generate(self.generator, int(n), int(seed)).numpy())
        return np.concatenate(images)


# MLflow "models from code": `log_pyfunc(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(GeneratorModel())
