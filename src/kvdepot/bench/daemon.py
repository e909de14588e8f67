"""`kvdepot bench daemon`: KV through the daemon vs the same bytes copied through /dev/shm.

Runs in the caller's process and starts a `kvdepot serve` subprocess (RAM tier only, so the
daemon's disk write-back does not compete for the two cores). Figures, each with its limit:
- store: `CacheEngine.store` through a `DaemonClient` (reserve, copy into the shared arena,
  commit) vs `numpy.copyto` of the same bytes into a touched /dev/shm mapping;
- retrieve: `CacheEngine.retrieve(out=...)` through the client (read lease, copy out,
  release) vs `numpy.copyto` of the same bytes out of a /dev/shm mapping;
- lookup: round trip of a 16-chunk `lookup` (keys precomputed), p50 and p99;
- partial: `CacheEngine.lookup` / `retrieve` of a prompt whose last chunk matches a stored
  chunk in part (partial matching), p50, vs the same calls for the whole chunks alone: the
  partial tail rides in the same round trip, so it should cost little more;
- router lookup: `POST /lookup` of a 4,096-token prompt by model name over one kept-alive
  HTTP connection (what a router's hot path pays), p50 and p99, beside a `GET /healthz` on
  the same connection (the HTTP floor).
Goals: store and retrieve >= 0.6 of the limit; lookup p50 <= 200 us; partial <= 1.5x;
router lookup p50 <= 1 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from kvdepot.bench.tiers import CHUNK_TOKENS, LAYOUTS, Result, results_table
from kvdepot.bench.timing import gbps, paired_seconds
from kvdepot.daemon.client import DaemonClient
from kvdepot.engine import CacheEngine
from kvdepot.tensors import as_numpy_bits
from kvdepot.tiers.arena import HostBuffer


def _start_daemon(
    root: Path, capacity_bytes: int, http_port: int = 0
) -> tuple[subprocess.Popen[bytes], Path]:
    socket_path = root / "daemon.sock"
    args = [
        sys.executable, "-m", "kvdepot.cli", "serve", "--daemon-socket-path", str(socket_path),
        "--memory-capacity-bytes", str(capacity_bytes), "--daemon-http-port", str(http_port),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = DaemonClient(socket_path=socket_path, reconnect_interval_s=0.05)
    deadline = time.monotonic() + 60
    while not client.stats():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the daemon did not start")
        time.sleep(0.1)
    client.close()
    return proc, socket_path


def _bench_layout(name: str, socket_path: Path, total_bytes: int, repeats: int) -> list[Result]:
    layout = LAYOUTS[name]
    num_chunks = max(2, total_bytes // (layout.bytes_per_token * CHUNK_TOKENS))
    num_tokens = num_chunks * CHUNK_TOKENS
    kv = torch.randn(layout.chunk_shape(num_tokens)).to(torch.bfloat16)
    out = torch.zeros_like(kv)
    tokens = list(range(num_tokens))
    nbytes = kv.numel() * kv.element_size()
    client = DaemonClient(socket_path=socket_path)
    engine = CacheEngine(client, layout, "bench-model", chunk_size_tokens=CHUNK_TOKENS)
    shm = HostBuffer.create_shared(
        Path("/dev/shm") / f"kvdepot-bench-{os.getpid()}-{secrets.token_hex(4)}.shm", nbytes
    )
    try:
        src, dst = as_numpy_bits(kv).reshape(-1), as_numpy_bits(out).reshape(-1)
        shm_view = np.frombuffer(shm.view, dtype=src.dtype, count=src.size)
        copy_in_s, store_s, store_ratio = paired_seconds(
            lambda: np.copyto(shm_view, src), lambda: engine.store(tokens, kv), repeats,
            ours_setup=client.clear,
        )  # fmt: skip
        engine.store(tokens, kv)
        copy_out_s, retrieve_s, retrieve_ratio = paired_seconds(
            lambda: np.copyto(dst, shm_view), lambda: engine.retrieve(tokens, out=out), repeats
        )
        assert torch.equal(out, kv), "the daemon returned different KV"
    finally:
        shm.close()
        shm.unlink()
        client.close()
    return [
        Result(name, "daemon store", gbps(nbytes, store_s), gbps(nbytes, copy_in_s),
                     "GB/s", store_ratio, ">= 0.6"),
        Result(name, "daemon retrieve", gbps(nbytes, retrieve_s),
                     gbps(nbytes, copy_out_s), "GB/s", retrieve_ratio, ">= 0.6"),
    ]  # fmt: skip


def _bench_lookup(socket_path: Path, num_calls: int) -> list[Result]:
    layout = LAYOUTS["small"]
    client = DaemonClient(socket_path=socket_path)
    engine = CacheEngine(client, layout, "bench-lookup", chunk_size_tokens=CHUNK_TOKENS)
    keys = engine.chunk_keys(list(range(16 * CHUNK_TOKENS)))
    samples = []
    for _ in range(num_calls):
        start = time.perf_counter()
        client.lookup(keys)
        samples.append(time.perf_counter() - start)
    client.close()
    samples.sort()
    p50_us = statistics.median(samples) * 1e6
    p99_us = samples[int(len(samples) * 0.99)] * 1e6
    return [
        Result("any", "lookup 16 chunks p50", p50_us, 200.0, "us", p50_us / 200, "<= 1.0"),
        Result("any", "lookup 16 chunks p99", p99_us, 200.0, "us", p99_us / 200, "info"),
    ]


def _bench_router_lookup(socket_path: Path, http_port: int, num_calls: int) -> list[Result]:
    """A 4,096-token prompt stored (RAM), then looked up by model name over HTTP."""
    layout = LAYOUTS["small"]
    client = DaemonClient(socket_path=socket_path)
    engine = CacheEngine(client, layout, "bench-router", chunk_size_tokens=CHUNK_TOKENS)
    engine.announce(["bench-model"])
    tokens = list(range(100, 100 + 4096))
    engine.store(tokens, torch.randn(layout.chunk_shape(len(tokens))).to(torch.bfloat16))
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    body = json.dumps({"model": "bench-model", "tokens": tokens}).encode()
    headers = {"Content-Type": "application/json"}

    def lookup() -> None:
        conn.request("POST", "/lookup", body=body, headers=headers)
        answer = json.loads(conn.getresponse().read())
        if answer["cached_tokens"] != len(tokens):
            raise RuntimeError(f"the router lookup found {answer}")

    def healthz() -> None:
        conn.request("GET", "/healthz")
        conn.getresponse().read()

    try:
        floor = _samples_s(healthz, num_calls)
        samples = _samples_s(lookup, num_calls)
    finally:
        conn.close()
        client.close()
    p50_us, p99_us = statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99)] * 1e6
    floor_us = statistics.median(floor) * 1e6
    return [
        Result("any", "router lookup 4K tokens p50", p50_us, 1000.0, "us", p50_us / 1000, "<= 1.0"),
        Result("any", "router lookup 4K tokens p99", p99_us, 1000.0, "us", p99_us / 1000, "info"),
        Result(
            "any",
            "HTTP floor (GET /healthz) p50",
            floor_us,
            p50_us,
            "us",
            floor_us / p50_us,
            "info",
        ),
    ]


def _samples_s(fn: Callable[[], object], num_calls: int) -> list[float]:
    """Sorted seconds of `num_calls` calls of `fn`, after a tenth as many to warm up."""
    for _ in range(max(num_calls // 10, 3)):
        fn()
    samples = []
    for _ in range(num_calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)


def _p50_s(fn: Callable[[], object], num_calls: int) -> float:
    return statistics.median(_samples_s(fn, num_calls))


def _bench_partial(socket_path: Path, num_calls: int) -> list[Result]:
    """A 12-chunk prompt stored; the query shares 11 chunks and 3/4 of the 12th."""
    layout = LAYOUTS["small"]
    client = DaemonClient(socket_path=socket_path)
    engine = CacheEngine(client, layout, "bench-partial", chunk_size_tokens=CHUNK_TOKENS)
    stored = list(range(12 * CHUNK_TOKENS))
    kv = torch.randn(layout.chunk_shape(len(stored))).to(torch.bfloat16)
    engine.store(stored, kv)
    whole = stored[: 11 * CHUNK_TOKENS]
    num_shared = 11 * CHUNK_TOKENS + 3 * CHUNK_TOKENS // 4
    partial = stored[:num_shared] + [10**6] * (CHUNK_TOKENS // 4)
    out = torch.empty(layout.chunk_shape(len(partial)), dtype=torch.bfloat16)
    try:
        if engine.lookup(partial) != num_shared:
            raise RuntimeError("partial matching found less than the shared tokens")
        got = engine.retrieve(partial, out=out)
        assert torch.equal(got, kv[:, :, :num_shared]), "the daemon returned different KV"
        results = []
        for op, fn_whole, fn_partial, calls in (
            ("lookup", lambda: engine.lookup(whole), lambda: engine.lookup(partial), num_calls),
            ("retrieve", lambda: engine.retrieve(whole, out=out),
             lambda: engine.retrieve(partial, out=out), max(num_calls // 20, 20)),
        ):  # fmt: skip
            whole_s, partial_s = _p50_s(fn_whole, calls), _p50_s(fn_partial, calls)
            results.append(
                Result("small", f"partial {op} p50", partial_s * 1e6, whole_s * 1e6, "us",
                       partial_s / whole_s, "<= 1.5")
            )  # fmt: skip
    finally:
        client.close()
    return results


def run(layouts: list[str], total_mib: int, repeats: int) -> list[Result]:
    """Start a daemon, measure, stop it; returns the results (printed by `report`)."""
    root = Path(tempfile.mkdtemp(prefix="kvdepot-bench-daemon-"))
    http_port = _free_port()
    proc, socket_path = _start_daemon(root, (total_mib << 20) * 2 + (64 << 20), http_port)
    try:
        results = []
        for name in layouts:
            results += _bench_layout(name, socket_path, total_mib << 20, repeats)
        results += _bench_lookup(socket_path, 2000)
        results += _bench_partial(socket_path, 1000)
        results += _bench_router_lookup(socket_path, http_port, 2000)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def report(results: list[Result]) -> str:
    head = f"kvdepot bench daemon | {os.cpu_count()} cores | torch {torch.__version__}"
    table = results_table(results)
    return f"{head}\n{table}\nlimit: numpy.copyto of the same bytes into / out of /dev/shm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layouts", default="small,7b", help="comma list of: small, 7b")
    parser.add_argument("--total-mib", type=int, default=256, help="KV bytes per run")
    parser.add_argument("--repeats", type=int, default=7, help="runs per figure (median)")
    parser.add_argument("--json", type=Path, default=None, help="also write JSON")


def cli_main(args: argparse.Namespace) -> int:
    results = run(args.layouts.split(","), args.total_mib, args.repeats)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0
