"""Batched inference of any network over a whole split, on the network's device."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.inference_mode()
def predict(net: nn.Module, x: np.ndarray, batch_size: int = 2048) -> torch.Tensor:
    """net(x) in eval mode, `batch_size` samples at a time: x (N, ...) as the processed data
    stores it -> float32 outputs (N, ...) on the CPU (logits (N, K); (N, 1) for a regressor)."""
    net.eval()
    device = next(net.parameters()).device
    inputs = torch.from_numpy(x)
    return torch.cat(
        [
            net(inputs[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(inputs), batch_size)
        ]
    )
