"""The one way from a saved network back to a working one: a Lightning checkpoint (evaluate,
register, every task) or a pyfunc's spec and weights (every served model) -> `build_net`, the
registry, -> the saved state. Reads checkpoints without importing Lightning (the stages that only
read them start seconds faster, and a served model has no Lightning)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlpipe.models.registry import create_model


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, hyperparameters) of a Lightning checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint["state_dict"], checkpoint["hyper_parameters"]


def submodule_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix` ("net."), with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def build_net(model: Mapping[str, Any], net: Mapping[str, Any]) -> nn.Module:
    """The network of a model config (`name` and its conf/model keys) and the data-derived
    arguments `net` (`tasks.net_args`, or only `input_shape` for a generative network), as a
    checkpoint's hyperparameters and a pyfunc's spec.json record them."""
    return create_model(**model, **net)


def load_checkpoint(path: str | Path, prefix: str = "net.") -> tuple[nn.Module, dict[str, Any]]:
    """(network, hyperparameters) of a checkpoint whose LightningModule saved `model` and `net`
    hyperparameters and keeps the network as the attribute `prefix` names (`self.net`; a GAN's
    `self.generator`: prefix="generator."), in eval mode on the CPU.

    Raises RuntimeError (torch's, naming the keys) if the saved state does not fit the network."""
    state, hparams = read_checkpoint(path)
    net = build_net(hparams["model"], hparams["net"])
    net.load_state_dict(submodule_state(state, prefix))
    return net.eval(), hparams
