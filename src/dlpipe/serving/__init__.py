"""Shipping models: MLflow pyfuncs logged "from code" (the networks and the checkpoint loader
they share with the tasks live in `dlpipe.models`).

Each task's pyfunc is a file `dlpipe/serving/<task>.py` ending in `mlflow.models.set_model(...)`;
MLflow stores that file with the model and the dlpipe package as `code_paths`, so a registered
model loads and serves where dlpipe is not installed. Every pyfunc reads two artifacts, `spec`
(spec.json: how to rebuild the network and what its inputs mean) and `weights` (a state_dict),
plus any files of the data format (a tokenizer, a fitted table transform).
"""

from __future__ import annotations

import functools
import inspect
import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

import dlpipe
from dlpipe.formats import format_module
from dlpipe.models import build_net, load_checkpoint


def load_artifacts(
    context: mlflow.pyfunc.PythonModelContext,
    build: Callable[[Mapping[str, Any], Mapping[str, Any]], torch.nn.Module] | None = None,
) -> tuple[dict[str, Any], torch.nn.Module]:
    """(spec, network in eval mode) of a pyfunc's `spec` and `weights` artifacts, rebuilt by
    `models.build_net` like a checkpoint's network.

    `build(model, net)` stays for the gan and autoencoder pyfunc files registered before their
    networks moved to `dlpipe.models`: those files bring their own builder, and where the new
    dlpipe is already imported (e.g. a notebook) they call this function with it."""
    with open(context.artifacts["spec"]) as f:
        spec = json.load(f)
    net = (build or build_net)(spec["model"], spec["net"])
    net.load_state_dict(
        torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
    )
    return spec, net.eval()


def input_contract(predict: Callable) -> Callable:
    """Decorates a pyfunc's `predict`: an input the model refuses (its adapter's ValueError or
    TypeError, which names the expected form) becomes an MlflowException with
    INVALID_PARAMETER_VALUE, so /invocations answers HTTP 400 with that one line."""

    @functools.wraps(predict)
    def checked(self, context, model_input, params=None):
        try:
            return predict(self, context, model_input, params)
        except (ValueError, TypeError) as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from e

    return checked


class AdaptedModel(mlflow.pyfunc.PythonModel):
    """A pyfunc whose input is what its data format's `Adapter` documents (images, waveforms,
    strings, table rows): `outputs(model_input)` is the network's float output for it.
    Subclasses turn that into their answer (class probabilities, predictions in units)."""

    # The input contract is ours (the adapter checks it); MLflow's type-hint validation,
    # which converts inputs lossily and warns when `predict` has no hints, stays off.
    _skip_type_hint_validation = True

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
    input_doc: str | None = None,
) -> str:
    """Log `python_model` (a class defined in a dlpipe/serving file ending in set_model) with
    its spec, weights and extra `files` as artifacts on `run_id`; returns the model URI.

    The signature declares the outputs (inferred from the model's own prediction on `example`)
    and `params` (inference parameters and their defaults), but no input schema: MLflow would
    convert inputs to it before the model sees them, and its conversions are lossy (floats cut
    to uint8 pixels or to integer columns) or refuse what the model takes (an int column where
    the examples held floats). The input contract is the model's own adapter, which checks what
    it is given and names the expected form; `input_doc` (default: the model class's
    docstring) describes it in the model's metadata. A task may pass its own `signature`."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.json").write_text(json.dumps(spec, indent=2))
        torch.save(dict(weights), Path(tmp) / "weights.pt")
        artifacts = {"spec": f"{tmp}/spec.json", "weights": f"{tmp}/weights.pt", **(files or {})}
        loaded = python_model()  # only to compute the output side of the signature
        loaded.load_context(mlflow.pyfunc.PythonModelContext(artifacts, None))
        output = loaded.predict(None, example, dict(params) if params else None)
        inferred = infer_signature(example, output, params=dict(params) if params else None)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=Path(inspect.getfile(python_model)),
                artifacts=artifacts,
                code_paths=[str(Path(dlpipe.__file__).parent)],
                signature=signature
                or ModelSignature(inputs=None, outputs=inferred.outputs, params=inferred.params),
                metadata={"input": input_doc or inspect.getdoc(python_model)},
                input_example=(example, dict(params)) if params else example,
                pip_requirements=pip_requirements(*extra_requirements),
            )
    return info.model_uri


def log_adapted_model(
    processed_dir: Path,
    checkpoint: Path,
    meta: Mapping[str, Any],
    run_id: str,
    python_model: type[AdaptedModel],
    fields: Mapping[str, Any] | None = None,
    hparam_fields: tuple[str, ...] = (),
    extra_requirements: tuple[str, ...] = (),
) -> str:
    """Log the network of a task checkpoint as an `AdaptedModel` pyfunc fed by its data
    format's adapter: spec = the network's config, the format, `fields` and the checkpoint's
    `hparam_fields` (e.g. the target's training statistics); the format's example input and
    serving files go with it. Returns the model URI."""
    net, hparams = load_checkpoint(checkpoint)
    fmt = format_module(meta["format"])
    spec = {
        "model": hparams["model"],
        "net": hparams["net"],
        **{key: hparams[key] for key in hparam_fields},
        **(fields or {}),
        "format": meta["format"],
        "input": fmt.INPUT_DOC,
    }
    return log_pyfunc(
        run_id,
        python_model,
        spec,
        net.state_dict(),
        fmt.example_input(Path(processed_dir)),
        input_doc=fmt.INPUT_DOC,
        files=fmt.serving_files(Path(processed_dir)),
        extra_requirements=extra_requirements,
    )
