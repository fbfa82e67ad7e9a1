"""The model registry: `model=` names -> builders, and `create_model`, the one way to build any of
them (for training, for evaluation and inside a served model).

Two kinds of network are registered:

- predictors (`register(name)`) take their inputs exactly as the processed data stores them and
  answer per sample (or per position); `create_model` puts the input's preprocessing in front of
  them, so a saved network needs nothing else:
  - `input_kind="image"`: uint8 images (B, H, W) or (B, H, W, C), standardized with training stats;
  - `input_kind="features"`: float features (B, ..., F), standardized per feature (mean/std of F);
  - `input_kind="tokens"`: int token ids (B, L), `pad_id` marking padding.
  The output is (B, num_classes) logits (or regression outputs), or (B, L, num_classes) per
  position when `per_step` is set (language models).
- generative networks (`register(name, generative=True)`) model the data themselves (a DCGAN
  generator, an autoencoder, a translator's encoder-decoder); they are built from the input spec
  and their config alone, read their own inputs (noise, raw pixels, source and target tokens)
  and are trained by their own task (gan, autoencoder, translator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from dlpipe.errors import ConfigError
from dlpipe.models.layers import DeepEnsemble, Normalize, Standardize

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_GENERATIVE: set[str] = set()

INPUT_KINDS = ("image", "features", "tokens")


def register(name: str, *, generative: bool = False):
    """Decorator: `builder` (a function or an nn.Module class) is what `model=<name>` builds.

    A predictor's builder is called with `spec`, `num_classes`, `per_step` and the keys of
    conf/model/<name>.yaml; a generative one with `spec` and those keys. Raises ValueError if
    `name` is already registered (two builders for one name: the second would silently win)."""

    def wrap(builder):
        if name in _BUILDERS:
            raise ValueError(
                f"model {name!r} is already registered (by {_BUILDERS[name].__module__}."
                f"{_BUILDERS[name].__qualname__}): give {builder.__qualname__} another name"
            )
        _BUILDERS[name] = builder
        if generative:
            _GENERATIVE.add(name)
        return builder

    return wrap


def available_models() -> list[str]:
    """Every registered `model=` name, sorted."""
    return sorted(_BUILDERS)


def generative_models() -> list[str]:
    """The registered names of generative networks (built without classes; see the module doc)."""
    return sorted(_GENERATIVE)


@dataclass(frozen=True)
class InputSpec:
    """What a network is fed: `kind` (one of INPUT_KINDS), the per-sample `shape`, and for
    tokens the vocabulary size, padding id and, where the data format gives them (text tables),
    the token strings by id (`vocab`, e.g. for character n-grams of words)."""

    kind: str
    shape: tuple[int, ...]
    vocab_size: int | None = None
    pad_id: int = 0
    vocab: tuple[str, ...] | None = None


def create_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_kind: str = "image",
    vocab_size: int | None = None,
    pad_id: int = 0,
    vocab: Sequence[str] | None = None,
    per_step: bool = False,
    members: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build `name`. A predictor comes with its preprocessing in front (raw batch in, logits
    out) and needs `num_classes`; a generative network takes neither classes nor `per_step`.
    `members` > 1 (`model.members`) builds a classifier as a deep ensemble of that many
    networks (`layers.DeepEnsemble`) behind the one preprocessing.

    Raises ConfigError for an unknown name, and for `members` > 1 where nothing is classified
    (one output, per-step outputs, a generative network); ValueError naming the valid choices
    for an unknown input kind, and for a generative network asked to predict (or a predictor
    without `num_classes`)."""
    if name not in _BUILDERS:
        raise ConfigError(
            f"unknown model {name!r}: choose one of {available_models()} "
            f"(e.g. model={available_models()[0]})"
        )
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind={input_kind!r} is not one of {INPUT_KINDS}")
    if input_kind == "tokens" and not vocab_size:
        raise ValueError("input_kind='tokens' needs the vocabulary size (vocab_size)")
    if vocab is not None and len(vocab) != vocab_size:
        raise ValueError(f"vocab holds {len(vocab)} tokens, vocab_size says {vocab_size}")
    spec = InputSpec(
        input_kind, tuple(input_shape), vocab_size, pad_id, None if vocab is None else tuple(vocab)
    )
    predictors = sorted(set(_BUILDERS) - _GENERATIVE)
    members = members or 1
    if members > 1 and (name in _GENERATIVE or per_step or (num_classes or 0) < 2):
        raise ConfigError(
            f"model.members={members} (a deep ensemble averaging class probabilities) is for "
            f"task=classifier only: set model.members=1 for this task"
        )
    if name in _GENERATIVE:
        if num_classes is not None or per_step:
            raise ValueError(
                f"model={name} is a generative network (task=gan trains model=dcgan, "
                f"task=autoencoder model=autoencoder or vae, task=translator model="
                f"seq2seq_transformer or seq2seq_rnn); it makes no predictions: for this "
                f"task choose one of {predictors}"
            )
        return _BUILDERS[name](spec=spec, **kwargs)
    if num_classes is None:
        raise ValueError(f"model={name} needs num_classes (the data's classes, or 1 output)")
    nets = [
        _BUILDERS[name](spec=spec, num_classes=num_classes, per_step=per_step, **kwargs)
        for _ in range(members)
    ]
    body = nets[0] if members == 1 else DeepEnsemble(nets)
    if input_kind == "image":
        front: nn.Module = Normalize(mean, std)
    elif input_kind == "features" and mean is not None:
        front = Standardize(mean, std)
    else:
        front = nn.Identity()
    return nn.Sequential(front, body)
