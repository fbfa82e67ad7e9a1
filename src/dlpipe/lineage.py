"""One lineage chain per registered version: code (git commit, dirty flag), data (the train run's
sha256 of every raw and processed file, dvc.lock's hashes of the data and model outputs), the
Optuna study and its best trial's MLflow run, the train run, the evaluate metrics and the gate.
`register` records it (`record_lineage`); `python -m dlpipe.lineage URI` prints it and checks
that the local data and dvc.lock still match, naming what differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from dlpipe.data import sha256_file
from dlpipe.tracking import git_commit

PREFIX = "lineage."
DATA_TAG = "data.sha256."  # the train run's tag of each raw and processed file (tracking.py)


def dvc_lock_hashes(lock: Path, outputs: list[str]) -> dict[str, str]:
    """{"<stage>:<path>": md5} of the outs in `lock` (a dvc.lock) that are `outputs` (paths
    relative to the lock's folder, or absolute): the data and model hashes DVC recorded for
    this run. Empty when there is no dvc.lock or it tracks none of them (stages run outside
    `dvc repro`, e.g. by the tests into temporary folders)."""
    if not lock.is_file():
        return {}
    root = lock.parent.resolve()
    wanted = {(root / p).resolve() for p in outputs}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {
        f"{stage}:{out['path']}": out["md5"]
        for stage, entry in stages.items()
        for out in entry.get("outs", [])
        if "md5" in out and (root / out["path"]).resolve() in wanted
    }


def data_digest(hashes: Mapping[str, str]) -> str:
    """One sha256 over the sorted `name sha256` lines of a run's data files."""
    lines = "".join(f"{name} {sha}\n" for name, sha in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def best_trial_run(client: MlflowClient, study: Mapping[str, Any]) -> str:
    """The MLflow run of the study's best trial (a child of the study's `tune` run)."""
    parent = client.get_run(study["mlflow_run_id"])
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
        f"and tags.`optuna.trial` = '{study['best_trial']}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else "unknown"


def lineage_tags(
    client: MlflowClient,
    run_id: str,
    paths: Mapping[str, str],
    use_tuned: bool,
    metrics: Mapping[str, float],
    lock: Path = Path("dvc.lock"),
) -> dict[str, str]:
    """The `lineage.*` tags of a version built by the train run `run_id` from the config's
    `paths`, evaluated to `metrics`; `lock` is the dvc.lock of the project the stages ran in."""
    run = client.get_run(run_id)
    code = {k: run.data.tags.get(k) for k in ("git_commit", "git_dirty")}
    if None in code.values():  # a run logged before provenance tags: the code registering it
        code = git_commit()
    hashes = {
        k.removeprefix(DATA_TAG): v for k, v in run.data.tags.items() if k.startswith(DATA_TAG)
    }
    tags = {
        f"{PREFIX}git_commit": code["git_commit"],
        f"{PREFIX}git_dirty": code["git_dirty"],
        f"{PREFIX}train_run": run_id,
        f"{PREFIX}data.name": run.data.tags.get("data.name", "unknown"),
        f"{PREFIX}data.files": str(len(hashes)),
        f"{PREFIX}data.digest": data_digest(hashes),
    }
    outputs = [
        paths["raw"],
        paths["processed"],
        paths["tune"],
        paths["train"],
        str(Path(paths["reports"]) / "evaluate" / "metrics.json"),
    ]
    for key, md5 in dvc_lock_hashes(lock, outputs).items():
        tags[f"{PREFIX}dvc.{key}"] = md5
    study_file = Path(paths["tune"]) / "study.json"
    if use_tuned and study_file.is_file():
        study = json.loads(study_file.read_text())
        tags |= {
            f"{PREFIX}optuna.study": study["study_name"],
            f"{PREFIX}optuna.storage": study["storage"],
            f"{PREFIX}optuna.best_trial": str(study["best_trial"]),
            f"{PREFIX}optuna.best_trial_run": best_trial_run(client, study),
        }
    else:
        tags[f"{PREFIX}optuna.study"] = "none (train.use_tuned=false or no tune output)"
    tags |= {f"{PREFIX}metric.{k}": f"{v:.6g}" for k, v in metrics.items()}
    return tags


def describe(tags: Mapping[str, str]) -> str:
    """The chain as text, one link per line (the version's description, the CLI's output)."""
    t = {k.removeprefix(PREFIX): v for k, v in tags.items() if k.startswith(PREFIX)}
    dirty = " (uncommitted changes)" if t.get("git_dirty") == "true" else ""
    lines = [
        f"code: git {t.get('git_commit', 'unknown')}{dirty}",
        f"data: {t.get('data.name')}, {t.get('data.files')} raw and processed files, sha256 "
        f"digest {t.get('data.digest', '')[:16]} (train run tags data.sha256.*)",
    ]
    dvc = {k.removeprefix("dvc."): v for k, v in t.items() if k.startswith("dvc.")}
    lines += [f"dvc.lock: {k} md5 {v}" for k, v in dvc.items()] or ["dvc.lock: not run by dvc"]
    if "optuna.storage" in t:
        lines.append(
            f"tune: Optuna study {t['optuna.study']} in {t['optuna.storage']}, best trial "
            f"{t['optuna.best_trial']} (MLflow run {t['optuna.best_trial_run']})"
        )
    else:
        lines.append(f"tune: {t.get('optuna.study')}")
    lines.append(f"train: MLflow run {t.get('train_run')}")
    metrics = ", ".join(
        f"{k.removeprefix('metric.')}={v}" for k, v in t.items() if k.startswith("metric.")
    )
    lines.append(f"evaluate: {metrics}")
    if "gate.decision" in tags:
        lines.append(f"gate: {tags['gate.decision']}")
    if "export.status" in tags:
        lines.append(f"export: {tags.get('export.format')} {tags['export.status']}")
    return "\n".join(lines)


def record_lineage(
    client: MlflowClient,
    name: str,
    version: str,
    run_id: str,
    paths: Mapping[str, str],
    use_tuned: bool,
    metrics: Mapping[str, float],
    extra: Mapping[str, str],
) -> dict[str, str]:
    """Tag model version `name`/`version` with its lineage and `extra` tags (the export's) and
    append the chain to its description; returns the tags set."""
    tags = lineage_tags(client, run_id, paths, use_tuned, metrics) | dict(extra)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    current = client.get_model_version(name, version)
    chain = describe(current.tags | tags)
    client.update_model_version(name, version, description=f"{current.description}\n\n{chain}")
    return tags


# --- walking and checking a chain ------------------------------------------------------------


def resolve_version(client: MlflowClient, ref: str) -> ModelVersion:
    """models:/<name>@<alias>, models:/<name>/<version>, or the id of the run that logged it.
    ValueError naming the accepted forms when `ref` is none of them."""
    if ref.startswith("models:/"):
        body = ref.removeprefix("models:/")
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, number = body.rpartition("/")
        if name and number.isdigit():
            return client.get_model_version(name, number)
    elif ref and "/" not in ref:
        versions = client.search_model_versions(f"run_id = '{ref}'")
        if versions:
            return max(versions, key=lambda v: int(v.version))
        raise ValueError(f"no registered version was logged by run {ref!r}")
    raise ValueError(f"{ref!r}: give models:/<name>@<alias>, models:/<name>/<version> or a run id")


@dataclass
class Chain:
    """A registered version's lineage as recorded, and what the local project says now."""

    version: ModelVersion
    tags: dict[str, str]
    data: dict[str, str]  # file name -> sha256 recorded by the train run
    files: dict[str, Path]  # file name -> where it lies locally (raw or processed folder)
    differences: list[str] = field(default_factory=list)


def walk(client: MlflowClient, ref: str, root: Path = Path(".")) -> Chain:
    """The chain of version `ref` back to the exact data files (as the train run recorded
    them), checked against the project at `root`: every data file's sha256 and dvc.lock's
    recorded hashes; `Chain.differences` names each mismatch (empty: everything matches)."""
    version = resolve_version(client, ref)
    run = client.get_run(version.run_id)
    tags = dict(version.tags)
    data = {k.removeprefix(DATA_TAG): v for k, v in run.data.tags.items() if k.startswith(DATA_TAG)}
    raw = root / run.data.params.get("paths.raw", "")
    processed = root / run.data.params.get("paths.processed", "")
    files, differences = {}, []
    for name, sha in sorted(data.items()):
        path = next((d / name for d in (processed, raw) if (d / name).is_file()), None)
        if path is None:
            differences.append(f"data file {name} is missing (looked in {processed} and {raw})")
            continue
        files[name] = path
        if (now := sha256_file(path)) != sha:
            differences.append(f"data file {path} has sha256 {now}, recorded {sha}")
    recorded = {
        k.removeprefix(f"{PREFIX}dvc."): v for k, v in tags.items() if k.startswith(f"{PREFIX}dvc.")
    }
    if recorded:
        lock = root / "dvc.lock"
        paths = [key.split(":", 1)[1] for key in recorded]
        current = dvc_lock_hashes(lock, paths)
        for key, md5 in recorded.items():
            if key not in current:
                differences.append(f"dvc.lock has no entry {key} any more (recorded md5 {md5})")
            elif current[key] != md5:
                differences.append(f"dvc.lock {key} is md5 {current[key]} now, recorded {md5}")
    return Chain(version, tags, data, files, differences)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlpipe.lineage",
        description="Print a registered model version's lineage (code, data, dvc.lock, Optuna "
        "study, train run, metrics, gate) and check that the local data files and dvc.lock "
        "still match it. Exit code 0: everything matches; 1: something differs (listed).",
    )
    parser.add_argument("ref", help="models:/<name>@champion, models:/<name>/<version> or a run id")
    parser.add_argument("--root", type=Path, default=Path("."), help="the project folder")
    parser.add_argument("--tracking-uri", default=None, help="default: the stages' store")
    args = parser.parse_args(argv)
    from dlpipe.tracking import tracking_uri

    client = MlflowClient(tracking_uri(args.tracking_uri))
    chain = walk(client, args.ref, args.root)
    v = chain.version
    print(f"{v.name} v{v.version} (aliases: {', '.join(v.aliases) or 'none'})")
    print(describe(chain.tags))
    print(f"data files ({len(chain.data)}):")
    for name, sha in chain.data.items():
        print(f"  {sha}  {chain.files.get(name, name)}")
    head = git_commit()["git_commit"]
    if head not in ("unknown", chain.tags.get(f"{PREFIX}git_commit")):
        print(f"note: the code here is at {head}, not the recorded commit")
    if chain.differences:
        print(f"DIFFERS ({len(chain.differences)}):")
        print("\n".join(f"  {d}" for d in chain.differences))
        return 1
    print("OK: the local data files and dvc.lock match the recorded hashes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
