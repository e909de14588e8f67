"""`kvdepot bench ttft`: time to first token on the real model, cold vs warm, vs the limit.

Runs in the caller's process, on CPU, with SmolLM2-135M-Instruct in fp32 (this CPU has no
bf16 instructions). For each prompt length, one run measures:
- cold: a full prefill (`use_cache=False`; its KV is stored on the way);
- warm RAM: the same prompt again, every token but the last loaded from the RAM tier;
- warm disk: the RAM tier emptied and the disk files dropped from the page cache first;
- the limit: copying the same KV bytes in memory (`numpy.copyto`, touched buffers) plus one
  decode step of the model over a cache of that length. No cache can load faster than a
  copy, nor answer before the model has run once;
- the disk limit: the same KV bytes at the rate this disk reads the chunk files cold (page
  cache dropped, one file after another, no checksum: the plain reads `bench tiers` compares
  the disk tier with), plus the same decode step. Measured between the warm-disk runs, since
  a shared disk's rate drifts; the rate with four reads in flight is reported beside it.
Goals at 4K tokens: warm RAM <= 1/10 of cold, and <= 2x the limit; at the longest prompt
(8K by default): warm disk <= 1.5x the disk read time + one decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from kvdepot.bench.timing import format_table
from kvdepot.config import load_config
from kvdepot.store import open_store
from kvdepot.workloads import make_document

DEFAULT_LENGTHS = (1024, 2048, 4096, 8000)


@dataclass(frozen=True, slots=True)
class TTFTResult:
    num_tokens: int
    cold_s: float
    warm_ram_s: float
    warm_disk_s: float
    limit_s: float
    copy_s: float
    kv_mib: float
    disk_read_s: float = 0.0
    decode_s: float = 0.0
    parallel_read_s: float = 0.0

    @property
    def warm_vs_cold(self) -> float:
        return self.warm_ram_s / self.cold_s

    @property
    def warm_vs_limit(self) -> float:
        return self.warm_ram_s / self.limit_s

    @property
    def disk_limit_s(self) -> float:
        """1.5x the time this disk takes to read the KV cold, plus one decode step."""
        return 1.5 * self.disk_read_s + self.decode_s


def _prompt(tokenizer: Any, num_tokens: int) -> list[int]:
    text = make_document(seed=11, num_products=max(4, num_tokens // 250)).text
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) < num_tokens:
        raise ValueError(f"document too short: {len(ids)} < {num_tokens} tokens")
    return ids[:num_tokens]


def _drop_page_cache(root: Path) -> None:
    for path in root.rglob("*.kvc"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _DiskReader:
    """Times this disk reading the chunk files under `root` cold: page cache dropped, each
    file read whole into a touched buffer, no checksum."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = sorted(root.rglob("*.kvc"))
        self.buffers = [bytearray(path.stat().st_size) for path in self.paths]
        self.nbytes = sum(len(b) for b in self.buffers)
        self.pool = ThreadPoolExecutor(4)

    def _read(self, i: int) -> None:
        with open(self.paths[i], "rb", buffering=0) as file:
            file.readinto(self.buffers[i])

    def seconds_for(self, kv_nbytes: int, *, in_flight: int = 1) -> float:
        """One cold read of the files (`in_flight` at a time), scaled to `kv_nbytes`."""
        _drop_page_cache(self.root)
        start = time.perf_counter()
        if in_flight > 1:
            list(self.pool.map(self._read, range(len(self.paths))))
        else:
            for i in range(len(self.paths)):
                self._read(i)
        return (time.perf_counter() - start) * kv_nbytes / max(1, self.nbytes)


def _limit_s(
    model: Any, ids: list[int], kv_nbytes: int, repeats: int
) -> tuple[float, float, float]:
    """(copy + one decode step, copy alone, the step alone) for a cache of len(ids) - 1
    tokens."""
    from transformers import DynamicCache

    src = np.ones(kv_nbytes, dtype=np.uint8)
    dst = np.zeros(kv_nbytes, dtype=np.uint8)
    copies, steps = [], []
    with torch.inference_mode():
        prefix = model(torch.tensor([ids[:-1]]), use_cache=True).past_key_values
        layers = [(layer.keys, layer.values) for layer in prefix.layers]
        for _ in range(repeats):
            start = time.perf_counter()
            np.copyto(dst, src)
            copies.append(time.perf_counter() - start)
            cache = DynamicCache(ddp_cache_data=layers, config=model.config)
            start = time.perf_counter()
            model(torch.tensor([ids[-1:]]), past_key_values=cache, use_cache=True)
            steps.append(time.perf_counter() - start)
    copy_s, step_s = statistics.median(copies), statistics.median(steps)
    return copy_s + step_s, copy_s, step_s


def run(
    model_dir: Path, lengths: list[int], repeats: int, work_dir: Path | None = None
) -> list[TTFTResult]:
    """Measure every prompt length; returns the results (printed by `report`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvdepot.connectors.transformers import KVDepotGenerator

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    )
    model.train(False)
    root = Path(tempfile.mkdtemp(prefix="kvdepot-ttft-", dir=work_dir))
    results = []
    try:
        config = load_config(
            overrides={"memory.capacity_bytes": "2GiB", "disk.path": str(root / "disk")}
        )
        with open_store(config) as store:
            generator = KVDepotGenerator.for_model(model, store, store_generated=False)
            for num_tokens in lengths:
                ids = _prompt(tokenizer, num_tokens)

                def ttft(use_cache: bool, ids: list[int] = ids) -> float:
                    result = generator.generate(ids, max_new_tokens=1, use_cache=use_cache)
                    expected = len(ids) - 1 if use_cache else 0
                    assert result.num_cached_tokens == expected, result
                    return result.ttft_s

                cold = [ttft(False) for _ in range(max(1, repeats // 2))]
                store.flush()
                warm_ram = [ttft(True) for _ in range(repeats)]
                kv_nbytes = generator.engine.layout.bytes_per_token * (num_tokens - 1)
                reader = _DiskReader(root / "disk")
                warm_disk, disk_reads, parallel_reads = [], [], []
                for _ in range(repeats):  # interleaved: this shared disk's rate drifts
                    disk_reads.append(reader.seconds_for(kv_nbytes))
                    parallel_reads.append(reader.seconds_for(kv_nbytes, in_flight=4))
                    store.memory.clear()
                    _drop_page_cache(root / "disk")
                    warm_disk.append(ttft(True))
                reader.pool.shutdown()
                limit_s, copy_s, decode_s = _limit_s(model, ids, kv_nbytes, repeats)
                results.append(
                    TTFTResult(
                        num_tokens,
                        statistics.median(cold),
                        statistics.median(warm_ram),
                        statistics.median(warm_disk),
                        limit_s,
                        copy_s,
                        kv_nbytes / 2**20,
                        statistics.median(disk_reads),
                        decode_s,
                        statistics.median(parallel_reads),
                    )
                )
                store.clear()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def report(results: list[TTFTResult]) -> str:
    rows = [
        (r.num_tokens, r.kv_mib, r.cold_s, r.warm_ram_s, r.warm_disk_s, r.limit_s,
         r.disk_limit_s, f"1/{1 / r.warm_vs_cold:.0f}", f"{r.warm_vs_limit:.2f}x",
         f"{r.warm_disk_s / r.disk_limit_s:.2f}x")
        for r in results
    ]  # fmt: skip
    header = ["tokens", "KV MiB", "cold s", "warm RAM s", "warm disk s", "limit s",
              "disk limit s", "RAM/cold", "RAM/limit", "disk/limit"]  # fmt: skip
    lines = [
        f"kvdepot bench ttft | SmolLM2-135M fp32 | CPU {os.cpu_count()} cores | "
        f"torch {torch.__version__} | {torch.get_num_threads()} threads",
        format_table(header, cast(list[list[object]], [list(r) for r in rows])),
        "limit = numpy copy of the KV bytes + one decode step over the cache; "
        "warm disk = RAM emptied and page cache dropped;",
        "disk limit = 1.5x the KV bytes at this disk's cold read rate, one file at a time "
        f"({_disk_rate(results, parallel=False)}; four in flight: "
        f"{_disk_rate(results, parallel=True)}) + one decode step",
    ]
    lines += [f"goal {'met' if met else 'MISSED'}: {text}" for text, met in goal_lines(results)]
    return "\n".join(lines)


def goal_lines(results: list[TTFTResult]) -> list[tuple[str, bool]]:
    """The RAM goals, judged at 4,096 tokens (or the longest prompt measured, if shorter); the
    disk goal at the longest prompt."""
    if not results:
        return []
    longest = max(results, key=lambda r: r.num_tokens)
    r = next((r for r in results if r.num_tokens == 4096), longest)
    disk = longest.warm_disk_s / longest.disk_limit_s
    return [
        (f"warm RAM <= 1/10 cold at {r.num_tokens} tokens: 1/{1 / r.warm_vs_cold:.0f}",
         r.warm_vs_cold <= 0.1),
        (f"warm RAM <= 2x limit at {r.num_tokens} tokens: {r.warm_vs_limit:.2f}x",
         r.warm_vs_limit <= 2.0),
        (f"warm disk <= disk limit at {longest.num_tokens} tokens: {disk:.2f}x", disk <= 1.0),
    ]  # fmt: skip


def _disk_rate(results: list[TTFTResult], *, parallel: bool) -> str:
    times = [r.parallel_read_s if parallel else r.disk_read_s for r in results]
    rates = [r.kv_mib * 2**20 / t / 1e9 for r, t in zip(results, times, strict=True) if t > 0]
    return f"{statistics.median(rates):.2f} GB/s" if rates else "not measured"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine", choices=("transformers", "llama.cpp"), default="transformers",
        help="transformers (the prepared SmolLM2 folder) or llama.cpp (the GGUF; needs "
        "llama-cpp-python: kvdepot.bench.ttft_llama)",
    )  # fmt: skip
    parser.add_argument(
        "--lengths",
        default=None,
        help="prompt lengths (default 1024,2048,4096,8000; llama.cpp 2048,4096)",
    )
    parser.add_argument("--repeats", type=int, default=4, help="warm runs per length (median)")
    parser.add_argument("--model-dir", type=Path, default=None, help="prepared model folder")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")


def cli_main(args: argparse.Namespace) -> int:
    from kvdepot.connectors.model import prepare_model

    if args.engine == "llama.cpp":
        from kvdepot.bench import ttft_llama

        args.lengths = args.lengths or "2048,4096"
        return ttft_llama.cli_main(args)
    lengths = [int(n) for n in (args.lengths or "1024,2048,4096,8000").split(",")]
    results = run(prepare_model(args.model_dir), lengths, args.repeats)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0
