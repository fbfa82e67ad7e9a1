"""The MLflow pyfunc that ships a classifier: raw uint8 images in, class names and probabilities
out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from dlpipe.models import create_model


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Input: uint8 array (N, *input_shape), e.g. (N, 28, 28) for Fashion-MNIST, as
    `{"inputs": [...]}` at /invocations. Output: one row per image with `label` (the most
    probable class name) and one probability column per class."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        with open(context.artifacts["spec"]) as f:
            self.spec = json.load(f)
        self.net = create_model(
            input_shape=self.spec["input_shape"],
            num_classes=len(self.spec["classes"]),
            mean=self.spec["mean"],
            std=self.spec["std"],
            **self.spec["model"],
        )
        self.net.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu"))
        self.net.eval()

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        x = np.asarray(model_input)
        expected = tuple(self.spec["input_shape"])
        if x.shape[1:] != expected:
            raise ValueError(
                f"expected raw images of shape (N, {', '.join(map(str, expected))}), got {x.shape}"
            )
        if not np.issubdtype(x.dtype, np.integer) or x.min(initial=0) < 0 or x.max(initial=0) > 255:
            raise ValueError("expected uint8 pixel values 0-255 (raw images, not normalized)")
        with torch.inference_mode():
            probs = self.net(torch.from_numpy(x.astype(np.uint8))).softmax(-1).numpy()
        classes = self.spec["classes"]
        frame = pd.DataFrame(probs.astype(np.float64), columns=classes)
        frame.insert(0, "label", [classes[i] for i in probs.argmax(1)])
        return frame


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The shippable network of a training checkpoint and its hyperparameters, rebuilt without
    importing Lightning (evaluate and register start seconds faster)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    net = create_model(
        input_shape=hparams["input_shape"],
        num_classes=hparams["num_classes"],
        mean=hparams["mean"],
        std=hparams["std"],
        **hparams["model"],
    )
    weights = checkpoint["state_dict"]
    net.load_state_dict(
        {k.removeprefix("net."): v for k, v in weights.items() if k.startswith("net.")}
    )
    return net.eval(), hparams


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(ImageClassifier())
