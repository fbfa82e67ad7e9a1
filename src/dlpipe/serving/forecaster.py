"""The MLflow pyfunc that ships a price forecaster: recent daily rows per ticker in, each
ticker's predicted log return for the next trading day out."""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from dlpipe.formats.stocks import latest_windows
from dlpipe.serving import input_contract, load_artifacts


class ForecasterModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame of daily rows (date, open, high, low, close, volume, Name), at least
    window+1 trading days per ticker. The features are recomputed by the same code as in
    preprocessing; the network's first layer applies the training-period scaling.
    Output: one row per ticker: Name, date (the last day given), predicted_log_return (for the
    next trading day) and predicted_close (= last close * exp(predicted_log_return))."""

    _skip_type_hint_validation = True  # our own input contract (see AdaptedModel)

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.spec, self.net = load_artifacts(context)

    @input_contract
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        x, last = latest_windows(model_input, self.spec["window"])
        with torch.inference_mode():
            out = self.net(torch.from_numpy(x)).double().squeeze(-1).numpy()
        target = self.spec["target"]
        predicted = out * target["std"] + target["mean"]
        rows = pd.DataFrame(model_input)
        rows = rows.assign(date=pd.to_datetime(rows["date"]).dt.strftime("%Y-%m-%d"))
        close = rows.sort_values("date").groupby("Name")["close"].last()
        return last.assign(
            predicted_log_return=predicted,
            predicted_close=close.loc[last["Name"]].to_numpy(np.float64) * np.exp(predicted),
        )


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(ForecasterModel())
