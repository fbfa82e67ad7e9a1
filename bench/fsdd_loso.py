"""Spoken digits (FSDD): leave-one-speaker-out accuracy (classifier) or word error rate
(transcriber, experiment fsdd_ctc), and the official-split pipeline run.

LOSO: for each of the six speakers, preprocess with `data.test_speaker=<speaker>` (that speaker's
500 recordings are the test set, the other five speakers' 2500 train/val), then the pipeline's own
`train` and `evaluate` stages. `--official` runs the six stages once on the official split instead
(what `dvc exp run -S experiment=<name>` does), timing each stage.

    python bench/fsdd_loso.py --experiment fsdd_cnn                 # LOSO table, ~10 min on 2 cores
    python bench/fsdd_loso.py --experiment fsdd_cnn --official      # all six stages, timed
    python bench/fsdd_loso.py --experiment fsdd_cnn trainer.max_epochs=10   # plus Hydra overrides
    python bench/fsdd_loso.py --smoke --official                    # does it run? (smoke=true)
    python bench/fsdd_loso.py --experiment fsdd_ctc --jobs 2 --out /tmp/loso   # 2 folds at once
    python bench/fsdd_loso.py --experiment fsdd_ctc --speakers george          # one fold

Everything (data, MLflow store, checkpoints) goes under --out (default bench/.data/fsdd/
<experiment>, with --smoke: <experiment>-smoke); results are printed as markdown and written to
<that folder>/{loso,official}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import mlflow
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dlpipe.collect import collect
from dlpipe.data import MIRROR_ENV, load_meta
from dlpipe.evaluate import evaluate
from dlpipe.formats.audio import RECORDINGS, parse_names
from dlpipe.preprocess import preprocess
from dlpipe.register import register
from dlpipe.smoke import sized
from dlpipe.train import to_dict, train
from dlpipe.tune import tune

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / ".data" / "fsdd"  # git-ignored; never touches the pipeline's data/
DEFAULT_MIRROR = ROOT.parent / "shared" / "datasets"


# The LOSO table's columns per task: (heading, where the value comes from, format). "test/..." is
# the evaluate stage's metric, "best" train's best monitored score (val/acc, val/wer).
COLUMNS = {
    "classifier": [
        ("test acc", "test/acc", ".4f"),
        ("test F1 (macro)", "test/f1_macro", ".4f"),
        ("best val acc", "best", ".4f"),
    ],
    "transcriber": [
        ("test WER", "test/wer", ".2%"),
        ("test string acc", "test/seq_acc", ".2%"),
        ("WER greedy", "test/wer_greedy", ".2%"),
        ("best val WER", "best", ".2%"),
    ],
}


def compose_cfg(root: Path, overrides: list[str], raw: Path = DATA / "raw") -> DictConfig:
    """conf/ with `overrides`, every output under `root` (raw data shared by all runs)."""
    paths = {
        "raw": raw,
        "processed": root / "processed",
        "tune": root / "tune",
        "study_db": root / "optuna.db",
        "train": root / "train",
        "reports": root / "reports",
    }
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                *overrides,
                *(f"paths.{k}={v}" for k, v in paths.items()),
                f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
                "trainer.enable_progress_bar=false",
            ],
        )
    return sized(cfg)  # as a stage: smoke=true applies


def timed(step, *args) -> tuple[object, float]:
    t0 = time.perf_counter()
    result = step(*args)
    return result, time.perf_counter() - t0


def official(out: Path, overrides: list[str], raw: Path) -> dict:
    """The six stages on the official split, as `dvc exp run` runs them; seconds per stage."""
    cfg = compose_cfg(out, overrides, raw)
    data = to_dict(cfg.data)
    stages = {
        "collect": lambda: collect(data, Path(cfg.paths.raw)),
        "preprocess": lambda: preprocess(data, cfg.paths.raw, cfg.paths.processed, cfg.seed),
        "tune": lambda: tune(cfg),
        "train": lambda: train(cfg),
        "evaluate": lambda: evaluate(cfg),
        "register": lambda: register(cfg),
    }
    results, seconds = {}, {}
    for name, step in stages.items():
        results[name], seconds[name] = timed(step)
    return {
        "task": cfg.task.name,
        "test": {**results["evaluate"], "best": results["train"]["best_score"]},
        "epochs": results["train"]["epochs"],
        "tuned": (Path(cfg.paths.tune) / "best_params.yaml").read_text()
        if (Path(cfg.paths.tune) / "best_params.yaml").exists()
        else None,
        "seconds": seconds,
    }


def fold(out: Path, overrides: list[str], raw: Path, name: str) -> dict:
    """One LOSO fold, `name` held out: preprocess, train, evaluate; the table's values."""
    cfg = compose_cfg(
        out / name, [*overrides, f"data.test_speaker={name}", "train.use_tuned=false"], raw
    )
    data = to_dict(cfg.data)
    _, prep_s = timed(preprocess, data, cfg.paths.raw, cfg.paths.processed, cfg.seed)
    info, train_s = timed(train, cfg)
    metrics, eval_s = timed(evaluate, cfg)
    result = {
        **{key: metrics[key] for _, key, _ in COLUMNS[cfg.task.name] if key != "best"},
        "best": info["best_score"],
        "epochs": info["epochs"],
        "test_size": load_meta(cfg.paths.processed)["sizes"]["test"],
        "preprocess_s": prep_s,
        "train_s": train_s,
        "evaluate_s": eval_s,
    }
    print(f"{name}: {result}", flush=True)
    return result


def loso(out: Path, overrides: list[str], raw: Path, speakers: list[str] | None, jobs: int) -> dict:
    """Train on five speakers and test on the sixth, for each speaker (or those named);
    untuned (the experiment's own settings), so every fold trains the same model. `jobs`
    folds run at once, each in its own process."""
    probe = compose_cfg(out, overrides, raw)
    collect(to_dict(probe.data), Path(probe.paths.raw))
    _, _, found, _ = parse_names(Path(probe.paths.raw) / RECORDINGS)
    known = sorted(set(found.tolist()))
    unknown = sorted(set(speakers or []) - set(known))
    if unknown:
        raise SystemExit(f"--speakers {unknown} are not FSDD speakers: choose from {known}")
    names = [name for name in known if not speakers or name in speakers]
    # spawn: a fresh interpreter per fold (no forked torch or MLflow state)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {name: pool.submit(fold, out, overrides, raw, name) for name in names}
        folds = {name: future.result() for name, future in futures.items()}
    key = COLUMNS[probe.task.name][0][1]  # the headline metric: test/acc or test/wer
    return {
        "task": probe.task.name,
        "folds": folds,
        "metric": key,
        "mean": sum(f[key] for f in folds.values()) / len(folds),
    }


def markdown(kind: str, experiment: str, result: dict, command: str) -> str:
    columns = COLUMNS[result["task"]]
    headings = " | ".join(h for h, _, _ in columns)
    if kind == "official":
        test = result["test"]
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
        return (
            f"`{command}`\n\n"
            f"| experiment | {headings} | epochs | total |\n"
            f"|{'---|' * (len(columns) + 3)}\n"
            f"| {experiment} | "
            + "".join(f"{test[key]:{fmt}} | " for _, key, fmt in columns)
            + f"{result['epochs']} | {sum(result['seconds'].values()):.0f} s |\n\n"
            f"Stages: {stages}\n"
        )
    rows = "".join(
        f"| {name} | "
        + "".join(f"{f[key]:{fmt}} | " for _, key, fmt in columns)
        + f"{f['epochs']} | {f['train_s']:.0f} s |\n"
        for name, f in result["folds"].items()
    )
    headline = format(result["mean"], columns[0][2])
    return (
        f"`{command}`\n\n"
        f"| held-out speaker | {headings} | epochs | train |\n"
        f"|{'---|' * (len(columns) + 3)}\n"
        f"{rows}| **mean of {len(result['folds'])}** | **{headline}** |"
        f"{' |' * (len(columns) + 1)}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="fsdd_cnn", help="conf/experiment/<name>.yaml")
    parser.add_argument("--official", action="store_true", help="the six stages, official split")
    parser.add_argument("--smoke", action="store_true", help="at smoke size (smoke=true)")
    parser.add_argument("--out", type=Path, help="output folder (default bench/.data/fsdd/...)")
    parser.add_argument("--speakers", nargs="+", help="LOSO: only these folds (default all six)")
    parser.add_argument("--jobs", type=int, default=1, help="LOSO: folds run at once")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_epochs=10")
    args = parser.parse_args()
    os.environ.setdefault(MIRROR_ENV, str(DEFAULT_MIRROR))
    if args.smoke:
        args.overrides.insert(0, "smoke=true")
    out = args.out or DATA / f"{args.experiment}{'-smoke' if args.smoke else ''}"
    raw = out / "raw" if args.out else DATA / "raw"
    kind = "official" if args.official else "loso"
    shutil.rmtree(out / kind, ignore_errors=True)
    overrides = [f"experiment={args.experiment}", *args.overrides]
    before = mlflow.get_tracking_uri()
    if args.official:
        result = official(out / kind, overrides, raw)
    else:
        result = loso(out / kind, overrides, raw, args.speakers, args.jobs)
    mlflow.set_tracking_uri(before)
    command = shlex.join(["python", "bench/fsdd_loso.py", *sys.argv[1:]])
    text = markdown(kind, args.experiment, result, command)
    print(text)
    (out / f"{kind}.md").write_text(text)
    (out / f"{kind}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
