"""Benchmark the tune stage at scale on a Fashion-MNIST slice (docs/tuning.md):

    python bench/tune_scale.py workers --trials 12 --epochs 2 --limit 6000 --set \
        tune.sampler.name=random tune.pruner.name=none      # wall time to one budget, 1/2/4 workers
    python bench/tune_scale.py pruners --trials 30 --epochs 10 --limit 6000   # trial-epochs
    python bench/tune_scale.py replay --epochs 10 --limit 6000   # replayed on none's curves
    python bench/tune_scale.py pareto --trials 12 --plot docs/img/tuning_pareto.png

Each measurement is a fresh study and MLflow store under bench/.data/tune/ (git-ignored), the
same seed and search space (model=mlp); prints a markdown table with the load average.

`pruners` compares the pruners on the same trials: the sampler is `random` (each trial seeded
with seed + its number, so trial k has the same parameters in every study, whatever was pruned
before it), so the only difference between the rows is which trials each pruner stops, and when.
Early stopping is off (`train.early_stopping_patience=null`), so an unpruned trial runs every
epoch. Each pruner runs with dlpipe's shipped settings (conf/config.yaml `tune.pruner`) unless
`--set tune.pruner.KEY=VALUE` says otherwise; `--pruners` picks the rows (`median:KEY=VALUE`
sets a row's own setting, e.g. `median:n_warmup_steps=0`). The reference is the `none` row, of
this invocation or of the last one (its study is kept under bench/.data/tune/pruner-none/).

`replay` needs no training: it replays the learning curves of the `none` row's trials (every
epoch's val/acc, from its MLflow store) through each pruner setting of a grid, in the order they
ran and in `--orders - 1` random orders, and prints each setting's share of the unpruned
trial-epochs and how often it keeps the best trial. Trials of the random sampler are the same in
every study, so a replay decides as the real study would (the first order is the real one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import optuna
from bench_fit import DATA, DEFAULT_MIRROR, compose_cfg, foreign_share, prepare_data

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


def cpu_sample() -> tuple[int, int, int]:
    """bench_fit.cpu_sample, with this process's reaped children (the pool's workers) counted
    as its own: (busy, total) jiffies of the machine and this process tree's. Linux only."""
    stat, own = Path("/proc/stat"), Path("/proc/self/stat")
    if not (stat.exists() and own.exists()):
        return 0, 0, 0
    fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:9]]  # user..steal
    total = sum(fields)
    busy = total - fields[3] - fields[4]  # minus idle and iowait
    utime, stime, cutime, cstime = own.read_text().rsplit(")", 1)[1].split()[11:15]
    return busy, total, int(utime) + int(stime) + int(cutime) + int(cstime)


def trial_epochs(study: optuna.Study) -> int:
    """Epochs trained over all trials: what a finished trial recorded (TrialRecord), else the
    epochs a pruned one reported (with no pruner, nothing is reported per epoch)."""
    return sum(_epochs(t) for t in study.trials)


def best_so_far(study: optuna.Study, target: float) -> tuple[int | None, int]:
    """(number of the first trial whose value reached `target` or None, trial-epochs spent up
    to and including it, or in all when none did)."""
    spent = 0
    for t in sorted(study.trials, key=lambda t: t.number):
        spent += _epochs(t)
        if t.value is not None and t.state.name == "COMPLETE" and t.value >= target:
            return t.number, spent
    return None, spent


def _epochs(t: optuna.trial.FrozenTrial) -> int:
    return t.system_attrs.get("dlpipe:record", {}).get("epochs") or len(t.intermediate_values)


def unpruned() -> tuple[float, int]:
    """(best value, trial-epochs) of the last `none` row's study: its SQLite file, or the
    journal file beside it when that row ran with `tune.workers` > 1."""
    root = OUT / "pruner-none"
    journal = root / "optuna.log"
    storage = open_storage(str(journal) if journal.exists() else f"sqlite:///{root / 'optuna.db'}")
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    return study.best_value, trial_epochs(study)


def curves() -> dict[int, list[float]]:
    """val/acc per epoch of every trial of the last `none` row, from its MLflow store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{OUT / 'pruner-none' / 'mlflow.db'}")
    found = {}
    for run in client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.stage = 'tune'", max_results=10000,
    ):  # fmt: skip
        if "optuna.trial" in run.data.tags:
            history = client.get_metric_history(run.info.run_id, "val/acc")
            found[int(run.data.tags["optuna.trial"])] = [
                m.value for m in sorted(history, key=lambda m: m.step)
            ]
    return dict(sorted(found.items()))


def replay(pruner: optuna.pruners.BasePruner, order: list[int], seen: dict) -> tuple[int, float]:
    """Trial-epochs spent and best value when `pruner` judges the curves `seen` in `order`."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    spent, best = 0, float("-inf")
    for number in order:
        curve, trial = seen[number], study.ask()
        for step, value in enumerate(curve):
            trial.report(value, step)
            if step < len(curve) - 1 and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                spent += step + 1
                break
        else:
            study.tell(trial, max(curve))
            spent, best = spent + len(curve), max(best, max(curve))
    return spent, best


def replay_grid(orders: int, epochs: int) -> None:
    import random

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    seen = curves()
    total = sum(len(c) for c in seen.values())
    top = max(max(c) for c in seen.values())
    rng = random.Random(0)
    tried = [list(seen)] + [rng.sample(list(seen), len(seen)) for _ in range(orders - 1)]
    P = optuna.pruners
    grid = {
        **{f"median n_startup_trials={n}, n_warmup_steps={w}":
           (lambda n=n, w=w: P.MedianPruner(n_startup_trials=n, n_warmup_steps=w))
           for n in (3, 5, 10) for w in (0, 1, 2)},
        **{f"percentile 25, n_startup_trials={n}, n_warmup_steps={w}":
           (lambda n=n, w=w: P.PercentilePruner(25.0, n_startup_trials=n, n_warmup_steps=w))
           for n in (3, 5) for w in (0, 1)},
        **{f"hyperband min_resource={m}, reduction_factor={r}":
           (lambda m=m, r=r: P.HyperbandPruner(min_resource=m, max_resource=epochs,
                                               reduction_factor=r))
           for m in (1, 2, 3) for r in (2, 3, 4)},
        **{f"successive_halving min_resource={m}, reduction_factor={r}":
           (lambda m=m, r=r: P.SuccessiveHalvingPruner(min_resource=m, reduction_factor=r))
           for m in (1, 2, 3) for r in (2, 3, 4)},
    }  # fmt: skip
    print(f"{len(seen)} trials, {total} trial-epochs unpruned, best {top:.4f}; {orders} orders")
    print(
        "| pruner | trial-epochs, real order | mean share over orders | best kept "
        "| best within 0.005 | mean best |\n|---|---|---|---|---|---|"
    )
    for name, make in grid.items():
        results = [replay(make(), order, seen) for order in tried]
        first = results[0][0]
        share = sum(spent for spent, _ in results) / len(results) / total
        kept = sum(best == top for _, best in results) / len(results)
        near = sum(best >= top - 0.005 for _, best in results) / len(results)
        mean_best = sum(best for _, best in results) / len(results)
        print(
            f"| {name} | {first} ({first / total:.0%}) | {share:.0%} | {kept:.0%} | {near:.0%} "
            f"| {mean_best:.4f} |"
        )


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("workers", "pruners", "replay", "pareto"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=3000, help="training samples")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument(
        "--pruners",
        nargs="+",
        default=["none", "median", "hyperband"],
        help="rows of `pruners`: NAME or NAME:KEY=VALUE[,KEY=VALUE]",
    )
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    parser.add_argument("--orders", type=int, default=40, help="replay: trial orders tried")
    args = parser.parse_args()
    os.environ.setdefault(MIRROR_ENV, str(DEFAULT_MIRROR))
    processed = prepare_data(args.limit, [])
    common = [f"tune.n_trials={args.trials}", f"tune.max_epochs={args.epochs}", *args.set]
    print(f"load average (1/5 min) at start: {load()}", flush=True)

    if args.what == "workers":
        print(
            "| workers | wall (s) | trials/min | other processes' CPU share | load 1/5 min |\n"
            "|---|---|---|---|---|"
        )
        for n in args.workers:
            _, study, wall, foreign = run(f"workers{n}", processed, [*common, f"tune.workers={n}"])
            done = sum(t.state.is_finished() for t in study.trials)
            print(
                f"| {n} | {wall:.0f} | {60 * done / wall:.2f} | {foreign:.0%} | {load()} |",
                flush=True,
            )
    elif args.what == "pruners":
        print(
            "| pruner | settings | trial-epochs | best val/acc (trial) | reached unpruned best "
            "at trial (trial-epochs) | pruned | wall (s) | load 1/5 min |\n"
            "|---|---|---|---|---|---|---|---|", flush=True,
        )  # fmt: skip
        reference = None if "none" in args.pruners else unpruned()
        for row in args.pruners:
            pruner, _, own = row.partition(":")
            settings = [f"tune.pruner.{kv}" for kv in own.split(",") if kv]
            summary, study, wall, _ = run(
                f"pruner-{row.replace(':', '-').replace(',', '-').replace('=', '')}", processed,
                [*common, "tune.sampler.name=random", "train.early_stopping_patience=null",
                 f"tune.pruner.name={pruner}", *settings],
            )  # fmt: skip
            epochs = trial_epochs(study)
            if reference is None:  # the first row (none) is the reference
                reference = (summary["best_value"], epochs)
            at, spent = best_so_far(study, reference[0])
            shown = ", ".join(s.removeprefix("tune.pruner.") for s in settings) or "shipped"
            print(
                f"| {pruner} | {shown} | {epochs} ({epochs / reference[1]:.0%}) | "
                f"{summary['best_value']:.4f} ({summary['best_trial']}) | "
                f"{'never' if at is None else f'{at} ({spent})'} | "
                f"{summary['trials']['pruned']} | {wall:.0f} | {load()} |", flush=True,
            )  # fmt: skip
    elif args.what == "replay":
        replay_grid(args.orders, args.epochs)
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
