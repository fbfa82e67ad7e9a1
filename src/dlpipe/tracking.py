"""MLflow plumbing shared by the stages: where the store is, whether it answers, and provenance."""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dlpipe.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
log = logging.getLogger(__name__)


class TrackingServerError(UserError, RuntimeError):
    """The configured MLflow tracking server does not answer."""


class StoreMovedError(UserError, RuntimeError):
    """A SQLite store's artifacts are recorded under another project folder than its own."""


def tracking_uri(configured: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the embedded SQLite store in the repo root."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def server_down(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why the tracking server `uri` does not answer its /health now; None when it does (or
    `uri` is no server)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at stage entry, not after an hour of training, when a tracking server is down."""
    reason = server_down(uri, timeout_s)
    if reason is None:
        return
    raise TrackingServerError(
        f"MLflow tracking server {uri} is unreachable ({reason}). Start it "
        f"(e.g. `mlflow server --host 127.0.0.1 --port 5000`), fix MLFLOW_TRACKING_URI / "
        f"mlflow.tracking_uri, or unset both to use the local store {DEFAULT_TRACKING_URI}."
    )


# MLflow retries a failed request to a server 7 times with backoff factor 2, and waits 120 s
# for an answer: minutes per request once the server is gone, at every epoch end and at the
# end of the run. A stage bounds that to about 10 s unless these are set already.
HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # waits 1, 2, 4 s (+ up to 1 s jitter each)
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",  # s per request
}
_announced: set[str] = set()


def bound_http_retries(uri: str) -> None:
    """Set MLflow's own HTTP retry settings (`HTTP_RETRIES`, environment variables the user has
    not set) for a tracking server, and say what they are."""
    if not uri.startswith(("http://", "https://")):
        return
    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)
    if uri in _announced:  # once per process, not once per tuning trial
        return
    _announced.add(uri)
    settings = ", ".join(f"{name}={os.environ[name]}" for name in HTTP_RETRIES)
    log.info("requests to the MLflow tracking server %s are retried with %s", uri, settings)


def setup_mlflow(configured_uri: str | None, experiment: str) -> str:
    """Point the MLflow client at the store (checked) and experiment; returns the experiment id."""
    import mlflow

    uri = tracking_uri(configured_uri)
    check_reachable(uri)
    check_store_location(uri)
    bound_http_retries(uri)
    if not sys.stderr.isatty():  # a log file: MLflow's download bars would fill it with \r
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    location = artifact_location(uri, experiment)
    if location is not None and mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            pass  # another worker created it first; set_experiment reads (or raises) below
    found = mlflow.set_experiment(experiment)
    mark_experiment(mlflow.MlflowClient(), found)
    return found.experiment_id


# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, no runs table);
# "custom_model_development" is the UI's kind for model training (the runs table).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def mark_experiment(client: Any, experiment: Any) -> None:
    """Tag `experiment` (an mlflow Experiment) as model training, unless already tagged."""
    key, value = EXPERIMENT_KIND
    if key not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, key, value)


# What DVC writes for every run: params.yaml (the composition `dvc exp run -S` rewrites; the run
# records it whole as params and config.yaml) and dvc.lock (the outputs' hashes). Neither makes
# the code differ from the commit, so neither makes a run dirty.
RUN_WRITTEN = ("params.yaml", "dvc.lock")


def git_commit() -> dict[str, str]:
    """The commit the code ran from, and whether tracked files differ from it (`git_dirty`),
    not counting the RUN_WRITTEN files."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        excluded = [f":(top,exclude){name}" for name in RUN_WRITTEN]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", *excluded],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": sha, "git_dirty": str(bool(dirty)).lower()}


def provenance_tags(meta: Mapping[str, Any]) -> dict[str, str]:
    """Run tags that pin a result to its code and its exact data."""
    tags = git_commit()
    tags["mlflow.source.git.commit"] = tags["git_commit"]
    tags["data.name"] = meta["name"]
    for name, sha in {**meta.get("raw_sha256", {}), **meta.get("sha256", {})}.items():
        tags[f"data.sha256.{name}"] = sha
    return tags


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}, the form MLflow params and overrides use."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of the SQLite store `uri` keeps its artifacts: the `mlruns/`
    folder beside the database file, `<that folder>/mlruns/<experiment>` (the name with
    characters other than letters, digits, `.`, `_`, `-` replaced by `_`), as a file:// URI.
    None, i.e. MLflow's own default `./mlruns/<experiment id>`, for other stores and for a
    database in the working directory (the embedded default, sqlite:///mlflow.db). MLflow's
    default is relative to the process's working directory, not to the store, so without this
    a store elsewhere (a benchmark's, a test's, `sqlite:///models/mlflow.db`) would scatter
    its artifacts over whatever folders its stages were started in."""
    db = sqlite_path(uri)
    if db is None:
        return None
    folder = db.resolve().parent
    if folder == Path.cwd().resolve():
        return None
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in experiment)
    return (folder / "mlruns" / safe).as_uri()


# --- a project folder that moves ----------------------------------------------------------
# A SQLite store records absolute artifact paths (<project>/mlruns/...). Copied or moved with
# the project, it would read, and write new runs into, the old folder's artifacts, or fail
# with "No such artifact" once that is gone. MLflow has no relocation tool, so the embedded
# store is checked at each stage's entry and `python -m dlpipe.tracking relocate` rewrites it.


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (None for other stores)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def recorded_roots(db: Path) -> set[Path]:
    """The project folders whose `mlruns/` the store's experiments that hold runs keep their
    artifacts in. An experiment without runs reads and writes nothing; that leaves out the
    "Default" experiment MLflow creates with every store at ./mlruns of the process that
    created it, which for a store outside the working directory is not the store's folder."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT artifact_location FROM experiments WHERE experiment_id IN "
            "(SELECT DISTINCT experiment_id FROM runs)"
        ).fetchall()
    roots = set()
    for (location,) in rows:
        path = Path((location or "").removeprefix("file://"))
        if path.is_absolute() and path.parent.name == "mlruns":
            roots.add(path.parent.parent)
    return roots


def check_store_location(uri: str) -> None:
    """StoreMovedError when the embedded store (a SQLite file given relative to the project,
    like the default sqlite:///mlflow.db) keeps its artifacts under another folder than the one
    holding it: the project was copied or moved. Names both folders and the fix. A store at an
    absolute path is the user's own layout and is left alone."""
    db = sqlite_path(uri)
    if db is None or db.is_absolute() or not db.is_file():
        return
    here = db.resolve().parent
    elsewhere = sorted(str(r) for r in recorded_roots(db) if r.resolve() != here)
    if elsewhere:
        state = "still exists" if Path(elsewhere[0]).exists() else "no longer exists"
        raise StoreMovedError(
            f"the MLflow store {db} keeps its artifacts under {elsewhere[0]}/mlruns, another "
            f"project folder (which {state}); this copy would read and write that folder's "
            f"runs. Point the store at this folder, {here}, with `python -m dlpipe.tracking "
            f"relocate --db {db}` (copy {elsewhere[0]}/mlruns here first if it is not)"
        )


def relocate_store(db: Path, old_root: Path, new_root: Path) -> int:
    """Rewrite every `<old_root>/mlruns/...` path stored in the SQLite store `db` to
    `<new_root>/mlruns/...` (experiments, runs, logged models, model versions); returns how
    many values changed. Every text column is rewritten, so it holds across MLflow schemas."""
    old, new = f"{old_root}/mlruns/", f"{new_root}/mlruns/"
    changed = 0
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for column in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                name, kind = column[1], (column[2] or "").upper()
                if not kind.startswith(("VARCHAR", "TEXT")):
                    continue
                for prefix in ("", "file://"):
                    changed += con.execute(
                        f'UPDATE "{table}" SET "{name}" = ? || substr("{name}", ?) '
                        f'WHERE substr("{name}", 1, ?) = ?',
                        (prefix + new, len(prefix + old) + 1, len(prefix + old), prefix + old),
                    ).rowcount
                    changed += con.execute(
                        f'UPDATE "{table}" SET "{name}" = ? WHERE "{name}" = ?',
                        (prefix + new.rstrip("/"), prefix + old.rstrip("/")),
                    ).rowcount
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dlpipe.tracking",
        description="relocate: point a copied or moved project's SQLite MLflow store at its "
        "new folder. Run it in the project folder: every stored <old folder>/mlruns/... path "
        "(experiments, runs, logged models, model versions) becomes <this folder>/mlruns/...; "
        "copy the old mlruns/ along first if it did not move with the project.",
    )
    parser.add_argument("command", choices=["relocate"])
    parser.add_argument(
        "--db", type=Path, default=Path("mlflow.db"), help="the store's file (default: mlflow.db)"
    )
    args = parser.parse_args(argv)
    here = args.db.resolve().parent
    total = 0
    for old in recorded_roots(args.db):
        if old.resolve() != here:
            total += relocate_store(args.db, old, here)
            print(f"{args.db}: {old}/mlruns -> {here}/mlruns")
    print(f"{total} stored paths rewritten")


if __name__ == "__main__":
    main()
