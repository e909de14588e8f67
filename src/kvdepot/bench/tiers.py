"""`kvdepot bench tiers`: RAM and disk tier throughput and lookup latency vs plain limits.

Every figure is a ratio to a limit measured in the same run on the same bytes:
- RAM store / retrieve (through `CacheEngine`, from and into a torch tensor) vs
  `numpy.copyto` of the same bytes into already-touched memory;
- disk write (with fsync) vs plain files of the same sizes written and fsynced the same way;
- disk cold read (page cache dropped) through the store, which verifies each chunk and
  promotes it into the RAM tier, vs plain reads of the same files into touched memory;
- `lookup` latency per chunk for a 32-chunk prompt, all chunks cached in RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kvdepot.bench.timing import format_table, gbps, median_seconds, paired_seconds
from kvdepot.codec import RawCodec, encode_chunk
from kvdepot.engine import CacheEngine
from kvdepot.errors import KVDepotError
from kvdepot.keys import CacheNamespace, ChunkKey, HashAlgorithm, chunk_keys
from kvdepot.layout import DType, KVLayout
from kvdepot.metrics import Metrics
from kvdepot.store import TieredStore
from kvdepot.tensors import as_numpy_bits
from kvdepot.tiers.arena import HostBuffer
from kvdepot.tiers.disk import DiskTier
from kvdepot.tiers.memory import MemoryTier

CHUNK_TOKENS = 256
LAYOUTS = {
    "small": KVLayout(30, 3, 64, DType.BFLOAT16),  # SmolLM2-135M-like: 5.6 MiB a chunk
    "7b": KVLayout(32, 8, 128, DType.BFLOAT16),  # Llama-7B-like (GQA 8): 32 MiB a chunk
}


@dataclass(frozen=True, slots=True)
class Result:
    layout: str
    metric: str
    ours: float
    limit: float
    unit: str
    ratio: float
    goal: str

    @property
    def is_met(self) -> bool:
        if self.goal == "info":
            return True
        op, value = self.goal.split(" ")
        return self.ratio >= float(value) if op == ">=" else self.ratio <= float(value)


def _engine(layout: KVLayout, capacity_bytes: int, algorithm: HashAlgorithm) -> CacheEngine:
    memory = MemoryTier(HostBuffer.allocate(capacity_bytes, prefault=True))
    return CacheEngine(
        TieredStore(memory, metrics=Metrics()), layout, "bench-model",
        chunk_size_tokens=CHUNK_TOKENS, hash_algorithm=algorithm,
    )  # fmt: skip


def bench_ram(name: str, layout: KVLayout, total_bytes: int, repeats: int) -> list[Result]:
    num_chunks = max(2, total_bytes // (layout.bytes_per_token * CHUNK_TOKENS))
    num_tokens = num_chunks * CHUNK_TOKENS
    kv = torch.randn(layout.chunk_shape(num_tokens)).to(torch.bfloat16)
    tokens = list(range(num_tokens))
    nbytes = kv.numel() * kv.element_size()
    engine = _engine(layout, int(nbytes * 1.1) + (1 << 20), HashAlgorithm.BLAKE2B_128)
    out = torch.empty_like(kv)
    out.fill_(0)
    src, dst = as_numpy_bits(kv), as_numpy_bits(out)

    def copy() -> None:
        np.copyto(dst, src)

    copy_s, store_s, store_ratio = paired_seconds(
        copy, lambda: engine.store(tokens, kv), repeats, ours_setup=engine.backend.clear
    )
    engine.store(tokens, kv)
    copy2_s, retrieve_s, retrieve_ratio = paired_seconds(
        copy, lambda: engine.retrieve(tokens, out=out), repeats
    )
    assert torch.equal(out, kv), "retrieve returned different KV"
    engine.backend.close()
    return [
        Result(name, "RAM store", gbps(nbytes, store_s), gbps(nbytes, copy_s), "GB/s",
               store_ratio, ">= 0.8"),
        Result(name, "RAM retrieve", gbps(nbytes, retrieve_s), gbps(nbytes, copy2_s), "GB/s",
               retrieve_ratio, ">= 0.8"),
    ]  # fmt: skip


def _drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _plain_write(paths: list[Path], blobs: list[bytes]) -> None:
    for path, blob in zip(paths, blobs, strict=True):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)


def _plain_read(paths: list[Path], into: memoryview) -> None:
    """Read each file into consecutive parts of `into` (memory already touched)."""
    offset = 0
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            size = os.fstat(file.fileno()).st_size
            file.readinto(into[offset : offset + size])
            offset += size


def bench_disk(
    name: str, layout: KVLayout, total_bytes: int, root: Path, repeats: int
) -> list[Result]:
    shape = layout.chunk_shape(CHUNK_TOKENS)
    num_chunks = max(2, total_bytes // (layout.bytes_per_token * CHUNK_TOKENS))
    ns = CacheNamespace("bench-model", layout.layout_id)
    keys: list[ChunkKey] = chunk_keys(list(range(num_chunks * CHUNK_TOKENS)), CHUNK_TOKENS, ns)
    rng = np.random.default_rng(0)
    chunks = [
        encode_chunk(rng.integers(0, 2**16, size=shape, dtype=np.uint16), layout.dtype, RawCodec())
        for _ in keys
    ]
    items = list(zip(keys, chunks, strict=True))
    blobs = [c.header.pack() + bytes(c.contiguous_payload()) for c in chunks]
    nbytes = sum(len(b) for b in blobs)
    plain_dir, tier_dir = root / "plain", root / "tier"
    plain_dir.mkdir(parents=True, exist_ok=True)
    paths = [plain_dir / f"{i}.bin" for i in range(len(blobs))]

    def fresh_tier() -> DiskTier:
        shutil.rmtree(tier_dir, ignore_errors=True)
        return DiskTier.open(tier_dir, nbytes * 2, fsync=True)

    holder: list[DiskTier] = []

    def setup_write() -> None:
        for tier in holder:
            tier.close()
        holder[:] = [fresh_tier()]

    plain_w, tier_w, write_ratio = paired_seconds(
        lambda: _plain_write(paths, blobs), lambda: holder[0].put(items), repeats,
        ours_setup=setup_write,
    )  # fmt: skip
    tier = holder[0]
    tier_files = list(tier_dir.rglob("*.kvc"))
    # Cold read = the store's real path: disk file -> verified -> RAM-tier slot (promotion),
    # against plain reads of the same files into already-touched memory.
    memory = MemoryTier(HostBuffer.allocate(nbytes + (len(keys) + 1) * 64, prefault=True))
    store = TieredStore(memory, [tier])
    plain_buffer = HostBuffer.allocate(nbytes, prefault=True)

    def cold() -> None:
        memory.clear()
        _drop_cache(tier_files)

    def read_all() -> None:
        with store.read(keys) as blobs:
            assert len(blobs) == len(keys), "disk tier lost chunks"

    plain_r, tier_r, read_ratio = paired_seconds(
        lambda: _plain_read(paths, plain_buffer.view), read_all, repeats,
        limit_setup=lambda: _drop_cache(paths), ours_setup=cold,
    )  # fmt: skip
    store.close()
    plain_buffer.close()
    return [
        Result(name, "disk write+fsync", gbps(nbytes, tier_w), gbps(nbytes, plain_w), "GB/s",
               write_ratio, ">= 0.8"),
        Result(name, "disk cold read->RAM", gbps(nbytes, tier_r), gbps(nbytes, plain_r), "GB/s",
               read_ratio, ">= 0.8"),
    ]  # fmt: skip


def bench_lookup(layout: KVLayout, repeats: int) -> list[Result]:
    results = []
    num_chunks = 32
    tokens = list(range(1000, 1000 + num_chunks * CHUNK_TOKENS))
    for algorithm, goal_us in ((HashAlgorithm.XXH3_128, 5.0), (HashAlgorithm.BLAKE2B_128, 15.0)):
        engine = _engine(KVLayout(2, 1, 8, DType.BFLOAT16), 64 << 20, algorithm)
        engine.store(
            tokens, torch.zeros(engine.layout.chunk_shape(len(tokens)), dtype=torch.bfloat16)
        )
        assert engine.lookup(tokens) == len(tokens)
        seconds = median_seconds(partial(engine.lookup, tokens), 2000)
        per_chunk_us = seconds / num_chunks * 1e6
        results.append(Result("any", f"lookup/chunk {algorithm.value}", per_chunk_us, goal_us,
                              "us", per_chunk_us / goal_us, "<= 1.0"))  # fmt: skip
        engine.backend.close()
    return results


def run(layouts: list[str], total_mib: int, repeats: int, disk_dir: Path | None) -> list[Result]:
    """Run every tier benchmark; returns the results (also printed by the CLI)."""
    results: list[Result] = []
    root = Path(tempfile.mkdtemp(prefix="kvdepot-bench-", dir=disk_dir))
    try:
        for name in layouts:
            layout = LAYOUTS[name]
            results += bench_ram(name, layout, total_mib << 20, repeats)
            results += bench_disk(name, layout, total_mib << 20, root / name, repeats)
        results += bench_lookup(LAYOUTS[layouts[0]], repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def results_table(results: Sequence[Result]) -> str:
    """The table every ratio benchmark prints: ours, limit, ratio and goal per row."""
    rows = [
        (r.layout, r.metric, r.ours, r.limit, r.unit, r.ratio, r.goal,
         "met" if r.is_met else "MISSED")
        for r in results
    ]  # fmt: skip
    return format_table(["layout", "metric", "ours", "limit", "unit", "ratio", "goal", ""], rows)


def report(results: list[Result]) -> str:
    head = (
        f"kvdepot bench tiers | {platform.machine()} | {os.cpu_count()} cores"
        f" | torch {torch.__version__}"
    )
    return f"{head}\n{results_table(results)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layouts", default="small,7b", help="comma list of: small, 7b")
    parser.add_argument("--total-mib", type=int, default=512, help="KV bytes per measurement")
    parser.add_argument("--repeats", type=int, default=7, help="runs per measurement (median)")
    parser.add_argument("--disk-dir", type=Path, default=None, help="where the disk test writes")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a goal is missed")


def cli_main(args: argparse.Namespace) -> int:
    layouts = [name.strip() for name in args.layouts.split(",")]
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        raise KVDepotError(f"unknown layouts {sorted(unknown)}; choose from {sorted(LAYOUTS)}")
    results = run(layouts, args.total_mib, args.repeats, args.disk_dir)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(r.is_met for r in results) or not args.strict else 1
