"""Encoder-decoder networks for translation (task=translator): a pre-norm Transformer
(seq2seq_transformer; Vaswani et al. 2017 with pre-norm as in Xiong et al. 2020) and a recurrent
encoder-decoder with attention (seq2seq_rnn; a bidirectional GRU/LSTM encoder and Luong et al.
2015's "general" attention), plus greedy and beam-search decoding for both.

Both share one interface, which the decoders and the task use:
  `encode(src (B, S)) -> state`, a tuple of batch-first tensors (memory, source mask, ...);
  `decode(tgt (B, T), state) -> logits (B, T, V)`, position t seeing target tokens 0..t only;
  `forward(src, tgt) = decode(tgt, encode(src))` (teacher forcing);
  `start(state) -> (state, cache)` and `step(token (B,), position, state, cache) -> (logits
  (B, V), cache)`: the same logits one position at a time, the cache carrying what earlier
  positions computed (a Transformer's self-attention keys and values, an RNN's hidden state),
  so decoding T tokens costs O(T) decoder passes of one position instead of O(T^2). Cache
  tensors are batch-first, so a beam search reorders them by indexing dimension 0.
Source and target share one vocabulary (the joint subword tokenizer) and one embedding, which
the output layer reuses (tied weights, Press & Wolf 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dlpipe.models.registry import InputSpec, register
from dlpipe.models.sequence import sinusoidal_positions

MAX_POSITIONS = 1024  # longest source or target a Transformer takes (sinusoidal table size)


def _check_tokens(spec: InputSpec, name: str) -> None:
    if spec.kind != "tokens" or not spec.vocab_size:
        raise ValueError(
            f"model={name} translates token ids (data.format=parallel_text, task=translator), "
            f"not {spec.kind} inputs"
        )


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention (flash / memory-efficient
    kernels where the device has them). `mask` (B, 1 or Tq, Tk) is True where a query may look."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attend(x, *self.keys_values(memory), mask)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, Tk, d) of `memory` (B, Tk, D)."""
        batch, _, dim = memory.shape
        k, v = self.kv(memory).view(batch, -1, 2, self.heads, dim // self.heads).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def attend(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Queries from `x` (B, Tq, D) over keys/values (B, H, Tk, d) -> (B, Tq, D)."""
        batch, length, dim = x.shape
        q = self.q(x).view(batch, length, self.heads, -1).transpose(1, 2)  # (B, H, Tq, d)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask[:, None],  # (B, 1, Tq or 1, Tk): the same for every head
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.ln2, self.ff = nn.LayerNorm(dim), FeedForward(dim, hidden, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.dropout(self.attn(h, h, mask))
        return x + self.dropout(self.ff(self.ln2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.ln1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.ln2, self.cross_attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.ln3, self.ff = nn.LayerNorm(dim), FeedForward(dim, hidden, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, self_mask: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor
    ) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.dropout(self.self_attn(h, h, self_mask))
        x = x + self.dropout(self.cross_attn(self.ln2(x), memory, src_mask))
        return x + self.dropout(self.ff(self.ln3(x)))

    def step(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        self_mask: torch.Tensor,
        cross: tuple[torch.Tensor, torch.Tensor],
        src_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` for one new position x (B, 1, D), given the earlier positions' self-attention
        keys/values (B, H, t, d), the mask (B, 1, t+1) of keys up to and including this one, and
        the cross-attention keys/values of the memory; returns (y, keys, values) with this
        position's keys/values appended."""
        h = self.ln1(x)
        k, v = self.self_attn.keys_values(h)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        x = x + self.dropout(self.self_attn.attend(h, keys, values, self_mask))
        x = x + self.dropout(self.cross_attn.attend(self.ln2(x), *cross, src_mask))
        return x + self.dropout(self.ff(self.ln3(x))), keys, values


@register("seq2seq_transformer", generative=True)
class Seq2SeqTransformer(nn.Module):
    """Pre-norm Transformer encoder-decoder with sinusoidal positions and one embedding shared by
    source, target and output layer. Padding is masked out of every attention (source keys in
    the encoder and in cross-attention, target keys in the decoder), and the decoder's
    self-attention is causal, so position t's logits depend on target tokens 0..t only and
    padding never changes a translation."""

    def __init__(
        self,
        *,
        spec: InputSpec,
        d_model: int,
        nhead: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        dim_feedforward: int,
        dropout: float,
    ):
        super().__init__()
        _check_tokens(spec, "seq2seq_transformer")
        if d_model % nhead:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.nhead={nhead}")
        self.pad_id, self.scale = spec.pad_id, math.sqrt(d_model)
        self.embed = nn.Embedding(spec.vocab_size, d_model)
        nn.init.normal_(self.embed.weight, 0.0, d_model**-0.5)  # x sqrt(d): unit-variance input
        self.register_buffer(
            "positions", sinusoidal_positions(MAX_POSITIONS, d_model), persistent=False
        )
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(
            EncoderLayer(d_model, nhead, dim_feedforward, dropout)
            for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward, dropout)
            for _ in range(num_decoder_layers)
        )
        self.enc_norm, self.dec_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > MAX_POSITIONS:
            raise ValueError(f"{ids.shape[1]} tokens exceed the {MAX_POSITIONS} positions")
        return self.dropout(self.embed(ids) * self.scale + self.positions[: ids.shape[1]])

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory (B, S, D), source mask (B, 1, S), True = real token)."""
        mask = (src != self.pad_id)[:, None, :]
        h = self._embed(src)
        for layer in self.encoder:
            h = layer(h, mask)
        return self.enc_norm(h), mask

    def decode(self, tgt: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        memory, src_mask = state
        length = tgt.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=tgt.device).tril()
        # (B, T, T): causal and not padding; the diagonal of a real query is always allowed,
        # and [BOS] at 0 is real, so no row is empty (an empty row would give NaN).
        self_mask = causal & (tgt != self.pad_id)[:, None, :]
        h = self._embed(tgt)
        for layer in self.decoder:
            h = layer(h, self_mask, memory, src_mask)
        return self.dec_norm(h) @ self.embed.weight.T  # (B, T, V), tied output layer

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt, self.encode(src))

    def start(self, state: tuple[torch.Tensor, ...]) -> tuple[tuple, tuple]:
        """State plus every decoder layer's cross-attention keys and values of the memory
        (computed once per sentence); an empty cache: the real-key mask (B, 0) and each
        layer's self-attention keys and values (B, H, 0, d)."""
        memory, src_mask = state
        cross = [t for layer in self.decoder for t in layer.cross_attn.keys_values(memory)]
        batch, heads = len(memory), self.decoder[0].self_attn.heads
        empty = memory.new_zeros(batch, heads, 0, memory.shape[-1] // heads)
        keep = torch.zeros(batch, 0, dtype=torch.bool, device=memory.device)
        return (memory, src_mask, *cross), (keep, *[empty] * (2 * len(self.decoder)))

    def step(
        self, token: torch.Tensor, position: int, state: tuple, cache: tuple
    ) -> tuple[torch.Tensor, tuple]:
        """Logits (B, V) of the position after `token` (B,), which stands at `position`: what
        `decode` gives at that position, with padding keys masked the same way."""
        _, src_mask, *cross = state
        keep, *kv = cache
        keep = torch.cat([keep, (token != self.pad_id)[:, None]], 1)  # (B, t+1)
        if position >= MAX_POSITIONS:
            raise ValueError(f"{position + 1} tokens exceed the {MAX_POSITIONS} positions")
        h = self.dropout(self.embed(token[:, None]) * self.scale + self.positions[position])
        new_kv = []
        for i, layer in enumerate(self.decoder):
            h, keys, values = layer.step(
                h, kv[2 * i], kv[2 * i + 1], keep[:, None, :], tuple(cross[2 * i : 2 * i + 2]),
                src_mask,
            )  # fmt: skip
            new_kv += [keys, values]
        logits = self.dec_norm(h[:, 0]) @ self.embed.weight.T
        return logits, (keep, *new_kv)


@register("seq2seq_rnn", generative=True)
class Seq2SeqRNN(nn.Module):
    """Recurrent encoder-decoder with attention: a bidirectional GRU/LSTM encoder over the
    (packed) source, a unidirectional decoder started from the encoder's final states, and
    Luong "general" attention from each decoder output to the source (padding masked),
    combined as tanh(W [h_t; c_t]) and projected onto the shared, tied embedding."""

    CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}

    def __init__(
        self,
        *,
        spec: InputSpec,
        cell: str,
        embed_dim: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
    ):
        super().__init__()
        _check_tokens(spec, "seq2seq_rnn")
        if cell not in self.CELLS:
            raise ValueError(f"model.cell={cell!r}: choose one of {sorted(self.CELLS)}")
        self.pad_id, self.lstm = spec.pad_id, cell == "lstm"
        rnn_dropout = dropout if num_layers > 1 else 0.0
        self.embed = nn.Embedding(spec.vocab_size, embed_dim, padding_idx=spec.pad_id)
        self.encoder = self.CELLS[cell](
            embed_dim, hidden_size, num_layers, batch_first=True, bidirectional=True,
            dropout=rnn_dropout,
        )  # fmt: skip
        self.bridge = nn.Linear(2 * hidden_size, hidden_size)  # both directions -> decoder init
        self.decoder = self.CELLS[cell](
            embed_dim, hidden_size, num_layers, batch_first=True, dropout=rnn_dropout
        )
        self.keys = nn.Linear(2 * hidden_size, hidden_size, bias=False)  # Luong "general"
        self.combine = nn.Linear(hidden_size + 2 * hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def _bridge(self, final: torch.Tensor) -> torch.Tensor:
        # (2 * layers, B, H) -> (B, layers, H): each layer's forward and backward states joined
        both = final.view(-1, 2, *final.shape[1:]).permute(2, 0, 1, 3).flatten(2)
        return torch.tanh(self.bridge(both))

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(memory (B, S, 2H), attention keys (B, S, H), source mask (B, S), initial decoder
        state (B, layers, H), and for an LSTM its cell state (B, layers, H))."""
        mask = src != self.pad_id
        lengths = mask.sum(1).clamp(min=1).cpu()  # packed kernels take lengths on the host
        packed = pack_padded_sequence(
            self.dropout(self.embed(src)), lengths, batch_first=True, enforce_sorted=False
        )
        out, final = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        finals = final if self.lstm else (final,)
        return (memory, self.keys(memory), mask, *(self._bridge(f) for f in finals))

    def decode(self, tgt: torch.Tensor, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        _, _, _, *init = state
        out, _ = self._run_decoder(tgt, init)
        return self._logits(out, state)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt, self.encode(src))

    def start(self, state: tuple[torch.Tensor, ...]) -> tuple[tuple, tuple]:
        """The state as it is; the cache: the decoder's initial state(s) (B, layers, H)."""
        return state, tuple(state[3:])

    def step(
        self, token: torch.Tensor, position: int, state: tuple, cache: tuple
    ) -> tuple[torch.Tensor, tuple]:
        """Logits (B, V) of the position after `token` (B,), and the decoder's new state."""
        out, final = self._run_decoder(token[:, None], cache)
        return self._logits(out, state)[:, 0], final

    def _run_decoder(
        self, tgt: torch.Tensor, hidden: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple]:
        """Decoder outputs (B, T, H) from its state(s) (B, layers, H), and the final state(s)."""
        hidden = tuple(s.transpose(0, 1).contiguous() for s in hidden)  # (layers, B, H)
        out, final = self.decoder(self.dropout(self.embed(tgt)), hidden if self.lstm else hidden[0])
        final = final if self.lstm else (final,)
        return out, tuple(s.transpose(0, 1) for s in final)

    def _logits(self, out: torch.Tensor, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        memory, keys, mask, *_ = state
        scores = out @ keys.transpose(1, 2)  # (B, T, S)
        weights = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
        context = weights @ memory  # (B, T, 2H)
        h = torch.tanh(self.combine(torch.cat([out, context], -1)))
        return self.out(self.dropout(h)) @ self.embed.weight.T  # (B, T, V), tied output layer


# --- decoding -------------------------------------------------------------------------------


def _max_steps(src: torch.Tensor, pad_id: int, max_len: int) -> int:
    # A translation rarely runs past twice its source: the cap spares runaway decodes.
    return min(max_len, 2 * int((src != pad_id).sum(1).max()) + 10)


@torch.inference_mode()
def greedy_decode(
    net: nn.Module, src: torch.Tensor, bos_id: int, eos_id: int, pad_id: int, max_len: int
) -> torch.Tensor:
    """The most likely next token at each step, for source ids (B, S); returns generated ids
    (B, T) without [BOS], [EOS] included where reached, padded after it. At most
    min(max_len, 2 x longest source + 10) tokens."""
    state, cache = net.start(net.encode(src))
    ys = torch.full((len(src), 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
    for position in range(_max_steps(src, pad_id, max_len)):
        logits, cache = net.step(ys[:, -1], position, state, cache)
        next_id = logits.argmax(-1).masked_fill(done, pad_id)
        ys = torch.cat([ys, next_id[:, None]], 1)
        done |= next_id == eos_id
        if done.all():
            break
    return ys[:, 1:]


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT's length normalization ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, eq. 14): a beam's
    log-probability is divided by it, so alpha > 0 favours longer translations; 0 = none."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.inference_mode()
def beam_search(
    net: nn.Module,
    src: torch.Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len: int,
    beam_size: int,
    alpha: float,
) -> torch.Tensor:
    """Beam search for source ids (B, S): `beam_size` hypotheses per sentence, extended by
    their summed log-probabilities; a finished hypothesis (one that emitted [EOS]) keeps its
    score and slot. The answer is the beam with the best score / length_penalty(length, alpha).
    Returns generated ids (B, T) as greedy_decode does; beam_size=1 is greedy decoding."""
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be >= 1")
    batch, k, device = len(src), beam_size, src.device
    # (B*k, ...); the beams of one sentence share its state rows, so only the cache is reordered
    state, cache = net.start(tuple(s.repeat_interleave(k, 0) for s in net.encode(src)))
    ys = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start equal: keep one, or the top k would be k copies
    lengths = torch.zeros(batch * k, device=device)
    done = torch.zeros(batch * k, dtype=torch.bool, device=device)
    offsets = (torch.arange(batch, device=device) * k)[:, None]  # (B, 1)
    for position in range(_max_steps(src, pad_id, max_len)):
        logits, cache = net.step(ys[:, -1], position, state, cache)
        logp = logits.float().log_softmax(-1)  # (B*k, V)
        vocab = logp.shape[-1]
        # A finished beam continues with padding at no cost, and with nothing else.
        logp[done] = float("-inf")
        logp[done, pad_id] = 0.0
        total = (scores.view(-1, 1) + logp).view(batch, k * vocab)
        scores, flat = total.topk(k, dim=1)  # (B, k)
        origin = (flat // vocab + offsets).view(-1)  # the beam each new one extends
        token = (flat % vocab).view(-1)
        ys = torch.cat([ys[origin], token[:, None]], 1)
        was_done = done[origin]
        lengths = lengths[origin] + (~was_done).float()
        done = was_done | (token == eos_id)
        cache = tuple(c[origin] for c in cache)
        if done.all():
            break
    normalized = scores / length_penalty(lengths.view(batch, k), alpha)
    best = normalized.argmax(1) + offsets[:, 0]
    return ys[best, 1:]


def translate_ids(
    net: nn.Module,
    src: torch.Tensor,
    ids: dict[str, int],
    max_len: int,
    beam_size: int = 1,
    alpha: float = 0.0,
    batch_size: int = 128,
) -> list[list[int]]:
    """Generated ids of every source row (N, S), decoded in batches of similar length (less
    padding, earlier stops); beam_size 1 = greedy. `ids` holds bos_id, eos_id and pad_id.
    Rows come back in the order given, each cut after its [EOS]."""
    net.eval()
    lengths = (src != ids["pad_id"]).sum(1)
    order = torch.argsort(lengths, stable=True)
    out: list[list[int]] = [[] for _ in range(len(src))]
    for chunk in order.split(batch_size):
        batch = src[chunk, : max(int(lengths[chunk].max()), 1)]
        special = (ids["bos_id"], ids["eos_id"], ids["pad_id"], max_len)
        if beam_size == 1:
            generated = greedy_decode(net, batch, *special)
        else:
            generated = beam_search(net, batch, *special, beam_size, alpha)
        for i, row in zip(chunk.tolist(), generated.tolist(), strict=True):
            out[i] = row[: row.index(ids["eos_id"]) + 1] if ids["eos_id"] in row else row
    return out
