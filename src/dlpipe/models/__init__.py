"""Every network, built by name: `create_model("cnn", ...)` for any `model=` choice.

`registry` holds the names and `create_model`; the networks live by family in `simple` (mlp,
cnn, the Fréchet feature net), `sequence` (rnn, lstm, gru, transformer, gpt) and `generative`
(dcgan, autoencoder, vae), `translation` (seq2seq_transformer, seq2seq_rnn, their decoding),
`tabular` (ft_transformer, mlp_autoencoder) and `acoustic` (crnn, conv_transformer: CTC
acoustic models), their shared layers in `layers`. `checkpoint` rebuilds a saved network,
`predict` runs one over a split. Adding a network is one module here (imported below) plus
conf/model/<name>.yaml and conf/search/<name>.yaml. Only torch: no Lightning, no MLflow.
"""

# imported to register every name
from dlpipe.models import (  # noqa: F401
    acoustic,
    generative,
    sequence,
    simple,
    tabular,
    translation,
)
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
