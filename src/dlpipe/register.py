"""Stage 6: log the model as an MLflow pyfunc, register it as `@challenger`, and promote it to
`@champion` only when its test metric beats the current champion's (higher or lower, as
`register.direction` says). The pyfunc itself is the task's (`Task.log_model`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from omegaconf import DictConfig

from dlpipe.data import load_meta, write_json
from dlpipe.schema import check_config
from dlpipe.tasks import get_task
from dlpipe.tracking import setup_mlflow

log = logging.getLogger(__name__)


def champion_gate(challenger: float, champion: float | None, maximize: bool = True) -> bool:
    """Promote when there is no champion yet, or the challenger is strictly better."""
    if champion is None:
        return True
    return challenger > champion if maximize else challenger < champion


def register(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg)
    run = json.loads((Path(cfg.paths.train) / "run.json").read_text())
    metrics = json.loads((Path(cfg.paths.reports) / "evaluate" / "metrics.json").read_text())
    metric = cfg.register.metric
    if metric not in metrics:
        raise KeyError(
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
    promoted = champion_gate(challenger_value, champion_value, cfg.register.direction == "maximize")
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
        decision = "promoted to champion" + (f" over v{champion.version}" if champion else "")
    else:
        decision = f"kept v{champion.version} as champion"
    for key, value in {
        metric: challenger_value,
        "gate.champion_version": champion.version if champion else "none",
        "gate.champion_value": champion_value if champion else "none",
        "gate.decision": decision,
    }.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.update_model_version(
        name,
        version,
        description=f"{metric}={challenger_value:.4f} vs champion "
        f"{'none' if champion_value is None else f'{champion_value:.4f}'}: {decision}",
    )
    result = {
        "model_name": name,
        "version": int(version),
        "model_uri": f"models:/{name}/{version}",
        "metric": metric,
        "value": challenger_value,
        "champion_value_before": champion_value,
        "decision": decision,
        "champion_version": int(version) if promoted else int(champion.version),
    }
    write_json(Path(cfg.paths.reports) / "register.json", result)
    log.info("registered %s v%s (%s=%.4f): %s", name, version, metric, challenger_value, decision)
    return result


def _metric_of(client: MlflowClient, version: Any, metric: str) -> float:
    """The gate metric of a registered version: its tag, else its training run's metric."""
    if metric in version.tags:
        return float(version.tags[metric])
    run_metrics = client.get_run(version.run_id).data.metrics
    if metric in run_metrics:
        return run_metrics[metric]
    raise KeyError(
        f"champion v{version.version} of {version.name!r} has no {metric!r} to compare against: "
        f"set register.metric to the metric it was promoted on, or pick a new register.model_name"
    )
