"""Chaos scenarios for the remote tiers: a Valkey or S3 server killed or hung (SIGSTOP)
mid-run under an embedded `TieredStore` that uses it.

Runs in the benchmark or test process; the servers are real, on loopback, from the
`[servers]` extra (`kvdepot.bench.servers`). Invariants: nothing raises into the caller, a
call never waits much longer than the tier's timeouts, reads of an unreachable tier are
misses, every hit is exact, and what was flushed to a healthy server is read back.
"""

from __future__ import annotations

import importlib.util
import random
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from kvdepot.bench.chaos_kit import (
    ScenarioResult,
    chain,
    chain_items,
    count_wrong,
    guarded,
    read_copies,
    run_trials,
)
from kvdepot.bench.servers import HOST, LocalServer, seaweed_s3, valkey_server
from kvdepot.config import load_config
from kvdepot.store import TieredStore, open_store

REMOTE_KIB = 32
FAULT_S = 2.0
RECOVER_S = 1.0
REMOTE_DEADLINE_S = 10.0
"""A call may wait for a hung server's timeouts (1 s here), never this long."""
T = TypeVar("T")
S3_BUCKET = "kvdepot-chaos"
S3_ACCESS_KEY = "kvdepot-chaos"
S3_SECRET_KEY = "kvdepot-chaos-secret"


def valkey_faults(budget_s: float, workdir: Path) -> ScenarioResult:
    """A Valkey server SIGKILLed or SIGSTOPped mid-run: no exception, misses, exact hits."""

    def start() -> tuple[LocalServer, dict[str, object]]:
        server = valkey_server(workdir / "valkey").start()
        return server, {
            "valkey.address": f"{HOST}:{server.port}", "valkey.key_prefix": "chaos",
            "valkey.connect_timeout_ms": 300, "valkey.timeout_ms": 1000,
            "valkey.breaker_failures": 2, "valkey.breaker_cooldown_ms": 500,
        }  # fmt: skip

    return _remote_faults(ScenarioResult("valkey_faults"), budget_s, start)


def s3_faults(budget_s: float, workdir: Path) -> ScenarioResult:
    """An S3 server (SeaweedFS) SIGKILLed or SIGSTOPped mid-run: no exception, misses,
    exact hits."""

    def start() -> tuple[LocalServer, dict[str, object]]:
        if importlib.util.find_spec("boto3") is None:
            raise ImportError("boto3 is missing: pip install 'kvdepot[s3]'")
        server = seaweed_s3(
            workdir / "s3", access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY, bucket=S3_BUCKET
        ).start()
        return server, {
            "s3.bucket": S3_BUCKET, "s3.endpoint_url": f"http://{HOST}:{server.port}",
            "s3.region": "us-east-1", "s3.access_key_id": S3_ACCESS_KEY,
            "s3.secret_access_key": S3_SECRET_KEY, "s3.addressing_style": "path",
            "s3.prefix": "chaos", "s3.connect_timeout_ms": 500, "s3.timeout_ms": 1000,
            "s3.max_attempts": 1, "s3.breaker_failures": 2, "s3.breaker_cooldown_ms": 500,
        }  # fmt: skip

    return _remote_faults(ScenarioResult("s3_faults"), budget_s, start)


def _remote_faults(
    result: ScenarioResult,
    budget_s: float,
    start: Callable[[], tuple[LocalServer, dict[str, object]]],
) -> ScenarioResult:
    try:
        server, remote = start()
    except (RuntimeError, ImportError) as exc:
        result.skipped = str(exc).splitlines()[0]
        return result
    overrides = {"memory.capacity_bytes": "8MiB", "memory.prefault": False, **remote}
    store = open_store(load_config(overrides=overrides))
    try:
        run_trials(result, budget_s, partial(_fault_trial, result, store, server))
    finally:
        server.resume()
        store.close()
        server.kill()
    return result


def _fault_trial(result: ScenarioResult, store: TieredStore, server: LocalServer, i: int) -> None:
    rng = random.Random(i)
    if not _wait_healthy(result, store, 190_000 + 1000 * i):
        result.violate("the store did not use the server again within 15 s of its return")
    seeds = [160_000 + 100 * i + j for j in range(3)]
    for seed in seeds:  # healthy: what is flushed is there
        _call(result, "put", partial(store.put, chain_items(seed, 4, REMOTE_KIB)))
    _call(result, "flush", partial(store.flush, 30.0))
    store.memory.clear()  # reads now come from the remote tier
    for seed in seeds:
        blobs = _call(result, "read", partial(read_copies, store, chain(seed, 4))) or []
        result.wrong_bytes_served += count_wrong(blobs, seed, REMOTE_KIB)
        result.committed_lost += 4 - len(blobs)
    fault = rng.choice(["kill", "pause"])
    timer = threading.Timer(rng.uniform(0.0, 0.5), server.kill if fault == "kill" else server.pause)
    timer.start()
    try:
        _churn(result, store, rng, seeds, 170_000 + 100 * i, FAULT_S)
    finally:
        timer.join()
    if fault == "pause":
        server.resume()
    else:
        server.start()  # same port; a killed Valkey comes back empty
    _churn(result, store, rng, seeds, 180_000 + 100 * i, RECOVER_S)
    result.peak("faults", i + 1)


def _wait_healthy(result: ScenarioResult, store: TieredStore, base: int) -> bool:
    """Whether a chain stored, flushed and dropped from RAM is read back from the remote
    tier within 15 s (its breaker closes again after a fault)."""
    end, n = time.monotonic() + 15, 0
    while time.monotonic() < end:
        seed, n = base + n, n + 1
        _call(result, "put", partial(store.put, chain_items(seed, 4, REMOTE_KIB)))
        _call(result, "flush", partial(store.flush, 5.0))
        store.memory.clear()
        blobs = _call(result, "read", partial(read_copies, store, chain(seed, 4))) or []
        result.wrong_bytes_served += count_wrong(blobs, seed, REMOTE_KIB)
        if len(blobs) == 4:
            return True
        time.sleep(0.2)
    return False


def _churn(
    result: ScenarioResult,
    store: TieredStore,
    rng: random.Random,
    seeds: list[int],
    base: int,
    seconds: float,
) -> None:
    """Store, flush, drop RAM and read back for `seconds`: every hit must be exact."""
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        seed = base + n
        seeds.append(seed)
        n += 1
        _call(result, "put", partial(store.put, chain_items(seed, 4, REMOTE_KIB)))
        _call(result, "flush", partial(store.flush, 2.0))
        store.memory.clear()
        old = rng.choice(seeds)
        blobs = _call(result, "read", partial(read_copies, store, chain(old, 4))) or []
        result.wrong_bytes_served += count_wrong(blobs, old, REMOTE_KIB)


def _call(result: ScenarioResult, what: str, call: Callable[[], T]) -> T | None:
    return guarded(result, what, call, deadline_s=REMOTE_DEADLINE_S)
