"""The MLflow pyfunc that ships a CTC transcriber: waveforms of any length in, the digit string
and its confidence out. `transcribe` (greedy or beam-search CTC decoding) is also what
validation and evaluation use, so the served strings are decoded exactly as the reports say.

Beam search is flashlight-text's lexicon-free CTC decoder (the decoder torchaudio's
`ctc_decoder` wraps; torchaudio itself does not import beside the CPU torch build, and
pyctcdecode pins numpy < 2), with no language model and hypotheses of one string merged by
log-add, so a beam's score approximates log P(string | audio) summed over its alignments."""

from __future__ import annotations

import functools
from typing import Any

import mlflow.models
import numpy as np
import pandas as pd
import torch
from flashlight.lib.text.decoder import (
    CriterionType,
    LexiconFreeDecoder,
    LexiconFreeDecoderOptions,
    ZeroLM,
)
from torch import nn

from dlpipe.models.acoustic import frame_logits
from dlpipe.serving import AdaptedModel, input_contract

BLANK = 0  # CTC blank index; label k is output k + 1
DECODERS = ("greedy", "beam")
BATCH = 64  # utterances per forward pass when transcribing


def collapse(path: list[int]) -> list[int]:
    """A CTC frame path -> its labels: repeats merged, blanks dropped, outputs shifted to
    label ids (output k + 1 = label k)."""
    labels, previous = [], BLANK
    for token in path:
        if token != previous and token != BLANK:
            labels.append(token - 1)
        previous = token
    return labels


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[tuple[list[int], float]]:
    """Best-path decoding of log-probabilities (B, T, C) with `lengths` (B,) real frames:
    (labels, probability of that best path) per utterance."""
    best, path = log_probs.max(-1)  # (B, T)
    out = []
    for row, n in enumerate(lengths.tolist()):
        out.append((collapse(path[row, :n].tolist()), float(best[row, :n].sum().exp())))
    return out


@functools.cache
def _beam_decoder(beam_size: int, num_classes: int) -> LexiconFreeDecoder:
    options = LexiconFreeDecoderOptions(
        beam_size=beam_size,
        beam_size_token=num_classes,  # every label is tried at every frame
        beam_threshold=50.0,  # hypotheses more than e^50 less likely than the best are pruned
        lm_weight=0.0,
        sil_score=0.0,
        log_add=True,  # one string's alignments merge by summing probabilities
        criterion_type=CriterionType.CTC,
    )
    # No language model, and the blank doubles as the silence token.
    return LexiconFreeDecoder(options, ZeroLM(), BLANK, BLANK, [])


def beam_decode(
    log_probs: torch.Tensor, lengths: torch.Tensor, beam_size: int
) -> list[tuple[list[int], float]]:
    """CTC prefix beam search over log-probabilities (B, T, C): (labels, approximate
    P(labels | audio)) of the best beam per utterance."""
    decoder = _beam_decoder(beam_size, log_probs.shape[-1])
    out = []
    for row, n in enumerate(lengths.tolist()):
        # The decoder reads the emissions through a raw pointer: float32, contiguous, on the CPU.
        emissions = log_probs[row, :n].float().cpu().contiguous()
        best = decoder.decode(emissions.data_ptr(), n, emissions.shape[1])[0]
        out.append((collapse(best.tokens), float(np.exp(best.score))))
    return out


@torch.inference_mode()
def transcribe(
    net: nn.Module,
    x: torch.Tensor,
    lengths: torch.Tensor,
    decoder: str,
    beam_size: int,
    batch_size: int = BATCH,
) -> list[tuple[list[int], float]]:
    """(digits, confidence) of each padded feature sequence x (N, T, n_mels) with `lengths`
    (N,), decoded by `decoder` ("greedy" or "beam"), `batch_size` utterances of similar length
    per forward pass, in input order."""
    if decoder not in DECODERS:
        raise ValueError(f"task.decoder={decoder!r}: choose one of {list(DECODERS)}")
    net.eval()
    device = next(net.parameters()).device
    order = torch.argsort(lengths, stable=True)
    results: list[tuple[list[int], float]] = [([], 0.0)] * len(lengths)
    for chunk in order.split(batch_size):
        width = int(lengths[chunk].max())
        logits, out_lengths = frame_logits(
            net, x[chunk, :width].to(device), lengths[chunk].to(device)
        )
        log_probs = logits.float().log_softmax(-1).cpu()
        out_lengths = out_lengths.cpu()
        if decoder == "greedy":
            decoded = greedy_decode(log_probs, out_lengths)
        else:
            decoded = beam_decode(log_probs, out_lengths, beam_size)
        for i, result in zip(chunk.tolist(), decoded, strict=True):
            results[i] = result
    return results


class TranscriberModel(AdaptedModel):
    """Input: a DataFrame with one column 'waveform', one mono float waveform per row (any
    length, samples in [-1, 1], 8 kHz), as `{"dataframe_records": [{"waveform": [...]}]}` at
    /invocations; the unwrapped model also takes a list of 1-D arrays. Output: one row per
    waveform with `transcript` (the digits heard, e.g. "4072"; "" if none) and `confidence`
    (the decoder's probability of that string given the audio, 0-1)."""

    @input_contract
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        x, lengths = self.adapter(model_input)
        decoded = transcribe(self.net, x, lengths, self.spec["decoder"], self.spec["beam_size"])
        classes = self.spec["classes"]
        return pd.DataFrame(
            {
                "transcript": ["".join(classes[d] for d in digits) for digits, _ in decoded],
                "confidence": [confidence for _, confidence in decoded],
            }
        )


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(TranscriberModel())
