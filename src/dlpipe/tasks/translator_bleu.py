"""Corpus BLEU of the translator (sacrebleu): the score its training logs as val/bleu
(dlpipe.modules.translator, over every DDP rank's translations: `gathered`) and its test report
by source length (dlpipe.tasks.translator)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sacrebleu

# Source sentence lengths (words) of the BLEU-by-length report: [low, high] inclusive.
LENGTH_BUCKETS = ((1, 9), (10, 12), (13, 15), (16, 19), (20, 1000))


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> sacrebleu.metrics.BLEUScore:
    """sacrebleu's corpus BLEU with its defaults (13a tokenization, exponential smoothing,
    case-sensitive) on detokenized text, as the field reports it (Post 2018)."""
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)])


def bleu_by_length(
    sources: Sequence[str],
    hypotheses: Sequence[str],
    references: Sequence[str],
    buckets: Sequence[tuple[int, int]] = LENGTH_BUCKETS,
) -> list[dict[str, Any]]:
    """Corpus BLEU of the model and of copying the source, per bucket of source length in
    whitespace-separated words; buckets without sentences are left out."""
    rows = []
    for low, high in buckets:
        idx = [i for i, s in enumerate(sources) if low <= len(s.split()) <= high]
        if not idx:
            continue
        refs = [references[i] for i in idx]
        rows.append(
            {
                "source_words": f"{low}-{high}" if high < 1000 else f"{low}+",
                "sentences": len(idx),
                "bleu": round(bleu([hypotheses[i] for i in idx], refs).score, 2),
                "baseline_bleu": round(bleu([sources[i] for i in idx], refs).score, 2),
            }
        )
    return rows


def gathered(hypotheses: Mapping[int, list[int]]) -> dict[int, list[int]]:
    """Every process's {validation index: generated token ids}, merged: the same dict on every
    rank (`torch.distributed.all_gather_object`); as it is without a process group. Each rank
    must call it. A DistributedSampler pads the shares with repeated sentences: their index
    and ids repeat too, so the merge keeps one of each."""
    import torch.distributed as dist  # on use: scoring BLEU needs no torch

    if not (dist.is_available() and dist.is_initialized()):
        return dict(hypotheses)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(hypotheses))
    return {index: ids for part in parts for index, ids in part.items()}
