"""The MLflow pyfunc that ships a fraud detector: raw transaction rows in, the calibrated fraud
probability and the decision at the threshold chosen on the validation period out."""

from __future__ import annotations

from typing import Any

import mlflow.models
import numpy as np
import pandas as pd
import torch

from dlpipe.models.tabular import detector_score
from dlpipe.serving import AdaptedModel, input_contract


class FraudModel(AdaptedModel):
    """Input: a DataFrame of raw transaction rows with the table's feature columns (what the
    data format's `Adapter` documents). Output: one row per transaction with `probability`
    (of fraud, Platt-calibrated on the validation period), `fraud` (probability >= threshold)
    and `score` (the network's raw score: logit, or log reconstruction error). Param
    `threshold` (default: the one of least expected cost on validation) overrides the cut."""

    @input_contract
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        threshold = (params or {}).get("threshold", self.spec["threshold"])
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ValueError(f"param threshold={threshold!r} must be a probability in [0, 1]")
        with torch.inference_mode():
            scores = detector_score(self.net, self.adapter(model_input)).double().numpy()
        a, b = self.spec["calibration"]
        probs = 1.0 / (1.0 + np.exp(-(a * scores + b)))
        return pd.DataFrame({"probability": probs, "fraud": probs >= threshold, "score": scores})


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(FraudModel())
