"""Benchmark the tune stage at scale on a Fashion-MNIST slice (docs/tuning.md):

    python bench/tune_scale.py workers --workers 1 2 4 --trials 8      # wall time to a budget
    python bench/tune_scale.py pruners --trials 12 --epochs 4          # trial-epochs per pruner
    python bench/tune_scale.py pareto --trials 12 --plot docs/img/tuning_pareto.png

Each measurement is a fresh study and MLflow store under bench/.data/tune/ (git-ignored), the
same seed and search space (model=mlp); prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import optuna
from bench_fit import DATA, DEFAULT_MIRROR, compose_cfg, cpu_sample, foreign_share, prepare_data

from dlpipe.data import MIRROR_ENV
from dlpipe.tune import open_storage, study_name, tune

OUT = DATA / "tune"
MO = "[{metric:val/acc,direction:maximize},{metric:model/params,direction:minimize}]"


def run(
    name: str, processed: Path, overrides: list[str]
) -> tuple[dict, optuna.Study, float, float]:
    """One fresh study: (summary, study, wall seconds, share of the CPU other processes took)."""
    root = OUT / name
    shutil.rmtree(root, ignore_errors=True)
    cfg = compose_cfg([
        "model=mlp", "trainer.enable_progress_bar=false",
        f"paths.processed={processed}", f"paths.tune={root / 'tune'}",
        f"paths.study_db={root / 'optuna.db'}", f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
        *overrides,
    ])  # fmt: skip
    before, start = cpu_sample(), time.perf_counter()
    summary = tune(cfg)
    wall, foreign = time.perf_counter() - start, foreign_share(before, cpu_sample())
    url = summary["storage"]
    study = optuna.load_study(study_name=study_name(cfg), storage=open_storage(url))
    return summary, study, wall, foreign


def trial_epochs(study: optuna.Study) -> int:
    """Epochs trained over all trials: what a finished trial recorded (TrialRecord), else the
    epochs a pruned one reported (with no pruner, nothing is reported per epoch)."""
    return sum(
        t.system_attrs.get("dlpipe:record", {}).get("epochs") or len(t.intermediate_values)
        for t in study.trials
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("workers", "pruners", "pareto"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=3000, help="training samples")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault(MIRROR_ENV, str(DEFAULT_MIRROR))
    processed = prepare_data(args.limit, [])
    common = [f"tune.n_trials={args.trials}", f"tune.max_epochs={args.epochs}"]

    if args.what == "workers":
        print("| workers | wall (s) | trials/min | other processes' CPU share |\n|---|---|---|---|")
        for n in args.workers:
            _, study, wall, foreign = run(f"workers{n}", processed, [*common, f"tune.workers={n}"])
            done = sum(t.state.is_finished() for t in study.trials)
            print(f"| {n} | {wall:.0f} | {60 * done / wall:.2f} | {foreign:.0%} |", flush=True)
    elif args.what == "pruners":
        print("| pruner | trial-epochs | best val/acc | pruned | wall (s) |\n|---|---|---|---|---|")
        for pruner in ("none", "median", "hyperband"):
            summary, study, wall, _ = run(
                f"pruner-{pruner}", processed,
                [*common, f"tune.pruner.name={pruner}", "tune.pruner.n_warmup_steps=0"],
            )  # fmt: skip
            print(
                f"| {pruner} | {trial_epochs(study)} | {summary['best_value']:.4f} | "
                f"{summary['trials']['pruned']} | {wall:.0f} |", flush=True,
            )  # fmt: skip
    else:
        summary, study, wall, _ = run(
            "pareto", processed, [*common, f"tune.objectives={MO}", "tune.sampler.name=nsga2",
                                  "tune.sampler.population_size=6"],
        )  # fmt: skip
        print("| trial | val/acc | model/params | chosen |\n|---|---|---|---|")
        for row in summary["pareto_front"]:
            print(f"| {row['trial']} | {row['val/acc']:.4f} | {row['model/params']:.0f} | "
                  f"{'yes' if row['chosen'] else ''} |")  # fmt: skip
        print(f"\n{len(study.trials)} trials in {wall:.0f} s")
        if args.plot is not None:
            import matplotlib

            matplotlib.use("Agg")
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = optuna.visualization.matplotlib.plot_pareto_front(
                    study, target_names=["val/acc", "model/params"]
                )
            ax.set_yscale("log")
            ax.set_title(f"Fashion-MNIST MLP, {args.limit} samples, {args.epochs} epoch(s)")
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            ax.figure.set_size_inches(7, 5)
            ax.figure.tight_layout()
            ax.figure.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
