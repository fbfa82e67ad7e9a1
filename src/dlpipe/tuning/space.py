"""A model's search space (conf/search/<model>.yaml) sampled by the configured Optuna sampler,
judged by the configured pruner; and trial 0 of every study, the experiment's own settings."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SAMPLE_TYPES = ("float", "int", "categorical")
SAMPLERS = ("tpe", "gp", "cmaes", "random", "qmc", "nsga2")
PRUNERS = ("median", "percentile", "hyperband", "successive_halving", "none")
BRANCH = "__"  # `lr__sgd` sets config key `lr`: one range per branch of a conditional space


def suggest(
    trial: optuna.Trial,
    space: Mapping[str, Any],
    prefix: str = "",
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample every leaf of a (nested) search space; returns {"optim.lr": 0.003, ...}.

    A leaf with `when: {"optim.name": [sgd]}` is sampled only if the parameters sampled before
    it (in file order) have one of those values: a conditional space, e.g. momentum for SGD only.
    `lr__sgd` sets the config key `lr` under its own Optuna name, so one key can have a range
    per branch (and `search.optim.lr__sgd.low=0.05` still overrides from the command line).
    """
    params = {} if params is None else params
    for name, spec in leaves(space, prefix):
        if not _applies(spec.get("when"), params, name):
            continue
        key = config_key(name)
        if spec["type"] == "float":
            params[key] = trial.suggest_float(
                name, spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step")
            )
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(
                name, spec["low"], spec["high"], log=spec.get("log", False),
                step=spec.get("step", 1),
            )  # fmt: skip
        else:
            params[key] = trial.suggest_categorical(name, list(spec["choices"]))
    return params


def leaves(space: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Mapping[str, Any]]]:
    """(Optuna name, spec) of every leaf in file order; ValueError on a bad leaf."""
    found = []
    for key, spec in space.items():
        name = f"{prefix}{key}"
        if "@" in key:
            raise ValueError(
                f"search.{name}: `@` in a search-space key cannot be overridden from the command "
                f"line (Hydra reads it as a package); rename it {name.replace('@', BRANCH)}"
            )
        if "type" not in spec:
            found += leaves(spec, f"{name}.")
        elif spec["type"] not in SAMPLE_TYPES:
            raise ValueError(
                f"search.{name}.type is {spec['type']!r}: choose one of {SAMPLE_TYPES}"
            )
        else:
            found.append((name, spec))
    return found


def config_key(name: str) -> str:
    """The config key an Optuna parameter sets: "optim.lr__sgd" -> "optim.lr"."""
    *parents, leaf = name.split(".")
    return ".".join([*parents, leaf.split(BRANCH, 1)[0]])


def _applies(when: Mapping[str, Any] | None, params: Mapping[str, Any], name: str) -> bool:
    if not when:
        return True
    for key, allowed in when.items():
        if key not in params:
            raise ValueError(
                f"search.{name}.when refers to {key!r}, which is not sampled before it: put "
                f"{key} earlier in the search space"
            )
        if params[key] not in (allowed if isinstance(allowed, list | tuple) else [allowed]):
            return False
    return True


def own_settings(cfg: DictConfig) -> dict[str, Any]:
    """The experiment's own values of the search space's leaves, by Optuna name: enqueued as
    trial 0, so a study can only match or improve on the settings it starts from. A value a
    categorical leaf does not offer is left to the sampler (Optuna cannot store it), with a
    warning; a float or int outside its range is kept (Optuna warns)."""
    params: dict[str, Any] = {}
    config: dict[str, Any] = {}  # config key -> value, for the `when` conditions
    for name, spec in leaves(OmegaConf.to_container(cfg.search, resolve=True)):
        if not _applies(spec.get("when"), config, name):
            continue
        value = OmegaConf.select(cfg, config_key(name))
        if value is None:
            continue
        if spec["type"] == "categorical" and value not in list(spec["choices"]):
            log.warning(
                "trial 0 (the experiment's own settings): %s=%r is not among search.%s.choices "
                "%s, so the sampler picks it",
                config_key(name), value, name, list(spec["choices"]),
            )  # fmt: skip
            continue
        params[name] = value
        config[config_key(name)] = value
    return params


def make_sampler(spec: DictConfig, seed: int, n_objectives: int) -> optuna.samplers.BaseSampler:
    """The configured sampler (tune.sampler.name: one of SAMPLERS) with its main settings."""
    name = spec.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(
                n_startup_trials=spec.n_startup_trials,
                multivariate=spec.multivariate,
                seed=seed,
            )
        if name == "gp":
            return optuna.samplers.GPSampler(n_startup_trials=spec.n_startup_trials, seed=seed)
        if name == "cmaes":
            # Categorical leaves are outside CMA-ES: they are sampled at random.
            return optuna.samplers.CmaEsSampler(
                n_startup_trials=spec.n_startup_trials, seed=seed, warn_independent_sampling=False
            )
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "qmc":
            return optuna.samplers.QMCSampler(qmc_type=spec.qmc_type, seed=seed)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=spec.population_size, seed=seed)
    raise ValueError(f"tune.sampler.name is {name!r}: choose one of {SAMPLERS}")


def make_pruner(spec: DictConfig, n_objectives: int, max_epochs: int) -> optuna.pruners.BasePruner:
    """The configured pruner (tune.pruner.name: one of PRUNERS). Optuna cannot prune a study
    with several objectives, so there it is always NopPruner (and the stage says so)."""
    name = spec.name
    if name not in PRUNERS:
        raise ValueError(f"tune.pruner.name is {name!r}: choose one of {PRUNERS}")
    if name == "none" or n_objectives > 1:
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps
        )
    if name == "percentile":
        return optuna.pruners.PercentilePruner(
            spec.percentile,
            n_startup_trials=spec.n_startup_trials,
            n_warmup_steps=spec.n_warmup_steps,
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=spec.min_resource,
            max_resource=max_epochs,  # a trial's resource is its epochs
            reduction_factor=spec.reduction_factor,
        )
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=spec.min_resource, reduction_factor=spec.reduction_factor
    )
