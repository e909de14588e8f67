"""`kvdepot bench pages`: the vLLM connector's page copies vs a plain copy of the same bytes.

Runs in the caller's process; needs the `vllm` extra (the page code lives in the connector),
imported when the benchmark runs, so that `--help` works without it.
The geometry is SmolLM2-135M's on vLLM's CPU backend: 30 layers, 3 KV heads, head size 64,
fp32, 128-token pages, K transposed inside a page ("cpu-vec"), every layer in one tensor at
one spacing, as vLLM 0.32 allocates them. Chunks live in a RAM-tier store, as in embedded
mode. Figures (ratio: the limit's time over ours, so 1.0 is as fast as a plain copy):
- load, stored in one put, consecutive pages: `retrieve_views` + `scatter_views`;
- load, stored turn by turn (100-token turns, partial tails between the chunks), scattered
  pages: the chunks lie in several runs in memory, the pages in many;
- save gather, scattered pages: `gather_pages` into the staging tensor;
- the same load with every layer in a tensor of its own (no stacking): info only.
The limit: torch's copy of one contiguous tensor of the same bytes (every core).
Goal: each figure >= 0.25 of the limit (at most 4x a plain copy; medians run 0.4-0.55 on 2
cores, where the limit itself varies by 1.5x between runs). It guards against pathological
paths, not a tight bound: the gather of scattered pages once took 50x the limit (an indexed
copy on the stacked view copied the whole KV cache).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvdepot.bench.tiers import Result, results_table
from kvdepot.bench.timing import paired_seconds
from kvdepot.engine import CacheEngine
from kvdepot.layout import DType, KVLayout
from kvdepot.metrics import Metrics
from kvdepot.store import TieredStore
from kvdepot.tiers.arena import HostBuffer
from kvdepot.tiers.memory import MemoryTier

if TYPE_CHECKING:
    from kvdepot.connectors.vllm.pages import KVParts

LAYOUT = KVLayout(30, 3, 64, DType.FLOAT32)  # SmolLM2-135M
PAGE = 128
GOAL = ">= 0.25"


def _pages(num_blocks: int, *, one_tensor: bool) -> tuple[list[KVParts], KVParts | None]:
    from kvdepot.connectors.vllm.pages import LAYOUTS, stack_layers

    shape = (num_blocks, LAYOUT.num_kv_heads, PAGE, 2 * LAYOUT.head_dim)
    caches = (
        list(torch.zeros(LAYOUT.num_layers, *shape))
        if one_tensor
        else [torch.zeros(shape) for _ in range(LAYOUT.num_layers)]
    )
    layers = [LAYOUTS["cpu-vec"].split(cache, LAYOUT.head_dim) for cache in caches]
    return layers, stack_layers(layers)


def _engine(num_tokens: int, turn_tokens: int | None) -> tuple[CacheEngine, list[int]]:
    """An engine whose RAM tier holds `num_tokens` of KV: one put, or turn by turn."""
    capacity = 3 * LAYOUT.bytes_per_token * num_tokens + (64 << 20)
    store = TieredStore(MemoryTier(HostBuffer.allocate(capacity, prefault=True)), metrics=Metrics())
    engine = CacheEngine(store, LAYOUT, "bench-pages", chunk_size_tokens=PAGE)
    tokens = list(range(num_tokens))
    kv = torch.randn(LAYOUT.chunk_shape(num_tokens))
    ends = [num_tokens] if turn_tokens is None else [*range(400, num_tokens, turn_tokens)]
    for end in [*ends, num_tokens]:
        engine.store(tokens[:end], kv[:, :, :end], store_partial=True)
    return engine, tokens


def _figure(name: str, nbytes: int, ours: Callable[[], object], repeats: int, goal: str) -> Result:
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    limit_s, ours_s, ratio = paired_seconds(lambda: dst.copy_(src), ours, repeats)
    return Result("smollm2-135m", name, ours_s * 1e3, limit_s * 1e3, "ms", ratio, goal)


def _loader(
    engine: CacheEngine,
    tokens: list[int],
    end: int,
    ids: list[int],
    layers: list[KVParts],
    stacked: KVParts | None,
) -> Callable[[], None]:
    """The worker's load of tokens `[0, end)` into pages `ids`, as a call to time."""
    from kvdepot.connectors.vllm.pages import LAYOUTS, scatter_views

    def load() -> None:
        with engine.retrieve_views(tokens) as kv:
            scatter_views(kv, 0, end, layers, LAYOUTS["cpu-vec"], ids, stacked=stacked)

    return load


def run(num_tokens: int, repeats: int) -> list[Result]:
    """Measure every figure; returns the results (printed by `report`)."""
    from kvdepot.connectors.vllm.pages import LAYOUTS, gather_pages

    num_pages = -(-num_tokens // PAGE)
    num_blocks = 4 * num_pages
    rng = random.Random(0)
    consecutive = list(range(3, 3 + num_pages))
    scattered = rng.sample(range(num_blocks), num_pages)
    end = num_tokens - 1  # vLLM computes the last prompt token itself
    nbytes = LAYOUT.bytes_per_token * end
    results = []
    for name, turn_tokens, ids, one_tensor, goal in (
        ("load, one put, consecutive pages", None, consecutive, True, GOAL),
        ("load, turn by turn, scattered pages", 100, scattered, True, GOAL),
        ("load, layers apart (no stacking)", None, consecutive, False, "info"),
    ):
        engine, tokens = _engine(num_tokens, turn_tokens)
        load = _loader(engine, tokens, end, ids, *_pages(num_blocks, one_tensor=one_tensor))
        results.append(_figure(name, nbytes, load, repeats, goal))
        engine.backend.close()
    layers, stacked = _pages(num_blocks, one_tensor=True)
    out = torch.empty(LAYOUT.chunk_shape(num_pages * PAGE))

    def gather() -> None:
        gather_pages(layers, LAYOUTS["cpu-vec"], scattered, out, stacked=stacked)

    results.append(_figure("save gather, scattered pages", out.numel() * 4, gather, repeats, GOAL))
    return results


def report(results: list[Result], num_tokens: int) -> str:
    head = (
        f"kvdepot bench pages | {os.cpu_count()} cores | torch {torch.__version__}"
        f" | {num_tokens} tokens of SmolLM2-135M KV (fp32, 30 layers)"
    )
    limit = "limit: torch copy of one contiguous tensor of the same bytes; ratio = limit / ours"
    return f"{head}\n{results_table(results)}\n{limit}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=3200, help="tokens per load")
    parser.add_argument("--repeats", type=int, default=9, help="pairs per figure")
    parser.add_argument("--json", type=Path, default=None, help="also write JSON")


def cli_main(args: argparse.Namespace) -> int:
    results = run(args.tokens, args.repeats)
    print(report(results, args.tokens))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0
