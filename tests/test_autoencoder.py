"""task=autoencoder on real Fashion-MNIST slices: the AE and VAE losses, the VAE's KL against its
closed form, training that never reads a label, k-means scoring of a latent space, and both
experiments through all six stages to a registered model that encodes and decodes images."""

import json
import math
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import validate_serving_input
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from dlpipe.data import load_meta, load_split
from dlpipe.models import load_checkpoint
from dlpipe.models.generative import kl_to_standard_normal, reconstruct
from dlpipe.smoke import sized
from dlpipe.tasks.autoencoder import TASK, cluster_scores

MODELS = ("autoencoder", "vae")


@pytest.fixture(scope="module")
def images(fmnist_processed: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_split(fmnist_processed, "train")
    return x[:64], y[:64]


def _module(compose_conf, fmnist_processed: Path, model: str) -> L.LightningModule:
    cfg = sized(compose_conf(f"model={model}", "task=autoencoder", "smoke=true"))
    cfg.optim.scheduler = "none"
    return TASK.module(cfg, load_meta(fmnist_processed))


@pytest.mark.parametrize("model", MODELS)
def test_losses_are_finite_and_shapes_right(compose_conf, fmnist_processed, images, model):
    module = _module(compose_conf, fmnist_processed, model)
    x = torch.from_numpy(images[0][:16])  # (16, 28, 28) uint8
    logits, mean, logvar = module.net(x)
    latent_dim = module.hparams.model["latent_dim"]
    assert logits.shape == (16, 1, 28, 28) and mean.shape == (16, latent_dim)
    assert (logvar is None) == (model == "autoencoder")
    assert module.net.to_images(logits).shape == (16, 28, 28)
    assert module.net.to_images(logits).dtype == torch.uint8

    losses = module.losses(x)
    assert set(losses) == ({"loss", "recon"} if model == "autoencoder" else {"loss", "recon", "kl"})
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    # BCE of 784 pixels: near 784 * ln 2 for an untrained decoder, far from 0.
    assert 100 < losses["recon"] < 2000
    if model == "vae":
        assert losses["kl"] >= 0
        assert torch.allclose(losses["loss"], losses["recon"] + module.beta * losses["kl"])
    else:
        assert losses["loss"] == losses["recon"]


def test_kl_matches_the_closed_form():
    # KL(N(mu, s^2) || N(0, 1)) = (mu^2 + s^2 - ln s^2 - 1) / 2 per dimension.
    mean = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    expected = 0.5 * (1 + 1 - 0 - 1) + 0.5 * (0 + 2 - math.log(2.0) - 1)
    assert kl_to_standard_normal(mean, logvar).item() == pytest.approx(expected, rel=1e-6)

    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0, 1)
    )
    assert kl_to_standard_normal(mean, logvar).item() == pytest.approx(
        reference.sum(1).mean().item(), rel=1e-5
    )


@pytest.mark.parametrize("model", MODELS)
def test_training_never_reads_labels(compose_conf, fmnist_processed, images, model):
    x, y = map(torch.from_numpy, images)
    garbage = torch.randint(-1000, 1000, y.shape, generator=torch.Generator().manual_seed(1))

    def train(labels: torch.Tensor) -> tuple[dict, dict]:
        L.seed_everything(0)
        module = _module(compose_conf, fmnist_processed, model)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        trainer = L.Trainer(
            max_steps=3,
            accelerator="cpu",
            deterministic=True,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(TensorDataset(x, labels), batch_size=16))
        return before, module.state_dict()

    before, trained = train(y)
    _, with_garbage = train(garbage)
    assert any(not torch.equal(before[k], trained[k]) for k in trained)  # it did train
    assert all(torch.equal(trained[k], with_garbage[k]) for k in trained)


def test_cluster_scores_find_separated_classes_and_not_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 50)
    centers = rng.normal(scale=100.0, size=(10, 8))
    separated = centers[labels] + rng.normal(size=(len(labels), 8))
    assert cluster_scores(separated, labels, k=10, n_init=10, seed=0) == pytest.approx((1.0, 1.0))

    nmi, ari = cluster_scores(rng.normal(size=(500, 8)), labels, k=10, n_init=10, seed=0)
    assert nmi < 0.1 and abs(ari) < 0.05


EXPERIMENTS = {
    "fmnist_ae": ("fashion_mnist-autoencoder", set()),
    "fmnist_vae": ("fashion_mnist-vae", {"test/kl", "test/elbo"}),
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_reports_and_ships_an_encoder_decoder(experiment, smoke_run):
    # All six stages at smoke size, run once per session: see tests/test_smoke.py.
    cfg, results, champion = smoke_run(experiment)
    name, vae_metrics = EXPERIMENTS[experiment]
    assert cfg.register.model_name == name

    metrics = results["evaluate"]
    base = {"recon_mse", "recon_bce", "nmi", "ari"}
    pixels = {"baseline/nmi", "baseline/ari"}
    assert set(metrics) == {f"test/{k}" for k in base} | pixels | vae_metrics
    assert 0 < metrics["test/recon_mse"] < 0.25 and 0 <= metrics["test/nmi"] <= 1
    assert 0.4 < metrics["baseline/nmi"] < 0.6  # k-means on raw pixels: about 0.5
    if vae_metrics:
        assert metrics["test/kl"] > 0 and metrics["test/elbo"] < -metrics["test/kl"]
    files = Path(cfg.paths.reports) / "evaluate" / "files"
    assert {p.name for p in files.iterdir()} == {"latents.png", "reconstructions.png"}
    # 2 images per class: originals over reconstructions, 2-pixel gaps.
    assert Image.open(files / "reconstructions.png").size == (20 * 30 - 2, 2 * 30 - 2)

    run = json.loads((Path(cfg.paths.train) / "run.json").read_text())
    client = MlflowClient(cfg.mlflow.tracking_uri)
    logged = client.get_run(run["run_id"]).data.metrics
    val_keys = {"val/loss", "val/recon"} | ({"val/kl"} if vae_metrics else set())
    assert {"train/loss", *val_keys, "test/nmi"} <= set(logged)
    recon = {a.path for a in client.list_artifacts(run["run_id"], "reconstructions")}
    assert recon == {"reconstructions/epoch_000.png"}

    # The registered model: images -> codes -> images, as docs/autoencoder.md documents.
    assert results["register"]["decision"] == "promoted to champion"
    model = mlflow.pyfunc.load_model(str(champion))
    x, _ = load_split(cfg.paths.processed, "test")
    codes = model.predict(x[:5])  # mode=encode is the default
    latent_dim = cfg.model.latent_dim
    assert codes.shape == (5, latent_dim) and codes.dtype == np.float32
    decoded = model.predict(codes, params={"mode": "decode"})
    assert decoded.shape == (5, 28, 28) and decoded.dtype == np.uint8
    net, _ = load_checkpoint(Path(cfg.paths.train) / run["best_checkpoint"])
    assert np.array_equal(decoded, reconstruct(net, x[:5]))  # the evaluated checkpoint
    # The JSON a server gets, parsed as `mlflow models serve` parses it.
    served = validate_serving_input(
        str(champion), json.dumps({"inputs": codes.tolist(), "params": {"mode": "decode"}})
    )
    assert np.array_equal(served, decoded)

    inner = model.unwrap_python_model()
    with pytest.raises(MlflowException, match=r"shape \(N, 28, 28\), got \(5, 20, 28\)"):
        inner.predict(None, x[:5, :20])
    with pytest.raises(MlflowException, match=r"uint8 pixel values"):
        inner.predict(None, x[:5] / 255.0)
    with pytest.raises(
        MlflowException, match=rf"shape \(N, {latent_dim}\), got \(5, {latent_dim + 1}\)"
    ):
        inner.predict(None, np.zeros((5, latent_dim + 1)), {"mode": "decode"})
    with pytest.raises(MlflowException, match="choose one of"):
        inner.predict(None, x[:5], {"mode": "sample"})
