"""Spoken digits (FSDD): leave-one-speaker-out accuracy, and the official-split pipeline run.

LOSO: for each of the six speakers, preprocess with `data.test_speaker=<speaker>` (that speaker's
500 recordings are the test set, the other five speakers' 2500 train/val), then the pipeline's own
`train` and `evaluate` stages. `--official` runs the six stages once on the official split instead
(what `dvc exp run -S experiment=<name>` does), timing each stage.

    python bench/fsdd_loso.py --experiment fsdd_cnn                 # LOSO table, ~10 min on 2 cores
    python bench/fsdd_loso.py --experiment fsdd_cnn --official      # all six stages, timed
    python bench/fsdd_loso.py --experiment fsdd_cnn trainer.max_epochs=10   # plus Hydra overrides
    python bench/fsdd_loso.py --smoke --official                    # does it run? (smoke=true)

Everything (data, MLflow store, checkpoints) goes under bench/.data/fsdd/<experiment> (with
--smoke: <experiment>-smoke); results are printed as markdown and written to
<that folder>/{loso,official}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
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


def compose_cfg(root: Path, overrides: list[str]) -> DictConfig:
    """conf/ with `overrides`, every output under `root` (raw data shared by all runs)."""
    paths = {
        "raw": DATA / "raw",
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


def official(out: Path, overrides: list[str]) -> dict:
    """The six stages on the official split, as `dvc exp run` runs them; seconds per stage."""
    cfg = compose_cfg(out, overrides)
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
        "test": results["evaluate"],
        "best_val_acc": results["train"]["best_score"],
        "epochs": results["train"]["epochs"],
        "tuned": (Path(cfg.paths.tune) / "best_params.yaml").read_text()
        if (Path(cfg.paths.tune) / "best_params.yaml").exists()
        else None,
        "seconds": seconds,
    }


def loso(out: Path, overrides: list[str]) -> dict:
    """Train on five speakers and test on the sixth, for each speaker; untuned (the
    experiment's own settings), so every fold trains the same model."""
    probe = compose_cfg(out, overrides)
    collect(to_dict(probe.data), Path(probe.paths.raw))
    _, _, speakers, _ = parse_names(Path(probe.paths.raw) / RECORDINGS)
    folds = {}
    for name in sorted(set(speakers.tolist())):
        cfg = compose_cfg(
            out / name, [*overrides, f"data.test_speaker={name}", "train.use_tuned=false"]
        )
        data = to_dict(cfg.data)
        _, prep_s = timed(preprocess, data, cfg.paths.raw, cfg.paths.processed, cfg.seed)
        info, train_s = timed(train, cfg)
        metrics = evaluate(cfg)
        folds[name] = {
            "test_acc": metrics["test/acc"],
            "test_f1_macro": metrics["test/f1_macro"],
            "best_val_acc": info["best_score"],
            "epochs": info["epochs"],
            "test_size": load_meta(cfg.paths.processed)["sizes"]["test"],
            "preprocess_s": prep_s,
            "train_s": train_s,
        }
        print(f"{name}: {folds[name]}", flush=True)
    accs = [f["test_acc"] for f in folds.values()]
    return {"folds": folds, "mean_test_acc": sum(accs) / len(accs)}


def markdown(kind: str, experiment: str, result: dict, overrides: list[str]) -> str:
    command = " ".join(["python bench/fsdd_loso.py", f"--experiment {experiment}", *overrides])
    if kind == "official":
        test = result["test"]
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
        return (
            f"`{command} --official`\n\n"
            f"| experiment | test acc | test F1 (macro) | best val acc | epochs | total |\n"
            f"|---|---|---|---|---|---|\n"
            f"| {experiment} | {test['test/acc']:.4f} | {test['test/f1_macro']:.4f} | "
            f"{result['best_val_acc']:.4f} | {result['epochs']} | "
            f"{sum(result['seconds'].values()):.0f} s |\n\nStages: {stages}\n"
        )
    rows = "".join(
        f"| {name} | {f['test_acc']:.4f} | {f['test_f1_macro']:.4f} | {f['best_val_acc']:.4f} | "
        f"{f['epochs']} | {f['train_s']:.0f} s |\n"
        for name, f in result["folds"].items()
    )
    return (
        f"`{command}`\n\n"
        "| held-out speaker | test acc | test F1 (macro) | best val acc | epochs | train |\n"
        "|---|---|---|---|---|---|\n"
        f"{rows}| **mean** | **{result['mean_test_acc']:.4f}** | | | | |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="fsdd_cnn", help="conf/experiment/<name>.yaml")
    parser.add_argument("--official", action="store_true", help="the six stages, official split")
    parser.add_argument("--smoke", action="store_true", help="at smoke size (smoke=true)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_epochs=10")
    args = parser.parse_args()
    os.environ.setdefault(MIRROR_ENV, str(DEFAULT_MIRROR))
    if args.smoke:
        args.overrides.insert(0, "smoke=true")
    out = DATA / f"{args.experiment}{'-smoke' if args.smoke else ''}"
    kind = "official" if args.official else "loso"
    shutil.rmtree(out / kind, ignore_errors=True)
    overrides = [f"experiment={args.experiment}", *args.overrides]
    before = mlflow.get_tracking_uri()
    result = (official if args.official else loso)(out / kind, overrides)
    mlflow.set_tracking_uri(before)
    text = markdown(kind, args.experiment, result, args.overrides)
    print(text)
    (out / f"{kind}.md").write_text(text)
    (out / f"{kind}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
