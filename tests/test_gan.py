"""The DCGAN task on real Fashion-MNIST: the Fréchet distance against closed forms, manual
optimization of both networks, and the fmnist_dcgan experiment through all six stages up to the
registered generator."""

import json
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from scipy import linalg

from dlpipe import fid
from dlpipe.data import load_split
from dlpipe.datamodule import TensorDataModule
from dlpipe.models.generative import generate, to_uint8
from dlpipe.modules.gan import GAN, to_unit_range

# The unit tests' networks, built without Hydra; the feature net learns (lr, batch size).
TINY_NET = {"channels": [4, 8], "features": 16, "epochs": 1, "batch_size": 128, "lr": 3e-3}
TINY_GAN = {"name": "dcgan", "latent_dim": 8, "g_width": 8, "d_width": 8}
ADAM = {"lr": 2e-4, "betas": [0.5, 0.999]}


def _random_gaussian(rng: np.random.Generator, d: int) -> fid.Gaussian:
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_noise():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
    assert fid.frechet_distance(fid.gaussian(features), fid.gaussian(features)) < 1e-8
    noise = rng.normal(size=features.shape)
    distances = [
        fid.frechet_distance(fid.gaussian(features), fid.gaussian(features + s * noise))
        for s in (0.1, 0.3, 1.0, 3.0)
    ]
    assert distances[0] > 1e-3
    assert distances == sorted(distances) and len(set(distances)) == 4, distances


def test_frechet_distance_matches_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
    one_d = fid.frechet_distance((np.array([1.0]), np.array([[4.0]])), (np.zeros(1), np.eye(1)))
    assert one_d == pytest.approx(1.0 + (2.0 - 1.0) ** 2)
    # Covariances sharing eigenvectors: |mu|^2 + sum (sqrt a_i - sqrt b_i)^2.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu = rng.normal(size=5)
    got = fid.frechet_distance((mu, q @ np.diag(a) @ q.T), (np.zeros(5), q @ np.diag(b) @ q.T))
    assert got == pytest.approx((mu**2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    # General covariances: the textbook formula with scipy's sqrtm of the (non-symmetric) product.
    (mu_a, cov_a), (mu_b, cov_b) = _random_gaussian(rng, 6), _random_gaussian(rng, 6)
    textbook = (
        ((mu_a - mu_b) ** 2).sum()
        + np.trace(cov_a + cov_b)
        - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b).real)
    )
    assert fid.frechet_distance((mu_a, cov_a), (mu_b, cov_b)) == pytest.approx(textbook)


def test_entropy_ratio_spans_one_class_to_uniform():
    assert fid.entropy_ratio(np.array([0, 50, 0, 0])) == 0.0
    assert fid.entropy_ratio(np.array([7, 7, 7, 7])) == pytest.approx(1.0)
    assert 0 < fid.entropy_ratio(np.array([1, 10, 10, 10])) < 1
    logits = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    assert fid.class_histogram(logits, 3).tolist() == [1, 2, 0]


def test_images_round_trip_through_the_generator_range():
    x = torch.arange(256, dtype=torch.uint8).repeat(4).view(4, 16, 16)
    scaled = to_unit_range(x)  # (4, 1, 16, 16)
    assert scaled.shape == (4, 1, 16, 16) and scaled.min() == -1 and scaled.max() == 1
    assert torch.equal(to_uint8(scaled), x)


@pytest.fixture(scope="module")
def tiny_gan(fmnist_processed: Path) -> tuple[GAN, L.Trainer, dict[str, torch.Tensor]]:
    """A tiny GAN trained for 3 batches on the real slice, validated once, and its initial
    state."""
    torch.manual_seed(0)
    feature_net = fid.FeatureNet((28, 28), 10, [4, 8], 16).eval()
    val_features, _ = fid.activations(feature_net, load_split(fmnist_processed, "val")[0])
    module = GAN(
        model=TINY_GAN,
        net={"input_shape": [28, 28]},
        generator_optim=ADAM,
        discriminator_optim=ADAM | {"lr": 4e-4},
        label_smoothing=0.1,
        fid_samples=64,
        sample_seed=0,
        feature_net=feature_net,
        reference=fid.gaussian(val_features),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, datamodule=TensorDataModule(fmnist_processed, batch_size=64, seed=0))
    return module, trainer, before


def test_manual_optimization_steps_both_networks_with_their_own_adam(tiny_gan):
    module, trainer, initial = tiny_gan
    opt_g, opt_d = trainer.optimizers
    assert opt_g.param_groups[0]["lr"] == 2e-4 and opt_d.param_groups[0]["lr"] == 4e-4
    assert opt_g.param_groups[0]["betas"] == (0.5, 0.999)
    for optimizer, net in ((opt_g, module.generator), (opt_d, module.discriminator)):
        params = list(net.parameters())
        assert {id(p) for g in optimizer.param_groups for p in g["params"]} == set(map(id, params))
        assert all(int(optimizer.state[p]["step"]) == 3 for p in params)  # once per batch
    for name, value in module.state_dict().items():
        if name.endswith(".weight"):
            assert not torch.equal(value, initial[name]), name
        assert torch.isfinite(value.float()).all(), name


def test_gan_losses_are_finite_and_val_fid_is_deterministic(tiny_gan):
    module, trainer, _ = tiny_gan
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/d_loss", "train/g_loss", "train/d_real", "train/d_fake"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/loss"] == pytest.approx(
        float(metrics["train/d_loss"] + metrics["train/g_loss"])
    )
    assert 0 < metrics["train/d_real"] < 1 and 0 < metrics["train/d_fake"] < 1
    first = float(metrics["val/fid"])
    assert first > 0 and np.isfinite(first)
    (again,) = trainer.validate(module, datamodule=trainer.datamodule, verbose=False)
    assert again["val/fid"] == pytest.approx(first, rel=1e-6)


def test_generate_gives_uint8_images_fixed_by_the_seed(tiny_gan):
    generator = tiny_gan[0].generator
    images = generate(generator, 5, seed=3)
    assert images.shape == (5, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(generate(generator, 5, seed=3), images)
    assert torch.equal(generate(generator, 2, seed=3), images[:2])  # a prefix of the same noise
    assert not torch.equal(generate(generator, 5, seed=4), images)


def test_feature_net_is_seeded_cached_and_keyed_by_its_config(fmnist_processed, tmp_path):
    config = TINY_NET | {"seed": 0}
    state = torch.random.get_rng_state()
    net, info = fid.feature_net(fmnist_processed, config, tmp_path)
    # Training draws from its own generators: the caller's random state is untouched.
    assert torch.equal(torch.random.get_rng_state(), state)
    assert info["feature_dim"] == 16 and 0.3 < info["test_acc"] <= 1  # it learned something
    assert list(tmp_path.glob("*.pt")) == [tmp_path / f"{info['key']}.pt"]

    cached, cached_info = fid.feature_net(fmnist_processed, config, tmp_path)
    assert cached_info == info
    fresh = fid.train_feature_net(*load_split(fmnist_processed, "train"), 10, config)
    for (name, a), b, c in zip(
        net.state_dict().items(),
        cached.state_dict().values(),
        fresh.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b) and torch.equal(a, c), name

    sha = info["data_sha256"]
    assert fid.cache_key(config, sha) == info["key"]
    assert fid.cache_key(config | {"seed": 1}, sha) != info["key"]
    assert fid.cache_key(config, sha | {"train_x.npy": "0" * 64}) != info["key"]


def test_fmnist_dcgan_reports_and_the_registered_generator(smoke_run):
    # All six stages at smoke size, run once per session: see tests/test_smoke.py.
    cfg, results, champion = smoke_run("fmnist_dcgan")
    assert results["train"]["monitor"] == "val/fid" and results["train"]["best_score"] > 0
    metrics = results["evaluate"]
    assert set(metrics) == {
        "test/fid",
        "test/fid_floor",
        "test/class_entropy_ratio",
        "baseline/fid",
    }
    assert metrics["test/fid"] > metrics["test/fid_floor"] > 0
    assert metrics["baseline/fid"] > metrics["test/fid_floor"]  # PCA-Gaussian samples aren't real
    assert 0 <= metrics["test/class_entropy_ratio"] <= 1
    files = Path(cfg.paths.reports) / "evaluate" / "files"
    histogram = json.loads((files / "class_histogram.json").read_text())
    assert sum(v["count"] for v in histogram.values()) == cfg.task.eval_samples
    for name in ("class_histogram.png", "samples.png"):
        assert (files / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Trained once, reused by every stage.
    assert len(list(Path(cfg.task.feature_net_dir).glob("*.pt"))) == 1

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    grids = client.list_artifacts(results["train"]["run_id"], "samples")
    assert [a.path for a in grids] == ["samples/epoch_000.png"]

    assert results["register"]["model_name"] == "fashion_mnist-gan"
    model = mlflow.pyfunc.load_model(str(champion))
    images = model.predict(pd.DataFrame({"n": [3, 2], "seed": [7, 8]}))
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    again = model.predict(pd.DataFrame({"n": [3], "seed": [7]}))
    assert np.array_equal(again, images[:3])
    assert not np.array_equal(model.predict(pd.DataFrame({"n": [3], "seed": [9]})), again)
    with pytest.raises(MlflowException, match="must be an integer in 1..10000"):
        model.unwrap_python_model().predict(None, pd.DataFrame({"n": [0], "seed": [1]}))
