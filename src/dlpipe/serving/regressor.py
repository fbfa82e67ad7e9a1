"""The MLflow pyfunc that ships a regressor: raw table rows in (the data format's documented
input, e.g. a pandas DataFrame with the original columns), predictions in the target's own
units out."""

from __future__ import annotations

from typing import Any

import mlflow.models
import pandas as pd

from dlpipe.serving import AdaptedModel, input_contract


class RegressorModel(AdaptedModel):
    """Input: what the data format's `Adapter` documents (for tables: a DataFrame of raw rows,
    missing values allowed). Output: one row per input with `prediction`, in the target's units
    (the network predicts the standardized target; the training mean/std undo that)."""

    @input_contract
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        out = self.outputs(model_input).double().squeeze(-1).numpy()
        target = self.spec["target"]
        return pd.DataFrame({"prediction": out * target["std"] + target["mean"]})


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(RegressorModel())
