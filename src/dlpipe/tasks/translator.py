"""Translation (task=translator): an encoder-decoder trained on parallel text with
label-smoothed cross-entropy over length-bucketed batches, validated every epoch by BLEU of
greedy translations of the validation split (what checkpoints, early stopping and tuning
watch), tested with beam search by BLEU and chrF (sacrebleu, on detokenized text) beside the
copy-the-source baseline, and shipped as a pyfunc that translates sentences."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sacrebleu
import tokenizers
from omegaconf import DictConfig, OmegaConf

from dlpipe.formats.parallel import example_input, load_texts, load_tokenizer, serving_files
from dlpipe.models import load_checkpoint
from dlpipe.serving import log_pyfunc
from dlpipe.serving.translator import TRANSLATE_PARAMS, TranslatorModel, translate
from dlpipe.tasks import net_args
from dlpipe.tasks.translator_bleu import bleu_by_length

if TYPE_CHECKING:  # type hints only: evaluate and register load no Lightning
    import lightning as L


def translator_net_args(meta: Mapping[str, Any]) -> dict[str, Any]:
    """create_model's data-derived arguments: token ids of the joint vocabulary, padded with
    pad_id, at most input_shape[0] per sentence. No classes: the network is generative."""
    args = net_args(meta)
    return {k: args[k] for k in ("input_shape", "input_kind", "vocab_size", "pad_id")}


class TranslatorTask:
    # The Lightning side is imported where training asks for it (module(), datamodule()), so
    # evaluate and register load no Lightning (dlpipe.modules).
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        from dlpipe.modules.translator import ParallelDataModule

        return ParallelDataModule(
            cfg.paths.processed,
            cfg.train.batch_size,
            cfg.seed,
            cfg.data.bucket_pool,
            eval_batch_size=cfg.task.decode_batch_size,
        )

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        from dlpipe.modules.translator import Translator

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
