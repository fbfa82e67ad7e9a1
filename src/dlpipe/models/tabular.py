"""Networks for table rows (float features (B, F)): the FT-Transformer (ft_transformer), a
Transformer over one token per feature, and an MLP autoencoder (mlp_autoencoder) whose
reconstruction error scores how unusual a row is (task=fraud's unsupervised detector).
`detector_score` is the one fraud score of either kind of network."""

from __future__ import annotations

import math

import torch
from torch import nn

from dlpipe.models.layers import activation_layer
from dlpipe.models.registry import InputSpec, register


class FTTransformer(nn.Module):
    """Gorishniy et al., "Revisiting Deep Learning Models for Tabular Data" (NeurIPS 2021):
    feature j of a row becomes the token x_j * W_j + b_j (d_model), a learned [CLS] token is
    prepended, `num_layers` pre-norm Transformer encoder layers mix them, and a LayerNorm ->
    ReLU -> linear head reads [CLS]. Input (B, ...) is flattened to (B, F) float features."""

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
    ):
        super().__init__()
        bound = 1 / math.sqrt(d_model)  # the paper's uniform initialization of the tokenizer
        self.weight = nn.Parameter(torch.empty(num_features, d_model).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_features, d_model).uniform_(-bound, bound))
        self.cls = nn.Parameter(torch.empty(1, 1, d_model).uniform_(-bound, bound))
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
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.ReLU(), nn.Linear(d_model, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).float()  # (B, F)
        tokens = x.unsqueeze(-1) * self.weight + self.bias  # (B, F, d)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)  # (B, 1 + F, d)
        return self.head(self.encoder(tokens)[:, 0])  # (B, num_classes)


@register("ft_transformer")
def ft_transformer(
    *,
    spec: InputSpec,
    num_classes: int,
    per_step: bool,
    d_model: int,
    nhead: int,
    num_layers: int,
    dim_feedforward: int,
    dropout: float,
) -> FTTransformer:
    if spec.kind == "tokens" or per_step:
        raise ValueError(
            "model=ft_transformer reads one row of features per sample (tables): for token "
            "sequences use model=transformer, for language modeling model=gpt"
        )
    if d_model % nhead:
        raise ValueError(f"model.d_model={d_model} must be divisible by model.nhead={nhead}")
    return FTTransformer(
        math.prod(spec.shape), num_classes, d_model, nhead, num_layers, dim_feedforward, dropout
    )


class MLPAutoencoder(nn.Module):
    """Float features (B, ...) flattened to (B, F) -> code (B, latent_dim) -> reconstruction
    (B, F). Encoder: `depth` linear -> activation layers of `width` units (halving each layer
    after the first), then linear to the code; the decoder mirrors it, ending linear."""

    def __init__(self, num_features: int, width: int, depth: int, latent_dim: int, activation: str):
        super().__init__()
        widths = [max(width // 2**i, latent_dim) for i in range(depth)]
        encoder: list[nn.Module] = [nn.Flatten()]
        features = num_features
        for w in widths:
            encoder += [nn.Linear(features, w), activation_layer(activation)]
            features = w
        self.encoder = nn.Sequential(*encoder, nn.Linear(features, latent_dim))
        decoder: list[nn.Module] = []
        features = latent_dim
        for w in reversed(widths):
            decoder += [nn.Linear(features, w), activation_layer(activation)]
            features = w
        self.decoder = nn.Sequential(*decoder, nn.Linear(features, num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x.float()))  # (B, F)

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared error per row (B,) of the reconstruction of x (B, ...)."""
        x = x.flatten(1).float()
        return (self(x) - x).pow(2).mean(-1)


@register("mlp_autoencoder", generative=True)
def mlp_autoencoder(
    *, spec: InputSpec, width: int, depth: int, latent_dim: int, activation: str
) -> MLPAutoencoder:
    return MLPAutoencoder(math.prod(spec.shape), width, depth, latent_dim, activation)


def detector_score(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fraud score (B,) of rows x (B, F), higher = more suspicious: a classifier's logit,
    or an autoencoder's log reconstruction error (log: the errors span orders of magnitude,
    and the score is calibrated by a logistic fit)."""
    if isinstance(net, MLPAutoencoder):
        return net.reconstruction_error(x).clamp_min(1e-12).log()
    return net(x).float().squeeze(-1)
