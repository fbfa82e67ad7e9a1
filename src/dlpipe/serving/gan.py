"""The MLflow pyfunc that ships a DCGAN generator: a number of samples and a seed in, uint8
images out (`models.generative.generate`, as in training and evaluation)."""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd

from dlpipe.models.generative import generate
from dlpipe.serving import input_contract, load_artifacts

MAX_SAMPLES = 10_000  # per request row: bounds the memory one request can take on a server


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with integer columns `n` (samples, 1..10000) and `seed`, one request
    per row; at /invocations `{"dataframe_records": [{"n": 16, "seed": 0}]}`. Output: uint8
    images (sum of n, H, W), the rows' samples in order. The same (n, seed), the same images."""

    _skip_type_hint_validation = True  # our own input contract (see AdaptedModel)

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.spec, self.generator = load_artifacts(context)

    @input_contract
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        requests = pd.DataFrame(model_input)
        if not {"n", "seed"} <= set(requests.columns) or requests.empty:
            raise ValueError(
                f"expected rows with columns 'n' and 'seed', e.g. "
                f"pd.DataFrame({{'n': [16], 'seed': [0]}}), got columns {list(requests.columns)}"
            )
        images = []
        for n, seed in zip(requests["n"], requests["seed"], strict=True):
            if int(n) != n or not 1 <= n <= MAX_SAMPLES or int(seed) != seed:
                raise ValueError(
                    f"n={n} must be an integer in 1..{MAX_SAMPLES} and seed={seed} an integer"
                )
            images.append(generate(self.generator, int(n), int(seed)).numpy())
        return np.concatenate(images)


# MLflow "models from code": `log_pyfunc(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(GeneratorModel())
