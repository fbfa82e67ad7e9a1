"""CPU cost of the translation models, independent of how busy the machine is: process CPU
seconds (not wall time) per training batch and per greedy decode, on the processed Multi30k.

    python bench/bench_translation.py data/processed/multi30k experiment=multi30k_transformer \
        model.dim_feedforward=512

Prints target tokens per CPU-second of training (teacher forcing, label smoothing 0.1, AdamW,
random batches of train.batch_size pairs) and CPU-seconds to decode one batch greedily and with
task.beam_size beams (the cached decoders of models/translation.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dlpipe.data import load_meta
from dlpipe.models import create_model
from dlpipe.models.translation import translate_ids
from dlpipe.serving.translator import SPECIAL_IDS
from dlpipe.tasks.translator import translator_net_args

CONF = Path(__file__).resolve().parents[1] / "conf"
STEPS = 5


def main(processed: Path, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    net = create_model(**model, **translator_net_args(load_meta(processed)))
    x = torch.from_numpy(np.load(processed / "train_x.npy")).long()
    y = torch.from_numpy(np.load(processed / "train_y.npy")).long()
    batch = cfg.train.batch_size
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: batch * STEPS]
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr)
    tokens, t0 = 0, time.process_time()
    for rows in order.split(batch):
        width = int(max((x[rows] != 0).sum(1).max(), (y[rows] != 0).sum(1).max()))
        src, tgt = x[rows, :width], y[rows, :width]
        logits = net(src, tgt[:, :-1])
        loss = F.cross_entropy(
            logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=0, label_smoothing=0.1
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens += int((tgt[:, 1:] != 0).sum())
    seconds = time.process_time() - t0
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"{model['name']} ({params:.1f} M parameters, {torch.get_num_threads()} threads)")
    print(f"train: {tokens / seconds:.0f} target tokens per CPU-second, "
          f"{seconds / STEPS:.2f} CPU-s per batch of {batch}")  # fmt: skip
    net.eval()
    for beam in (1, cfg.task.beam_size):
        t0 = time.process_time()
        translate_ids(net, x[order[:batch]], SPECIAL_IDS, cfg.task.max_len, beam_size=beam)
        print(f"beam {beam} decode of {batch} sentences: {time.process_time() - t0:.1f} CPU-s")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
