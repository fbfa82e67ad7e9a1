"""The composed config's types and ranges, checked at each stage's entry (`check_config`), so a
bad value gets one message naming the key, the value and what is allowed before anything runs
or is logged. Sections a data format or task owns (`data`, `task`) are checked by their own code;
this schema covers the keys every run shares and the model sizes. Unknown keys are left to Hydra,
which already refuses them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dlpipe.errors import ConfigError  # noqa: F401  (raised here; imported from here by callers)

PositiveInt = Annotated[int, Field(strict=True, gt=0)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
Probability = Annotated[float, Field(ge=0, lt=1)]


class _Section(BaseModel):
    # extra="allow": a section may carry keys of one model or experiment only.
    model_config = ConfigDict(extra="allow")


class Optim(_Section):
    name: Literal["sgd", "adam", "adamw"]
    lr: Annotated[float, Field(gt=0)]
    weight_decay: Annotated[float, Field(ge=0)]
    momentum: Probability
    scheduler: Literal["none", "cosine", "onecycle"]
    warmup_fraction: Fraction


class Train(_Section):
    batch_size: PositiveInt
    early_stopping_patience: NonNegativeInt | None  # 0 or null: off
    divergence_factor: Annotated[float, Field(gt=1)] | None
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None  # null: off
    compile: bool
    use_tuned: bool
    resume: bool
    log_every_n_steps: PositiveInt
    progress_refresh_steps: PositiveInt


class Trainer(_Section):
    max_epochs: PositiveInt


class Pruner(_Section):
    name: Literal["median", "percentile", "hyperband", "successive_halving", "none"]
    n_startup_trials: NonNegativeInt
    n_warmup_steps: NonNegativeInt
    percentile: Annotated[float, Field(gt=0, lt=100)]
    min_resource: PositiveInt
    reduction_factor: Annotated[int, Field(strict=True, ge=2)]


class Cost(_Section):
    check: bool
    steps: PositiveInt
    max_trial_s: Annotated[float, Field(gt=0)] | None


class Sampler(_Section):
    name: Literal["tpe", "gp", "cmaes", "random", "qmc", "nsga2"]
    n_startup_trials: NonNegativeInt
    multivariate: bool
    population_size: Annotated[int, Field(strict=True, ge=2)]
    qmc_type: Literal["sobol", "halton", "lhs"]


class Objective(_Section):
    metric: str
    direction: Literal["maximize", "minimize"]


class Tune(_Section):
    n_trials: PositiveInt
    max_epochs: PositiveInt
    timeout_s: Annotated[float, Field(gt=0)] | None
    trial_timeout_s: Annotated[float, Field(gt=0)] | None
    cost: Cost
    direction: Literal["maximize", "minimize"]
    workers: PositiveInt
    devices: Literal["auto"] | list[NonNegativeInt]
    devices_per_trial: PositiveInt
    objectives: list[Objective]
    constraints: list[str]
    sampler: Sampler
    pruner: Pruner


class Model(_Section):
    """The sizes any registered model may have (each model uses some of them)."""

    name: str
    members: PositiveInt | None = None  # > 1: a deep ensemble (classifiers only)
    width: PositiveInt | None = None
    depth: PositiveInt | None = None
    convs_per_stage: PositiveInt | None = None
    embed_dim: PositiveInt | None = None
    hidden_size: PositiveInt | None = None
    num_layers: PositiveInt | None = None
    num_encoder_layers: PositiveInt | None = None
    num_decoder_layers: PositiveInt | None = None
    d_model: PositiveInt | None = None
    nhead: PositiveInt | None = None
    dim_feedforward: PositiveInt | None = None
    n_layer: PositiveInt | None = None
    n_head: PositiveInt | None = None
    n_embd: PositiveInt | None = None
    latent_dim: PositiveInt | None = None
    g_width: PositiveInt | None = None
    d_width: PositiveInt | None = None
    dropout: Probability | None = None
    beta: Annotated[float, Field(ge=0)] | None = None
    word_ngrams: PositiveInt | None = None
    buckets: PositiveInt | None = None
    char_ngram_min: PositiveInt | None = None  # fasttext: character n-grams of each word
    char_ngram_max: NonNegativeInt | None = None  # 0: none
    word_dropout: Probability | None = None  # fasttext: DAN word dropout
    frequencies: PositiveInt | None = None  # plr_mlp: periodic embedding
    sigma: Annotated[float, Field(gt=0)] | None = None
    channels: PositiveInt | None = None  # crnn, conv_transformer: conv feature maps
    conv_layers: PositiveInt | None = None
    time_stride: PositiveInt | None = None


class Register(_Section):
    export: Literal["none", "onnx", "torch_export"] = "onnx"
    require_beat_baseline: Annotated[bool, Field(strict=True)] | None = None  # null: the task's


class Mlflow(_Section):
    system_metrics_s: Annotated[float, Field(gt=0)] | None = None  # null: off


class Task(_Section):
    name: str


class Config(_Section):
    seed: Annotated[int, Field(strict=True)]
    task: Task
    # An alias: `register` is a pydantic BaseModel attribute (ABC registration).
    register_: Register = Field(Register(), alias="register")
    mlflow: Mlflow = Mlflow()
    optim: Optim
    train: Train
    trainer: Trainer
    tune: Tune
    model: Model


def check_config(cfg: DictConfig | dict[str, Any]) -> None:
    """Raise ConfigError naming every bad key, its value and what is allowed."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    try:
        Config.model_validate(tree)
    except ValidationError as e:
        lines = []
        for error in e.errors():
            key = ".".join(str(part) for part in error["loc"])
            value = error.get("input")
            shown = "missing" if error["type"] == "missing" else f"{value!r}"
            lines.append(f"{key}={shown}: {_allowed(error)}")
        raise ConfigError(
            "bad config value(s); fix them as Hydra overrides (e.g. optim.lr=0.001):\n  "
            + "\n  ".join(lines)
        ) from None
    members, task = tree["model"].get("members") or 1, tree["task"]["name"]
    if members > 1 and task != "classifier":
        raise ConfigError(
            f"model.members={members} (a deep ensemble averaging class probabilities) is for "
            f"task=classifier only, not task={task}: set model.members=1"
        )


def _allowed(error: dict[str, Any]) -> str:
    """Pydantic's message in the config's words: bool is not an integer here either."""
    message = error["msg"]
    return message.replace("Input should be", "must be").replace("input should be", "must be")
