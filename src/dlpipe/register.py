"""Stage 6: log the model as an MLflow pyfunc, register it as `@challenger`, and promote it to
`@champion` only when its test metric beats the current champion's (higher or lower, as
`register.direction` says) and chance, and the classical baseline where
`register.require_beat_baseline` says so. The pyfunc itself is the task's (`Task.log_model`)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from omegaconf import DictConfig

from dlpipe.data import load_meta, write_json
from dlpipe.export import export_version
from dlpipe.lineage import record_lineage
from dlpipe.schema import ConfigError, check_config
from dlpipe.tasks import get_task
from dlpipe.tracking import setup_mlflow

log = logging.getLogger(__name__)


def champion_gate(
    challenger: float,
    champion: float | None,
    maximize: bool = True,
    floors: Mapping[str, float] | None = None,
) -> bool:
    """Promote when the challenger is strictly better than every floor, what a model must beat
    to be worth shipping at all (e.g. {"chance": 0.5, "baseline": 0.82}; a NaN floor is no
    floor), and than the champion if there is one. A NaN challenger (a diverged run) never is."""

    def beats(value: float) -> bool:
        return challenger > value if maximize else challenger < value

    if math.isnan(challenger):
        return False
    if not all(beats(value) for value in (floors or {}).values() if not math.isnan(value)):
        return False
    return champion is None or beats(champion)


def gate_floors(
    metrics: Mapping[str, float], metric: str, require_beat_baseline: bool
) -> dict[str, float]:
    """The floors of `metric` ("test/<suffix>") among the evaluated metrics: chance
    ("chance/<suffix>") always, the classical baseline ("baseline/<suffix>") when required."""
    suffix = metric.split("/", 1)[-1]
    names = ("chance", "baseline") if require_beat_baseline else ("chance",)
    return {n: metrics[f"{n}/{suffix}"] for n in names if f"{n}/{suffix}" in metrics}


def baseline_required(cfg: DictConfig) -> bool:
    """Whether the gate requires beating the classical baseline: register.require_beat_baseline,
    or where that is null the task's default, task.require_beat_baseline (false if unset)."""
    value = cfg.register.get("require_beat_baseline")
    return bool(cfg.task.get("require_beat_baseline", False) if value is None else value)


def register(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg)
    run = json.loads((Path(cfg.paths.train) / "run.json").read_text())
    metrics = json.loads((Path(cfg.paths.reports) / "evaluate" / "metrics.json").read_text())
    metric = cfg.register.metric
    if metric not in metrics:
        raise ConfigError(
            f"register.metric={metric!r} is not among the evaluated metrics {sorted(metrics)}"
        )
    meta = load_meta(cfg.paths.processed)
    task = get_task(cfg.task.name)

    setup_mlflow(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    client = MlflowClient()
    name = cfg.register.model_name
    checkpoint = Path(cfg.paths.train) / run["best_checkpoint"]
    model_uri = task.log_model(cfg, checkpoint, meta, run["run_id"])
    version = mlflow.register_model(model_uri, name).version
    client.set_registered_model_alias(name, "challenger", version)

    aliases = client.get_registered_model(name).aliases
    champion = (
        client.get_model_version(name, aliases["champion"]) if "champion" in aliases else None
    )
    champion_value = _metric_of(client, champion, metric) if champion is not None else None
    challenger_value = metrics[metric]
    maximize = cfg.register.direction == "maximize"
    floors = gate_floors(metrics, metric, baseline_required(cfg))
    promoted = champion_gate(challenger_value, champion_value, maximize, floors)
    missed = [
        f for f in floors if not champion_gate(challenger_value, None, maximize, {f: floors[f]})
    ]
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
        decision = "promoted to champion" + (f" over v{champion.version}" if champion else "")
    elif missed:
        decision = f"not promoted: no better than {' and '.join(missed)}" + (
            f"; v{champion.version} stays champion" if champion else "; no champion yet"
        )
    else:
        decision = f"kept v{champion.version} as champion"
    baseline = _baseline_comparison(metrics, metric, maximize, Path(cfg.paths.reports))
    for key, value in {
        metric: challenger_value,
        "gate.champion_version": champion.version if champion else "none",
        "gate.champion_value": champion_value if champion else "none",
        "gate.decision": decision,
        **{f"gate.{floor}_value": value for floor, value in floors.items()},
        **{f"gate.baseline_{k}": v for k, v in baseline.items() if k != "text"},
    }.items():
        client.set_model_version_tag(name, version, key, str(value))
    before = "none" if champion_value is None else f"{champion_value:.4f}"
    chance = f"; chance {floors['chance']:.4f}" if "chance" in floors else ""
    client.update_model_version(
        name,
        version,
        description=f"{metric}={challenger_value:.4f} vs champion {before}"
        f"{baseline.get('text', '')}{chance}: {decision}",
    )
    # The export (attached only if it matches the eager network) and the lineage chain.
    exported = export_version(cfg.register.export, task, cfg, checkpoint, meta, run["run_id"])
    paths = {k: str(v) for k, v in cfg.paths.items()}
    record_lineage(
        client, name, version, run["run_id"], paths, cfg.train.use_tuned, metrics, exported
    )
    result = {
        "model_name": name,
        "version": int(version),
        "model_uri": f"models:/{name}/{version}",
        "metric": metric,
        "value": challenger_value,
        "champion_value_before": champion_value,
        "decision": decision,
        "export": {k.removeprefix("export."): v for k, v in exported.items()},
        "floors": floors,
        "baseline_margin": baseline.get("margin"),
        "champion_version": int(version) if promoted else champion and int(champion.version),
    }
    write_json(Path(cfg.paths.reports) / "register.json", result)
    log.info("registered %s v%s (%s=%.4f): %s", name, version, metric, challenger_value, decision)
    return result


def _baseline_comparison(
    metrics: Mapping[str, float], metric: str, maximize: bool, reports: Path
) -> dict[str, Any]:
    """How `metric` compares with its classical baseline ("baseline/<suffix>"): its value,
    name (from the evaluate stage's baseline.json), margin (positive: the model is better, in
    the metric's units) and a sentence for the version's description; {} without a baseline."""
    key = f"baseline/{metric.split('/', 1)[-1]}"
    if key not in metrics:
        return {}
    value = metrics[key]
    margin = metrics[metric] - value if maximize else value - metrics[metric]
    info = reports / "evaluate" / "files" / "baseline.json"
    name = json.loads(info.read_text())["name"] if info.is_file() else "classical baseline"
    verdict = f"beat it by {margin:.4f}" if margin > 0 else f"missed it by {-margin:.4f}"
    text = f"; baseline {value:.4f} ({name}): {verdict}"
    return {"value": value, "name": name, "margin": margin, "text": text}


def _metric_of(client: MlflowClient, version: Any, metric: str) -> float:
    """The gate metric of a registered version: its tag, else its training run's metric."""
    if metric in version.tags:
        return float(version.tags[metric])
    run_metrics = client.get_run(version.run_id).data.metrics
    if metric in run_metrics:
        return run_metrics[metric]
    raise ConfigError(
        f"champion v{version.version} of {version.name!r} has no {metric!r} to compare against: "
        f"set register.metric to the metric it was promoted on, or pick a new register.model_name"
    )
