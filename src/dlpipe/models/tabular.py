"""Networks for table rows (float features (B, F)): the FT-Transformer (ft_transformer), a
Transformer over one token per feature, an MLP on periodic embeddings of the features
(plr_mlp), and an MLP autoencoder (mlp_autoencoder) whose
reconstruction error scores how unusual a row is (task=fraud's unsupervised detector).
`detector_score` is the one fraud score of either kind of network."""

from __future__ import annotations

import math

import torch
from torch import nn

from dlpipe.models.layers import activation_layer, pre_norm_encoder
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
        self.encoder = pre_norm_encoder(d_model, nhead, dim_feedforward, dropout, num_layers)
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
    return FTTransformer(
        math.prod(spec.shape), num_classes, d_model, nhead, num_layers, dim_feedforward, dropout
    )


class PeriodicEmbedding(nn.Module):
    """The PLR embedding of numeric features (Gorishniy et al., "On Embeddings for Numerical
    Features in Tabular Deep Learning", NeurIPS 2022): feature x_j (B, F) -> v = [sin(2 pi c_j
    x_j), cos(2 pi c_j x_j)] with `frequencies` learned c_j ~ N(0, sigma^2) per feature ->
    per-feature linear (2 * frequencies -> `dim`) -> ReLU -> (B, F * dim). Lets an MLP cut a
    feature at many thresholds, as a tree does, where a raw scalar gives it one slope."""

    def __init__(self, num_features: int, frequencies: int, sigma: float, dim: int):
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(num_features, frequencies) * sigma)
        bound = 1 / math.sqrt(2 * frequencies)
        self.weight = nn.Parameter(
            torch.empty(num_features, 2 * frequencies, dim).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(num_features, dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angle = 2 * math.pi * x.flatten(1).float().unsqueeze(-1) * self.frequencies  # (B, F, k)
        periodic = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)  # (B, F, 2k)
        out = torch.einsum("bfk,fkd->bfd", periodic, self.weight) + self.bias
        return torch.relu(out).flatten(1)  # (B, F * dim)


@register("plr_mlp")
def plr_mlp(
    *,
    spec: InputSpec,
    num_classes: int,
    per_step: bool,
    frequencies: int,
    sigma: float,
    embed_dim: int,
    width: int,
    depth: int,
    dropout: float,
) -> nn.Module:
    """An MLP (`depth` linear -> ReLU -> dropout layers of `width`) on the PeriodicEmbedding of
    every feature of a table row (B, F) -> (B, num_classes). Raises ValueError for tokens."""
    if spec.kind == "tokens" or per_step:
        raise ValueError(
            "model=plr_mlp reads one row of numeric features per sample (tables): for token "
            "sequences use model=fasttext, lstm or transformer"
        )
    num_features = math.prod(spec.shape)
    layers: list[nn.Module] = [PeriodicEmbedding(num_features, frequencies, sigma, embed_dim)]
    features = num_features * embed_dim
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU(), nn.Dropout(dropout)]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, num_classes))


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
