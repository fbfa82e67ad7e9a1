"""Images (formats idx and image_folder): preprocessing lives in dlpipe.preprocess; this module
is what a served image model is given: raw uint8 images, exactly as the data stores them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlpipe.preprocess import load_split, preprocess_images

preprocess = preprocess_images

INPUT_DOC = "uint8 array (N, *input_shape), e.g. (N, 28, 28) for Fashion-MNIST"


def serving_files(processed_dir: Path) -> dict[str, str]:
    """Extra files a served model needs besides its weights: none for images."""
    return {}


def example_input(processed_dir: Path, n: int = 2) -> np.ndarray:
    return load_split(processed_dir, "test")[0][:n]


class Adapter:
    """Checks raw uint8 images (N, *input_shape) and hands them to the network as they are."""

    def __init__(self, spec: dict[str, Any], files: dict[str, str]):
        self.shape = tuple(spec["net"]["input_shape"])

    def __call__(self, model_input: Any) -> torch.Tensor:
        x = np.asarray(model_input)
        if x.shape[1:] != self.shape:
            shape = ", ".join(map(str, self.shape))
            raise ValueError(f"expected raw images of shape (N, {shape}), got {x.shape}")
        if not np.issubdtype(x.dtype, np.integer) or x.min(initial=0) < 0 or x.max(initial=0) > 255:
            raise ValueError("expected uint8 pixel values 0-255 (raw images, not normalized)")
        return torch.from_numpy(x.astype(np.uint8))
