#!/usr/bin/env bash
# Fills the git-ignored .gpu/ for bench/gpu.sh, on a machine with the package index and the
# dataset mirror: .gpu/whl (what the GPU image lacks for the pipeline: hydra, mlflow-skinny, optuna,
# pydantic, ...), .gpu/whl-audio (librosa and soundfile, for the FSDD part) and .gpu/data/<dataset>
# (copies of the mirror's files, which collect verifies by sha256 there as everywhere).
#   bench/gpu-prepare.sh            # then see bench/gpu.sh for the two device calls
set -euo pipefail
cd "$(dirname "$0")/.."
mirror=${DLPIPE_DATA_MIRROR:-../shared/datasets}
tools=$(cd ../shared/tools 2>/dev/null && pwd) || { echo "needs ../shared/tools/gpu-wheels.sh" >&2; exit 1; }
rm -rf .gpu && mkdir -p .gpu/data
build() {  # build DIR REQUIREMENT...: the wheels of REQUIREMENTs the GPU image lacks, into DIR
    local dir=$1; shift
    (mkdir -p .gpu/tmp && cd .gpu/tmp && rm -rf .whl && "$tools/gpu-wheels.sh" "$@" >/dev/null && mv .whl "../${dir#.gpu/}")
}
build .gpu/whl hydra-core mlflow-skinny optuna optuna-integration pydantic
# cryptography (4.7 MB) comes with mlflow-skinny's auth extras; the pipeline never imports it.
rm -f .gpu/whl/cryptography-*.whl
build .gpu/whl-audio librosa soundfile
# Only what .gpu/whl does not hold already.
for w in .gpu/whl-audio/*.whl; do [ -e ".gpu/whl/$(basename "$w")" ] && rm "$w"; done
rm -rf .gpu/tmp
for d in fashion-mnist tinyshakespeare fsdd; do cp -r "$mirror/$d" .gpu/data/; done
du -sh .gpu/whl .gpu/whl-audio .gpu/data/*
