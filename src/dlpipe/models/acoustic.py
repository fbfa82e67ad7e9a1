"""Acoustic models for CTC transcription: feature frames (B, T, n_mels) of any length in,
per-frame logits over blank + labels (B, T', num_classes) out, T' = ceil(T / time_stride).

Both share a convolutional front end (2-D convolutions over time x mel, subsampling time by
`time_stride` and frequency by 2 per layer) and differ in the sequence encoder: `crnn` a
bidirectional LSTM/GRU (Deep Speech 2's layout: Amodei et al. 2016), `conv_transformer` a
Transformer encoder (Dong et al. 2018, "Speech-Transformer"'s conv front end). Padded frames
are masked at every layer, so padding never changes an utterance's output."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dlpipe.models.layers import pre_norm_encoder
from dlpipe.models.registry import InputSpec, register
from dlpipe.models.sequence import sinusoidal_positions


def frame_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) bool, True at the real frames of each sequence."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


class ConvFrontEnd(nn.Module):
    """(B, T, F) -> (B, T', dim): `layers` 3x3 convolutions (batch norm, GELU), each halving
    the mel axis and the first log2(time_stride) also time; then a linear map to `dim`."""

    def __init__(self, n_mels: int, channels: int, layers: int, time_stride: int, dim: int):
        super().__init__()
        halvings = time_stride.bit_length() - 1
        if time_stride != 1 << halvings or halvings > layers:
            raise ValueError(
                f"model.time_stride={time_stride} must be a power of two up to "
                f"2**model.conv_layers={1 << layers}: each convolution halves time at most once"
            )
        self.convs = nn.ModuleList()
        self.strides = [2] * halvings + [1] * (layers - halvings)
        features, in_channels = n_mels, 1
        for stride in self.strides:
            self.convs.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, channels, 3, stride=(stride, 2), padding=1),
                    nn.BatchNorm2d(channels),
                    nn.GELU(),
                )
            )
            features, in_channels = (features - 1) // 2 + 1, channels
        self.proj = nn.Linear(channels * features, dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.unsqueeze(1)  # (B, 1, T, F)
        for conv, stride in zip(self.convs, self.strides, strict=True):
            # Zeroed padding = the convolution's own zero padding: the last real frames see the
            # same neighbours however long the batch is.
            h = h * frame_mask(lengths, h.shape[2])[:, None, :, None]
            h = conv(h)
            lengths = (lengths - 1) // stride + 1
        h = h * frame_mask(lengths, h.shape[2])[:, None, :, None]
        return self.proj(h.permute(0, 2, 1, 3).flatten(2)), lengths  # (B, T', dim)


UTTERANCE_NORMS = ("none", "mean", "mean_var")


def utterance_normalize(x: torch.Tensor, lengths: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-utterance normalization of feature frames x (B, T, F) over each utterance's real
    frames (lengths (B,)), per feature: "mean" subtracts the utterance's mean (cepstral mean
    normalization, Atal 1974, here of log-mel bands: a fixed channel or vocal-tract gain is an
    offset in the log domain), "mean_var" also divides by its standard deviation (CMVN, Viikki &
    Laurila 1998), "none" returns x. Padded frames come out zero. Raises ValueError for another
    `kind`."""
    if kind == "none":
        return x
    if kind not in UTTERANCE_NORMS:
        raise ValueError(f"model.utterance_norm={kind!r}: choose one of {UTTERANCE_NORMS}")
    mask = frame_mask(lengths, x.shape[1])[:, :, None].to(x.dtype)  # (B, T, 1)
    count = mask.sum(1, keepdim=True).clamp(min=1.0)  # (B, 1, 1)
    mean = (x * mask).sum(1, keepdim=True) / count
    x = (x - mean) * mask
    if kind == "mean_var":
        std = ((x * x).sum(1, keepdim=True) / count).sqrt()
        x = x / std.clamp(min=1e-3)
    return x


class CTCModel(nn.Module):
    """Base of the acoustic models: checks that it is used per frame, with features, and
    normalizes each utterance's features first (`utterance_norm`, see `utterance_normalize`)."""

    def __init__(self, spec: InputSpec, per_step: bool, name: str, utterance_norm: str = "none"):
        super().__init__()
        if utterance_norm not in UTTERANCE_NORMS:
            raise ValueError(
                f"model.utterance_norm={utterance_norm!r}: choose one of {UTTERANCE_NORMS}"
            )
        self.utterance_norm = utterance_norm
        if not per_step:
            raise ValueError(
                f"model={name} emits a label distribution per frame for CTC: use it with "
                "task=transcriber"
            )
        if spec.kind != "features" or len(spec.shape) != 2:
            raise ValueError(
                f"model={name} takes (frames, n_mels) feature sequences, not {spec.kind} "
                f"inputs of shape {spec.shape}"
            )

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, F), lengths (B,) real frames (None: all T) -> (logits (B, T', C),
        output lengths (B,))."""
        if lengths is None:
            lengths = torch.full((len(x),), x.shape[1], dtype=torch.int64, device=x.device)
        x = utterance_normalize(x, lengths, self.utterance_norm)
        h, lengths = self.front(x, lengths)
        return self.head(self.dropout(self.encode(self.dropout(h), lengths))), lengths


@register("crnn")
class CRNN(CTCModel):
    """Conv front end + bidirectional LSTM or GRU (packed: each utterance stops at its length)."""

    def __init__(
        self,
        *,
        spec: InputSpec,
        num_classes: int,
        per_step: bool,
        channels: int,
        conv_layers: int,
        time_stride: int,
        cell: str,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        utterance_norm: str = "none",
    ):
        super().__init__(spec, per_step, "crnn", utterance_norm)
        if cell not in ("lstm", "gru"):
            raise ValueError(f"model.cell={cell!r}: choose lstm or gru")
        self.front = ConvFrontEnd(spec.shape[-1], channels, conv_layers, time_stride, hidden_size)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(
            hidden_size,
            hidden_size,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=True,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden_size, num_classes)

    def encode(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = h.shape[1]
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=steps)[0]


@register("conv_transformer")
class ConvTransformer(CTCModel):
    """Conv front end + pre-norm Transformer encoder (sinusoidal positions, padding masked out
    of attention)."""

    def __init__(
        self,
        *,
        spec: InputSpec,
        num_classes: int,
        per_step: bool,
        channels: int,
        conv_layers: int,
        time_stride: int,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        utterance_norm: str = "none",
    ):
        super().__init__(spec, per_step, "conv_transformer", utterance_norm)
        self.front = ConvFrontEnd(spec.shape[-1], channels, conv_layers, time_stride, d_model)
        self.encoder = pre_norm_encoder(d_model, nhead, dim_feedforward, dropout, num_layers)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_classes)

    def encode(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = sinusoidal_positions(h.shape[1], h.shape[2]).to(h.device, h.dtype)
        mask = frame_mask(lengths, h.shape[1])
        return self.norm(self.encoder(h + positions, src_key_padding_mask=~mask))


def frame_logits(
    net: nn.Module, x: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T', C), output lengths (B,)) of a registered acoustic model as
    `create_model` builds it (its input standardization, then the model): the standardization
    is per frame, so it takes the padded batch as it is, and the model gets the lengths."""
    standardize, body = net
    return body(standardize(x), lengths)
