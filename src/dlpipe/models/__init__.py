"""Every network, built by name: `create_model("cnn", ...)` for any `model=` choice.

`registry` holds the names and `create_model`; the networks live by family in `simple` (mlp,
cnn, the Fréchet feature net), `sequence` (rnn, lstm, gru, transformer, gpt) and `generative`
(dcgan, autoencoder, vae), their shared layers in `layers`. `checkpoint` rebuilds a saved
network, `predict` runs one over a split. Adding a network is one module here (imported below)
plus conf/model/<name>.yaml and conf/search/<name>.yaml. Only torch: no Lightning, no MLflow.
"""

from dlpipe.models import generative, sequence, simple  # noqa: F401  (registers every name)
from dlpipe.models.checkpoint import build_net, load_checkpoint, read_checkpoint, submodule_state
from dlpipe.models.layers import Normalize, Standardize, activation_layer, norm_layer
from dlpipe.models.predict import predict
from dlpipe.models.registry import (
    INPUT_KINDS,
    InputSpec,
    available_models,
    create_model,
    generative_models,
    register,
)
from dlpipe.models.simple import FeatureNet

__all__ = [
    "INPUT_KINDS",
    "FeatureNet",
    "InputSpec",
    "Normalize",
    "Standardize",
    "activation_layer",
    "available_models",
    "build_net",
    "create_model",
    "generative_models",
    "load_checkpoint",
    "norm_layer",
    "predict",
    "read_checkpoint",
    "register",
    "submodule_state",
]
