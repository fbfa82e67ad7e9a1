"""Exports with a parity gate: the shipped network of a registered version as an ONNX file (or a
`torch.export` program), run next to the eager network on the test inputs and attached to the
version only when both agree within the task's stated tolerance.

A task opts in with `export_targets(cfg, checkpoint, meta) -> list[ExportTarget]` (see
`dlpipe.tasks`): the plain tensor functions it ships (a classifier's logits, a generator's
images, an encoder's latents) and the test inputs to check them on. A task without the method,
or a network that cannot be exported (`NotExportable`, `check_exportable`), is reported as such.
`register.export=none|onnx|torch_export` picks the format; the measured errors go on the
version as `export.*` tags whatever the outcome, and no outcome stops the register stage.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlpipe.logs import quieted
from dlpipe.models.sequence import Recurrent
from dlpipe.tasks import ExportTarget, NotExportable

log = logging.getLogger(__name__)

EXPORTS = ("none", "onnx", "torch_export")
SUFFIX = {"onnx": ".onnx", "torch_export": ".pt2"}
MIN_ARGMAX_AGREEMENT = 0.999  # same argmax on at least 99.9 % of test samples (or positions)
BATCH = 256  # parity runs in batches of this size (the last one smaller): a dynamic batch axis


@dataclass(frozen=True)
class Parity:
    """The measured agreement of an export with the eager network on the test inputs."""

    max_abs_error: float
    argmax_agreement: float | None  # share of rows with the same argmax; None if not checked
    samples: int
    passed: bool


def check_exportable(net: torch.nn.Module) -> None:
    """NotExportable, saying why, for a network no exporter traces as a tensor function."""
    for module in net.modules():
        if isinstance(module, Recurrent) and module.input.kind == "tokens" and not module.per_step:
            raise NotExportable(
                "a recurrent classifier of padded token sequences packs each batch by its "
                "lengths (pack_padded_sequence): a data-dependent shape that neither "
                "torch.export nor the TorchScript ONNX exporter traces; model=transformer "
                "exports (its padding is an attention mask)"
            )


def export(target: ExportTarget, kind: str, path: Path) -> Path:
    """Write `target.net` as `kind` ("onnx" or "torch_export") to `path` with a dynamic batch
    axis; returns `path`. Raises what the exporter raises when the network does not export."""
    example = _example(target.inputs)
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings(), quieted(EXPORTER_LOGGERS, logging.ERROR):
        # The exporter's notes on torch internals (not on this network) would flood the log.
        warnings.simplefilter("ignore")
        if kind == "onnx":
            # The torch.export-based ("dynamo") exporter: torch's maintained one (the
            # TorchScript exporter is deprecated since torch 2.9).
            torch.onnx.export(
                target.net,
                (example,),
                str(path),
                input_names=["input"],
                output_names=["output"],
                dynamo=True,
                dynamic_shapes=({0: batch},),
                external_data=False,  # one self-contained file (weights inside; < 2 GB)
                verbose=False,
            )
        elif kind == "torch_export":
            program = torch.export.export(target.net, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))
        else:
            raise ValueError(f"register.export={kind!r}: choose one of {list(EXPORTS)}")
    return path


# What the exporters log while they work: torch.onnx's "torchvision is not installed" notes and
# the graph optimizers' pass reports ("Removed 19 unused nodes"). Their errors still show.
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


def load_runner(kind: str, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function batch (B, ...) -> outputs (B, ...) of an exported file, run the way it ships:
    ONNX Runtime on the CPU for "onnx", the loaded program's module for "torch_export"."""
    if kind == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    program = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return program(torch.from_numpy(x)).float().numpy()

    return run


def parity(target: ExportTarget, run: Callable[[np.ndarray], np.ndarray]) -> Parity:
    """Compare `run` (an exported network) with the eager `target.net` on every test input, in
    batches of BATCH and once on a single sample (the batch axis is dynamic)."""
    errors, agree, rows = [], 0, 0
    inputs = target.inputs
    chunks = [inputs[:1], *inputs.split(BATCH)]
    with torch.inference_mode():
        for chunk in chunks:
            eager = target.net(chunk).float().numpy()
            exported = np.asarray(run(chunk.numpy()), dtype=np.float32)
            if exported.shape != eager.shape:
                raise ValueError(f"export gives shape {exported.shape}, eager {eager.shape}")
            errors.append(float(np.abs(exported - eager).max()) if eager.size else 0.0)
            if target.argmax:
                same = exported.argmax(-1) == eager.argmax(-1)
                agree, rows = agree + int(same.sum()), rows + same.size
    max_error = max(errors)
    agreement = agree / rows if target.argmax else None
    passed = bool(max_error <= target.max_abs_error) and (
        agreement is None or agreement >= MIN_ARGMAX_AGREEMENT
    )
    return Parity(max_error, agreement, len(inputs), passed)


def export_targets(
    kind: str,
    targets: list[ExportTarget],
    out_dir: Path,
    attach: Callable[[Path], str],
) -> dict[str, str]:
    """Export, check and (where parity holds) `attach` each target; returns the `export.*`
    tags of the outcome. `attach(file)` stores a file and returns its URI. An exporter
    failure or a parity miss is logged as a warning naming the target and tagged, never
    raised: the registered pyfunc is unaffected."""
    tags = {"export.format": kind}
    for target in targets:
        key = f"export.{target.name}"
        path = out_dir / f"{target.name}{SUFFIX[kind]}"
        tags[f"{key}.tolerance"] = f"max_abs_error<={target.max_abs_error:g}" + (
            f", argmax_agreement>={MIN_ARGMAX_AGREEMENT}" if target.argmax else ""
        )
        start = time.perf_counter()
        try:
            export(target, kind, path)
            measured = parity(target, load_runner(kind, path))
        except Exception as e:  # any exporter error: reported on the version, stage goes on
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400]}"
            log.warning("export of %s as %s failed: %s", target.name, kind, message)
            tags[f"{key}.status"] = "failed"
            tags[f"{key}.error"] = message
            continue
        tags[f"{key}.max_abs_error"] = f"{measured.max_abs_error:.3g}"
        tags[f"{key}.samples"] = str(measured.samples)
        if measured.argmax_agreement is not None:
            tags[f"{key}.argmax_agreement"] = f"{measured.argmax_agreement:.6f}"
        if measured.passed:
            tags[f"{key}.status"] = "attached"
            tags[f"{key}.uri"] = attach(path)
        else:
            tags[f"{key}.status"] = "rejected"
            log.warning(
                "export of %s as %s rejected by the parity gate: max abs error %.3g (allowed "
                "%g), argmax agreement %s on %d test inputs; the version ships without it",
                target.name,
                kind,
                measured.max_abs_error,
                target.max_abs_error,
                measured.argmax_agreement,
                measured.samples,
            )
        log.info(
            "export %s (%s): %s, max abs error %.3g, %.1f s",
            target.name,
            kind,
            tags[f"{key}.status"],
            measured.max_abs_error,
            time.perf_counter() - start,
        )
    return tags


def export_version(
    kind: str, task: Any, cfg: Any, checkpoint: Path, meta: dict[str, Any], run_id: str
) -> dict[str, str]:
    """The `export.*` tags of a registered version after exporting its task's targets as
    `kind`; files that pass parity are logged to the MLflow run `run_id` under `export/`."""
    if kind == "none":
        return {"export.format": "none"}
    hook = getattr(task, "export_targets", None)
    if hook is None:
        reason = f"task={cfg.task.name} defines no export_targets (no export implemented)"
        return {"export.format": kind, "export.status": "unsupported", "export.reason": reason}
    try:
        targets = hook(cfg, checkpoint, meta)
        for target in targets:
            check_exportable(target.net)
    except NotExportable as e:
        log.warning("no %s export for %s: %s", kind, cfg.model.name, e)
        return {"export.format": kind, "export.status": "unsupported", "export.reason": str(e)}

    from mlflow import MlflowClient

    client = MlflowClient()

    def attach(path: Path) -> str:
        client.log_artifact(run_id, str(path), "export")
        return f"runs:/{run_id}/export/{path.name}"

    with tempfile.TemporaryDirectory() as tmp:
        tags = export_targets(kind, targets, Path(tmp), attach)
    statuses = {v for k, v in tags.items() if k.endswith(".status")}
    tags["export.status"] = "attached" if statuses == {"attached"} else "incomplete"
    return tags


def _example(inputs: torch.Tensor) -> torch.Tensor:
    # Two samples: a batch of one would let torch.export specialize the batch axis to 1.
    return inputs[:2] if len(inputs) >= 2 else torch.cat([inputs, inputs])[:2]
