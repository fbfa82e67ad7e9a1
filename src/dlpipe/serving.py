"""The MLflow pyfunc that ships a classifier: raw uint8 images in, class names and probabilities out."""

from __future__ import annotations

import json
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
        self.net = build_net(self.spec)
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


def build_net(spec: dict[str, Any]) -> torch.nn.Module:
    """The network (preprocessing included) described by a spec written at registration."""
    model = dict(spec["model"])
    return create_model(
        model.pop("name"),
        input_shape=spec["input_shape"],
        num_classes=len(spec["classes"]),
        mean=spec["mean"],
        std=spec["std"],
        **model,
    )


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(ImageClassifier())
