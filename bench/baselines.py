"""The classical baselines alone (dlpipe.baselines) on processed datasets, printed as one JSON
line each: what a recorded champion of the same data config and seed was up against.

    python bench/baselines.py data/processed/fsdd data/processed/california_housing
"""

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from dlpipe.baselines import (
    chance_probs,
    char_ngram_loss,
    classification_baseline,
    regression_baseline,
)
from dlpipe.data import load_array, load_meta, load_split
from dlpipe.tasks.regressor import regression_metrics


def measure(processed: Path, max_order: int = 6) -> dict:
    meta = load_meta(processed)
    t0 = time.perf_counter()
    if meta["format"] == "char_text":
        streams = (load_array(processed, f"{s}_x") for s in ("train", "val", "test"))
        loss, order, seconds = char_ngram_loss(*streams, meta["vocab_size"], max_order)
        row = {"baseline/loss": loss, "baseline/bpc": loss / math.log(2), "context": order}
        return row | {"fit_seconds": seconds, "total_seconds": time.perf_counter() - t0}
    y = load_split(processed, "test")[1]
    if "classes" in meta:
        k = len(meta["classes"])
        fitted = classification_baseline(processed, meta["input_kind"], k)
        chance = chance_probs(load_split(processed, "train")[1], k, len(y))
        row = {
            "baseline/acc": float(np.mean(fitted.test.argmax(1) == y)),
            "chance/acc": float(np.mean(chance.argmax(1) == y)),
        }
    else:
        fitted = regression_baseline(processed)
        row = {f"baseline/{k}": v for k, v in regression_metrics(fitted.test, y).items()}
    return {"name": fitted.name, **row, **fitted.info(), "total_seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(Path(path).name, json.dumps(measure(Path(path))), flush=True)
