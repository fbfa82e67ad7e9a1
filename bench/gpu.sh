#!/usr/bin/env bash
# The GPU suite in one command (bench/gpu_suite.py says what it measures), for a lent GPU machine
# with no package index: Python 3.12 with torch, lightning, torchmetrics preinstalled.
#
#   bench/gpu.sh OUTDIR                  # on the GPU machine; every figure and log lands in OUTDIR
#   bench/gpu.sh OUTDIR --dry-run        # here, on CPU at smoke sizes (tests/test_bench.py runs it)
#   bench/gpu.sh OUTDIR --parts fsdd     # only some parts
#
# Beforehand, on a machine with the package index: bench/gpu-prepare.sh fills the git-ignored .gpu/
# (wheels the GPU image lacks, and the dataset files) and prints what to carry. Device calls carry
# 64 MiB at most, so the suite goes in two calls (the installed .gpu/site/ stays between calls
# while the machine is warm):
#   run(command="bench/gpu.sh $OUT --parts fmnist gpt lstm", carry=[".gpu/whl", ".gpu/data/fashion-mnist", ".gpu/data/tinyshakespeare"])
#   run(command="bench/gpu.sh $OUT --parts fsdd", carry=[".gpu/whl-audio", ".gpu/data/fsdd"])
set -euo pipefail
out=${1:?usage: bench/gpu.sh OUTDIR [--dry-run] [--parts PART ...]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [ "${1:-}" = --dry-run ]; then
    shift
    exec python bench/gpu_suite.py --data "${DLPIPE_DATA_MIRROR:-../shared/datasets}" \
        --out "$out" --dry-run "$@"
fi

# Wheels the image lacks, installed once into .gpu/site (kept while the machine stays warm).
for whl in .gpu/whl .gpu/whl-audio; do
    if [ -d "$whl" ] && [ ! -f "$whl/.installed" ]; then
        python3 -m pip install -q --no-index --no-deps --no-cache-dir --target .gpu/site "$whl"/*.whl
        touch "$whl/.installed"
    fi
done
export PYTHONPATH=$PWD/.gpu/site:$PWD/src
{ nvidia-smi; python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'; } \
    > "$out/environment.txt" 2>&1 || true
# The loan is short: the suite caps its own parts; this cap only stops a hang.
timeout 480 python3 bench/gpu_suite.py --data .gpu/data --out "$out" "$@" 2>&1 | tee "$out/suite.log"
