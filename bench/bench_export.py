"""Benchmark: ONNX Runtime vs eager PyTorch latency per sample on the CPU, for the Fashion-MNIST
CNN (the default experiment) and the char GPT (experiment=shakespeare_gpt), at batch 1 and 256.

    python bench/bench_export.py                 # the full-size networks (about a minute)
    python bench/bench_export.py --smoke         # their smoke=true sizes (does it run?)

The networks are built from conf/ as the stages build them (random weights: latency does not
depend on their values), exported with `dlpipe.export.export` (the exporter `register` uses)
and timed on the same inputs; prints a markdown table of the median of `--reps` timings.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dlpipe.export import export
from dlpipe.models import create_model
from dlpipe.smoke import sized
from dlpipe.tasks import ExportTarget

CONF = Path(__file__).resolve().parents[1] / "conf"
CHARS = 65  # Tiny Shakespeare's character vocabulary


def networks(smoke: bool) -> dict[str, tuple[torch.nn.Module, callable]]:
    """{name: (network in eval mode, batch size -> input batch)} built from conf/."""
    out = {}
    for name, overrides in (
        ("fashion_mnist cnn", []),
        ("char gpt", ["experiment=shakespeare_gpt"]),
    ):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = sized(compose("config", overrides=[*overrides, f"smoke={smoke}"]))
        model = OmegaConf.to_container(cfg.model, resolve=True)
        if cfg.model.name == "gpt":
            block = cfg.data.block_size
            net = create_model(
                **model, input_shape=[block], num_classes=CHARS, input_kind="tokens",
                vocab_size=CHARS, per_step=True,
            )  # fmt: skip
            make = lambda b, block=block: torch.randint(0, CHARS, (b, block))  # noqa: E731
        else:
            net = create_model(**model, input_shape=[28, 28], num_classes=10, mean=[0.286],
                               std=[0.353])  # fmt: skip
            make = lambda b: torch.randint(0, 256, (b, 28, 28), dtype=torch.uint8)  # noqa: E731
        out[name] = (net.eval(), make)
    return out


def per_sample_ms(fn, x, reps: int) -> float:
    fn(x[:1])  # warm-up (allocations, lazy initialization) on one sample
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both")
    parser.add_argument("--only", default=None, help="one network: 'cnn' or 'gpt'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} thread(s)\n")
    print("| network | batch | eager ms/sample | ONNX Runtime ms/sample | speed-up |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (net, make) in networks(args.smoke).items():
            if args.only and args.only not in name:
                continue
            path = export(ExportTarget(name, net, make(2), 1e-3), "onnx", Path(tmp) / "net.onnx")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

            def onnx(x, session=session):
                return session.run(None, {"input": x})[0]

            def eager(x, net=net):
                with torch.inference_mode():
                    return net(torch.from_numpy(x)).numpy()

            for batch in (1, 256):
                x = make(batch).numpy()
                t_eager = per_sample_ms(eager, x, args.reps)
                t_onnx = per_sample_ms(onnx, x, args.reps)
                print(f"| {name} | {batch} | {t_eager:.4f} | {t_onnx:.4f} | "
                      f"{t_eager / t_onnx:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
