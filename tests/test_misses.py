"""Why did it miss? Every reason `kvdepot.misses` names, produced for real and counted in
tokens: never stored, evicted (from which tier), corrupt, tier unavailable, another namespace,
below `min_reuse_fraction`; and the counts travel to the daemon's `/stats`, `/metrics` and
`kvdepot stats`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvdepot import CacheEngine, Metrics, load_config
from kvdepot.continuations import ContinuationIndex
from kvdepot.keys import ChunkKey
from kvdepot.misses import GoneLedger, clamp_missed, split_missed
from kvdepot.store import TieredStore, open_store
from kvdepot.tiers.disk import DiskTier
from tests.helpers import (
    CHUNK,
    LAYOUTS,
    Daemon,
    free_port,
    kv_for,
    kvdepot_stats,
    make_engine,
    make_keys,
    tiny_llama,
)

CHUNK_ROOM = 3 * 2 * CHUNK * 2 * 8 * 4 + 256  # a float32 chunk of the helpers' layout, stored


def missed(metrics: Metrics) -> dict[str, float]:
    """`kvdepot_engine_miss_tokens_total` as {"reason" or "reason:tier": tokens}."""
    out = {}
    for family in metrics.miss_tokens.collect():
        for s in family.samples:
            if s.name.endswith("_total") and s.value:
                reason, tier = s.labels["reason"], s.labels["tier"]
                out[f"{reason}:{tier}" if tier else reason] = s.value
    return out


def embedded(tmp_path: Path, **overrides: object) -> TieredStore:
    """A store as `open_store` builds it (its tiers count into the store's metrics)."""
    settings: dict[str, object] = {"memory.capacity_bytes": 64 << 20, "memory.prefault": False}
    settings.update(overrides)
    return open_store(load_config(env={}, overrides=settings))


@pytest.fixture
def small(tmp_path: Path) -> Iterator[TieredStore]:
    """RAM for ~10 chunks over a disk for ~20: eviction happens within a few prompts."""
    store = embedded(
        tmp_path,
        **{
            "memory.capacity_bytes": 10 * CHUNK_ROOM,
            "disk.path": str(tmp_path / "disk"),
            "disk.capacity_bytes": 20 * CHUNK_ROOM,
        },
    )
    yield store
    store.close()


def prompt(seed: int, num_tokens: int = 4 * CHUNK) -> list[int]:
    return [seed * 1000 + i for i in range(num_tokens)]


def test_a_prompt_never_stored_misses_as_never_stored(tmp_path: Path) -> None:
    with embedded(tmp_path) as store:
        engine = make_engine(store)
        assert engine.lookup(prompt(1)) == 0
        assert missed(engine.metrics) == {"never_stored": 4 * CHUNK}
        engine.store(prompt(1), kv_for(engine, 4 * CHUNK))
        longer = prompt(1, 6 * CHUNK)
        assert engine.lookup(longer) == 4 * CHUNK
        assert missed(engine.metrics) == {"never_stored": 6 * CHUNK}  # + the 2 new chunks


def test_evicted_names_the_tier_that_dropped_the_chunk_last(small: TieredStore) -> None:
    engine = make_engine(small, partial_match=False)
    engine.store(prompt(0), kv_for(engine, 4 * CHUNK))
    assert small.flush()
    # Evicted from RAM but on disk: a hit, not a miss.
    for seed in range(1, 4):
        engine.store(prompt(seed), kv_for(engine, 4 * CHUNK, seed))
        assert small.flush()
    assert not any(small.memory.contains([k])[0] for k in engine.chunk_keys(prompt(0)))
    assert engine.lookup(prompt(0)) == 4 * CHUNK
    assert missed(engine.metrics) == {}
    # Off the disk too (20 chunks of room, 4 x 7 stored): its last tier dropped it.
    for seed in range(4, 8):
        engine.store(prompt(seed), kv_for(engine, 4 * CHUNK, seed))
        assert small.flush()
    assert engine.lookup(prompt(1)) == 0
    assert missed(engine.metrics) == {"evicted:disk": 4 * CHUNK}


def test_evicted_from_ram_with_no_disk_says_memory(tmp_path: Path) -> None:
    with embedded(tmp_path, **{"memory.capacity_bytes": 6 * CHUNK_ROOM}) as store:
        engine = make_engine(store, partial_match=False)
        for seed in range(4):
            engine.store(prompt(seed), kv_for(engine, 4 * CHUNK, seed))
        assert engine.lookup(prompt(0)) == 0
        assert missed(engine.metrics) == {"evicted:memory": 4 * CHUNK}


def test_a_corrupt_chunk_is_a_miss_for_corruption(small: TieredStore) -> None:
    engine = make_engine(small, partial_match=False)
    tokens = prompt(0)
    engine.store(tokens, kv_for(engine, 4 * CHUNK))
    assert small.flush()
    keys = engine.chunk_keys(tokens)
    small.memory.delete(keys)  # served from disk from now on
    disk = small.lower[0]
    assert isinstance(disk, DiskTier)
    path = disk._path(keys[2])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped payload byte: the checksum catches it when read
    path.write_bytes(bytes(data))
    assert engine.lookup(tokens) == 4 * CHUNK  # the disk still lists it
    assert engine.retrieve(tokens).shape[2] == 2 * CHUNK  # read, found corrupt, deleted
    assert engine.lookup(tokens) == 2 * CHUNK
    assert missed(engine.metrics) == {"corrupt:disk": 2 * CHUNK}


def test_a_tier_that_fails_makes_its_misses_tier_unavailable(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every call fails
    with embedded(tmp_path, **{"valkey.address": dead, "valkey.connect_timeout_ms": 100}) as store:
        engine = make_engine(store)
        assert engine.lookup(prompt(0)) == 0
        assert missed(engine.metrics) == {"tier_unavailable:valkey": 4 * CHUNK}


def test_tokens_another_namespace_holds_are_told_apart(tmp_path: Path) -> None:
    """Two engines of one model, one in fp32 and one in fp16 (the classic "should share but
    do not"): what the other holds is `other_namespace`, the rest `never_stored`."""
    import torch

    with embedded(tmp_path) as store:
        fp32 = CacheEngine(store, LAYOUTS[torch.float32], "m", chunk_size_tokens=CHUNK,
                           metrics=Metrics())  # fmt: skip
        fp16 = CacheEngine(store, LAYOUTS[torch.float16], "m", chunk_size_tokens=CHUNK,
                           metrics=Metrics())  # fmt: skip
        fp32.store(prompt(0), kv_for(fp32, 4 * CHUNK))
        fp32.lookup(prompt(0))  # its namespace's root is known to the store from a lookup
        assert fp16.lookup(prompt(0, 6 * CHUNK)) == 0
        assert missed(fp16.metrics) == {"other_namespace": 4 * CHUNK, "never_stored": 2 * CHUNK}
        # A prompt that parts from the stored one inside its second chunk: 1.5 chunks held.
        fp16.metrics = Metrics()
        fp16.lookup(prompt(0)[: CHUNK + CHUNK // 2] + prompt(9)[: 2 * CHUNK])
        assert missed(fp16.metrics) == {
            "other_namespace": CHUNK + CHUNK // 2,
            "never_stored": 2 * CHUNK,
        }
        # A tenant is a namespace too; a prompt nobody holds is never_stored for all.
        assert fp32.lookup(prompt(0), tenant_salt=b"alice") == 0
        assert fp32.lookup(prompt(5), tenant_salt=b"alice") == 0
        assert missed(fp32.metrics) == {"other_namespace": 4 * CHUNK, "never_stored": 4 * CHUNK}


def test_the_roots_survive_a_restart_with_the_index(tmp_path: Path) -> None:
    index = ContinuationIndex()
    root, child = make_keys(1, bytes(16))[0], make_keys(1, b"\x01" * 16)[0]
    other_root = ChunkKey(b"\x01" * 16, bytes(16))
    tokens = bytes(range(4 * 4))
    index.add([(other_root, child, tokens)])
    index.note_root(other_root)
    index.save(tmp_path / "index")
    loaded = ContinuationIndex()
    assert loaded.load(tmp_path / "index") == 1
    assert loaded.held_elsewhere(root, tokens, lambda keys: [True] * len(keys)) == 4
    assert loaded.held_elsewhere(other_root, tokens, lambda keys: [True] * len(keys)) == 0


def test_below_min_reuse_counts_what_the_connector_did_not_load(store: TieredStore) -> None:
    from kvdepot.connectors.transformers import KVDepotGenerator

    generator = KVDepotGenerator.for_model(tiny_llama(), store, chunk_size_tokens=16)
    generator.generate(list(range(10, 30)), max_new_tokens=1)  # stores 16 tokens + the tail
    result = generator.generate(list(range(10, 26)) + list(range(100, 200)), max_new_tokens=1)
    assert result.num_cached_tokens == 0  # 16 of 116 tokens: below 20 %, not loaded
    assert missed(generator.engine.metrics)["below_min_reuse"] == 16


def test_the_ledger_and_client_labels_are_bounded() -> None:
    ledger = GoneLedger(max_entries=3)
    keys = make_keys(5)
    ledger.note(keys, "evicted", "disk")
    assert (
        len(ledger) == 3 and ledger.why(keys[0]) is None and ledger.why(keys[4]) == ("evicted:disk")
    )
    ledger.note([keys[4]], "corrupt", "s3")
    assert ledger.why(keys[4]) == "corrupt:s3"
    junk = {f"reason{i}:tier{i}": 5 for i in range(40)} | {"evicted:disk": -3}
    clamped = clamp_missed(junk)
    assert set(clamped) <= {"never_stored:other"} and sum(clamped.values()) <= 16 * 5
    assert clamp_missed({"evicted:disk": 7, "corrupt:nowhere": 2}) == {
        "evicted:disk": 7,
        "corrupt:other": 2,
    }
    assert split_missed(100, 0, "", 30) == {"other_namespace": 30, "never_stored": 70}
    assert split_missed(100, 40, "evicted:memory", 30) == {"evicted:memory": 60}
    assert split_missed(100, 100, "", 0) == {}


def test_the_daemon_counts_miss_reasons_per_model_and_shows_them(tmp_path: Path) -> None:
    import torch

    daemon = Daemon(tmp_path, http_port=free_port()).start()
    try:
        client = daemon.client(client_name="engine")
        engine = CacheEngine(client, LAYOUTS[torch.float32], "org/m@main", chunk_size_tokens=CHUNK)
        assert engine.lookup(prompt(0)) == 0
        engine.store(prompt(0), kv_for(engine, 4 * CHUNK))
        client.flush()  # written down first: the delete then removes it everywhere
        client.delete(engine.chunk_keys(prompt(0))[2:3])  # as a reader that found it corrupt
        assert engine.lookup(prompt(0)) == 2 * CHUNK
        client.flush()  # a call that waits: the posted reports are in
        stats = json.loads(daemon.http("/stats")[1])
        assert stats["models"]["org/m@main"]["missed"] == {
            "never_stored": 4 * CHUNK,
            "corrupt:memory": 2 * CHUNK,
        }
        line = 'kvdepot_model_miss_tokens_total{model="org/m@main",reason="corrupt",tier="memory"}'
        assert f"{line} {2.0 * CHUNK}" in daemon.http("/metrics")[1].decode()
        shown = kvdepot_stats(daemon.socket_path)
        assert "missed: never_stored 64 (67%), corrupt:memory 32 (33%)" in shown
        client.close()
    finally:
        daemon.stop()
    # The daemon is gone: the engine's own count says so.
    dead_engine = CacheEngine(
        daemon.client(), LAYOUTS[torch.float32], "org/m@main", chunk_size_tokens=CHUNK
    )
    assert dead_engine.lookup(prompt(0)) == 0
    assert missed(dead_engine.metrics) == {"tier_unavailable:daemon": 4 * CHUNK}
