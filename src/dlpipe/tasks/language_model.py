"""Character-level language modeling: next-token cross-entropy on random windows of the token
stream (nanoGPT's get_batch), loss in nats/char with bits per character and perplexity, text
samples while training, and a pyfunc that generates text from prompts. The test metrics stand
next to a character n-gram model's (`baseline/...`) and the uniform distribution's
(`chance/...`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from dlpipe.baselines import char_ngram_loss
from dlpipe.data import load_array, write_json
from dlpipe.models import load_checkpoint
from dlpipe.serving import log_pyfunc
from dlpipe.serving.language_model import GENERATION_PARAMS, LanguageModel, complete
from dlpipe.tasks import ExportTarget, net_args

if TYPE_CHECKING:  # type hints only: evaluate and register load no Lightning
    import lightning as L

LN2 = math.log(2)
EXPORT_WINDOWS = 512  # test windows an export is checked on


def lm_net_args(meta: Mapping[str, Any]) -> dict[str, Any]:
    """create_model's data-derived arguments: the context length is input_shape[0], and the
    network predicts one of vocab_size characters at every position."""
    return net_args(meta, num_classes=meta["vocab_size"], per_step=True)


@torch.inference_mode()
def stream_loss(
    net: torch.nn.Module, stream: np.ndarray, block_size: int, batch_size: int = 64
) -> tuple[float, float, int]:
    """(mean next-char cross-entropy in nats, next-char accuracy, characters scored) over a
    whole stream, cut into consecutive windows of `block_size` targets: every character after
    the first is predicted exactly once (the last window may be shorter)."""
    net.eval()
    device = next(net.parameters()).device
    ids = torch.from_numpy(stream.astype(np.int64))
    starts = list(range(0, len(ids) - 1, block_size))
    total = correct = torch.zeros((), device=device)
    count = 0
    groups = [starts[:-1], starts[-1:]]  # full windows batch together; the last may be short
    for group in groups:
        for i in range(0, len(group), batch_size):
            window = torch.stack(
                [ids[s : s + block_size + 1] for s in group[i : i + batch_size]]
            ).to(device)
            x, y = window[:, :-1], window[:, 1:]
            logits = net(x).float()
            total = total + F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
            correct = correct + (logits.argmax(-1) == y).sum()
            count += y.numel()
    return total.item() / count, correct.item() / count, count


def write_samples(
    net: torch.nn.Module,
    chars: str,
    block_size: int,
    prompts: list[str],
    temperatures: list[float],
    max_new_tokens: int,
    seed: int,
    path: Path,
) -> None:
    """Every prompt continued at every temperature (seeded), as one text file."""
    sections = []
    for temperature in temperatures:
        texts = complete(
            net, prompts, chars, block_size, max_new_tokens, temperature, top_k=0, seed=seed
        )
        for prompt, text in zip(prompts, texts, strict=True):
            sections.append(f"=== temperature {temperature}, prompt {prompt!r} ===\n{prompt}{text}")
    path.write_text("\n\n".join(sections) + "\n")


class LanguageModelTask:
    # The Lightning side is imported where training asks for it (module(), datamodule()), so
    # evaluate and register load no Lightning (dlpipe.modules).
    def datamodule(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningDataModule:
        from dlpipe.modules.language_model import TokenStreamDataModule

        return TokenStreamDataModule(
            cfg.paths.processed,
            block_size=meta["input_shape"][0],
            batch_size=cfg.train.batch_size,
            steps_per_epoch=cfg.task.steps_per_epoch,
            eval_batches=cfg.task.eval_batches,
            seed=cfg.seed,
        )

    def module(self, cfg: DictConfig, meta: dict[str, Any]) -> L.LightningModule:
        from dlpipe.modules.language_model import CharLM

        return CharLM(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            net=lm_net_args(meta),
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            chars=meta["chars"],
            sample={
                "prompt": cfg.task.sample_prompt,
                "count": cfg.task.sample_count,
                "tokens": cfg.task.sample_tokens,
                "temperature": cfg.task.sample_temperature,
                "seed": cfg.task.sample_seed,
            },
            compile=cfg.train.compile,
        )

    def evaluate(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], out: Path
    ) -> dict[str, float]:
        net, hparams = load_checkpoint(checkpoint)
        block_size = hparams["net"]["input_shape"][0]
        test = load_array(cfg.paths.processed, "test_x")
        loss, accuracy, _ = stream_loss(net, test, block_size)
        write_samples(
            net,
            hparams["chars"],
            block_size,
            list(cfg.task.report_prompts),
            list(cfg.task.report_temperatures),
            cfg.task.report_tokens,
            cfg.task.sample_seed,
            out / "samples.txt",
        )
        ngram_loss, order, seconds = char_ngram_loss(
            load_array(cfg.paths.processed, "train_x"),
            load_array(cfg.paths.processed, "val_x"),
            test,
            meta["vocab_size"],
            cfg.task.baseline_max_order,
        )
        name = f"interpolated Witten-Bell character {order + 1}-gram"
        write_json(out / "baseline.json", {"name": name, "fit_seconds": seconds})
        uniform = math.log(meta["vocab_size"])  # chance: every character equally likely
        return {
            f"{prefix}/{key}": value
            for prefix, nats in (("test", loss), ("baseline", ngram_loss), ("chance", uniform))
            for key, value in (("loss", nats), ("bpc", nats / LN2), ("ppl", math.exp(nats)))
        } | {"test/acc": accuracy}

    def log_model(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any], run_id: str
    ) -> str:
        net, hparams = load_checkpoint(checkpoint)
        spec = {
            "model": hparams["model"],
            "net": hparams["net"],
            "chars": hparams["chars"],
            "block_size": hparams["net"]["input_shape"][0],
            "input": "prompts: a list of strings, or a DataFrame column 'prompt'",
        }
        return log_pyfunc(
            run_id,
            LanguageModel,
            spec,
            net.state_dict(),
            list(cfg.task.report_prompts[:2]),
            params=GENERATION_PARAMS,
        )

    def export_targets(
        self, cfg: DictConfig, checkpoint: Path, meta: dict[str, Any]
    ) -> list[ExportTarget]:
        """The logits step (token ids (B, T) -> logits (B, T, V)) on consecutive windows of the
        test stream (at most EXPORT_WINDOWS): within 1e-3, the same next character at 99.9 %
        of the positions (dlpipe.export). Generation loops over it in the pyfunc."""
        net, hparams = load_checkpoint(checkpoint)
        block = hparams["net"]["input_shape"][0]
        stream = torch.from_numpy(load_array(cfg.paths.processed, "test_x").astype(np.int64))
        count = min(EXPORT_WINDOWS, len(stream) // block)
        windows = stream[: count * block].view(count, block)  # (N, T)
        return [ExportTarget("net", net, windows, max_abs_error=1e-3, argmax=True)]


TASK = LanguageModelTask()
