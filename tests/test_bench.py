"""The GPU suite (bench/gpu.sh) runs here on CPU at smoke sizes (--dry-run), so the one command
prepared for a rare, short GPU loan cannot rot between loans."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_measures_every_part(mirror: Path, tmp_path: Path):
    env = {**os.environ, "DLPIPE_DATA_MIRROR": str(mirror)}
    done = subprocess.run(
        ["bash", "bench/gpu.sh", str(tmp_path), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dry_run"] is True
    parts = results["parts"]
    assert set(parts) == {"fmnist", "gpt", "lstm", "fsdd"}
    for mode in ("eager", "compiled"):  # fit/raw measured side by side, both ways
        assert parts["fmnist"][mode]["fit_over_raw"] > 0
    assert 0 <= parts["fmnist"]["to_93"]["best_test_acc"] <= 1
    assert parts["gpt"]["best_val_loss"] > 0 and parts["lstm"]["best_val_loss"] > 0
    assert 0 <= parts["fsdd"]["best_test_acc"] <= 1
    assert "fmnist" in (tmp_path / "results.md").read_text()


def test_gpu_suite_refuses_to_run_without_a_gpu_unless_dry(tmp_path: Path):
    done = subprocess.run(
        ["python", "bench/gpu_suite.py", "--data", str(tmp_path), "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "--dry-run" in done.stderr
