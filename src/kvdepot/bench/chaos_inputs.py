"""Chaos scenarios with hostile input: chunk files damaged every way a disk or an operator
can, and fuzzed frames on the daemon's socket.

Runs in the benchmark or test process: the disk scenario embeds a `TieredStore` with a disk
tier (closed and reopened around the damage), the fuzz scenario starts a `kvdepot serve`
daemon. These held before the holes were found and must keep holding: never a wrong byte,
damage counted corrupt and deleted, and a daemon that serves its other clients throughout.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable
from functools import partial
from pathlib import Path

import msgspec

from kvdepot.bench.chaos_kit import (
    ScenarioResult,
    chain_items,
    check_visible,
    chunk_key,
    count_wrong,
    disk_chunk_path,
    disk_store_config,
    guarded,
    read_copies,
    run_trials,
    wait_for,
    write_to_disk,
)
from kvdepot.bench.chaos_procs import DaemonProcess, raw_connection, sampling
from kvdepot.codec.format import HEADER_NBYTES
from kvdepot.daemon import protocol as p
from kvdepot.daemon.client import DaemonClient
from kvdepot.metrics import Metrics
from kvdepot.store import open_store

CORRUPTIONS = (
    "none", "flip_header", "flip_payload", "truncate", "extend", "zero_length", "garbage",
    "header_only", "none",
)  # fmt: skip
DISK_CHUNKS = 18
DISK_KIB = 8
FUZZ_CONNECTIONS = 40
WITNESS_CHAINS = 4


def disk_corruption(budget_s: float, workdir: Path) -> ScenarioResult:
    """Chunk files with flipped bits (header, payload), truncated, extended, emptied or
    replaced by garbage, plus garbage under a valid name: never a wrong byte, damage counted
    corrupt and deleted, every undamaged chunk still a hit."""
    result = ScenarioResult("disk_corruption")

    def trial(i: int) -> None:
        seed, root = 130_000 + i, workdir / f"trial{i}" / "disk"
        config = disk_store_config(root)
        write_to_disk(root, chain_items(seed, DISK_CHUNKS, DISK_KIB))
        rng = random.Random(seed)
        kinds = [CORRUPTIONS[j % len(CORRUPTIONS)] for j in range(DISK_CHUNKS)]
        rng.shuffle(kinds)
        kinds.append("stranger")  # garbage under the name of a key never stored
        counted_before = 0
        for j, kind in enumerate(kinds):
            path = disk_chunk_path(root, chunk_key(seed, j))
            if kind != "none" and (path.exists() or kind == "stranger"):
                size = _damage(path, kind, rng)
                counted_before += size >= HEADER_NBYTES  # shorter ones go at the scan
        metrics = Metrics()
        with open_store(config, metrics) as store:
            for j, kind in enumerate(kinds):
                key = chunk_key(seed, j)
                blobs = guarded(result, "read", partial(read_copies, store, [key]))
                if blobs:
                    result.wrong_bytes_served += count_wrong(blobs, seed, DISK_KIB, first=j)
                elif blobs is not None and kind == "none":
                    result.committed_lost += 1
        counted = metrics.counter_value("kvdepot_tier_corrupt_chunks_total", {"tier": "disk"})
        result.peak("corrupt_counted", counted)
        if counted < counted_before:
            result.violate(f"{counted_before} damaged chunk files, {counted:.0f} counted corrupt")
        for j, kind in enumerate(kinds):
            if kind != "none" and disk_chunk_path(root, chunk_key(seed, j)).exists():
                result.violate(f"a chunk file damaged by {kind} was left in place")

    return run_trials(result, budget_s, trial)


def _damage(path: Path, kind: str, rng: random.Random) -> int:
    """Damage the chunk file at `path` the `kind` way; returns its new size."""
    data = bytearray(path.read_bytes()) if path.exists() else bytearray()
    if kind == "flip_header":
        data[rng.randrange(HEADER_NBYTES)] ^= 1 << rng.randrange(8)
    elif kind == "flip_payload":
        data[rng.randrange(HEADER_NBYTES, len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(1, len(data)) :]
    elif kind == "extend":
        data += rng.randbytes(rng.randint(1, 64))
    elif kind == "zero_length":
        data = bytearray()
    elif kind == "header_only":
        del data[HEADER_NBYTES:]
    else:  # garbage, stranger: random bytes of a chunk's size
        data = bytearray(rng.randbytes(HEADER_NBYTES + DISK_KIB * 1024))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return len(data)


def frame_fuzz(budget_s: float, workdir: Path) -> ScenarioResult:
    """Random bytes, garbage msgpack, huge length prefixes, truncated frames and valid
    messages with absurd fields on the daemon's socket: it survives, and a well-behaved
    client keeps reading what it stored and keeps storing."""
    result = ScenarioResult("frame_fuzz")
    with DaemonProcess(workdir, disk=True, result=result) as daemon, sampling(result, daemon):
        witness = daemon.client()
        seeds = [140_000 + j for j in range(WITNESS_CHAINS)]
        for seed in seeds:
            if guarded(result, "put", partial(witness.put, chain_items(seed, 4, 32))) != 4:
                result.note("the witness could not store before the fuzz")
        witness.flush(30)  # on disk: a chunk evicted by a fuzzed reservation comes back

        def trial(i: int) -> None:
            rng = random.Random(i)
            for _ in range(3):  # clients holding all they may, then sending garbage
                _fuzz_one(daemon, rng, [_greedy_then_garbage], is_hello=True)
            for _ in range(FUZZ_CONNECTIONS):
                _fuzz_one(daemon, rng)
            if not daemon.is_alive:
                result.crashes_hangs += 1
                result.violate("the daemon died under fuzzed frames")
                return
            fresh = chain_items(150_000 + i, 4, 1024)  # 4 MiB: an eighth of the arena
            put_fresh = partial(guarded, result, "put", partial(witness.put, fresh))
            is_stored = wait_for(lambda: put_fresh() == 4, 5)
            held = _peak_quarantine(result, witness)
            if not is_stored:
                result.violate(
                    f"after the fuzzed connections closed, 4 MiB could not be stored "
                    f"(the daemon holds {held / 2**20:.1f} MiB for connections it dropped)"
                )
            for seed in seeds:
                check_visible(result, witness, seed, 32, 4)

        run_trials(result, budget_s, trial)
        witness.close()
    return result


def _peak_quarantine(result: ScenarioResult, client: DaemonClient) -> int:
    """Arena bytes the daemon holds for sessions it dropped (0 where it does not say)."""
    quarantined = client.stats().get("quarantined_bytes")
    if not isinstance(quarantined, int):
        return 0
    result.peak("quarantined_mib", round(quarantined / 2**20, 1))
    return quarantined


def _fuzz_one(
    daemon: DaemonProcess,
    rng: random.Random,
    makers: list[Callable[[random.Random], bytes]] | None = None,
    *,
    is_hello: bool | None = None,
) -> None:
    """One connection: (maybe a hello, then) fuzzed payloads (1-3 random ones by default),
    whatever comes back read, then closed."""
    makers = makers or rng.choices(_FUZZ, k=rng.randint(1, 3))
    hello = rng.random() < 0.8 if is_hello is None else is_hello
    try:
        sock = raw_connection(daemon.socket_path, hello=hello, timeout_s=2)
    except (OSError, p.ProtocolError):
        return
    try:
        for make in makers:
            data = make(rng)
            sock.sendall(data)
            if data.startswith(struct.pack(">I", 1000)):
                sock.shutdown(socket.SHUT_WR)  # a truncated frame, then the peer leaves
                break
        sock.settimeout(0.1)
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass
    finally:
        sock.close()


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _msg(**fields: object) -> bytes:
    """A frame holding a tagged message built by hand, so any field can be absurd."""
    return _frame(msgspec.msgpack.encode(fields))


def _key(rng: random.Random) -> bytes:
    return rng.randbytes(32)


def _greedy_then_garbage(rng: random.Random) -> bytes:
    """Reserve ~2 GiB (all a client may hold), then a frame that is not msgpack."""
    keys = [_key(rng) for _ in range(2000)]
    return _msg(type="reserve", keys=keys, sizes=[1 << 20] * 2000) + _frame(rng.randbytes(20))


_ABSURD_SIZES = (-1, 0, 1, -(2**63), 2**40, 2**63 - 1)
_ABSURD_TAIL = {"root": b"x", "tokens": b"abc", "chunk_size_tokens": -1, "min_tokens": 0}
_FUZZ: list[Callable[[random.Random], bytes]] = [
    lambda r: r.randbytes(r.randint(1, 200)),
    lambda r: _frame(r.randbytes(r.randint(1, 300))),
    lambda r: struct.pack(">I", r.choice([p.MAX_FRAME_BYTES + 1, 1 << 31, 0xFFFFFFFF])),
    lambda r: struct.pack(">I", 1000) + r.randbytes(10),
    lambda r: _frame(b""),
    lambda r: _msg(type="reserve", keys=[_key(r)], sizes=[r.choice(_ABSURD_SIZES)]),
    lambda r: _msg(type="reserve", keys=[_key(r), _key(r)], sizes=[100]),
    lambda r: _msg(type="reserve", keys=[b"short"], sizes=[1000]),
    lambda r: _msg(type="reserve", keys=[_key(r) for _ in range(2000)], sizes=[1 << 20] * 2000),
    lambda r: _msg(type="reserve", keys=[_key(r)], sizes=[64 << 10]) + _frame(r.randbytes(20)),
    lambda r: _msg(type="reserve", keys="not a list", sizes=None),
    lambda r: _msg(type="read", keys=[b"x" * 33]),
    lambda r: _msg(type="read", keys=[_key(r) for _ in range(20_000)]),
    lambda r: _msg(type="release", lease_id=r.choice([-1, 0, 2**62])),
    lambda r: _msg(type="flush", timeout_s=r.choice([-5.0, 0.0, 1e9, float("nan")])),
    lambda r: _msg(type="commit", keys=[_key(r)], aborted=[_key(r)]),
    lambda r: _msg(type="delete", keys=[b""]),
    lambda r: _msg(type="remember", parents=[_key(r)], children=[], tokens=[b"abc"]),
    lambda r: _msg(type="remember", parents=[_key(r)], children=[_key(r)], tokens=[b"abc"]),
    lambda r: _msg(type="lookup", keys=[_key(r)] * 5, tail=_ABSURD_TAIL),
    lambda r: _msg(type="hello", version=p.PROTOCOL_VERSION, client_name="x" * 500_000, pid=-1),
    lambda r: _msg(type="hello", version=-1, client_name="x", pid=1),
    lambda r: _msg(type="stats"),
    lambda r: _msg(type="nope", keys=[]),
]
"""Fuzzed payloads: raw garbage, broken frames, and hand-built messages with absurd fields."""
