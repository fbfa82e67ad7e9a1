"""Translation (task=translator): an encoder-decoder trained on parallel text with
label-smoothed cross-entropy over length-bucketed batches, validated every epoch by BLEU of
greedy translations of the validation split (what checkpoints, early stopping and tuning
watch), tested with beam search by BLEU and chrF (sacrebleu, on detokenized text) beside the
copy-the-source baseline, and shipped as a pyfunc that translates sentences."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import sacrebleu
import tokenizers
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric, SumMetric

from dlpipe.datamodule import LengthBuckets, TokenDataModule
from dlpipe.formats.parallel import (
    PAD_ID,
    decode,
    example_input,
    load_texts,
    load_tokenizer,
    serving_files,
)
from dlpipe.models import create_model, load_checkpoint
from dlpipe.models.translation import translate_ids
from dlpipe.optim import configure_optimizers
from dlpipe.serving import log_pyfunc
from dlpipe.serving.translator import SPECIAL_IDS, TRANSLATE_PARAMS, TranslatorModel, translate
from dlpipe.tasks import net_args

# Source sentence lengths (words) of the BLEU-by-length report: [low, high] inclusive.
LENGTH_BUCKETS = ((1, 9), (10, 12), (13, 15), (16, 19), (20, 1000))


class PairBatches(Dataset):
    """Source ids x (N, max_len), target ids y (N, max_len): item (indices, width) is the batch
    (x[indices, :width], y[indices, :width], indices), width being the longest side of the
    batch (datamodule.LengthBuckets), so both sides are trimmed to it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, ...]:
        indices, width = item
        return self.x[indices, :width].long(), self.y[indices, :width].long(), indices


class ParallelDataModule(TokenDataModule):
    """Sentence pairs in length-bucketed batches (the text classifiers' bucketing), each side
    trimmed to the batch's longest sentence. Validation batches carry their row indices, so
    greedy translations line up with the raw references."""

    def _loader(self, split: str, batch_size: int, seed: int | None) -> DataLoader:
        x, y = self.splits[split].tensors
        order = LengthBuckets(self.lengths[split], batch_size, seed, self.pool_batches)
        return DataLoader(PairBatches(x, y), sampler=order, batch_size=None)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> sacrebleu.metrics.BLEUScore:
    """sacrebleu's corpus BLEU with its defaults (13a tokenization, exponential smoothing,
    case-sensitive) on detokenized text, as the field reports it (Post 2018)."""
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)])


class Translator(L.LightningModule):
    """Trains `create_model(**model, **net)` on (source, [BOS] target [EOS]) pairs with
    teacher forcing; `self.net` alone is evaluated and shipped. Every validation epoch ends with
    val/bleu of greedy translations, val/loss (per target token, no smoothing) and a few sample
    translations logged to MLflow."""

    def __init__(
        self,
        model: Mapping[str, Any],
        net: Mapping[str, Any],
        optim: Mapping[str, Any],
        label_smoothing: float,
        max_len: int,
        sample_count: int,
        val_bleu_limit: int | None = None,
        tokenizer: tokenizers.Tokenizer | None = None,
        references: Sequence[str] = (),
        sources: Sequence[str] = (),
    ):
        super().__init__()
        # The tokenizer and the validation texts are data, not settings: kept out of the
        # checkpoint's hyperparameters (the network rebuilds from `model` and `net` alone).
        self.save_hyperparameters(ignore=["tokenizer", "references", "sources"], logger=False)
        self.net = create_model(**model, **net)
        self.tokenizer, self.references, self.sources = tokenizer, list(references), list(sources)
        self.val_loss = MeanMetric()  # weighted by target tokens: a per-token mean
        self.train_tokens = SumMetric()
        self.hypotheses: dict[int, list[int]] = {}
        self.epoch_start = 0.0

    def loss(
        self, src: torch.Tensor, tgt: torch.Tensor, smoothing: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy per target token, number of target tokens) of a batch: the
        network reads tgt[:, :-1] and predicts tgt[:, 1:]; padding is ignored."""
        logits = self.net(src, tgt[:, :-1])  # (B, T-1, V)
        target = tgt[:, 1:]
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            target.flatten(),
            ignore_index=PAD_ID,
            label_smoothing=smoothing,
        )
        return loss, (target != PAD_ID).sum()

    def on_train_epoch_start(self) -> None:
        self.epoch_start = time.perf_counter()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        src, tgt, _ = batch
        loss, tokens = self.loss(src, tgt, self.hparams.label_smoothing)
        self.train_tokens.update(tokens)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        # Target tokens per second of training (validation excluded): the throughput docs quote.
        seconds = time.perf_counter() - self.epoch_start
        self.log("train/tokens_per_s", self.train_tokens.compute() / seconds)
        self.train_tokens.reset()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        src, tgt, indices = batch
        loss, tokens = self.loss(src, tgt, 0.0)
        self.val_loss.update(loss, tokens)
        if self.tokenizer is not None and not self.trainer.sanity_checking:
            limit = self.hparams.val_bleu_limit
            if limit is not None:  # BLEU of the first `limit` validation sentences only
                keep = indices < limit
                src, indices = src[keep], indices[keep]
            if len(src):
                generated = translate_ids(self.net, src, SPECIAL_IDS, self.hparams.max_len)
                self.hypotheses.update(zip(indices.tolist(), generated, strict=True))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        metrics = {"val/loss": loss, "val/ppl": loss.exp()}
        if self.hypotheses:
            # Single-device: under DDP each rank would score only the sentences it decoded.
            order = sorted(self.hypotheses)
            hypotheses = decode(self.tokenizer, _pad([self.hypotheses[i] for i in order]))
            references = [self.references[i] for i in order]
            metrics["val/bleu"] = bleu(hypotheses, references).score
            self.hypotheses = {}
            if self.trainer.is_global_zero:
                self.log_samples(order, hypotheses)
        self.log_dict(metrics, prog_bar=True)

    def log_samples(self, order: list[int], hypotheses: list[str]) -> None:
        """The first sample_count validation sentences with reference and translation, as an
        MLflow text artifact samples/epoch_NNN.txt."""
        if not self.hparams.sample_count or not isinstance(self.logger, MLFlowLogger):
            return
        position = {i: p for p, i in enumerate(order)}
        rows = [i for i in range(len(self.references)) if i in position]
        lines = [
            f"src: {self.sources[i]}\nref: {self.references[i]}\nhyp: {hypotheses[position[i]]}"
            for i in rows[: self.hparams.sample_count]
        ]
        epoch = self.current_epoch
        self.logger.experiment.log_text(
            self.logger.run_id,
            f"epoch {epoch} (greedy)\n\n" + "\n\n".join(lines) + "\n",
            f"samples/epoch_{epoch:03d}.txt",
        )

    def configure_optimizers(self):
        return configure_optimizers(self, self.hparams.optim)


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(1, *(len(r) for r in rows))
    return torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])


def translator_net_args(meta: Mapping[str, Any]) -> dict[str, Any]:
    """create_model's data-derived arguments: token ids of the joint vocabulary, padded with
    pad_id, at most input_shape[0] per sentence. No classes: the network is generative."""
    args = net_args(meta)
    return {k: args[k] for k in ("input_shape", "input_kind", "vocab_size", "pad_id")}


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


class TranslatorTask:
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        return ParallelDataModule(
            cfg.paths.processed,
            cfg.train.batch_size,
            cfg.seed,
            cfg.data.bucket_pool,
            eval_batch_size=cfg.task.decode_batch_size,
        )

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        sources, references = load_texts(cfg.paths.processed, "val")
        return Translator(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            net=translator_net_args(meta),
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            label_smoothing=cfg.task.label_smoothing,
            max_len=cfg.task.max_len,
            sample_count=cfg.task.sample_count,
            val_bleu_limit=cfg.task.val_bleu_limit,
            tokenizer=load_tokenizer(cfg.paths.processed),
            references=references,
            sources=sources,
        )

    def divergence_hint(self, cfg: DictConfig) -> str:
        return (
            f"Lower the learning rate (optim.lr={cfg.optim.lr}) or raise the warm-up "
            f"(optim.warmup_fraction={cfg.optim.warmup_fraction}), set "
            "trainer.gradient_clip_val=1.0"
        )

    def evaluate(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], out: Path
    ) -> dict[str, float]:
        net, hparams = load_checkpoint(checkpoint)
        tokenizer = load_tokenizer(cfg.paths.processed)
        sources, references = load_texts(cfg.paths.processed, "test")
        source_len = hparams["net"]["input_shape"][0]
        task = cfg.task
        t0 = time.perf_counter()
        beam = translate(
            net, tokenizer, sources, source_len, task.beam_size, task.max_len,
            task.length_penalty, task.decode_batch_size,
        )  # fmt: skip
        beam_seconds = time.perf_counter() - t0
        greedy = beam
        if task.beam_size > 1:
            greedy = translate(
                net, tokenizer, sources, source_len, 1, task.max_len, 0.0, task.decode_batch_size
            )
        metric_bleu, metric_chrf = sacrebleu.BLEU(), sacrebleu.CHRF()  # their defaults
        scores = {
            "bleu": metric_bleu.corpus_score(beam, [references]),
            "chrf": metric_chrf.corpus_score(beam, [references]),
            "bleu_greedy": metric_bleu.corpus_score(greedy, [references]),
            "baseline_bleu": metric_bleu.corpus_score(sources, [references]),
            "baseline_chrf": metric_chrf.corpus_score(sources, [references]),
        }
        # e.g. nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0
        signatures = {
            "bleu": str(metric_bleu.get_signature()),
            "chrf": str(metric_chrf.get_signature()),
        }
        (out / "sacrebleu.json").write_text(
            json.dumps(
                {
                    "signatures": signatures,
                    "scores": {k: str(v) for k, v in scores.items()},
                    "beam_size": task.beam_size,
                    "length_penalty": task.length_penalty,
                    "beam_decode_seconds": round(beam_seconds, 2),
                    "sentences": len(sources),
                },
                indent=2,
            )
            + "\n"
        )
        # The baseline's name, for the register stage's comparison (dlpipe.baselines' format).
        baseline = {"name": "copy the source sentence", "fit_seconds": 0.0, "val_scores": {}}
        (out / "baseline.json").write_text(json.dumps(baseline, indent=2) + "\n")
        by_length = bleu_by_length(sources, beam, references)
        with open(out / "bleu_by_length.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(by_length[0]))
            writer.writeheader()
            writer.writerows(by_length)
        (out / "translations.txt").write_text("\n".join(beam) + "\n")
        samples = [
            f"src: {s}\nref: {r}\nhyp: {h}"
            for s, r, h in list(zip(sources, references, beam, strict=True))[: task.report_samples]
        ]
        (out / "samples.txt").write_text("\n\n".join(samples) + "\n")
        return {
            "test/bleu": scores["bleu"].score,
            "test/chrf": scores["chrf"].score,
            "test/bleu_greedy": scores["bleu_greedy"].score,
            # the copy-the-source baseline beside the model (names shared with other tasks)
            "baseline/bleu": scores["baseline_bleu"].score,
            "baseline/chrf": scores["baseline_chrf"].score,
        }

    def log_model(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], run_id: str
    ) -> str:
        net, hparams = load_checkpoint(checkpoint)
        spec = {
            "model": hparams["model"],
            "net": hparams["net"],
            "format": meta["format"],
            "languages": meta["languages"],
            "input": TranslatorModel.__doc__,
        }
        params = TRANSLATE_PARAMS | {
            "beam_size": cfg.task.beam_size,
            "max_len": cfg.task.max_len,
            "length_penalty": cfg.task.length_penalty,
        }
        return log_pyfunc(
            run_id,
            TranslatorModel,
            spec,
            net.state_dict(),
            example_input(Path(cfg.paths.processed)),
            files=serving_files(Path(cfg.paths.processed)),
            params=params,
            extra_requirements=(f"tokenizers=={tokenizers.__version__}",),
        )


TASK = TranslatorTask()
