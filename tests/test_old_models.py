"""Models registered before the networks moved into `dlpipe.models` still load and answer as
they did: tiny pyfuncs logged by the old code (tests/fixtures/make_old_models.py, at commit
3b55c48) with what they answered then.

An old model ships its own copy of dlpipe (MLflow code_paths). In a fresh process (`mlflow models
serve`) that copy runs it; in a process that has already imported today's dlpipe, its pyfunc file
runs against today's package: `dlpipe.serving.load_artifacts` (with the builder the old gan and
autoencoder files pass), `AdaptedModel`, `dlpipe.models.activation_layer`/`norm_layer`, the `idx`
format's Adapter. And its weights, like an old checkpoint's, must fit the networks that
`dlpipe.models` builds today: the state-dict keys did not change.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

import dlpipe
from dlpipe.models import build_net, load_checkpoint
from dlpipe.models.generative import ConvAutoencoder, generate

FIXTURES = Path(__file__).parent / "fixtures" / "old_models"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
SRC = Path(dlpipe.__file__).parent


@pytest.fixture
def old_model(tmp_path, monkeypatch):
    """Loads a fixture model from a copy (loading may write bytecode next to its code), and
    undoes the sys.path entry MLflow prepends for the model's bundled code."""
    monkeypatch.setattr(sys, "path", list(sys.path))

    def load(name: str):
        shutil.copytree(FIXTURES / name, tmp_path / name)
        return mlflow.pyfunc.load_model(str(tmp_path / name))

    return load


def _runs_on_todays_dlpipe() -> None:
    assert Path(sys.modules["dlpipe"].__file__).parent == SRC
    assert Path(sys.modules["dlpipe.serving"].__file__).parent == SRC / "serving"
    assert hasattr(sys.modules["dlpipe.models"], "__path__")  # the package, not old models.py


def test_old_classifier_answers_as_before_on_todays_dlpipe(old_model):
    expected = EXPECTED["classifier"]
    model = old_model("classifier")
    _runs_on_todays_dlpipe()
    answer = model.predict(np.array(expected["inputs"], dtype=np.uint8))
    assert answer["label"].tolist() == expected["outputs"]["label"]
    for name in ("dark", "bright"):
        np.testing.assert_allclose(answer[name], expected["outputs"][name], rtol=1e-5, atol=1e-6)
    adapter = type(model.unwrap_python_model().adapter)  # today's idx format read the input
    assert Path(sys.modules[adapter.__module__].__file__).is_relative_to(SRC / "formats")


def test_old_vae_answers_as_before_on_todays_dlpipe(old_model):
    expected = EXPECTED["vae"]
    model = old_model("vae")
    _runs_on_todays_dlpipe()
    codes = model.predict(np.array(expected["inputs"], dtype=np.uint8), params={"mode": "encode"})
    np.testing.assert_allclose(codes, expected["codes"], rtol=1e-5, atol=1e-6)
    decoded = model.predict(np.array(expected["codes"], np.float32), params={"mode": "decode"})
    assert np.array_equal(decoded, expected["decoded"])


def test_old_dcgan_answers_as_before_on_todays_dlpipe(old_model):
    expected = EXPECTED["dcgan"]
    model = old_model("dcgan")
    _runs_on_todays_dlpipe()
    assert np.array_equal(model.predict(pd.DataFrame(expected["request"])), expected["images"])


def _saved(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    artifacts = FIXTURES / name / "artifacts"
    spec = json.loads((artifacts / "spec.json").read_text())
    return spec, torch.load(artifacts / "weights.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    "name, prefix", [("classifier", "net."), ("vae", "net."), ("dcgan", "generator.")]
)
def test_old_weights_fit_todays_networks_and_checkpoint_loader(tmp_path, name, prefix):
    # The old weights in a Lightning-shaped checkpoint, as their task module saved them
    # (`self.net` / `self.generator`): today's registry rebuilds the same keys, strictly.
    spec, weights = _saved(name)
    path = tmp_path / "best.ckpt"
    hparams = {"model": spec["model"], "net": spec["net"]}
    state = {prefix + k: v for k, v in weights.items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    net, loaded = load_checkpoint(path, prefix=prefix)
    assert loaded == hparams
    assert net.state_dict().keys() == weights.keys()
    assert not net.training
    with torch.inference_mode():
        if name == "classifier":
            x = torch.tensor(EXPECTED[name]["inputs"], dtype=torch.uint8)
            probs = net(x).softmax(-1).numpy()
            np.testing.assert_allclose(probs[:, 1], EXPECTED[name]["outputs"]["bright"], atol=1e-6)
        elif name == "vae":
            assert isinstance(net, ConvAutoencoder) and net.variational
            x = torch.tensor(EXPECTED[name]["inputs"], dtype=torch.uint8)
            np.testing.assert_allclose(net.encode(x)[0], EXPECTED[name]["codes"], atol=1e-6)
        else:
            request = EXPECTED[name]["request"]
            images = generate(net, request["n"][0], request["seed"][0])
            assert np.array_equal(images.numpy(), EXPECTED[name]["images"])
    assert type(build_net(spec["model"], spec["net"])) is type(net)


def test_old_classifier_serves_from_its_own_code_in_a_fresh_process(tmp_path):
    # What `mlflow models serve` does: nothing imported dlpipe first, so the copy the model
    # bundles runs it, even with today's dlpipe installed.
    shutil.copytree(FIXTURES / "classifier", tmp_path / "classifier")
    script = (
        "import sys, json, numpy as np, mlflow\n"
        f"model = mlflow.pyfunc.load_model({str(tmp_path / 'classifier')!r})\n"
        f"x = np.array(json.loads({json.dumps(EXPECTED['classifier']['inputs'])!r}), np.uint8)\n"
        "print(json.dumps({'labels': model.predict(x)['label'].tolist(),\n"
        "                  'dlpipe': sys.modules['dlpipe'].__file__}))\n"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["labels"] == EXPECTED["classifier"]["outputs"]["label"]
    assert Path(answer["dlpipe"]).is_relative_to(tmp_path / "classifier" / "code")
