"""The MLflow pyfunc that ships a classifier: raw inputs in the data format's documented form
(images, a waveform, strings, table rows) in, class names and probabilities out."""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd

from dlpipe.serving import AdaptedModel, input_contract


class ClassifierModel(AdaptedModel):
    """Input: what the data format's `Adapter` documents (e.g. uint8 images (N, 28, 28) for
    Fashion-MNIST), as `{"inputs": [...]}` at /invocations. Output: one row per input with
    `label` (the most probable class name) and one probability column per class."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        super().load_context(context)
        # Built once, not per call: at batch 1 the answer's DataFrame is most of what the pyfunc
        # adds to the network (bench/bench_serve.py), and a ready Index halves its cost.
        self.columns = pd.Index(self.spec["classes"])
        self.labels = np.array(self.spec["classes"], dtype=object)

    @input_contract
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        probs = self.outputs(model_input).softmax(-1).double().numpy()  # (N, classes)
        frame = pd.DataFrame(probs, columns=self.columns, copy=False)
        frame.insert(0, "label", self.labels[probs.argmax(1)])
        return frame


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(ClassifierModel())
