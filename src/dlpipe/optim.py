"""Optimizers and learning-rate schedules from `cfg.optim`, shared by every task."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "onecycle")


def configure_optimizers(module: L.LightningModule, opt: Mapping[str, Any], parameters=None) -> Any:
    """What `LightningModule.configure_optimizers` returns for `opt` (the `optim` config):
    sgd/adam/adamw over `parameters` (default: all of `module`'s), with a per-step schedule."""
    parameters = module.parameters() if parameters is None else parameters
    name, lr, wd = opt["name"], opt["lr"], opt["weight_decay"]
    if name == "sgd":
        optimizer = torch.optim.SGD(
            parameters, lr=lr, momentum=opt["momentum"], weight_decay=wd, nesterov=True
        )
    elif name == "adam":
        optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=wd)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=wd)
    else:
        raise ValueError(f"unknown optim.name {name!r}: choose one of {OPTIMIZERS}")

    schedule = opt["scheduler"]
    if schedule == "none":
        return optimizer
    steps = int(module.trainer.estimated_stepping_batches)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    elif schedule == "onecycle":
        # OneCycleLR divides by (warm-up steps - 1) and by the steps after it: both need >= 2.
        warmup = max(2, round(opt["warmup_fraction"] * steps))
        if steps < warmup + 2:
            return optimizer  # a handful of steps (smoke runs): constant lr
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=steps, pct_start=warmup / steps
        )
    else:
        raise ValueError(f"unknown optim.scheduler {schedule!r}: choose one of {SCHEDULERS}")
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
    }
