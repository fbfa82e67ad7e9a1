"""Benchmark: `dlpipe.train.fit` against a hand-written PyTorch loop (same model, data, batch size,
optimizer and schedule), the share of fit time spent in MLflow logging, and a no-op `dvc repro`.

    python bench/bench_fit.py --device cpu --limit 6000 --epochs 4   # a few minutes on 2 cores
    python bench/bench_fit.py --device cuda --epochs 6                # full data, trainer=gpu
    python bench/bench_fit.py --smoke --epochs 3 --dvc-reps 1         # does it run? (seconds)

Prints markdown and writes it, with the environment, as the device's section of --out; the other
sections of that file (e.g. a hand-written interpretation) are kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import mlflow
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

import dlpipe.train
from dlpipe.collect import collect
from dlpipe.data import MIRROR_ENV, load_meta, load_split
from dlpipe.datamodule import TensorDataModule
from dlpipe.models import create_model
from dlpipe.preprocess import preprocess
from dlpipe.smoke import sized

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / ".data"  # git-ignored; never touches the pipeline's data/
DEFAULT_MIRROR = ROOT.parent / "shared" / "datasets"
SECTIONS = {"cpu": "CPU", "cuda": "GPU (H100/H200)"}
# What the no-op repro runs on: every stage at smoke size (conf/tiny/), seconds.
SMOKE = ["smoke=true"]
# Never copied into the DVC sandbox: pipeline outputs and tracking stores.
NOT_COPIED = ("data/", "models/", "reports/", "mlruns/", "mlflow.db", "bench/.data/")


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return sized(compose("config", overrides=overrides))  # as a stage: smoke=true applies


def prepare_data(limit: int | None, overrides: list[str]) -> Path:
    """Collect (from the mirror) and preprocess Fashion-MNIST once per (limit, seed)."""
    cfg = compose_cfg([f"data.limit={'null' if limit is None else limit}", *overrides])
    limit = cfg.data.limit
    processed = DATA / f"processed-{limit or 'all'}-seed{cfg.seed}"
    if not (processed / "meta.json").exists():
        data = dlpipe.train.to_dict(cfg.data)
        collect(data, DATA / "raw")
        preprocess(data, DATA / "raw", processed, cfg.seed)
    return processed


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


QUIET = 0.10  # an epoch is "quiet" when other processes used < 10 % of the machine's CPU


def cpu_sample() -> tuple[int, int, int]:
    """(busy, total) jiffies of the whole machine and this process's own (all threads), to tell
    how much CPU other processes took during an epoch. Linux only: (0, 0, 0) elsewhere."""
    stat, own = Path("/proc/stat"), Path("/proc/self/stat")
    if not (stat.exists() and own.exists()):
        return 0, 0, 0
    fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:9]]  # user..steal
    total = sum(fields)
    busy = total - fields[3] - fields[4]  # minus idle and iowait; steal counts as taken
    utime, stime = own.read_text().rsplit(")", 1)[1].split()[11:13]
    return busy, total, int(utime) + int(stime)


def foreign_share(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    busy, total, own = (y - x for x, y in zip(a, b, strict=True))
    return max(0.0, (busy - own) / total) if total else 0.0


def summary(seconds: list[float]) -> str:
    std = statistics.stdev(seconds) if len(seconds) > 1 else 0.0
    return f"{statistics.mean(seconds):.3f} ± {std:.3f}"


# --- 1. the baseline: a plain PyTorch loop ------------------------------------------------------


def raw_loop(cfg: DictConfig, device: torch.device) -> dict:
    """What `fit` does, by hand: resident tensors, randperm batches, AdamW + OneCycle per step,
    label-smoothed loss, train loss/acc and val acc summed on the device; one sync per epoch."""
    t_begin = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    torch.use_deterministic_algorithms(cfg.trainer.deterministic)  # as Trainer(deterministic=...)
    processed = cfg.paths.processed
    meta = load_meta(processed)
    eval_batch = TensorDataModule(processed, cfg.train.batch_size, cfg.seed).eval_batch_size
    x_tr, y_tr, x_va, y_va = (
        torch.from_numpy(a).to(device) for s in ("train", "val") for a in load_split(processed, s)
    )
    model_kw = dlpipe.train.to_dict(cfg.model)
    net = create_model(
        model_kw.pop("name"),
        input_shape=meta["input_shape"],
        num_classes=meta["num_classes"],
        mean=meta["mean"],
        std=meta["std"],
        **model_kw,
    ).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    if cfg.train.compile:  # as the classifier module does with train.compile=true
        net = torch.compile(net)
    epochs, bs, n = cfg.trainer.max_epochs, cfg.train.batch_size, len(y_tr)
    steps_per_epoch = -(-n // bs)  # drop_last=False, like the datamodule
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.optim.lr,
        total_steps=epochs * steps_per_epoch,
        pct_start=cfg.optim.warmup_fraction,
    )
    bf16 = str(cfg.trainer.precision).startswith("bf16")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    epoch_s, foreign, val_acc = [], [], 0.0
    for _ in range(epochs):
        t0, c0 = now(device), cpu_sample()
        net.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for idx in torch.randperm(n, device=device).split(bs):
            x, y = x_tr[idx], y_tr[idx]  # (B, H, W) uint8, (B,)
            with autocast():
                logits = net(x)  # (B, num_classes)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.task.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        net.eval()
        val_correct = torch.zeros((), device=device, dtype=torch.long)
        with torch.inference_mode(), autocast():
            for x, y in zip(x_va.split(eval_batch), y_va.split(eval_batch), strict=True):
                val_correct += (net(x).argmax(1) == y).sum()
        val_acc = (val_correct / len(y_va)).item()  # the one host sync of the epoch
        epoch_s.append(now(device) - t0)
        foreign.append(foreign_share(c0, cpu_sample()))
    return {
        "epoch_s": epoch_s,
        "window_s": epoch_s,
        "foreign": foreign,
        "wall_s": time.perf_counter() - t_begin,
        "val_acc": val_acc,
        "train_loss": (loss_sum / n).item(),
    }


# --- 2. the project's one training path ---------------------------------------------------------


class EpochTimer(Callback):
    """Wall clock per epoch: `window` = train epoch start -> validation epoch end (train+val);
    `epoch` = start -> next start (or train end), i.e. also the epoch-end hooks and logging."""

    def __init__(self, device: torch.device):
        self.device, self.end = device, None
        self.starts, self.val_ends, self.cpu = [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.starts.append(now(self.device))
        self.cpu.append(cpu_sample())

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_ends.append(now(self.device))

    def on_train_end(self, trainer, pl_module):
        self.end = now(self.device)
        self.cpu.append(cpu_sample())

    def result(self) -> dict:
        edges, cpu = self.starts + [self.end], self.cpu
        return {
            "window_s": [v - s for s, v in zip(self.starts, self.val_ends, strict=True)],
            "epoch_s": [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)],
            "foreign": [foreign_share(a, b) for a, b in zip(cpu[:-1], cpu[1:], strict=True)],
        }


def _timed(fn: Callable, stats: dict, name: str) -> Callable:
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stats[name][0] += 1
            stats[name][1] += time.perf_counter() - t0

    return wrapper


@contextmanager
def timed_mlflow_logger(stats: dict):
    """Inside: the MLFlowLogger that `fit` builds gets its logging methods (and its construction,
    which opens the store) wrapped with timers. Bench-only; src is untouched."""
    real = dlpipe.train.ServerLogger  # the MLFlowLogger subclass fit builds

    def build(*args, **kwargs):
        logger = _timed(real, stats, "MLFlowLogger() (opens store)")(*args, **kwargs)
        for name in ("log_hyperparams", "log_metrics", "flush", "finalize"):
            setattr(logger, name, _timed(getattr(logger, name), stats, name))
        return logger

    dlpipe.train.ServerLogger = build
    try:
        yield
    finally:
        dlpipe.train.ServerLogger = real


def bench_fit(cfg: DictConfig, device: torch.device) -> dict:
    timer, stats = EpochTimer(device), defaultdict(lambda: [0, 0.0])
    with timed_mlflow_logger(stats):
        t0 = time.perf_counter()
        trainer, _ = dlpipe.train.fit(
            cfg, run_name="bench", callbacks=[timer], tags={"stage": "bench"}
        )
        wall = time.perf_counter() - t0
    metrics = trainer.callback_metrics
    return {
        **timer.result(),
        "wall_s": wall,
        "logging": dict(stats),
        "val_acc": float(metrics["val/acc"]),
        "train_loss": float(metrics["train/loss"]),
    }


def profiled_fit(cfg: DictConfig, report: Path) -> None:
    """`fit` once more with Lightning's SimpleProfiler (mean and total seconds per hook, step
    and loop), its report written to `report`."""
    from lightning.pytorch.profilers import SimpleProfiler

    profiler = SimpleProfiler(dirpath=report.parent, filename=report.stem)
    trainer_class = dlpipe.train.L.Trainer
    # fit builds its own Trainer: hand it the profiler on the way in
    dlpipe.train.L.Trainer = lambda *a, **k: trainer_class(*a, **k, profiler=profiler)
    try:
        dlpipe.train.fit(cfg, run_name="bench-profile", tags={"stage": "bench"})
    finally:
        dlpipe.train.L.Trainer = trainer_class
    # SimpleProfiler names its file "fit-<filename>.txt"
    (report.parent / f"fit-{report.stem}.txt").replace(report)


# --- 4. a no-op `dvc repro` ---------------------------------------------------------------------


def bench_dvc(mirror: Path, reps: int) -> dict:
    """Copy the working tree (no outputs, no stores) into a fresh git repo, fill the pipeline once
    with a tiny config, then time `dvc repro` when nothing changed."""
    from dvc.utils.hydra import compose_and_dump

    sandbox = Path(tempfile.mkdtemp(prefix="dlpipe-dvc-"))
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split("\0")
        for rel in filter(None, listed):
            if rel.startswith(NOT_COPIED) or not (ROOT / rel).is_file():
                continue
            (sandbox / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, sandbox / rel)
        subprocess.run(["git", "init", "-q"], cwd=sandbox, check=True)
        # Keep DVC's per-repo site cache inside the sandbox too (default: /var/tmp/dvc).
        (sandbox / ".dvc" / "config.local").write_text(
            f"[core]\n    site_cache_dir = {sandbox / '.dvc' / 'site'}\n"
        )
        compose_and_dump(
            sandbox / "params.yaml", str(sandbox / "conf"), None, "config", str(sandbox), SMOKE
        )
        env = {
            **os.environ,
            MIRROR_ENV: str(mirror),
            "MLFLOW_TRACKING_URI": f"sqlite:///{sandbox / 'mlflow.db'}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        dvc = str(Path(sys.executable).parent / "dvc")

        def repro(*cmd: str) -> tuple[float, str]:
            t0 = time.perf_counter()
            out = subprocess.run([dvc, *cmd], cwd=sandbox, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if out.returncode:
                what = f"dvc {' '.join(cmd)} in {sandbox}"
                raise RuntimeError(f"{what} failed:\n{out.stdout}\n{out.stderr}")
            return seconds, out.stdout + out.stderr

        fill_s, _ = repro("repro")
        runs = [repro("repro") for _ in range(reps)]
        startup_s = min(repro("--version")[0] for _ in range(reps))  # imports alone, for scale
        noop_s = [s for s, _ in runs]
        unchanged = all("Running stage" not in text and "up to date" in text for _, text in runs)
        return {
            "fill_s": fill_s,
            "noop_s": noop_s,
            "startup_s": startup_s,
            "unchanged": unchanged,
            "last_output": runs[-1][1].strip(),
        }
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)


# --- report -------------------------------------------------------------------------------------


def environment(device: torch.device) -> list[str]:
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        f"- device: {dev}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {L.__version__}, mlflow {mlflow.__version__}",
    ]


def steady(runs: list[dict], key: str, quiet: bool = False) -> list[float]:
    """Epoch times pooled over repeats, each run's first epoch dropped as warm-up (allocator,
    kernel selection, lazy imports); `quiet`: only epochs other processes left alone."""
    return [
        s
        for run in runs
        for s, other in zip(run[key][1:], run["foreign"][1:], strict=True)
        if not quiet or other < QUIET
    ]


def report(
    args,
    cfg: DictConfig,
    raws: list[dict],
    fits: list[dict],
    dvc: dict | None,
    load: tuple[float, float],
    plain: list[dict],
) -> str:
    n_tr = len(load_split(cfg.paths.processed, "train")[1])
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')}: `{' '.join(['python', *sys.argv])}`",
        "",
        *environment(torch.device(args.device)),
        f"- 1-min load average at start / end: {load[0]:.2f} / {load[1]:.2f}; other processes "
        "slow epochs down, so each epoch records their share of the machine's CPU (from "
        f"/proc/stat) and 'quiet' epochs are those where it stayed < {QUIET:.0%}",
        f"- run: model `{cfg.model.name}` width {cfg.model.width}, {n_tr} train samples, "
        f"batch {cfg.train.batch_size}, {cfg.optim.name} + {cfg.optim.scheduler}, precision "
        f"{cfg.trainer.precision}, {args.epochs} epochs (first excluded) x {args.repeats} "
        "repeat(s), raw and fit interleaved; fit = default "
        "config (progress bar on, MLflow on with system metrics every "
        f"{cfg.mlflow.system_metrics_s} s, early stopping off, no checkpoints)"
        + (f"; overrides `{' '.join(args.overrides)}`" if args.overrides else ""),
        "",
        "| loop | train+val s/epoch | full epoch s | full epoch s, quiet epochs | "
        "total wall s | val/acc |",
        "|---|---|---|---|---|---|",
    ]
    wall = {
        name: statistics.mean(run["wall_s"] for run in runs)
        for name, runs in (("raw", raws), ("fit", fits))
    }
    quiet = {
        name: steady(runs, "epoch_s", quiet=True) for name, runs in (("raw", raws), ("fit", fits))
    }
    for name, key, runs in (("plain PyTorch", "raw", raws), ("`dlpipe.train.fit`", "fit", fits)):
        lines.append(
            f"| {name} | {summary(steady(runs, 'window_s'))} | "
            f"{summary(steady(runs, 'epoch_s'))} | "
            f"{summary(quiet[key]) if quiet[key] else '-'} (n={len(quiet[key])}) | "
            f"{wall[key]:.2f} | {runs[-1]['val_acc']:.4f} |"
        )
    ratio = {
        k: statistics.mean(steady(fits, k)) / statistics.mean(steady(raws, k))
        for k in ("window_s", "epoch_s")
    }
    quiet_ratio = (
        f"{statistics.mean(quiet['fit']) / statistics.mean(quiet['raw']):.3f}"
        if quiet["fit"] and quiet["raw"]
        else "-"
    )
    lines.append(
        f"| **ratio fit/raw** (goal ≤ 1.10) | **{ratio['window_s']:.3f}** | "
        f"{ratio['epoch_s']:.3f} | {quiet_ratio} | {wall['fit'] / wall['raw']:.3f} | |"
    )
    if plain:  # --without-system-metrics: the same fit with MLflow's monitor off
        off = {
            k: statistics.mean(steady(plain, k)) / statistics.mean(steady(raws, k))
            for k in ("window_s", "epoch_s")
        }
        off_wall = statistics.mean(run["wall_s"] for run in plain)
        lines.append(
            f"| ratio fit/raw, system metrics off | {off['window_s']:.3f} | "
            f"{off['epoch_s']:.3f} | | {off_wall / wall['raw']:.3f} | {plain[-1]['val_acc']:.4f} |"
        )
    lines.append("\nFull epochs in s (other processes' CPU share), warm-up first, per repeat:")
    for name, runs in (("raw", raws), ("fit", fits)):
        epochs = " / ".join(
            ", ".join(
                f"{x:.2f} ({o:.0%})" for x, o in zip(run["epoch_s"], run["foreign"], strict=True)
            )
            for run in runs
        )
        lines.append(f"- {name}: {epochs}")
    calls: dict = defaultdict(lambda: [0, 0.0])
    for run in fits:
        for name, (n, s) in run["logging"].items():
            calls[name][0] += n
            calls[name][1] += s
    fit_wall = sum(run["wall_s"] for run in fits)
    log_s = sum(calls[name][1] for name in ("log_metrics", "log_hyperparams"))
    all_s = sum(s for _, s in calls.values())
    title = f"MLflow call in fit ({len(fits)} run(s), {fit_wall:.1f} s)"
    lines += ["", f"| {title} | calls | total s |", "|---|---|---|"]
    lines += [f"| `{name}` | {n} | {s:.3f} |" for name, (n, s) in calls.items()]
    lines += [
        f"| **log_metrics + log_hyperparams / fit wall** | | "
        f"**{100 * log_s / fit_wall:.1f} %** ({log_s:.3f} s) |",
        f"| all of the above / fit wall | | {100 * all_s / fit_wall:.1f} % ({all_s:.3f} s) |",
    ]
    if dvc is not None:
        lines += [
            "",
            f"No-op `dvc repro` of all stages (`{' '.join(SMOKE)}`; "
            f"first fill {dvc['fill_s']:.1f} s):",
            "",
            "| min s | median s | runs s | said nothing changed | `dvc --version` s |",
            "|---|---|---|---|---|",
            f"| **{min(dvc['noop_s']):.2f}** (goal ≤ 3) | "
            f"{statistics.median(dvc['noop_s']):.2f} | "
            f"{', '.join(f'{s:.2f}' for s in dvc['noop_s'])} | "
            f"{'yes' if dvc['unchanged'] else 'NO'} | {dvc['startup_s']:.2f} |",
        ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or add) `## title` in `path`; every other section is kept as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    head, *rest = text.split("\n## ")
    sections = {chunk.split("\n", 1)[0]: chunk for chunk in rest}
    sections[title] = f"{title}\n\n{body}"
    gpu = SECTIONS["cuda"]
    sections.setdefault(
        gpu,
        f"{gpu}\n\nNot measured yet. On a GPU machine run\n`python "
        "bench/bench_fit.py --device cuda --epochs 6` (uses `trainer=gpu`).\n",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "\n## ".join(
            [head.rstrip("\n") + "\n", *(s.rstrip("\n") + "\n" for s in sections.values())]
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--epochs", type=int, default=4, help="per loop; the first is warm-up")
    parser.add_argument("--limit", type=int, default=None, help="training samples (default all)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for both loops, e.g. model.width=8"
    )
    parser.add_argument("--repeats", type=int, default=1, help="raw/fit pairs, interleaved")
    parser.add_argument("--dvc-reps", type=int, default=3, help="no-op repros timed; 0 = skip")
    parser.add_argument(
        "--without-system-metrics",
        action="store_true",
        help="also fit with mlflow.system_metrics_s=null, interleaved: the cost of MLflow's "
        "system metrics monitor (one more table row)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="at smoke size (smoke=true): prints, writes nothing"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="after the loops, one more fit under Lightning's SimpleProfiler, its per-hook "
        "report written to this file (where fit's time beyond the raw loop goes)",
    )
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs must be >= 3: the first is warm-up and std needs two more")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    mirror = Path(os.environ.setdefault(MIRROR_ENV, str(DEFAULT_MIRROR)))

    # At smoke size the tiny sizes win over the usual keys, the epochs included.
    smoke = ["smoke=true", f"tiny.trainer.max_epochs={args.epochs}"] if args.smoke else []
    processed = prepare_data(args.limit, smoke)
    store = Path(tempfile.mkdtemp(prefix="dlpipe-bench-mlflow-"))
    try:
        uri = f"sqlite:///{store / 'mlflow.db'}"
        cfg = compose_cfg(
            [
                f"paths.raw={DATA / 'raw'}",
                f"paths.processed={processed}",
                f"data.limit={'null' if args.limit is None else args.limit}",
                f"trainer.max_epochs={args.epochs}",
                f"mlflow.tracking_uri='{uri}'",
                "train.early_stopping_patience=null",
                *(["trainer=gpu"] if args.device == "cuda" else []),
                *smoke,
                *args.overrides,
            ]
        )
        # Like a real stage: the store exists already (its one-off schema migration is not
        # training cost) but this process opens it afresh. Artifacts stay in the temp dir.
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, mlflow; mlflow.MlflowClient(sys.argv[1])"
                ".create_experiment(sys.argv[2], artifact_location=sys.argv[3])",
                uri,
                cfg.mlflow.experiment,
                (store / "artifacts").as_uri(),
            ],
            check=True,
        )
        device = torch.device(args.device)
        load_start = os.getloadavg()[0]
        raws, fits, plain = [], [], []
        for _ in range(args.repeats):
            raws.append(raw_loop(cfg, device))
            fits.append(bench_fit(cfg, device))
            if args.without_system_metrics:
                off = dlpipe.train.with_overrides(cfg, {"mlflow.system_metrics_s": None})
                plain.append(bench_fit(off, device))
        load = (load_start, os.getloadavg()[0])
        if args.profile:
            profiled_fit(cfg, args.profile)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    dvc = bench_dvc(mirror, args.dvc_reps) if args.dvc_reps > 0 else None
    table = report(args, cfg, raws, fits, dvc, load, plain)
    print("\n" + table)
    if dvc is not None:
        print("last no-op `dvc repro` said:\n" + dvc["last_output"])
    if args.smoke:
        return
    write_section(args.out, SECTIONS[args.device], table)
    print(f"wrote section '{SECTIONS[args.device]}' of {args.out}")


if __name__ == "__main__":
    main()
