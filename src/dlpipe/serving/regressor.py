"""The MLflow pyfunc that ships a regressor: raw table rows in (the data format's documented
input, e.g. a pandas DataFrame with the original columns), predictions in the target's own
units out."""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc
import pandas as pd
import torch

from dlpipe.preprocess import format_module
from dlpipe.serving import load_artifacts


class RegressorModel(mlflow.pyfunc.PythonModel):
    """Input: what the data format's `Adapter` documents (for tables: a DataFrame of raw rows,
    missing values allowed). Output: one row per input with `prediction`, in the target's units
    (the network predicts the standardized target; the training mean/std undo that)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.spec, self.net = load_artifacts(context)
        self.adapter = format_module(self.spec["format"]).Adapter(self.spec, context.artifacts)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        x = self.adapter(model_input)
        with torch.inference_mode():
            out = self.net(x).double().squeeze(-1).numpy()
        target = self.spec["target"]
        return pd.DataFrame({"prediction": out * target["std"] + target["mean"]})


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(RegressorModel())
