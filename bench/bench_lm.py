"""Benchmark: training throughput of the language-model experiments (tokens/s of forward +
backward + AdamW step on random windows of Tiny Shakespeare), their model FLOPs per token, and
model FLOPs utilization (MFU) against a matmul peak measured on the same device.

    python bench/bench_lm.py --device cuda --steps 50      # the experiments as they are set
    python bench/bench_lm.py --device cpu --steps 10 --gpt "model.n_layer=4 model.n_embd=128" \
        data.block_size=128
    python bench/bench_lm.py --smoke --steps 3                # does it run? (smoke=true, seconds)

Trailing arguments are Hydra overrides for both experiments (data.block_size,
train.batch_size); --gpt and --lstm take each model's own. Writes its table as the device's
section of docs/language_model.md.

FLOPs per token (training = forward + backward = 3 x forward, 2 FLOPs per multiply-add):
- gpt:  6 N + 12 n_layer n_embd T   N = parameters without the position table (the tied token
        embedding counts once, as the output matmul); 12 L d T is attention's QK^T and AV over
        a T-token context, counted in full (PaLM / nanoGPT's estimate_mfu), not halved for causal.
- lstm: 6 N                          N = recurrent weights 4h(in + h) per layer + the output layer;
        the embedding lookup and the gate nonlinearities are not counted.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dlpipe.collect import collect
from dlpipe.data import MIRROR_ENV, load_array, load_meta
from dlpipe.models import create_model
from dlpipe.preprocess import preprocess
from dlpipe.smoke import sized
from dlpipe.tasks.language_model import lm_net_args

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / ".data"  # git-ignored; never touches the pipeline's data/
DOC = ROOT / "docs" / "language_model.md"
EXPERIMENTS = ("shakespeare_gpt", "shakespeare_lstm")


def compose_cfg(experiment: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", *overrides])
    return sized(cfg)  # as a stage: smoke=true applies


def prepare_data(cfg: DictConfig) -> Path:
    """Tiny Shakespeare collected (from the mirror) and preprocessed once per block size and
    limit."""
    limit = f"-limit{cfg.data.limit}" if cfg.data.limit else ""
    processed = DATA / f"tinyshakespeare-block{cfg.data.block_size}{limit}"
    if not (processed / "meta.json").exists():
        os.environ.setdefault(MIRROR_ENV, str(ROOT.parent / "shared" / "datasets"))
        data = OmegaConf.to_container(cfg.data, resolve=True)
        collect(data, DATA / "raw-tinyshakespeare")
        preprocess(data, DATA / "raw-tinyshakespeare", processed, cfg.seed)
    return processed


def flops_per_token(net: torch.nn.Module, model: DictConfig, block_size: int) -> float:
    body = net[1]
    if model.name == "gpt":
        n = sum(p.numel() for p in body.parameters()) - body.positions.weight.numel()
        return 6 * n + 12 * model.n_layer * model.n_embd * block_size
    n = sum(p.numel() for name, p in body.named_parameters() if not name.startswith("input."))
    return 6 * n


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, reps: int) -> float:
    """FLOP/s of a square matmul: the device's practical peak for that dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, allocation
    t0 = now(device)
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (now(device) - t0)


def train_throughput(cfg: DictConfig, device: torch.device, steps: int, warmup: int) -> dict:
    """Tokens/s of the plain training step (no Lightning) at the experiment's sizes."""
    processed = prepare_data(cfg)
    meta = load_meta(processed)
    block, batch = cfg.data.block_size, cfg.train.batch_size
    model = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(cfg.seed)
    net = create_model(**model, **lm_net_args(meta)).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    stream = torch.from_numpy(load_array(processed, "train_x")).to(device)
    span = torch.arange(block + 1, device=device)
    bf16 = device.type == "cuda"  # what trainer=gpu runs (bf16-mixed)

    def step() -> None:
        offsets = torch.randint(len(stream) - block - 1, (batch,), device=device)
        window = stream[offsets[:, None] + span].long()  # (B, T + 1)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits = net(window[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    t0 = now(device)
    for _ in range(steps):
        step()
    seconds = now(device) - t0
    tokens_per_s = steps * batch * block / seconds
    fpt = flops_per_token(net, cfg.model, block)
    return {
        "model": cfg.model.name,
        "params": sum(p.numel() for p in net.parameters()),
        "sizes": sizes_of(cfg),
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * seconds / steps,
        "flops_per_token": fpt,
        "achieved": tokens_per_s * fpt,
    }


def sizes_of(cfg: DictConfig) -> str:
    m = cfg.model
    shape = (
        f"{m.n_layer}x{m.n_embd}, {m.n_head} heads"
        if m.name == "gpt"
        else f"{m.num_layers}x{m.hidden_size}, embed {m.embed_dim}"
    )
    return f"{shape}, T={cfg.data.block_size}, B={cfg.train.batch_size}"


def report(device: torch.device, rows: list[dict], peaks: dict[str, float], cmd: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    peak_key = "bf16" if device.type == "cuda" else "fp32"
    lines = [
        f"Measured with `{cmd}` on {name or 'cpu'} ({os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads), torch {torch.__version__}.",
        "",
        "Matmul peak: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()),
        "",
        "| model | sizes | params | tokens/s | ms/step | FLOPs/token | achieved TFLOP/s "
        f"| MFU (vs {peak_key} peak) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sizes']} | {r['params'] / 1e6:.2f} M | {r['tokens_per_s']:,.0f} "
            f"| {r['step_ms']:.1f} | {r['flops_per_token'] / 1e6:.1f} M "
            f"| {r['achieved'] / 1e12:.4f} | {100 * r['achieved'] / peaks[peak_key]:.1f} % |"
        )
    return "\n".join(lines)


def write_section(device: torch.device, body: str) -> None:
    """Replace this device's block between its markers in the doc (other sections are kept)."""
    begin, end = f"<!-- bench_lm:{device.type} -->", f"<!-- /bench_lm:{device.type} -->"
    text = DOC.read_text() if DOC.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--no-write", action="store_true", help=f"print only, leave {DOC.name}")
    parser.add_argument("--gpt", default="", help="Hydra overrides for shakespeare_gpt only")
    parser.add_argument("--lstm", default="", help="Hydra overrides for shakespeare_lstm only")
    parser.add_argument(
        "--smoke", action="store_true", help="at smoke size (smoke=true): implies --no-write"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both experiments")
    args = parser.parse_args()
    if args.smoke:
        args.overrides.insert(0, "smoke=true")
        args.no_write = True
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as trainer=gpu's bf16-mixed would have it
    peaks = {
        "fp32": matmul_peak(device, torch.float32, 4096 if device.type == "cuda" else 1024, 10)
    }
    if device.type == "cuda":
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, 8192, 20)
    rows = []
    own = {"shakespeare_gpt": args.gpt.split(), "shakespeare_lstm": args.lstm.split()}
    for experiment in EXPERIMENTS:
        cfg = compose_cfg(experiment, [*args.overrides, *own[experiment]])
        rows.append(train_throughput(cfg, device, args.steps, args.warmup))
        print(rows[-1], flush=True)
    cmd = " ".join(
        ["python bench/bench_lm.py", f"--device {args.device}", f"--steps {args.steps}"]
        + [f'--{k} "{v}"' for k, v in (("gpt", args.gpt), ("lstm", args.lstm)) if v]
        + args.overrides
    )
    body = report(device, rows, peaks, cmd)
    print(body)
    if not args.no_write:
        write_section(device, body)


if __name__ == "__main__":
    main()
