"""Report pictures the tasks write: matplotlib figures saved to files, and grids of images."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@contextmanager
def saved_figure(path: str | Path, *subplots: Any, **options: Any) -> Iterator[tuple[Any, Any]]:
    """`with saved_figure(path, figsize=(8, 4)) as (fig, ax):` draw, and on leaving the figure
    is laid out, saved to `path` (100 dpi) and closed. The arguments are `plt.subplots`'s.
    If drawing raises, the figure is closed and nothing is written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; imported here, as only evaluation draws
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*subplots, **options)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def image_grid(
    images: np.ndarray, cols: int, *, gap: int = 2, fill: int = 0, frame: bool = False
) -> np.ndarray:
    """uint8 images (N, H, W[, C]) tiled row by row, `cols` per row, into one uint8 image,
    `gap` pixels of the value `fill` between them (and around them with `frame`)."""
    n, height, width = images.shape[:3]
    rows = -(-n // cols)
    edge = gap if frame else 0
    grid = np.full(
        (
            rows * (height + gap) - gap + 2 * edge,
            cols * (width + gap) - gap + 2 * edge,
            *images.shape[3:],
        ),
        fill,
        np.uint8,
    )
    for i, image in enumerate(images):
        top, left = edge + (i // cols) * (height + gap), edge + (i % cols) * (width + gap)
        grid[top : top + height, left : left + width] = image
    return grid


def save_png(image: np.ndarray, path: str | Path, scale: int = 3) -> None:
    """`image` enlarged `scale` times (nearest neighbour, so pixels stay crisp)."""
    height, width = image.shape[:2]
    Image.fromarray(image).resize((width * scale, height * scale), Image.Resampling.NEAREST).save(
        path
    )


def history_curves(rows: Sequence[Mapping[str, float]], out: str | Path) -> list[Path]:
    """One PNG per metric of a training history (`EpochHistory.rows`: {"epoch": 0,
    "train/loss": 2.3, "val/loss": 2.2, ...}), train/ and val/ of one name on the same axes,
    by epoch: `<out>/loss.png`, `<out>/acc.png`... Only what the rows hold is drawn, so each
    task gets its own curves; pictures, so `dvc plots show` draws them offline. Earlier PNGs
    in `out` are removed (no stale curve of another task); returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    names = sorted({k.split("/", 1)[1] for row in rows for k in row if "/" in k})
    written = []
    for name in names:
        path = out / f"{name.replace('/', '_')}.png"
        with saved_figure(path, figsize=(6, 4)) as (_, ax):
            for key in (f"train/{name}", f"val/{name}"):
                points = [(r["epoch"], r[key]) for r in rows if key in r]
                if points:
                    epochs, values = zip(*points, strict=True)
                    ax.plot(epochs, values, marker="o", label=key)
            ax.set(title=f"{name} by epoch", xlabel="epoch", ylabel=name)
            epochs = sorted({r["epoch"] for r in rows})
            ax.set_xticks(epochs if len(epochs) <= 15 else epochs[:: -(-len(epochs) // 15)])
            ax.grid(alpha=0.3)
            ax.legend()
        written.append(path)
    return written
