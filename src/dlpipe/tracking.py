"""MLflow plumbing shared by the stages: where the store is, whether it answers, and provenance."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingServerError(RuntimeError):
    pass


def tracking_uri(configured: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the embedded SQLite store in the repo root."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at stage entry, not after an hour of training, when a tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        reason = str(getattr(err, "reason", err))
    raise TrackingServerError(
        f"MLflow tracking server {uri} is unreachable ({reason}). Start it "
        f"(e.g. `mlflow server --host 127.0.0.1 --port 5000`), fix MLFLOW_TRACKING_URI / "
        f"mlflow.tracking_uri, or unset both to use the local store {DEFAULT_TRACKING_URI}."
    )


def setup_mlflow(configured_uri: str | None, experiment: str) -> str:
    """Point the MLflow client at the store (checked) and experiment; returns the experiment id."""
    import mlflow

    uri = tracking_uri(configured_uri)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.set_experiment(experiment).experiment_id


def git_commit() -> dict[str, str]:
    """The commit the code ran from, and whether the working tree had uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
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
