"""Stage 2: decode the raw data into seeded train/val/test arrays plus meta.json.

Each data format (`dlpipe.formats.<module>`, chosen by `data.format`) writes `{split}_{key}.npy`
arrays and, last, a meta.json whose presence means the arrays are complete (`dlpipe.data`).
"""

from collections.abc import Mapping
from pathlib import Path

from dlpipe.formats import format_module


def preprocess(data: Mapping, raw_dir: Path, out_dir: Path, seed: int) -> dict:
    """Split and decode the collected dataset into `out_dir`; returns the meta it writes."""
    fmt = data.get("format")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer, or the splits would not be repeatable")
    return format_module(fmt).preprocess(data, Path(raw_dir), Path(out_dir), seed)
