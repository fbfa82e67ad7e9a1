"""The device pool: N worker processes sharing one study and one budget, each pinned to its
own devices (CUDA_VISIBLE_DEVICES; plain CPU processes on a machine without GPUs), each pulling
its next trial as soon as it is free. A worker that dies leaves the others running; the trial
it held is failed and does not count, so they run a replacement."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from dlpipe.tuning.study import close_stale_trials

log = logging.getLogger(__name__)


def device_groups(devices: object, workers: int, per_trial: int) -> list[list[int] | None]:
    """The GPU ids of each worker: `devices` is "auto" (every visible GPU) or a list of ids;
    each worker gets `per_trial` of them. None for every worker on a machine without GPUs.
    ValueError when there are GPUs but too few for the pool."""
    if devices == "auto":
        import torch

        ids = list(range(torch.cuda.device_count()))
    else:
        ids = [int(d) for d in devices]
    if not ids:
        return [None] * workers
    if len(ids) < workers * per_trial:
        raise ValueError(
            f"tune.workers={workers} x tune.devices_per_trial={per_trial} needs "
            f"{workers * per_trial} GPUs, tune.devices gives {ids}: lower tune.workers or list "
            "more devices"
        )
    return [ids[i * per_trial : (i + 1) * per_trial] for i in range(workers)]


def run_pool(cfg: DictConfig, url: str, study: optuna.Study, client: MlflowClient) -> None:
    """Start tune.workers worker processes on the study (created, with its MLflow parent run,
    by the caller) and wait for all; fail the trials of any that dies. RuntimeError when every
    worker died before the budget was spent."""
    groups = device_groups(cfg.tune.devices, cfg.tune.workers, cfg.tune.devices_per_trial)
    parent_id = study.user_attrs["mlflow_run_id"]
    with tempfile.TemporaryDirectory(prefix="dlpipe-tune-") as tmp:
        config = Path(tmp) / "config.yaml"
        # The workers open the study by its name, not by recomputing it from their copy.
        OmegaConf.save(cfg, config, resolve=True)
        saved = OmegaConf.load(config)
        saved.tune.study_name = study.study_name
        OmegaConf.save(saved, config)
        procs = {}
        for i, group in enumerate(groups):
            env = dict(os.environ)
            if group is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, group))
            else:  # CPU workers share the cores rather than each spawning a thread per core
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(groups))))
            label = f"{i}" + (f"@gpu{','.join(map(str, group))}" if group else "@cpu")
            procs[label] = subprocess.Popen(
                [sys.executable, "-m", "dlpipe.tune", str(config), label, url], env=env
            )
            log.info("worker %s started (pid %d)", label, procs[label].pid)
        failed = []
        while procs:
            time.sleep(0.5)
            for label, proc in list(procs.items()):
                if proc.poll() is None:
                    continue
                del procs[label]  # reaped: its pid no longer answers, so its trials are stale
                if proc.returncode != 0:
                    failed.append(label)
                    log.error(
                        "worker %s (pid %d) died with code %d; the others go on",
                        label, proc.pid, proc.returncode,
                    )  # fmt: skip
                    close_stale_trials(study, client, parent_id)
        if len(failed) == len(groups):
            raise RuntimeError(
                f"every tune worker died ({failed}): see their log lines above "
                "(prefixed [worker N])"
            )
