"""Building blocks every network shares: the input preprocessing layers that make a saved network
self-contained (`Normalize`, `Standardize`), activations and norms chosen by name, and the deep
ensemble of several classifiers (`DeepEnsemble`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """uint8 (B, H, W) or (B, H, W, C) -> float (B, C, H, W), standardized with training stats."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, -1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (B, C, H, W)
        return (x.float() - 255.0 * self.mean) * self.scale


class Standardize(nn.Module):
    """float (B, ..., F) -> (x - mean) / std per feature, with training-split statistics."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", 1.0 / torch.tensor(std, dtype=torch.float32).clamp(min=1e-8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) * self.scale


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def activation_layer(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def norm_layer(kind: str, features: int, *, conv: bool) -> nn.Module:
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


class Unsqueeze(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(self.dim)


def pre_norm_encoder(
    d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_layers: int
) -> nn.TransformerEncoder:
    """`num_layers` pre-norm Transformer encoder layers (GELU, batch first): (B, T, d_model) ->
    (B, T, d_model), with `src_key_padding_mask` (B, T) True at padding. Pre-norm (layer norm
    before attention and feed-forward, Xiong et al. 2020) trains without a warm-up schedule; the
    stack ends un-normalized, so callers add their final `nn.LayerNorm`.
    Raises ValueError when d_model is not divisible by nhead."""
    if d_model % nhead:
        raise ValueError(f"model.d_model={d_model} must be divisible by model.nhead={nhead}")
    layer = nn.TransformerEncoderLayer(
        d_model,
        nhead,
        dim_feedforward,
        dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    # enable_nested_tensor only speeds up padded batches, and warns with norm_first.
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


class DeepEnsemble(nn.Module):
    """A deep ensemble (Lakshminarayanan et al. 2017, "Simple and Scalable Predictive
    Uncertainty Estimation using Deep Ensembles"): K classifiers of one architecture, each
    with its own random initialization, trained side by side on the same batches, each on its
    own loss (`member_logits`; the classifier task gives each member the gradient of its own
    cross-entropy, so it learns as it would alone, and none sees another's).

    forward: the same input -> (B, C) logits of the members' mean class probabilities,
    log(mean_k softmax(z_k)), so softmax of the output is that mean and argmax its vote.
    Raises ValueError for fewer than two members."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a deep ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, C): each member's logits."""
        return torch.stack([member(x) for member in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = self.member_logits(x).log_softmax(-1)
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))
