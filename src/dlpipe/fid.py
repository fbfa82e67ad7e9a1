"""Fréchet distance between image sets in the feature space of our own Fashion-MNIST classifier.

The classic FID embeds images with an ImageNet Inception-v3; this project trains its own small
CNN classifier on the processed training split instead (seeded, on the CPU, cached by a hash of
its config and the data's sha256s) and embeds images with its penultimate layer. The distances
are therefore comparable between runs on the same data and feature-net config, not with
published FID numbers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dlpipe.data import load_meta, load_split, write_atomic
from dlpipe.models import FeatureNet

log = logging.getLogger(__name__)

Gaussian = tuple[np.ndarray, np.ndarray]  # (mean (D,), covariance (D, D)), float64


def train_feature_net(
    x: np.ndarray, y: np.ndarray, num_classes: int, config: Mapping[str, Any]
) -> FeatureNet:
    """Adam on cross-entropy for `config["epochs"]` epochs, seeded by `config["seed"]`.

    Runs inside `fork_rng`: whether the net is trained or read from the cache must not change
    the global random state that the GAN's own initialization draws from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        net = FeatureNet(x.shape[1:], num_classes, config["channels"], config["features"])
        optimizer = torch.optim.Adam(net.parameters(), lr=config["lr"])
        order = torch.Generator().manual_seed(config["seed"])
        images, labels = torch.from_numpy(x), torch.from_numpy(y)
        net.train()
        for _ in range(config["epochs"]):
            for idx in torch.randperm(len(images), generator=order).split(config["batch_size"]):
                loss = F.cross_entropy(net(images[idx]), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return net.eval()


def cache_key(config: Mapping[str, Any], data_sha256: Mapping[str, str]) -> str:
    """Same feature-net config and processed data -> same cached net; any change -> a new one."""
    identity = json.dumps({"config": dict(config), "data": dict(data_sha256)}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def feature_net(
    processed_dir: str | Path, config: Mapping[str, Any], cache_dir: str | Path
) -> tuple[FeatureNet, dict[str, Any]]:
    """The feature classifier of a processed image dataset, in eval mode on the CPU, with its
    info (config, test accuracy, feature dimension). Trained on the train split on first use,
    then read from `cache_dir/<key>.pt`."""
    meta = load_meta(processed_dir)
    if meta["input_kind"] != "image":
        raise ValueError(
            f"the Fréchet distance needs an image dataset; {meta['name']} holds "
            f"{meta['input_kind']} inputs: pick an image data config (e.g. data=fashion_mnist)"
        )
    config = dict(config)
    key = cache_key(config, meta["sha256"])
    path = Path(cache_dir) / f"{key}.pt"
    args = (meta["input_shape"], meta["num_classes"], config["channels"], config["features"])
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = FeatureNet(*args)
        net.load_state_dict(blob["state_dict"])
        return net.eval(), blob["info"]

    t0 = time.perf_counter()
    net = train_feature_net(*load_split(processed_dir, "train"), meta["num_classes"], config)
    seconds = time.perf_counter() - t0
    test_x, test_y = load_split(processed_dir, "test")
    _, logits = activations(net, test_x)
    info = {
        "key": key,
        "config": config,
        "data_sha256": meta["sha256"],
        "feature_dim": config["features"],
        "test_acc": float((logits.argmax(1) == test_y).mean()),
        "train_seconds": round(seconds, 1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "info": info}, buf)
    write_atomic(path, [buf.getbuffer()])
    log.info(
        "trained the FID feature net in %.1fs: test accuracy %.4f -> %s",
        seconds,
        info["test_acc"],
        path,
    )
    return net, info


@torch.inference_mode()
def activations(
    net: FeatureNet, images: np.ndarray | torch.Tensor, batch_size: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D), logits (N, K)) of uint8 images, as float64 arrays, on the net's device."""
    device = next(net.parameters()).device
    images = torch.as_tensor(images)
    features, logits = [], []
    for batch in images.split(batch_size):
        f = net.features(batch.to(device))
        features.append(f.double().cpu())
        logits.append(net.head(f).double().cpu())
    return torch.cat(features).numpy(), torch.cat(logits).numpy()


def gaussian(features: np.ndarray) -> Gaussian:
    """The Gaussian fitted to features (N, D): sample mean and unbiased covariance."""
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; round-off negative eigenvalues -> 0."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) is computed as tr((R S_b R)^(1/2)) with R = S_a^(1/2): the two matrices
    are similar, and R S_b R is symmetric PSD, so symmetric eigendecompositions give it without
    the complex round-off that a general `sqrtm` of S_a S_b produces."""
    (mu_a, cov_a), (mu_b, cov_b) = a, b
    root = _psd_sqrt(cov_a)
    middle = root @ cov_b @ root
    cross = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    return float(max(distance, 0.0))  # round-off can take an exact 0 slightly below


def class_histogram(logits: np.ndarray, num_classes: int) -> np.ndarray:
    """How many of the images the feature classifier assigns to each class."""
    return np.bincount(logits.argmax(axis=1), minlength=num_classes)


def entropy_ratio(counts: np.ndarray) -> float:
    """Entropy of the class distribution over log(K): 1 = all classes equally often, 0 = one."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(counts)))
