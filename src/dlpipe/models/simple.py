"""Feed-forward networks: a multilayer perceptron (mlp), a convolutional classifier (cnn), a
fastText-style bag of word n-grams for text (fasttext), and the small CNN whose features the
Fréchet distance is measured in (`FeatureNet`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dlpipe.models.layers import Unsqueeze, activation_layer, norm_layer
from dlpipe.models.registry import InputSpec, register


@register("mlp")
def mlp(
    *,
    spec: InputSpec,
    num_classes: int,
    per_step: bool,
    width: int,
    depth: int,
    activation: str,
    norm: str,
    dropout: float,
) -> nn.Module:
    _check(spec, per_step, "mlp", kinds=("image", "features"))
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(spec.shape)
    for _ in range(depth):
        layers += [
            nn.Linear(features, width, bias=norm == "none"),
            norm_layer(norm, width, conv=False),
            activation_layer(activation),
            nn.Dropout(dropout),
        ]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


@register("cnn")
def cnn(
    *,
    spec: InputSpec,
    num_classes: int,
    per_step: bool,
    width: int,
    depth: int,
    convs_per_stage: int,
    activation: str,
    norm: str,
    dropout: float,
) -> nn.Module:
    _check(spec, per_step, "cnn", kinds=("image", "features"))
    if spec.kind == "features" and len(spec.shape) != 2:
        raise ValueError(f"cnn needs 2-D features per sample (time, feature), got {spec.shape}")
    channels = spec.shape[2] if spec.kind == "image" and len(spec.shape) == 3 else 1
    # Features (B, T, F) are a one-channel image (B, 1, T, F), e.g. a spectrogram.
    layers: list[nn.Module] = [] if spec.kind == "image" else [Unsqueeze(1)]
    for stage in range(depth):
        out = width * 2**stage
        for _ in range(convs_per_stage):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=norm == "none"),
                norm_layer(norm, out, conv=True),
                activation_layer(activation),
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


@register("fasttext")
class FastText(nn.Module):
    """A fastText-style text classifier (Joulin et al. 2017, "Bag of Tricks for Efficient Text
    Classification"): token ids (B, L) -> the mean embedding of the text's words and of its
    hashed word n-grams (2..`word_ngrams`, `buckets` shared rows; nn.EmbeddingBag) -> one
    hidden layer -> (B, num_classes) logits. Order-free but for the n-grams, so it trains in
    seconds on a CPU and does well on small data. Padding (`pad_id`) is left out of the mean,
    so it never changes a prediction. Tokens are whole words (the text format's tokenizer),
    so the n-grams are word n-grams; fastText's character n-grams of unknown words would need
    the raw strings, which a word-level [UNK] has lost."""

    PRIME = 1_000_003  # n-gram hash: ((a * PRIME + b) mod buckets * PRIME + c) mod buckets

    def __init__(
        self,
        *,
        spec: InputSpec,
        num_classes: int,
        per_step: bool,
        embed_dim: int,
        hidden_size: int,
        word_ngrams: int,
        buckets: int,
        dropout: float,
    ):
        super().__init__()
        _check(spec, per_step, "fasttext", kinds=("tokens",))
        self.vocab_size, self.pad_id = spec.vocab_size, spec.pad_id
        self.word_ngrams, self.buckets = word_ngrams, buckets
        rows = spec.vocab_size + (buckets if word_ngrams > 1 else 0)
        self.embed = nn.EmbeddingBag(rows, embed_dim, mode="mean", padding_idx=spec.pad_id)
        self.head = nn.Sequential(
            nn.Linear(embed_dim, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_classes),
        )

    def ngram_ids(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L + (L-1) + ... ) ids of the words and their n-grams; an
        n-gram touching padding is padding."""
        x = x.long()
        real = x != self.pad_id
        bags, code = [x], x
        for n in range(2, self.word_ngrams + 1):
            # (B, L-n+1); reduced each step so the int64 code never overflows
            code = torch.remainder(code[:, :-1], self.buckets) * self.PRIME + x[:, n - 1 :]
            ok = real[:, : x.shape[1] - n + 1] & real[:, n - 1 :]
            ids = self.vocab_size + torch.remainder(code, self.buckets)
            bags.append(torch.where(ok, ids, torch.full_like(ids, self.pad_id)))
        return torch.cat(bags, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.ngram_ids(x)))


def _check(spec: InputSpec, per_step: bool, name: str, kinds: Sequence[str]) -> None:
    if spec.kind not in kinds:
        raise ValueError(
            f"model={name} does not take {spec.kind} inputs (it takes {', '.join(kinds)}): "
            "for token sequences use model=lstm, gru, rnn, transformer or gpt"
        )
    if per_step:
        raise ValueError(
            f"model={name} makes one prediction per sample, not per position: for language "
            "modeling use model=gpt or model=lstm"
        )


# Not registered: FeatureNet is not a `model=` choice but the measuring instrument of task=gan
# (dlpipe.fid trains and caches it from task.feature_net). Registered, it would be offered as a
# model to train and the registry <-> conf/model/ check would ask for a conf file it has no use for.
class FeatureNet(nn.Module):
    """uint8 images (B, H, W[, C]) -> logits; `features` is the penultimate layer (B, features).

    Two stages of conv3x3 -> ReLU -> 2x2 max-pool, then a ReLU dense layer (the features) and a
    linear classifier head."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int],
        features: int,
    ):
        super().__init__()
        height, width, *rest = input_shape
        layers: list[nn.Module] = []
        c_in = rest[0] if rest else 1
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, height, width = c_out, height // 2, width // 2
        self.body = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(c_in * height * width, features), nn.ReLU()
        )
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (B, C, H, W)
        return self.body(x.float() / 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
