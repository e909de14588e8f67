"""Shared parts of the chaos suite: the result of a scenario, and checkable chunks.

Runs in the benchmark or test process, and in the client scripts the scenarios spawn (the
chunk helpers, `client_for`, `read_copies`). A chunk's key and bytes derive from
`(seed, index, kib)` alone, so any process can tell whether the bytes served under a key are
the bytes written under it (`is_exact`): that is how every hit of every scenario is judged.
Processes (daemons, scripts, raw sockets) live in `chaos_procs`.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np

from kvdepot.codec import RawCodec, encode_chunk
from kvdepot.codec.format import HEADER_NBYTES, EncodedChunk, parse_header
from kvdepot.config import KVDepotConfig, load_config
from kvdepot.daemon.client import DaemonClient
from kvdepot.errors import CorruptChunk
from kvdepot.keys import ChunkHash, ChunkKey
from kvdepot.layout import DType
from kvdepot.store import ChunkStore, open_store

T = TypeVar("T")
CALL_DEADLINE_S = 20.0
"""A single cache call that takes longer than this counts as a hang."""
NAMESPACE = hashlib.blake2b(b"kvdepot-chaos-namespace", digest_size=16).digest()
_MAX_LISTED = 12


@dataclass(slots=True)
class ScenarioResult:
    """What one scenario saw. The goal: every count 0 and no violated bound.

    Attributes:
        wrong_bytes_served: hits whose bytes differed from those written under the key.
        committed_lost: chunks a put reported stored that could not be read later although
            nothing may have removed them (the scenario keeps them from eviction).
        exceptions_into_caller: exceptions that reached a caller of the cache API.
        crashes_hangs: a daemon died without being killed on purpose, or a call overran
            `CALL_DEADLINE_S`.
        violations: scenario-specific invariants broken (a bound exceeded, a refusal not
            given, a daemon that stopped serving), each once.
        high_water: peaks measured (daemon threads, RSS MiB, arena bytes held).
        notes: what the reader of the report should know (flags this daemon lacks).
    """

    name: str
    trials: int = 0
    wrong_bytes_served: int = 0
    committed_lost: int = 0
    exceptions_into_caller: int = 0
    crashes_hangs: int = 0
    violations: list[str] = field(default_factory=list)
    high_water: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""
    seconds: float = 0.0

    @property
    def is_met(self) -> bool:
        counts = (self.wrong_bytes_served, self.committed_lost, self.exceptions_into_caller)
        return not any(counts) and not self.crashes_hangs and not self.violations

    def violate(self, text: str) -> None:
        if text not in self.violations and len(self.violations) < _MAX_LISTED:
            self.violations.append(text)

    def note(self, text: str) -> None:
        if text not in self.notes and len(self.notes) < _MAX_LISTED:
            self.notes.append(text)

    def peak(self, name: str, value: float) -> None:
        self.high_water[name] = max(self.high_water.get(name, value), value)

    def merge(self, other: ScenarioResult) -> None:
        """Add what `other` (e.g. one worker thread's part of this scenario) saw."""
        self.wrong_bytes_served += other.wrong_bytes_served
        self.committed_lost += other.committed_lost
        self.exceptions_into_caller += other.exceptions_into_caller
        self.crashes_hangs += other.crashes_hangs
        for text in other.violations:
            self.violate(text)
        for text in other.notes:
            self.note(text)
        for name, value in other.high_water.items():
            self.peak(name, value)


def run_trials(
    result: ScenarioResult, budget_s: float, trial: Callable[[int], None], *, min_trials: int = 1
) -> ScenarioResult:
    """Call `trial(i)` until `budget_s` is spent and at least `min_trials` ran."""
    start = time.monotonic()
    while result.trials < min_trials or time.monotonic() - start < budget_s:
        trial(result.trials)
        result.trials += 1
    result.seconds = time.monotonic() - start
    return result


def guarded(
    result: ScenarioResult, what: str, call: Callable[[], T], deadline_s: float = CALL_DEADLINE_S
) -> T | None:
    """`call()`, counting an exception (then None) or an overrun of `deadline_s`."""
    start = time.monotonic()
    try:
        return call()
    except Exception as exc:
        result.exceptions_into_caller += 1
        result.note(f"{what} raised {type(exc).__name__}: {exc}")
        return None
    finally:
        elapsed = time.monotonic() - start
        if elapsed > deadline_s:
            result.crashes_hangs += 1
            result.violate(f"{what} took {elapsed:.1f} s (deadline {deadline_s:.0f} s)")


# ---- chunks whose bytes any process can check ------------------------------------------


def chunk_key(seed: int, index: int) -> ChunkKey:
    digest = hashlib.blake2b(struct.pack("<qq", seed, index), digest_size=16).digest()
    return ChunkKey(NAMESPACE, ChunkHash(digest))


def chain(seed: int, num_chunks: int) -> list[ChunkKey]:
    return [chunk_key(seed, i) for i in range(num_chunks)]


def payload_bytes(seed: int, index: int, kib: int) -> bytes:
    return np.random.default_rng([seed & 0xFFFFFFFF, index, kib]).bytes(kib * 1024)


def make_chunk(seed: int, index: int, kib: int) -> EncodedChunk:
    """A raw fp16 chunk of `kib` KiB of payload, shaped like KV (2 layers, K/V, kib tokens)."""
    data = np.frombuffer(payload_bytes(seed, index, kib), dtype=np.float16)
    return encode_chunk(data.reshape(2, 2, kib, 4, 32), DType.FLOAT16, RawCodec())


def span_items(seed: int, start: int, stop: int, kib: int) -> list[tuple[ChunkKey, EncodedChunk]]:
    """Chunks `start` to `stop` (excluded) of the chain `seed`, keyed."""
    return [(chunk_key(seed, i), make_chunk(seed, i, kib)) for i in range(start, stop)]


def chain_items(seed: int, num_chunks: int, kib: int) -> list[tuple[ChunkKey, EncodedChunk]]:
    return span_items(seed, 0, num_chunks, kib)


def is_exact(blob: bytes | memoryview, seed: int, index: int, kib: int) -> bool:
    """Whether `blob` is the chunk `make_chunk(seed, index, kib)` wrote (its KV bytes)."""
    if len(blob) != HEADER_NBYTES + kib * 1024:
        return False
    try:
        if parse_header(blob).shape != (2, 2, kib, 4, 32):
            return False
    except CorruptChunk:
        return False
    return bytes(blob[HEADER_NBYTES:]) == payload_bytes(seed, index, kib)


def count_wrong(blobs: Sequence[bytes | memoryview], seed: int, kib: int, first: int = 0) -> int:
    """How many of a chain's leading hits (from chunk `first`) are not the bytes written."""
    return sum(not is_exact(b, seed, first + i, kib) for i, b in enumerate(blobs))


def client_for(socket_path: Path, **options: float) -> DaemonClient:
    """A client that retries fast (scenarios restart daemons) with a generous timeout."""
    return DaemonClient(
        socket_path=socket_path,
        reconnect_interval_s=options.get("reconnect_interval_s", 0.05),
        request_timeout_s=options.get("request_timeout_s", 10.0),
        connect_timeout_s=options.get("connect_timeout_s", 2.0),
    )


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def num_clients(client: DaemonClient) -> int:
    """Sessions the daemon serves now (-1 when it does not answer)."""
    clients = client.stats().get("clients")
    return len(clients) if isinstance(clients, list) else -1


def read_copies(store: ChunkStore, keys: Sequence[ChunkKey]) -> list[bytes]:
    """The leading hits of `keys` as bytes, copied inside the store's read (lease) block."""
    with store.read(keys) as blobs:
        return [bytes(blob) for blob in blobs]


def check_visible(
    result: ScenarioResult, store: ChunkStore, seed: int, kib: int, stored: int
) -> None:
    """Every chunk of the 4-chunk chain `seed` that is visible is exact, and at least
    `stored` (what a put reported) are visible."""
    num_visible = 0
    for j, key in enumerate(chain(seed, 4)):
        blobs = guarded(result, "read", partial(read_copies, store, [key])) or []
        num_visible += len(blobs)
        result.wrong_bytes_served += count_wrong(blobs, seed, kib, first=j)
    result.committed_lost += max(0, stored - num_visible)


def disk_chunk_path(root: Path, key: ChunkKey) -> Path:
    """Where the disk tier keeps `key` (its documented layout)."""
    name = key.chunk_hash.hex()
    return root / key.namespace.hex() / name[:2] / f"{name}.kvc"


def disk_store_config(root: Path) -> KVDepotConfig:
    """An embedded store with a 16 MiB RAM tier and a disk tier at `root` (no fsync)."""
    return load_config(overrides={
        "memory.capacity_bytes": "16MiB", "memory.prefault": False,
        "disk.path": str(root), "disk.fsync": False,
    })  # fmt: skip


def write_to_disk(root: Path, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> None:
    """Store `items` in a `disk_store_config` store and close it once written down."""
    with open_store(disk_store_config(root)) as store:
        store.put(items)
        store.flush(30)
