"""Batch prediction with a registered model: `python -m dlpipe.predict MODEL INPUT -o out.csv`.

INPUT is what the model's users have: a folder of images or of wav files, a CSV of rows, or a
text file of one input per line. Each batch goes through the registered pyfunc itself, so its
adapter (the one serving uses) checks and converts the inputs; the output CSV has one row per
input, named, with the model's answer or the reason it failed. (Not to be confused with
`dlpipe.models.predict`, the network-level batched forward pass the stages use.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}


@dataclass
class Item:
    """One input: its name (file path or line), and what the model is given or why it can't be."""

    name: str
    kind: str  # image | audio | row | line
    value: Any = None
    error: str = ""


def read_inputs(source: Path, sample_rate: int | None = None) -> list[Item]:
    """The inputs in `source`: a folder (images and wav/flac/ogg files, searched recursively,
    named by their path inside it), a .csv (one row each, named `row <n>` counting from 1) or
    any other file (one input per non-empty line, named `line <n>`). A file that cannot be read
    becomes an Item with its `error`. Audio is mixed down to mono and resampled to
    `sample_rate` (the model's) where given. FileNotFoundError for a missing `source`."""
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: give a folder, a .csv or a text file")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [_read_file(p, p.relative_to(source).as_posix(), sample_rate) for p in files]
    if source.suffix.lower() == ".csv":
        table = pd.read_csv(source)
        return [Item(f"row {i + 1}", "row", table.iloc[[i]]) for i in range(len(table))]
    lines = source.read_text(encoding="utf-8").splitlines()
    return [Item(f"line {i + 1}", "line", text) for i, text in enumerate(lines) if text.strip()]


def _read_file(path: Path, name: str, sample_rate: int | None) -> Item:
    suffix = path.suffix.lower()
    try:
        if suffix in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as image:
                if image.mode not in ("L", "RGB", "RGBA"):
                    image = image.convert("RGB")
                return Item(name, "image", np.asarray(image))
        if suffix in AUDIO_SUFFIXES:
            import soundfile as sf

            wave, rate = sf.read(path, dtype="float32")
            wave = wave.mean(axis=1) if wave.ndim == 2 else wave  # mono
            if sample_rate and rate != sample_rate:
                import librosa

                wave = librosa.resample(wave, orig_sr=rate, target_sr=sample_rate)
            return Item(name, "audio", wave)
    except Exception as e:  # noqa: BLE001  any unreadable file is that row's failure
        return Item(name, "image" if suffix in IMAGE_SUFFIXES else "audio", error=_reason(e))
    supported = ", ".join(sorted(IMAGE_SUFFIXES | AUDIO_SUFFIXES))
    return Item(name, "file", error=f"not an image or audio file (supported: {supported})")


def model_input(items: list[Item]) -> Any:
    """What the pyfunc takes for a batch of items of one kind: images stacked (N, H, W[, C]),
    waveforms as a `waveform` column, rows as one DataFrame, lines as a list of strings."""
    kind = items[0].kind
    if kind == "image":
        return np.stack([i.value for i in items])
    if kind == "audio":
        return pd.DataFrame({"waveform": [i.value for i in items]})
    if kind == "row":
        return pd.concat([i.value for i in items], ignore_index=True)
    return [i.value for i in items]


def output_rows(output: Any, count: int) -> list[dict[str, Any]]:
    """The model's answer for `count` inputs as one dict per input: a DataFrame's columns, a
    vector's `output_<k>` columns, or a single `output` column. ValueError for answers that
    are not one row per input (e.g. a generator's images)."""
    if isinstance(output, pd.DataFrame):
        frame = output.reset_index(drop=True)
    elif isinstance(output, pd.Series):
        frame = output.reset_index(drop=True).to_frame("output")
    else:
        array = np.asarray(output)
        if array.ndim == 1:
            frame = pd.DataFrame({"output": array})
        elif array.ndim == 2:
            frame = pd.DataFrame(array, columns=[f"output_{k}" for k in range(array.shape[1])])
        else:
            raise ValueError(
                f"the model answers with an array of shape {array.shape} (e.g. images), not "
                "one row per input: call the pyfunc directly (mlflow.pyfunc.load_model)"
            )
    if len(frame) != count:
        raise ValueError(f"the model gave {len(frame)} answers for {count} inputs")
    return frame.to_dict("records")


def predict_items(
    model: Any, items: list[Item], params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One output dict per item (`error` empty where it ran). A batch is predicted at once; if
    the model refuses it, each item is retried alone so only the bad ones fail, each with the
    model's own message. Images of different sizes are predicted in groups of one size."""
    rows: list[dict[str, Any] | None] = [None] * len(items)
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        if item.error:
            rows[i] = {"error": item.error}
        else:
            shape = np.shape(item.value) if item.kind == "image" else ()
            groups.setdefault((item.kind, shape), []).append(i)
    for indices in groups.values():
        try:
            answers = output_rows(
                model.predict(model_input([items[i] for i in indices]), params), len(indices)
            )
        except Exception:  # noqa: BLE001  find which inputs the model refuses, one by one
            answers = []
            for i in indices:
                try:
                    answers.append(
                        output_rows(model.predict(model_input([items[i]]), params), 1)[0]
                    )
                except Exception as e:  # noqa: BLE001  this input's failure, reported in its row
                    answers.append({"error": _reason(e)})
        for i, answer in zip(indices, answers, strict=True):
            rows[i] = {"error": ""} | answer
    return rows  # type: ignore[return-value]


def batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_file(
    model_uri: str,
    source: Path,
    output: Path,
    batch_size: int,
    params: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[int, int]:
    """Predict every input in `source` with the registered model `model_uri` and write
    `output` (CSV: `input`, `error`, then the model's columns); returns (inputs, failed)."""
    import mlflow
    from tqdm import tqdm

    model = mlflow.pyfunc.load_model(model_uri)
    inner = model.unwrap_python_model()
    options = getattr(getattr(inner, "adapter", None), "options", None) or {}
    items = read_inputs(source, options.get("sample_rate"))
    if not items:
        raise ValueError(f"{source} holds no inputs")
    rows = []
    with tqdm(total=len(items), unit="input", disable=not progress, file=sys.stderr) as bar:
        for batch in batches(items, batch_size):
            answers = predict_items(model, batch, params)
            rows += [{"input": i.name} | a for i, a in zip(batch, answers, strict=True)]
            bar.update(len(batch))
    frame = pd.DataFrame(rows)
    frame["error"] = frame["error"].fillna("")
    output.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(output, index=False)
    return len(rows), int((frame["error"] != "").sum())


def _reason(error: Exception) -> str:
    """One line: the error's own message (a model's input contract names the expected form)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:500]


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"--param {text!r}: write key=value, e.g. max_new_tokens=50"
        )
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlpipe.predict",
        description="Run a registered model over a folder of images or wav files, a CSV of "
        "rows or a text file of one input per line; write one CSV row per input. Exit code "
        "0: every input ran; 1: some failed (their `error` column says why).",
    )
    parser.add_argument("model", help="models:/<name>@champion, models:/<name>/<version>, ...")
    parser.add_argument("input", type=Path, help="a folder, a .csv file or a text file")
    parser.add_argument("-o", "--output", type=Path, default=Path("predictions.csv"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--param", type=_param, action="append", default=[], help="inference parameter key=value"
    )
    parser.add_argument("--tracking-uri", default=None, help="default: the stages' store")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size} must be at least 1")
    import mlflow

    from dlpipe.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(args.tracking_uri))
    total, failed = predict_file(
        args.model,
        args.input,
        args.output,
        args.batch_size,
        dict(args.param) or None,
        progress=not args.no_progress,
    )
    print(f"{total} inputs, {failed} failed -> {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
