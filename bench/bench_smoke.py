"""Benchmark: where the seconds of the default experiment's smoke pipeline go, stage by stage.

    OMP_NUM_THREADS=1 python bench/bench_smoke.py    # writes "Smoke pipeline" in docs/benchmarks.md
    OMP_NUM_THREADS=1 python bench/bench_smoke.py --no-write --experiment sst2_transformer

The six stages run as `dvc repro` runs them, each a fresh interpreter on
`pipelines/<stage>.py smoke=true`, in a temporary working directory (data/, models/, reports/,
mlflow.db) with DLPIPE_DATA_MIRROR. Twice, from scratch each time:
- **plain**: exactly that command; its wall time is what a user waits for (the goal is the sum).
- **instrumented**: the same stage under `python -X importtime` through this file's runner, which
  marks when the stage script is loaded, when its `main()` runs and each time MLflow opens its
  SQLite store (`SqlAlchemyStore.__init__`, tracking and model registry). Each stage's wall
  time splits into
  - *start-up + exit*: the interpreter's own (site, teardown: what the runner does not see);
  - *imports*: first imports of modules (`-X importtime`, top-level cumulative), while loading
    the script or later, during the run (e.g. the task module `get_task` picks);
  - *store*: inside the store constructors, less the imports made there (counted above);
  - *work*: the rest of `main()`: reading, training, writing, logging.
`-X importtime` itself slows imports a little, so the instrumented run's total is above the plain
one's; the split is what it is for.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from doc_sections import write_section  # bench/, this script's folder

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("collect", "preprocess", "tune", "train", "evaluate", "register")
SECTION = "## Smoke pipeline"
STORES = {  # module -> its store class, whose constructor opens (and schema-checks) the database
    "mlflow.store.tracking.sqlalchemy_store": "SqlAlchemyStore",
    "mlflow.store.model_registry.sqlalchemy_store": "SqlAlchemyStore",
}
MARK = "@@bench_smoke "


# --- the runner: one stage, in its own interpreter ------------------------------------------


class _StoreTimer(importlib.abc.MetaPathFinder):
    """Wraps the store constructors when (and only if) the stage imports their modules, so a
    stage that never opens MLflow does not import it because it is being measured."""

    def __init__(self, spans: list[float]):
        self.spans = spans

    def find_spec(self, name, path, target=None):
        if name not in STORES:
            return None
        sys.meta_path.remove(self)  # let the normal finders locate it
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            cls = getattr(module, STORES[name])
            init = cls.__init__

            def timed_init(store, *args, **kwargs):
                print(f"{MARK}store-begin", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                try:
                    init(store, *args, **kwargs)
                finally:
                    self.spans.append(time.perf_counter() - t0)
                    print(f"{MARK}store-end", file=sys.stderr, flush=True)

            cls.__init__ = timed_init

        spec.loader.exec_module = exec_and_wrap
        return spec


def run_stage(stage: str, overrides: list[str], out: Path) -> None:
    t0 = time.perf_counter()
    spans: list[float] = []
    sys.meta_path.insert(0, _StoreTimer(spans))
    script = ROOT / "pipelines" / f"{stage}.py"
    sys.argv = [str(script), *overrides]
    spec = importlib.util.spec_from_file_location("stage_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Hydra finds conf/ relative to the file of a task function defined in `__main__`, which
    # is what the stage's function is when the script runs on its own.
    module.main.__wrapped__.__module__ = "__main__"
    t1 = time.perf_counter()
    print(f"{MARK}run-begin", file=sys.stderr, flush=True)
    try:
        module.main()
    finally:
        t2 = time.perf_counter()
        out.write_text(json.dumps({"load_s": t1 - t0, "run_s": t2 - t1, "store_s": spans}))


# --- the bench --------------------------------------------------------------------------------


def import_seconds(stderr: str) -> dict[str, float]:
    """Seconds of first imports (top-level cumulative of -X importtime) while loading the
    script, inside store constructors, and in the rest of the run."""
    total = {"load": 0.0, "store": 0.0, "run": 0.0}
    phase, outer = "load", "load"
    for line in stderr.splitlines():
        if line.startswith(MARK):
            event = line[len(MARK) :].strip()
            if event == "run-begin":
                phase = outer = "run"
            elif event == "store-begin":
                phase = "store"
            elif event == "store-end":
                phase = outer
        elif line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|", 2)
            if cumulative.strip().isdigit() and not name.startswith("  "):  # top level only
                total[phase] += int(cumulative) / 1e6
    return total


def stage_command(stage: str, overrides: list[str], instrumented: Path | None) -> list[str]:
    if instrumented is None:
        return [sys.executable, str(ROOT / "pipelines" / f"{stage}.py"), *overrides]
    return [sys.executable, "-X", "importtime", __file__, "--run-stage", stage,
            "--stage-out", str(instrumented), "--", *overrides]  # fmt: skip


def run_pipeline(work: Path, overrides: list[str], instrumented: bool) -> dict[str, dict]:
    work.mkdir(parents=True)
    env = dict(os.environ)
    env.setdefault("DLPIPE_DATA_MIRROR", str(ROOT.parent / "shared" / "datasets"))
    results = {}
    for stage in STAGES:
        out = work / f"{stage}.json" if instrumented else None
        t0 = time.perf_counter()
        done = subprocess.run(
            stage_command(stage, overrides, out),
            cwd=work, env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{stage} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        row = {"wall_s": wall}
        if instrumented:
            inside = json.loads(out.read_text())
            imports = import_seconds(done.stderr)
            store = sum(inside["store_s"]) - imports["store"]
            row |= {
                "startup_exit_s": wall - inside["load_s"] - inside["run_s"],
                "imports_load_s": imports["load"],
                "imports_run_s": imports["run"] + imports["store"],
                "store_s": store,
                "store_opens": len(inside["store_s"]),
                "work_s": inside["run_s"] - imports["run"] - sum(inside["store_s"]),
            }
        results[stage] = row
        print(f"{'instrumented' if instrumented else 'plain'} {stage}: {row}", flush=True)
    return results


def startup_seconds(reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def report(plain: dict, split: dict, args: argparse.Namespace, load: tuple) -> str:
    command = "python bench/bench_smoke.py" + (
        f" --experiment {args.experiment}" if args.experiment else ""
    )
    total = sum(r["wall_s"] for r in plain.values())
    lines = [
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} UTC: `OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', '-')} {command}`",
        "",
        f"- {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}; `python -c pass` {args.startup:.3f} s",
        f"- 1-min load average before plain / before instrumented / after: "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (2 idle cores would read < 0.2)",
        f"- **six stages, plain: {total:.1f} s** (goal <= 30 s on 2 idle cores)",
        "",
        "| stage | plain wall s | instrumented wall s | start-up + exit | imports (load) | "
        "imports (run) | store s (opens) | work s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        p, s = plain[stage], split[stage]
        lines.append(
            f"| {stage} | {p['wall_s']:.1f} | {s['wall_s']:.1f} | {s['startup_exit_s']:.1f} | "
            f"{s['imports_load_s']:.1f} | {s['imports_run_s']:.1f} | "
            f"{s['store_s']:.2f} ({s['store_opens']}) | {s['work_s']:.1f} |"
        )
    sums = {k: sum(s[k] for s in split.values()) for k in next(iter(split.values()))}
    lines.append(
        f"| **all** | **{total:.1f}** | {sums['wall_s']:.1f} | {sums['startup_exit_s']:.1f} | "
        f"{sums['imports_load_s']:.1f} | {sums['imports_run_s']:.1f} | "
        f"{sums['store_s']:.2f} ({sums['store_opens']:.0f}) | {sums['work_s']:.1f} |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--experiment", help="conf/experiment option (default: the default one)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--run-stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--stage-out", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    rest = [r for r in rest if r != "--"]
    if args.run_stage:
        run_stage(args.run_stage, rest, args.stage_out)
        return
    overrides = ["smoke=true", *([f"experiment={args.experiment}"] if args.experiment else [])]
    args.startup = startup_seconds()
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        load0 = os.getloadavg()[0]
        plain = run_pipeline(Path(tmp) / "plain", overrides, instrumented=False)
        load1 = os.getloadavg()[0]
        split = run_pipeline(Path(tmp) / "instrumented", overrides, instrumented=True)
    text = report(plain, split, args, (load0, load1, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section(text, args.out)


if __name__ == "__main__":
    main()
