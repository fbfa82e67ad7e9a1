"""The MLflow pyfunc that ships a classifier: raw inputs in the data format's documented form
(images, a waveform, strings, table rows) in, class names and probabilities out."""

from __future__ import annotations

from typing import Any

import mlflow.models
import pandas as pd

from dlpipe.serving import AdaptedModel, input_contract


class ClassifierModel(AdaptedModel):
    """Input: what the data format's `Adapter` documents (e.g. uint8 images (N, 28, 28) for
    Fashion-MNIST), as `{"inputs": [...]}` at /invocations. Output: one row per input with
    `label` (the most probable class name) and one probability column per class."""

    @input_contract
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        probs = self.outputs(model_input).softmax(-1).numpy()
        classes = self.spec["classes"]
        frame = pd.DataFrame(probs.astype("float64"), columns=classes)
        frame.insert(0, "label", [classes[i] for i in probs.argmax(1)])
        return frame


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(ClassifierModel())
