"""Sequence models over tokens, feature sequences or image rows: recurrent nets (rnn, lstm, gru),
a Transformer encoder classifier (transformer) and a GPT-style causal decoder (gpt)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from dlpipe.models.layers import pre_norm_encoder
from dlpipe.models.registry import InputSpec, register


class SequenceInput(nn.Module):
    """Any input kind as a sequence of `dim`-vectors: token ids (B, L) -> embeddings (B, L, dim)
    plus a padding mask (True = real token); features (B, T, F) -> (B, T, dim); images
    (B, C, H, W) -> one step per row (B, H, dim). The mask is None when nothing is padded."""

    def __init__(self, spec: InputSpec, dim: int):
        super().__init__()
        self.kind, self.pad_id = spec.kind, spec.pad_id
        if spec.kind == "tokens":
            self.embed = nn.Embedding(spec.vocab_size, dim)
        else:
            shape = spec.shape
            features = shape[-1] if spec.kind == "features" else math.prod(shape[1:])
            if spec.kind == "features" and len(shape) != 2:
                raise ValueError(f"sequence models need (time, feature) inputs, got {shape}")
            self.embed = nn.Linear(features, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind == "tokens":
            return self.embed(x), (x != self.pad_id)
        if self.kind == "image":  # (B, C, H, W) -> (B, H, C*W)
            x = x.permute(0, 2, 1, 3).flatten(2)
        return self.embed(x), None

    @staticmethod
    def steps(spec: InputSpec) -> int:
        return spec.shape[0]


class Recurrent(nn.Module):
    """Elman RNN, LSTM or GRU over the input sequence (cuDNN's fused kernels on a GPU).

    Classification reads the final hidden state of the last layer (both directions). Padded
    batches are packed, so each sequence stops at its own length and padding never changes the
    result. `per_step` (language modeling) predicts from every position; it must be causal, so
    it refuses `bidirectional`."""

    CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}

    def __init__(
        self,
        spec: InputSpec,
        num_classes: int,
        per_step: bool,
        *,
        cell: str,
        hidden_size: int,
        num_layers: int,
        bidirectional: bool,
        dropout: float,
        embed_dim: int,
    ):
        super().__init__()
        if per_step and bidirectional:
            raise ValueError(
                f"a bidirectional {cell} sees the future: set model.bidirectional=false for "
                "language modeling"
            )
        self.per_step, self.bidirectional = per_step, bidirectional
        self.input = SequenceInput(spec, embed_dim)
        self.rnn = self.CELLS[cell](
            embed_dim,
            hidden_size,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=bidirectional,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, mask = self.input(x)
        h = self.dropout(h)
        if self.per_step:
            out, _ = self.rnn(h)  # (B, L, H)
            return self.head(self.dropout(out))
        if mask is not None:
            # Lengths go to the host: cuDNN's packed kernels take them there.
            lengths = mask.sum(1).clamp(min=1).cpu()
            h = pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
        _, state = self.rnn(h)
        hidden = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n)
        last = hidden[-2:] if self.bidirectional else hidden[-1:]  # (dirs, B, H)
        return self.head(self.dropout(last.transpose(0, 1).flatten(1)))


def _recurrent(cell: str):
    def build(*, spec: InputSpec, num_classes: int, per_step: bool, **kwargs) -> nn.Module:
        return Recurrent(spec, num_classes, per_step, cell=cell, **kwargs)

    return build


for _cell in Recurrent.CELLS:
    register(_cell)(_recurrent(_cell))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The fixed (length, dim) positional encoding of "Attention Is All You Need"."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(1e4) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


@register("transformer")
class TransformerClassifier(nn.Module):
    """Pre-norm Transformer encoder with sinusoidal positions. Padding is masked out of
    attention and out of the pooling (`mean` over real positions, or a learned `cls` token), so
    padding never changes a classification."""

    def __init__(
        self,
        *,
        spec: InputSpec,
        num_classes: int,
        per_step: bool,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        pooling: str,
    ):
        super().__init__()
        if per_step:
            raise ValueError(
                "model=transformer is a bidirectional encoder, it sees the future: use "
                "model=gpt (causal) for language modeling"
            )
        if pooling not in ("mean", "cls"):
            raise ValueError(f"model.pooling={pooling!r}: choose mean or cls")
        self.pooling = pooling
        self.input = SequenceInput(spec, d_model)
        steps = SequenceInput.steps(spec) + (pooling == "cls")
        self.register_buffer("positions", sinusoidal_positions(steps, d_model), persistent=False)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if pooling == "cls" else None
        self.encoder = pre_norm_encoder(d_model, nhead, dim_feedforward, dropout, num_layers)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, mask = self.input(x)  # (B, L, D), (B, L) or None
        if self.cls is not None:
            h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1)
            if mask is not None:
                mask = F.pad(mask, (1, 0), value=True)
        h = self.dropout(h + self.positions[: h.shape[1]])
        h = self.norm(self.encoder(h, src_key_padding_mask=None if mask is None else ~mask))
        if self.cls is not None:
            pooled = h[:, 0]
        elif mask is None:
            pooled = h.mean(1)
        else:
            weights = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, bias: bool):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # Flash / memory-efficient attention where the device has it; is_causal masks the future.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj_dropout(self.proj(y.transpose(1, 2).reshape(batch, length, dim)))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, bias: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, bias=bias)
        self.attn = CausalSelfAttention(dim, heads, dropout, bias)
        self.ln2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim, bias=bias),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


@register("gpt")
class GPT(nn.Module):
    """GPT-style causal decoder (pre-norm blocks, learned positions, tied input/output
    embeddings): position t's logits depend only on tokens 0..t. `spec.shape[0]` is the
    context length (block size)."""

    def __init__(
        self,
        *,
        spec: InputSpec,
        num_classes: int,
        per_step: bool,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float,
        bias: bool,
    ):
        super().__init__()
        if not per_step:
            raise ValueError("model=gpt predicts every next token: use it with task=language_model")
        if spec.kind != "tokens":
            raise ValueError(f"model=gpt takes token ids, not {spec.kind} inputs")
        if n_embd % n_head:
            raise ValueError(f"model.n_embd={n_embd} must be divisible by model.n_head={n_head}")
        self.block_size = spec.shape[0]
        self.tokens = nn.Embedding(spec.vocab_size, n_embd)
        self.positions = nn.Embedding(self.block_size, n_embd)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(n_embd, n_head, dropout, bias) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, num_classes, bias=False)
        if num_classes == spec.vocab_size:
            self.head.weight = self.tokens.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scaled init of residual projections
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.block_size:
            raise ValueError(
                f"sequence of {length} tokens exceeds the context of {self.block_size}"
            )
        positions = torch.arange(length, device=x.device)
        h = self.dropout(self.tokens(x) + self.positions(positions))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))
