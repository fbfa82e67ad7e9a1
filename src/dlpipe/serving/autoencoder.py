"""The MLflow pyfunc that ships a convolutional autoencoder / VAE: uint8 images in, latent
vectors out (`mode="encode"`), or latent vectors in, uint8 images out (`mode="decode"`). The
network (`models.generative.ConvAutoencoder`) is rebuilt where only torch, numpy and mlflow are
installed (no Lightning, no scikit-learn).
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch

from dlpipe.serving import input_contract, load_artifacts

MODES = ("encode", "decode")


class AutoencoderModel(mlflow.pyfunc.PythonModel):
    """params `{"mode": "encode"}` (the default): uint8 images (N, *input_shape), e.g.
    (N, 28, 28), in; float32 latent vectors (N, latent_dim) out (the VAE's posterior means).
    params `{"mode": "decode"}`: latent vectors (N, latent_dim) in; uint8 images out."""

    _skip_type_hint_validation = True  # our own input contract (see AdaptedModel)

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.spec, self.net = load_artifacts(context)

    @input_contract
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        mode = (params or {}).get("mode", "encode")
        with torch.inference_mode():
            if mode == "encode":
                return self.net.encode(self._images(model_input))[0].float().numpy()
            if mode == "decode":
                return self.net.to_images(self.net.decode(self._latents(model_input))).numpy()
        raise ValueError(f"params mode={mode!r}: choose one of {MODES}")

    def _images(self, model_input: Any) -> torch.Tensor:
        x = np.asarray(model_input)
        shape = self.net.input_shape
        if x.shape[1:] != shape:
            expected = ", ".join(map(str, shape))
            raise ValueError(f"mode=encode expects images of shape (N, {expected}), got {x.shape}")
        if not np.issubdtype(x.dtype, np.integer) or x.min(initial=0) < 0 or x.max(initial=0) > 255:
            raise ValueError("mode=encode expects uint8 pixel values 0-255 (raw images)")
        return torch.from_numpy(x.astype(np.uint8))

    def _latents(self, model_input: Any) -> torch.Tensor:
        z = np.asarray(model_input)
        dim = self.net.latent_dim
        if z.ndim != 2 or z.shape[1] != dim or not np.issubdtype(z.dtype, np.number):
            raise ValueError(
                f"mode=decode expects latent vectors of shape (N, {dim}), got {z.shape} {z.dtype}"
            )
        if not np.isfinite(z).all():
            raise ValueError("mode=decode expects finite latent values (no NaN/inf)")
        return torch.from_numpy(z.astype(np.float32))


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(AutoencoderModel())
