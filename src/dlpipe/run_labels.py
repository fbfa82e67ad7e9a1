"""How a run reads in the MLflow UI: a name that tells it apart, the source and user tags MLflow's
fluent API adds, and the processed splits it saw as dataset inputs (the runs table's Dataset
column)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NAME


def run_title(stage: str, model: str, data: str, run_id: str) -> str:
    """The stage, what was trained on what, and the first six characters of the run id, e.g.
    `train cnn fashion_mnist 3f2a9c`, so a week of runs is not a wall of "train"."""
    return f"{stage} {model} {data} {run_id[:6]}"


def name_run(client: MlflowClient, run_id: str, stage: str, model: str, data: str) -> None:
    """Rename the run `run_id` to its `run_title` (the id exists only once the run does)."""
    client.set_tag(run_id, MLFLOW_RUN_NAME, run_title(stage, model, data, run_id))


def source_tags(tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """`tags` plus what MLflow records for a run it starts itself (mlflow.user,
    mlflow.source.name and .type, the git commit): `MlflowClient.create_run` adds none."""
    return resolve_tags(dict(tags or {}))


def split_digest(meta: Mapping[str, Any], split: str) -> str | None:
    """A 10-character digest of the split's processed arrays, from the sha256 that meta.json
    records for each file (`<split>_x.npy`, `<split>_y.npy`...); None if it records none."""
    hashes = sorted(
        f"{name}:{sha}"
        for name, sha in meta.get("sha256", {}).items()
        if name.startswith((f"{split}_", f"{split}."))
    )
    if not hashes:
        return None
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:10]


def log_splits(
    client: MlflowClient,
    run_id: str,
    meta: Mapping[str, Any],
    processed: str | Path,
    splits: Iterable[str],
) -> None:
    """Log each processed split the run saw as an MLflow dataset input: name
    `<dataset>-<split>`, our content digest (`split_digest`), the processed folder as source and
    the split as context. Metadata only: MLflow stores no data."""
    source = LocalArtifactDatasetSource(str(Path(processed).resolve()))
    inputs = []
    for split in splits:
        digest = split_digest(meta, split)
        if digest is None:
            continue
        dataset = MetaDataset(source, name=f"{meta['name']}-{split}", digest=digest)
        context = InputTag(key=MLFLOW_DATASET_CONTEXT, value=split)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[context]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
