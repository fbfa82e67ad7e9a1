"""Model registry: architecture names -> builders, and the networks themselves.

Every network takes raw inputs exactly as the data stores them (uint8 images, (B, H, W) or
(B, H, W, C)) and returns logits (B, num_classes): normalization is the first layer, so a saved
model carries its own preprocessing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(builder):
        _REGISTRY[name] = builder
        return builder

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    **kwargs,
) -> nn.Module:
    """Build `name` with its preprocessing in front: raw uint8 batch in, logits out."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}: choose one of {available_models()} "
            f"(e.g. model={available_models()[0]})"
        )
    body = _REGISTRY[name](input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
    return nn.Sequential(Normalize(mean, std), body)


class Normalize(nn.Module):
    """uint8 (B, H, W) or (B, H, W, C) -> float (B, C, H, W), standardized with training stats."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, -1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (B, C, H, W)
        return (x.float() - 255.0 * self.mean) * self.scale


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def _norm(kind: str, features: int, *, conv: bool) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(features) if conv else nn.BatchNorm1d(features)
    if kind == "layer" and not conv:
        return nn.LayerNorm(features)
    if kind == "group" and conv:
        return nn.GroupNorm(math.gcd(8, features), features)
    allowed = "batch | group | none" if conv else "batch | layer | none"
    raise ValueError(f"unknown norm {kind!r} for this model: choose {allowed}")


@register("mlp")
def mlp(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: int,
    depth: int,
    activation: str,
    norm: str,
    dropout: float,
) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)
    for _ in range(depth):
        layers += [
            nn.Linear(features, width, bias=norm == "none"),
            _norm(norm, width, conv=False),
            _activation(activation),
            nn.Dropout(dropout),
        ]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


@register("cnn")
def cnn(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: int,
    depth: int,
    convs_per_stage: int,
    activation: str,
    norm: str,
    dropout: float,
) -> nn.Module:
    channels = input_shape[2] if len(input_shape) == 3 else 1
    layers: list[nn.Module] = []
    for stage in range(depth):
        out = width * 2**stage
        for _ in range(convs_per_stage):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=norm == "none"),
                _norm(norm, out, conv=True),
                _activation(activation),
            ]
            channels = out
        layers.append(nn.MaxPool2d(2))  # (B, C, H, W) -> (B, C, H/2, W/2)
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (B, C)
        nn.Dropout(dropout),
        nn.Linear(channels, num_classes),
    ]
    return nn.Sequential(*layers)
