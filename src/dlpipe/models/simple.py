"""Feed-forward networks: a multilayer perceptron (mlp), a convolutional classifier (cnn), a
fastText-style bag of word n-grams for text (fasttext), and the small CNN whose features the
Fréchet distance is measured in (`FeatureNet`)."""

from __future__ import annotations

import math
import zlib
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
    Classification"; Bojanowski et al. 2017, "Enriching Word Vectors with Subword Information"):
    token ids (B, L) -> the mean embedding of the text's words, of its hashed word n-grams
    (2..`word_ngrams`) and of the hashed character n-grams (`char_ngram_min`..`char_ngram_max`
    characters of "<word>") of each word (nn.EmbeddingBag; word and character n-grams share
    `buckets` rows) -> `depth` hidden layers (ReLU, dropout) -> (B, num_classes) logits.

    `word_dropout` (Iyyer et al. 2015, "Deep Unordered Composition Rivals Syntactic Methods
    for Text Classification", the DAN's word dropout): in training, each word of a text is left
    out of its bag with this probability, with its character n-grams and every word n-gram
    touching it, so the network cannot lean on a few strong words; off (identity) in eval mode.

    Order-free but for the word n-grams, so it trains in seconds on a CPU and does well on small
    data; the character n-grams let related words ("bored", "boring") share what they learn.
    They are hashed once per vocabulary word (`spec.vocab`, the token strings the text format
    stores), so a word the training split never saw is [UNK] and has none. Padding (`pad_id`)
    is left out of the mean, so it never changes a prediction.

    Raises ValueError for non-token inputs, per-step prediction, or character n-grams without
    the vocabulary's strings (data formats other than text_table)."""

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
        char_ngram_min: int,
        char_ngram_max: int,
        buckets: int,
        dropout: float,
        word_dropout: float = 0.0,
        depth: int = 1,
    ):
        super().__init__()
        _check(spec, per_step, "fasttext", kinds=("tokens",))
        if not 0.0 <= word_dropout < 1.0:
            raise ValueError(f"model.word_dropout={word_dropout} must be in [0, 1)")
        self.word_dropout = word_dropout
        self.vocab_size, self.pad_id = spec.vocab_size, spec.pad_id
        self.word_ngrams, self.buckets = word_ngrams, buckets
        chars = char_ngram_max > 0
        if chars and not spec.vocab:
            raise ValueError(
                "model=fasttext with character n-grams needs the vocabulary's words (the "
                "text_table format stores them): set model.char_ngram_max=0 for these tokens"
            )
        if chars and not 1 <= char_ngram_min <= char_ngram_max:
            raise ValueError(
                f"model.char_ngram_min={char_ngram_min} must be in 1..char_ngram_max"
                f"={char_ngram_max}"
            )
        # (vocab_size, K) row ids of each word's character n-grams, padded with pad_id; derived
        # from the vocabulary (rebuilt from it, never saved in a checkpoint).
        subwords = char_ngram_ids(
            spec.vocab if chars else (), char_ngram_min, char_ngram_max, buckets
        )
        subwords = torch.where(subwords >= 0, spec.vocab_size + subwords, spec.pad_id)
        self.register_buffer("subwords", subwords, persistent=False)
        rows = spec.vocab_size + (buckets if chars or word_ngrams > 1 else 0)
        self.embed = nn.EmbeddingBag(rows, embed_dim, mode="mean", padding_idx=spec.pad_id)
        # fastText's initialization, U(-1/dim, 1/dim), not N(0, 1): a word n-gram or character
        # n-gram bucket no training text filled stays near zero, instead of adding noise to
        # the mean of every test text that hashes into it.
        nn.init.uniform_(self.embed.weight, -1 / embed_dim, 1 / embed_dim)
        if depth < 1:
            raise ValueError(f"model.depth={depth} must be at least 1 (hidden layers)")
        widths = [embed_dim] + [hidden_size] * depth
        hidden = [
            layer
            for n_in in widths[:-1]
            for layer in (nn.Linear(n_in, hidden_size), nn.ReLU(), nn.Dropout(dropout))
        ]
        self.head = nn.Sequential(*hidden, nn.Linear(hidden_size, num_classes))

    def ngram_ids(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L + (L-1) + ... + L*K) ids of the words, their word n-grams
        and their character n-grams; an n-gram touching padding is padding."""
        x = x.long()
        real = x != self.pad_id
        bags, code = [x], x
        for n in range(2, self.word_ngrams + 1):
            # (B, L-n+1); reduced each step so the int64 code never overflows
            code = torch.remainder(code[:, :-1], self.buckets) * self.PRIME + x[:, n - 1 :]
            ok = real[:, : x.shape[1] - n + 1] & real[:, n - 1 :]
            ids = self.vocab_size + torch.remainder(code, self.buckets)
            bags.append(torch.where(ok, ids, torch.full_like(ids, self.pad_id)))
        if self.subwords.shape[1]:
            bags.append(self.subwords[x].flatten(1))  # (B, L * K); padding's row is all padding
        return torch.cat(bags, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.word_dropout > 0:
            # A dropped word becomes padding, so ngram_ids leaves out its n-grams too.
            dropped = torch.rand(x.shape, device=x.device) < self.word_dropout
            x = x.masked_fill(dropped, self.pad_id)
        return self.head(self.embed(self.ngram_ids(x)))


def char_ngram_ids(words: Sequence[str], low: int, high: int, buckets: int) -> torch.Tensor:
    """(len(words), K) int64: bucket ids 0..buckets-1 of the character `low`..`high`-grams of
    "<" + word + ">" (fastText's boundary marks), hashed with CRC-32 (the same in every
    process, unlike Python's salted hash()), right-padded with -1; K is the most any word
    has. Special tokens ("[PAD]", "[UNK]", ...) get none. Empty `words` give (0, 0)."""
    grams = [
        []
        if word.startswith("[") and word.endswith("]")
        else [
            zlib.crc32(marked[i : i + n].encode()) % buckets
            for n in range(low, high + 1)
            for i in range(len(marked) - n + 1)
        ]
        for word in words
        for marked in ["<" + word + ">"]
    ]
    table = torch.full((len(words), max(map(len, grams), default=0)), -1, dtype=torch.long)
    for row, ids in enumerate(grams):
        table[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return table


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
