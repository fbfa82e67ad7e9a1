"""Transcription with CTC (Graves et al. 2006): an acoustic model emits a distribution over
blank + labels per frame, trained with `torch.nn.CTCLoss`; greedy decoding per validation epoch
(word error rate over digits, sequence accuracy), greedy and beam search on the test split
(the report: `transcriber_report`), and the pyfunc that transcribes waveforms."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from dlpipe.models import load_checkpoint
from dlpipe.serving import log_adapted_model
from dlpipe.serving.transcriber import TranscriberModel
from dlpipe.tasks import net_args
from dlpipe.tasks.transcriber_report import report_test_split, segment_baseline

if TYPE_CHECKING:  # type hints only: evaluate and register load no Lightning
    import lightning as L


class TranscriberTask:
    # The Lightning side is imported where training asks for it (module(), datamodule()), so
    # evaluate and register load no Lightning (dlpipe.modules).
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        from dlpipe.modules.transcriber import UtteranceDataModule

        return UtteranceDataModule(
            cfg.paths.processed, cfg.train.batch_size, cfg.seed, cfg.task.bucket_pool
        )

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        from dlpipe.modules.transcriber import Transcriber

        if meta.get("format") != "fsdd_digits":
            raise ValueError(
                f"task=transcriber needs utterances with digit strings (data=fsdd_digits), "
                f"not data={meta['name']} ({meta.get('format')})"
            )
        return Transcriber(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            # one output per label plus the CTC blank, at every frame
            net=net_args(meta, num_classes=meta["num_classes"] + 1, per_step=True),
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            augment=OmegaConf.to_container(cfg.task.spec_augment, resolve=True),
            compile=cfg.train.compile,
        )

    def evaluate(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], out: Path
    ) -> dict[str, float]:
        net, _ = load_checkpoint(checkpoint)
        processed = Path(cfg.paths.processed)
        summary = report_test_split(
            net, processed, meta, cfg.task.decoder, cfg.task.beam_size, cfg.task.error_examples, out
        )
        return summary | segment_baseline(processed, out)

    def log_model(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], run_id: str
    ) -> str:
        fields = {
            "classes": list(meta["classes"]),
            "decoder": cfg.task.decoder,
            "beam_size": cfg.task.beam_size,
        }
        return log_adapted_model(
            cfg.paths.processed,
            checkpoint,
            meta,
            run_id,
            TranscriberModel,
            fields,
            extra_requirements=(
                f"librosa=={version('librosa')}",
                f"soundfile=={version('soundfile')}",
                f"flashlight-text=={version('flashlight-text')}",
            ),
        )


TASK = TranscriberTask()
