#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and SGLang installed: a live SGLang server with HiCache
# and kvdepot as its storage tier (L3), through a kvdepot daemon. The same long prompt is sent,
# the server restarted (device and host caches gone), and the prompt sent again: the second
# answer must equal the first, and SGLang must report cached prompt tokens (loaded from L3).
#
#   MODEL=Qwen/Qwen3-0.6B benchmarks/sglang-gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
model=${MODEL:?set MODEL to a model SGLang can load}
port=${PORT:-30123}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
kvdepot serve --daemon-socket-path "$work/kvdepot.sock" --disk-path "$work/disk" \
  --daemon-http-port 0 &
sleep 3
extra=$(printf '{"backend_name":"kvdepot","module_path":"kvdepot.connectors.sglang","class_name":"KVDepotHiCacheStorage","interface_v1":1,"kvdepot.mode":"daemon","kvdepot.daemon.socket_path":"%s"}' "$work/kvdepot.sock")
serve() {
  python -m sglang.launch_server --model-path "$model" --port "$port" --page-size 64 \
    --enable-hierarchical-cache --hicache-ratio 2 --hicache-write-policy write_through \
    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config "$extra" \
    > "$work/server.log" 2>&1 &
  for _ in $(seq 1 300); do curl -sf "localhost:$port/health" >/dev/null && return; sleep 2; done
  echo "SGLang did not start"; tail -50 "$work/server.log"; exit 1
}
prompt=$(python -c "print(' '.join(f'Item {i} costs {i * 7 % 101} coins.' for i in range(600)) + ' Which item costs 3 coins?')")
ask() {
  curl -s "localhost:$port/v1/completions" -H 'Content-Type: application/json' \
    -d "$(python -c 'import json,sys; print(json.dumps({"model": "m", "prompt": sys.argv[1], "max_tokens": 32, "temperature": 0}))' "$prompt")"
}
serve; first=$(ask); sleep 5; kill %2; wait %2 || true
serve; second=$(ask)
python - "$first" "$second" <<'PY'
import json, sys
a, b = (json.loads(x) for x in sys.argv[1:3])
same = a["choices"][0]["text"] == b["choices"][0]["text"]
cached = (b.get("usage", {}).get("prompt_tokens_details") or {}).get("cached_tokens")
print(f"answers equal: {same}; cached prompt tokens after the restart: {cached}")
sys.exit(0 if same and cached else 1)
PY
