"""GPU paths: resident data, bf16 training and the compiled network (run with `pytest -m gpu`)."""

import pytest
import torch

from dlpipe.train import fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("compile", [False, True])
def test_gpu_fit_keeps_data_on_the_device(make_cfg, compile: bool):
    cfg = make_cfg(
        "trainer=gpu",
        "trainer.deterministic=false",
        "trainer.max_epochs=2",
        "model.width=16",
        f"train.compile={compile}",
    )
    trainer, _ = fit(cfg, run_name="gpu")
    x, y = trainer.datamodule.splits["train"].tensors
    assert x.is_cuda and y.is_cuda and x.dtype == torch.uint8  # moved once, normalized on-device
    assert 0.5 < float(trainer.callback_metrics["val/acc"]) <= 1.0
