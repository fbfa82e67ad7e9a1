"""`smoke=true`: any experiment at test size. The sizes are config (`tiny` in conf/config.yaml and
conf/tiny/); `sized` is where every stage applies them, on the config it was given."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dlpipe.schema import check_config

log = logging.getLogger(__name__)


def sized(cfg: DictConfig) -> DictConfig:
    """`cfg` as the stages run it. With `smoke: true` the `tiny` sizes are merged over it (they
    win over the keys they name) and the search leaves that would set one of those keys are
    dropped, so tuning trials stay tiny too. The `tiny` node itself is dropped either way: it
    describes smoke runs, not this run.

    Hydra can't make `smoke=true` a config group (a group's choice must be a string), and DVC
    composes params.yaml without our code, so the merge happens here, at each stage's entry.
    """
    cfg = cfg.copy()
    with open_dict(cfg):
        tiny = cfg.pop("tiny", None)
    if not cfg.get("smoke") or tiny is None:
        return cfg
    # The values given are checked before tiny replaces them: a bad one is an error at any size.
    check_config(cfg)
    sized_cfg = OmegaConf.merge(cfg, tiny)
    fixed = set(_leaf_keys(OmegaConf.to_container(tiny, resolve=True)))
    changed = {
        key: (OmegaConf.select(cfg, key), OmegaConf.select(sized_cfg, key))
        for key in sorted(fixed)
        if OmegaConf.select(cfg, key) != OmegaConf.select(sized_cfg, key)
    }
    if changed:
        log.info(
            "smoke=true sets %s (change a smoke size with tiny.<key>=...)",
            ", ".join(f"{k}={new} (was {old})" for k, (old, new) in changed.items()),
        )
    if "search" in sized_cfg:
        # Assigned whole: a merge could not remove the leaves.
        sized_cfg.search = _without(OmegaConf.to_container(sized_cfg.search), fixed)
    return sized_cfg


def _leaf_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the leaves of `tree`; a list is one leaf (it replaces, not merges)."""
    keys = []
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _without(space: Mapping[str, Any], fixed: set[str], prefix: str = "") -> dict[str, Any]:
    """The search space minus the leaves whose config key (`lr__sgd` sets `lr`) is in `fixed`."""
    kept = {}
    for key, spec in space.items():
        name = f"{prefix}{key.split('__', 1)[0]}"  # as dlpipe.tuning.space.config_key
        if "type" not in spec:
            inner = _without(spec, fixed, f"{name}.")
            if inner:
                kept[key] = inner
        elif name not in fixed:
            kept[key] = spec
    return kept
