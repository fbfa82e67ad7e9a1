"""The GPU suite: what one short loan of a GPU machine should measure, in one run, into one folder.

    python bench/gpu_suite.py --data .gpu/data --out OUT             # on the GPU (bench/gpu.sh)
    python bench/gpu_suite.py --data ../shared/datasets --out OUT --dry-run   # CPU, smoke sizes

Parts (each skipped, and said so, when its dataset is not under --data):
- `fmnist`: the Fashion-MNIST CNN (the default experiment, trainer=gpu, bf16-mixed): fit/raw epoch
  ratio against bench_fit.py's hand-written loop, without and with `torch.compile`; then seconds of
  training until test accuracy first reaches 93 % (test accuracy measured after every epoch on the
  resident test tensors, its own time not counted).
- `gpt`, `lstm`: the Tiny Shakespeare char GPT and char LSTM experiments; best val/loss (nats/char)
  and seconds until it is at most 1.47 (GPT) / 1.45 (LSTM).
- `fsdd`: the FSDD CNN on the official split (first 5 recordings of each speaker and digit are
  test); test accuracy and seconds of training.
Each part has a wall-clock cap (`trainer.max_time`), so the whole suite fits the loan (≤ 8 min on
an H200). Writes OUT/results.json, OUT/results.md and OUT/<part>.log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

import dlpipe.train
from dlpipe.collect import collect
from dlpipe.data import MIRROR_ENV, load_split
from dlpipe.preprocess import preprocess
from dlpipe.smoke import sized

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench_fit's raw loop and epoch timer, side by side
import bench_fit  # noqa: E402

# part -> (experiment, dataset folder under --data, monitored threshold, cap in s on the GPU)
PARTS = {
    "fmnist": (None, "fashion-mnist", 0.93, 150),
    "gpt": ("shakespeare_gpt", "tinyshakespeare", 1.47, 150),
    "lstm": ("shakespeare_lstm", "tinyshakespeare", 1.45, 75),
    "fsdd": ("fsdd_cnn", "fsdd", None, 60),
}


def compose_cfg(experiment: str | None, work: Path, dry_run: bool, *extra: str) -> DictConfig:
    if dry_run:  # smoke sizes win over the keys they set: an epoch count goes through tiny
        extra = tuple(f"tiny.{e}" if e.startswith("trainer.max_epochs=") else e for e in extra)
    overrides = [
        *([f"experiment={experiment}"] if experiment else []),
        f"trainer={'cpu' if dry_run else 'gpu'}",
        f"smoke={dry_run}",
        f"paths.raw={work}/raw",
        f"paths.processed={work}/processed",
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        "train.use_tuned=false",
        *extra,
    ]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return sized(compose("config", overrides=overrides))


def prepare(cfg: DictConfig, data_dir: Path) -> None:
    os.environ[MIRROR_ENV] = str(data_dir)
    data = dlpipe.train.to_dict(cfg.data)
    collect(data, Path(cfg.paths.raw))
    if not (Path(cfg.paths.processed) / "meta.json").exists():
        preprocess(data, Path(cfg.paths.raw), Path(cfg.paths.processed), cfg.seed)


class Progress(Callback):
    """Seconds of training (own measuring time excluded) and the monitored value after every
    epoch; with `test_acc`, also the accuracy of `pl_module.net` on the test split."""

    def __init__(self, monitor: str, processed: str | None = None):
        self.monitor, self.rows, self.spent, self.t0 = monitor, [], 0.0, None
        self.test = None
        if processed is not None:
            self.test = [torch.from_numpy(a) for a in load_split(processed, "test")]

    def on_train_start(self, trainer, pl_module):
        self.t0 = bench_fit.now(pl_module.device)

    def on_train_epoch_end(self, trainer, pl_module):
        # After the epoch's validation and the module's own epoch-end logging (the LM computes
        # val/loss there).
        t = bench_fit.now(pl_module.device)
        row = {"epoch": trainer.current_epoch, "seconds": t - self.t0 - self.spent}
        row[self.monitor] = float(trainer.callback_metrics[self.monitor])
        if self.test is not None:
            row["test/acc"] = self.test_accuracy(pl_module)
        self.rows.append(row)
        self.spent += bench_fit.now(pl_module.device) - t

    @torch.inference_mode()
    def test_accuracy(self, pl_module) -> float:
        x, y = (t.to(pl_module.device) for t in self.test)
        was_training = pl_module.training
        pl_module.eval()
        with torch.autocast(pl_module.device.type, torch.bfloat16, enabled=x.is_cuda):
            pred = torch.cat([pl_module.net(xb).argmax(1) for xb in x.split(1024)])
        pl_module.train(was_training)
        return (pred == y).float().mean().item()


def first_reaching(rows: list[dict], key: str, threshold: float, higher: bool) -> float | None:
    for row in rows:
        if (row[key] >= threshold) if higher else (row[key] <= threshold):
            return round(row["seconds"], 2)
    return None


def timed_fit(cfg: DictConfig, progress: Progress, name: str) -> float:
    t0 = time.perf_counter()
    dlpipe.train.fit(cfg, run_name=name, callbacks=[progress], tags={"stage": "bench"})
    return time.perf_counter() - t0


def run_fmnist(work: Path, data_dir: Path, dry_run: bool, cap_s: float) -> dict:
    device = torch.device("cpu" if dry_run else "cuda")
    out: dict = {}
    epochs = 2 if dry_run else 5
    for compiled in (False, True):
        cfg = compose_cfg(
            None, work, dry_run, f"trainer.max_epochs={epochs}", f"train.compile={compiled}",
            "train.early_stopping_patience=null",
        )  # fmt: skip
        prepare(cfg, data_dir)
        raw = bench_fit.raw_loop(cfg, device)
        fit = bench_fit.bench_fit(cfg, device)
        # The first epoch is warm-up (and compilation): left out, as in bench_fit.
        raw_s = sum(raw["epoch_s"][1:]) / (epochs - 1)
        fit_s = sum(fit["epoch_s"][1:]) / (epochs - 1)
        key = "compiled" if compiled else "eager"
        out[key] = {
            "raw_epoch_s": round(raw_s, 4),
            "fit_epoch_s": round(fit_s, 4),
            "fit_over_raw": round(fit_s / raw_s, 3),
            "raw_val_acc": round(raw["val_acc"], 4),
            "fit_val_acc": round(fit["val_acc"], 4),
        }
    cfg = compose_cfg(
        None, work, dry_run, "trainer.max_epochs=40", f"+trainer.max_time={{seconds: {cap_s}}}",
        "train.early_stopping_patience=null",
    )  # fmt: skip
    progress = Progress("val/acc", cfg.paths.processed)
    wall = timed_fit(cfg, progress, "bench-gpu-fmnist")
    out["to_93"] = {
        "seconds_to_0.93_test_acc": first_reaching(progress.rows, "test/acc", 0.93, True),
        "best_test_acc": round(max(r["test/acc"] for r in progress.rows), 4),
        "epochs": len(progress.rows),
        "wall_s": round(wall, 1),
        "curve": progress.rows,
    }
    return out


def run_lm(experiment: str, threshold: float, work: Path, data_dir: Path, dry_run: bool,
           cap_s: float) -> dict:  # fmt: skip
    cfg = compose_cfg(experiment, work, dry_run, f"+trainer.max_time={{seconds: {cap_s}}}")
    prepare(cfg, data_dir)
    progress = Progress("val/loss")
    wall = timed_fit(cfg, progress, f"bench-gpu-{experiment}")
    return {
        f"seconds_to_{threshold}_nats": first_reaching(progress.rows, "val/loss", threshold, False),
        "best_val_loss": round(min(r["val/loss"] for r in progress.rows), 4),
        "epochs": len(progress.rows),
        "wall_s": round(wall, 1),
        "curve": progress.rows,
    }


def run_fsdd(work: Path, data_dir: Path, dry_run: bool, cap_s: float) -> dict:
    cfg = compose_cfg("fsdd_cnn", work, dry_run, f"+trainer.max_time={{seconds: {cap_s}}}")
    prepare(cfg, data_dir)
    progress = Progress("val/acc", cfg.paths.processed)
    wall = timed_fit(cfg, progress, "bench-gpu-fsdd")
    last = progress.rows[-1]
    return {
        "test_acc_last_epoch": round(last["test/acc"], 4),
        "best_test_acc": round(max(r["test/acc"] for r in progress.rows), 4),
        "train_seconds": round(last["seconds"], 1),
        "epochs": len(progress.rows),
        "wall_s": round(wall, 1),
    }


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def markdown(results: dict) -> str:
    lines = [f"GPU suite, {results['environment']}", ""]
    for part, value in results["parts"].items():
        if not isinstance(value, dict):
            lines.append(f"- **{part}**: {value}")
            continue
        shown = {k: v for k, v in value.items() if k != "curve"}
        if "to_93" in shown:
            shown["to_93"] = {k: v for k, v in shown["to_93"].items() if k != "curve"}
        lines.append(f"- **{part}**: `{json.dumps(shown)}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, required=True, help="a mirror-layout dataset folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, smoke sizes: does it run?")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run to check the suite on CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    results = {"environment": environment(), "dry_run": args.dry_run, "parts": {}}
    for part in args.parts:
        experiment, folder, threshold, cap_s = PARTS[part]
        if not (args.data / folder).is_dir():
            results["parts"][part] = f"skipped: no {folder}/ under {args.data}"
            continue
        work = args.out / "work" / part
        cap_s = 20 if args.dry_run else cap_s
        t0 = time.perf_counter()
        try:
            if part == "fmnist":
                value = run_fmnist(work, args.data, args.dry_run, cap_s)
            elif part == "fsdd":
                value = run_fsdd(work, args.data, args.dry_run, cap_s)
            else:
                value = run_lm(experiment, threshold, work, args.data, args.dry_run, cap_s)
        except Exception:  # one part failing must not cost the loan's other figures
            value = {"error": traceback.format_exc(limit=8)}
        value["part_wall_s"] = round(time.perf_counter() - t0, 1)
        results["parts"][part] = value
        (args.out / "results.json").write_text(json.dumps(results, indent=1))  # as it goes
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    failed = [p for p, v in results["parts"].items() if isinstance(v, dict) and "error" in v]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
