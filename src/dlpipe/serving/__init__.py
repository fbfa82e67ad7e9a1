"""Shipping models: checkpoints read without Lightning, and MLflow pyfuncs logged "from code".

Each task's pyfunc is a file `dlpipe/serving/<task>.py` ending in `mlflow.models.set_model(...)`;
MLflow stores that file with the model and the dlpipe package as `code_paths`, so a registered
model loads and serves where dlpipe is not installed. Every pyfunc reads two artifacts, `spec`
(spec.json: how to rebuild the network and what its inputs mean) and `weights` (a state_dict),
plus any files of the data format (a tokenizer, a fitted table transform).
"""

from __future__ import annotations

import inspect
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature, infer_signature

import dlpipe
from dlpipe.formats import format_module
from dlpipe.models import create_model


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, hyperparameters) of a Lightning checkpoint, read without importing
    Lightning (evaluate and register start seconds faster)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint["state_dict"], checkpoint["hyper_parameters"]


def submodule_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix` ("net."), with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def build_net(model: Mapping[str, Any], net: Mapping[str, Any]) -> torch.nn.Module:
    """`create_model` from a model config and the data-derived arguments (`net_args`)."""
    return create_model(**model, **net)


def load_checkpoint(
    path: str | Path, prefix: str = "net."
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The shippable network of a checkpoint whose module saved `model` and `net` hyperparameters
    and keeps the network as `self.net`, in eval mode on the CPU."""
    state, hparams = read_checkpoint(path)
    net = build_net(hparams["model"], hparams["net"])
    net.load_state_dict(submodule_state(state, prefix))
    return net.eval(), hparams


def load_artifacts(
    context: mlflow.pyfunc.PythonModelContext, build=None
) -> tuple[dict[str, Any], torch.nn.Module]:
    """(spec, network in eval mode) of a pyfunc's `spec` and `weights` artifacts; `build(model,
    net)` makes the network (default: build_net, the registry's)."""
    with open(context.artifacts["spec"]) as f:
        spec = json.load(f)
    net = (build or build_net)(spec["model"], spec["net"])
    net.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu"))
    return spec, net.eval()


class AdaptedModel(mlflow.pyfunc.PythonModel):
    """A pyfunc whose input is what its data format's `Adapter` documents (images, waveforms,
    strings, table rows): `outputs(model_input)` is the network's float output for it.
    Subclasses turn that into their answer (class probabilities, predictions in units)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.spec, self.net = load_artifacts(context)
        self.adapter = format_module(self.spec["format"]).Adapter(self.spec, context.artifacts)

    def outputs(self, model_input: Any) -> torch.Tensor:
        with torch.inference_mode():
            return self.net(self.adapter(model_input)).float()


def pip_requirements(*extra: str) -> list[str]:
    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"mlflow=={mlflow.__version__}",
        *extra,
    ]


def log_pyfunc(
    run_id: str,
    python_model: type[mlflow.pyfunc.PythonModel],
    spec: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    example: Any,
    files: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    extra_requirements: tuple[str, ...] = (),
    signature: ModelSignature | None = None,
) -> str:
    """Log `python_model` (a class defined in a dlpipe/serving file ending in set_model) with
    its spec, weights and extra `files` as artifacts on `run_id`; returns the model URI.

    The signature is inferred from `example` and the model's own prediction on it, with
    `params` (inference parameters and their defaults) when the model takes any, unless the
    task passes its own `signature`."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.json").write_text(json.dumps(spec, indent=2))
        torch.save(dict(weights), Path(tmp) / "weights.pt")
        artifacts = {"spec": f"{tmp}/spec.json", "weights": f"{tmp}/weights.pt", **(files or {})}
        loaded = python_model()  # only to compute the output side of the signature
        loaded.load_context(mlflow.pyfunc.PythonModelContext(artifacts, None))
        output = loaded.predict(None, example, dict(params) if params else None)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=Path(inspect.getfile(python_model)),
                artifacts=artifacts,
                code_paths=[str(Path(dlpipe.__file__).parent)],
                signature=signature
                or infer_signature(example, output, params=dict(params) if params else None),
                input_example=(example, dict(params)) if params else example,
                pip_requirements=pip_requirements(*extra_requirements),
            )
    return info.model_uri
