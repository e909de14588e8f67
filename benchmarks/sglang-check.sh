#!/usr/bin/env bash
# kvdepot as SGLang HiCache's storage tier, against SGLang's own host pools and backend
# factory on CPU (tests/test_sglang.py). SGLang's wheel pins CUDA packages, so it goes in a
# venv of its own with `--no-deps` and the dependencies its storage layer imports (~7 min).
# CI does not run this; docs/benchmarks.md records the results.
#
#   benchmarks/sglang-check.sh                  # VENV (default .venv-sglang) reused when built
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
venv=${VENV:-.venv-sglang}
python=${PYTHON:-python3}
if ! "$venv/bin/python" -c "import sglang.srt.mem_cache.pool_host.mha" 2>/dev/null; then
  "$python" -m venv "$venv"
  pip=("$venv/bin/pip" install -q)
  "${pip[@]}" --no-deps sglang==0.5.23
  # What `sglang.srt.mem_cache` imports (torchvision brings the torch SGLang was built for).
  "${pip[@]}" "transformers==5.19.*" torchvision triton apache-tvm-ffi msgspec pyzmq fastapi \
    uvicorn orjson pydantic dill einops sentencepiece psutil setproctitle pybase64 \
    partial-json-parser interegular blobfile requests aiohttp packaging huggingface_hub \
    safetensors tqdm pillow IPython loguru
  "${pip[@]}" --no-deps compressed-tensors gguf
fi
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/pip" install -q xxhash zstandard prometheus-client pyyaml pytest
"$venv/bin/python" -m pytest -q -p no:warnings tests/test_sglang.py
