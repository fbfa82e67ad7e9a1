"""Several objectives for one study: what a trial is scored on, the Pareto front Optuna keeps,
the rule that picks one trial from it, and the front as an MLflow table and plot.

Besides any metric the task logs per epoch (its best epoch counts for the monitored one, the
last epoch for others), three are measured on the trial itself:
`model/params` (trainable parameters), `time/epoch_s` (wall seconds per epoch, setup included)
and `latency/sample_ms` (inference milliseconds per validation sample on the trial's device).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import lightning as L
import optuna
from mlflow import MlflowClient
from omegaconf import DictConfig
from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)

MEASURED = ("model/params", "time/epoch_s", "latency/sample_ms")
CONSTRAINT = re.compile(r"^\s*([\w/.\-]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # maximize | minimize


def objectives(cfg: DictConfig) -> list[Objective]:
    """tune.objectives, or the one objective tune.metric/tune.direction."""
    given = cfg.tune.objectives or [{"metric": cfg.tune.metric, "direction": cfg.tune.direction}]
    found = []
    for i, o in enumerate(given):
        if o.get("direction") not in ("maximize", "minimize") or not o.get("metric"):
            raise ValueError(
                f"tune.objectives[{i}] is {dict(o)}: give {{metric: <name>, direction: "
                "maximize|minimize}}, e.g. {metric: model/params, direction: minimize}"
            )
        found.append(Objective(str(o["metric"]), str(o["direction"])))
    return found


def measure(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: Any,
    fit_s: float,
    epochs: int,
    wanted: list[str],
) -> dict[str, float]:
    """The MEASURED metrics in `wanted` for a fitted trial (latency costs one validation pass)."""
    values: dict[str, float] = {}
    if "model/params" in wanted:
        values["model/params"] = float(
            sum(p.numel() for p in module.parameters() if p.requires_grad)
        )
    if "time/epoch_s" in wanted:
        values["time/epoch_s"] = fit_s / max(epochs, 1)
    if "latency/sample_ms" in wanted:
        loader = datamodule.val_dataloader()
        n = len(loader.dataset)
        start = time.perf_counter()
        trainer.validate(module, dataloaders=loader, verbose=False)
        values["latency/sample_ms"] = (time.perf_counter() - start) * 1000 / n
    return values


def constraints(cfg: DictConfig) -> list[tuple[str, str, float]]:
    """tune.constraints ("model/params<=100000", ...) as (metric, op, bound)."""
    parsed = []
    for text in cfg.tune.constraints:
        match = CONSTRAINT.match(str(text))
        if match is None:
            raise ValueError(
                f"tune.constraints has {text!r}: write '<metric><=<number>' or "
                "'<metric>>=<number>', e.g. 'model/params<=100000'"
            )
        parsed.append((match[1], match[2], float(match[3])))
    return parsed


def select(
    study: optuna.Study, goals: list[Objective], limits: list[tuple[str, str, float]]
) -> FrozenTrial:
    """The selection rule: among the Pareto front's trials that meet every constraint, the one
    best on the first objective (ties: the earlier trial). ValueError when none meets them."""
    names = [g.metric for g in goals]
    front = study.best_trials
    ok = [t for t in front if all(_meets(t, names, c) for c in limits)]
    if not ok:
        raise ValueError(
            f"no trial on the Pareto front meets tune.constraints {limits}: the front spans "
            + ", ".join(
                f"{n} {min(t.values[i] for t in front):.4g}..{max(t.values[i] for t in front):.4g}"
                for i, n in enumerate(names)
            )
            + "; loosen a constraint or raise tune.n_trials"
        )
    sign = -1 if goals[0].direction == "maximize" else 1
    return min(ok, key=lambda t: (sign * t.values[0], t.number))


def _meets(trial: FrozenTrial, names: list[str], limit: tuple[str, str, float]) -> bool:
    metric, op, bound = limit
    value = trial.values[names.index(metric)] if metric in names else trial.user_attrs.get(metric)
    if value is None:
        raise ValueError(
            f"tune.constraints names {metric!r}, which trial {trial.number} did not record: "
            f"constrain one of the objectives {names}"
        )
    return value <= bound if op == "<=" else value >= bound


def log_front(
    client: MlflowClient, run_id: str, study: optuna.Study, goals: list[Objective], chosen: int
) -> list[dict[str, Any]]:
    """Log the Pareto front to MLflow run `run_id`: `pareto_front.json` (a table: trial,
    objective values, params, chosen) and `pareto_front.png` (all trials, front highlighted).
    Returns the table's rows."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the stage runs without a display
    import matplotlib.pyplot as plt
    import pandas as pd

    names = [g.metric for g in goals]
    rows = [
        {"trial": t.number, **dict(zip(names, t.values, strict=True)), "chosen": t.number == chosen,
         **{f"param/{k}": v for k, v in t.params.items()}}
        for t in sorted(study.best_trials, key=lambda t: t.number)
    ]  # fmt: skip
    client.log_table(run_id, data=pd.DataFrame(rows), artifact_file="pareto_front.json")
    with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_pareto_front(study, target_names=names[:3])
    fig = ax.figure if hasattr(ax, "figure") else ax
    fig.set_size_inches(7, 5)
    fig.tight_layout()
    client.log_figure(run_id, fig, "pareto_front.png")
    plt.close(fig)
    return rows
