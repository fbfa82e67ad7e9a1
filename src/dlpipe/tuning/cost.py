"""What a search space can cost, said before a study draws from it.

A quick tune must not draw, say, a three-layer LSTM-512 whose one epoch runs a quarter of an
hour. So before a fresh study the stage builds the space's costliest point, trains and validates
a few batches of it on the trial's device, and estimates the seconds of one epoch and of one
trial (`tune.max_epochs` epochs). The estimate is logged, kept as the study's user attribute
`cost` (it shows in optuna-dashboard and `study.json`), a warning when it is over
`tune.trial_timeout_s` (those trials will be cut), and an error, before any trial, when it is
over `tune.cost.max_trial_s`; both messages name the leaves that make the point costly.

The costliest point: every integer leaf under `model.` at its top (`high`, or the largest
numeric choice), each other categorical `model.` leaf at the choice that gives the most
trainable parameters (tried one leaf at a time, in file order), and `train.batch_size` at its
smallest (the most steps per epoch). The other leaves (optimizer, float rates such as dropout)
keep the experiment's own values: they change what a trial learns, hardly what it costs.
Parameters stand in for time when choosing between non-numeric choices (a cell type); an
integer leaf that costs time without parameters (a sequence length) is at its top anyway.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from dlpipe.data import load_meta
from dlpipe.errors import UserError
from dlpipe.logs import quieted
from dlpipe.tasks import get_task
from dlpipe.tuning.space import config_key, leaves

log = logging.getLogger(__name__)

LIGHTNING_INFO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")

BATCH = "train.batch_size"


class SpaceTooCostlyError(UserError, ValueError):
    """The search space's costliest point is estimated over `tune.cost.max_trial_s`."""


@dataclass(frozen=True)
class Cost:
    """The estimate for one point of a search space, on the device trials train on."""

    point: dict[str, Any]  # config key -> value of the costliest point's search leaves
    params: int  # trainable parameters
    step_s: float  # seconds of one training batch (mean of the timed ones)
    val_step_s: float  # seconds of one validation batch
    # Batches in one training / validation epoch at the point's batch size; None for a loader
    # without a length (an iterable dataset), and then epoch_s and trial_s are None too.
    train_batches: int | None
    val_batches: int | None
    epoch_s: float | None  # step_s * train_batches + val_step_s * val_batches
    trial_s: float | None  # epoch_s * tune.max_epochs
    device: str
    # (leaf, parameters with it at its top / at its bottom), the costliest leaf first
    drivers: list[tuple[str, float]]

    def line(self) -> str:
        point = ", ".join(f"{k}={v}" for k, v in self.point.items()) or "the experiment's own"
        if self.trial_s is None:
            return (
                f"the search space's costliest point ({point}) has {self.params:,} parameters "
                f"and trains a batch in about {self.step_s * 1000:,.1f} ms on {self.device} "
                "(its loader has no length, so an epoch's time is not known)"
            )
        return (
            f"the search space's costliest point ({point}) has {self.params:,} parameters and "
            f"trains an epoch in about {self.epoch_s:,.1f} s on {self.device} "
            f"({self.train_batches:,} training and {self.val_batches:,} validation batches at "
            f"{self.step_s * 1000:,.1f} / {self.val_step_s * 1000:,.1f} ms), so one trial "
            f"costs about {self.trial_s:,.0f} s"
        )

    def fix(self) -> str:
        leaves = ", ".join(
            f"search.{k} (x{r:.1f} parameters)" for k, r in self.drivers[:3] if r > 1
        )
        narrow = f"narrow {leaves}" if leaves else "narrow the space's model leaves"
        return f"{narrow}, lower tune.max_epochs or data.limit"


def costliest_point(cfg: DictConfig) -> dict[str, Any]:
    """The config overrides (config key -> value) of the space's costliest point (module
    docstring); {} when the space has no model leaf and no batch size."""
    point: dict[str, Any] = {}
    chosen_by_params = []
    for name, spec in leaves(OmegaConf.to_container(cfg.search, resolve=True)):
        key = config_key(name)
        if key == BATCH and spec["type"] == "categorical":
            point[key] = min(spec["choices"])
        elif key == BATCH:
            point[key] = spec["low"]
        elif not key.startswith("model.") or spec["type"] == "float":
            continue  # a float model leaf is a rate (dropout), not a size
        elif spec["type"] == "int":
            point[key] = spec["high"]
        elif all(_number(c) for c in spec["choices"]):
            point[key] = max(spec["choices"])
        else:
            chosen_by_params.append((key, list(spec["choices"])))
    for key, choices in chosen_by_params:  # greedy, with the numeric leaves already at the top
        counts = [params(cfg, {**point, key: choice}) for choice in choices]
        point[key] = choices[counts.index(max(counts))]
    return point


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _with(cfg: DictConfig, point: dict[str, Any]) -> DictConfig:
    """A copy of `cfg` with the point's dotted keys set (as a trial sets them)."""
    cfg = cfg.copy()
    for key, value in point.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def params(cfg: DictConfig, point: dict[str, Any]) -> int:
    """Trainable parameters of the task's module built for `cfg` with `point` applied."""
    cfg = _with(cfg, point)
    module = get_task(cfg.task.name).module(cfg, load_meta(cfg.paths.processed))
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def drivers(cfg: DictConfig, point: dict[str, Any], top: int) -> list[tuple[str, float]]:
    """Each numeric model leaf of the point, with how many times the point's parameters are
    those of the same point with that leaf at its bottom; the largest factor first."""
    found = []
    for name, spec in leaves(OmegaConf.to_container(cfg.search, resolve=True)):
        key = config_key(name)
        if key not in point or not key.startswith("model.") or spec["type"] == "float":
            continue
        bottom = spec["low"] if spec["type"] == "int" else min(spec["choices"], default=None)
        if not _number(bottom) or bottom == point[key]:
            continue
        found.append((name, top / max(params(cfg, {**point, key: bottom}), 1)))
    return sorted(found, key=lambda kv: -kv[1])


class _Clock(Callback):
    """Wall seconds of each training and validation batch; the first of each is the warm-up."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []
        self._start = 0.0

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start = self._now(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.train.append(self._now(trainer) - self._start)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start = self._now(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.val.append(self._now(trainer) - self._start)


def estimate(cfg: DictConfig) -> Cost:
    """Build the space's costliest point, train and validate 1 + `tune.cost.steps` batches of
    it on one of the trial's devices (the first is a warm-up, not timed) and scale to one epoch
    and one trial. Seconds of setup (data loading, process start) are not included."""
    point = costliest_point(cfg)
    run_cfg = _with(cfg, point)
    meta = load_meta(run_cfg.paths.processed)
    task = get_task(run_cfg.task.name)
    data, module = task.datamodule(run_cfg, meta), task.module(run_cfg, meta)
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    clock = _Clock()
    steps = 1 + cfg.tune.cost.steps
    kwargs = OmegaConf.to_container(run_cfg.trainer, resolve=True) | {
        "devices": 1, "strategy": "auto", "max_epochs": 1, "limit_train_batches": steps,
        "limit_val_batches": steps, "num_sanity_val_steps": 0, "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "callbacks": [clock],
    }  # fmt: skip
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # Lightning's INFO lines (accelerator found, tips, max_epochs reached) are about this probe,
    # not about the study: kept out of the stage's log.
    with warnings.catch_warnings(), quieted(LIGHTNING_INFO):
        warnings.simplefilter("ignore")  # few batches, no loader workers: Lightning's advice
        trainer = L.Trainer(**kwargs)
        trainer.fit(module, datamodule=data)
    train_batches, val_batches = _batches(data.train_dataloader()), _batches(data.val_dataloader())
    step_s = _mean(clock.train)
    val_step_s = _mean(clock.val)
    epoch_s = (
        None
        if train_batches is None or val_batches is None
        else step_s * train_batches + val_step_s * val_batches
    )
    return Cost(
        point=point,
        params=n_params,
        step_s=step_s,
        val_step_s=val_step_s,
        train_batches=train_batches,
        val_batches=val_batches,
        epoch_s=epoch_s,
        trial_s=None if epoch_s is None else epoch_s * cfg.tune.max_epochs,
        device=str(trainer.strategy.root_device),
        drivers=drivers(cfg, point, n_params),
    )


def _batches(loader: Any) -> int | None:
    """Batches in one pass of a loader (or a list of loaders); None for an iterable without a
    length (then an epoch's time is not known, only a batch's)."""
    try:
        return sum(len(one) for one in loader) if isinstance(loader, list | tuple) else len(loader)
    except TypeError:
        return None


def _mean(values: list[float]) -> float:
    """Mean of the timed batches after the warm-up; the warm-up itself when it was the only
    one (an epoch of one batch); 0 when there was none."""
    timed = values[1:] or values
    return sum(timed) / len(timed) if timed else 0.0


def check_cost(cfg: DictConfig) -> dict[str, Any]:
    """Estimate the space's costliest trial (`estimate`), log it, warn when it is over
    `tune.trial_timeout_s` and raise SpaceTooCostlyError when it is over
    `tune.cost.max_trial_s`. Returns the estimate as a plain dict (the study keeps it)."""
    cost = estimate(cfg)
    log.info("%s (tune.max_epochs=%d)", cost.line(), cfg.tune.max_epochs)
    limit = cfg.tune.cost.max_trial_s
    if cost.trial_s is None:
        if limit is not None or cfg.tune.trial_timeout_s is not None:
            log.warning("tune.cost.max_trial_s and tune.trial_timeout_s cannot be checked: %s",
                        cost.line())  # fmt: skip
        return _plain(cost)
    if limit is not None and cost.trial_s > limit:
        raise SpaceTooCostlyError(
            f"{cost.line()}, over tune.cost.max_trial_s={limit:g}: {cost.fix()}, or raise "
            "tune.cost.max_trial_s (null: no limit)"
        )
    timeout = cfg.tune.trial_timeout_s
    if timeout is not None and cost.trial_s > timeout:
        epochs = int(timeout // cost.epoch_s) if cost.epoch_s > 0 else 0
        log.warning(
            "%s, over tune.trial_timeout_s=%g: trials near that point stop after about %d "
            "epoch(s) of %d and keep their best one (pruned if none validated). To give them "
            "every epoch: %s, or raise tune.trial_timeout_s",
            cost.line(), timeout, epochs, cfg.tune.max_epochs, cost.fix(),
        )  # fmt: skip
    return _plain(cost)


def _plain(cost: Cost) -> dict[str, Any]:
    found = asdict(cost)
    found["drivers"] = [list(d) for d in cost.drivers]  # JSON, as the study stores it
    return found


def main(argv: list[str] | None = None) -> int:
    """`python -m dlpipe.tuning.cost [OVERRIDE ...]`, from the repository root: what the tune
    stage would estimate for the composed config (e.g. `experiment=sst2_lstm tune.max_epochs=5`),
    printed without starting a study. The processed data must exist (`dvc repro preprocess`).
    Exit 1 when the estimate is over `tune.cost.max_trial_s`."""
    import sys

    from hydra import compose, initialize_config_dir

    from dlpipe.errors import reported
    from dlpipe.smoke import sized

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    conf = Path.cwd() / "conf"
    if not (conf / "config.yaml").exists():
        print(f"no conf/config.yaml under {Path.cwd()}: run this from the repository root")
        return 2
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = sized(compose("config", overrides=list(sys.argv[1:] if argv is None else argv)))
    with reported("cost"):  # over the limit: one line, exit 1
        try:
            cost = check_cost(cfg)
        except FileNotFoundError as missing:  # no processed data
            print(f"cost: {missing}", file=sys.stderr)
            return 1
    n, workers = cfg.tune.n_trials, cfg.tune.workers
    if cost["trial_s"] is None:
        print(f"{cost['params']:,} parameters, {cost['step_s'] * 1000:,.1f} ms per batch")
        return 0
    print(
        f"{cost['params']:,} parameters, {cost['epoch_s']:,.1f} s per epoch, "
        f"{cost['trial_s']:,.0f} s per trial of {cfg.tune.max_epochs} epoch(s); "
        f"tune.n_trials={n} trials that costly: {cost['trial_s'] * n / workers:,.0f} s with "
        f"{workers} worker(s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
