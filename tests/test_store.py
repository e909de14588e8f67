"""TieredStore: write-back to disk, promotion, restart, bounded queue, failing tiers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from kvdepot import (
    CacheEngine,
    ConfigError,
    DType,
    KVLayout,
    Metrics,
    TieredStore,
    load_config,
    open_store,
)
from kvdepot.codec import HEADER_NBYTES, EncodedChunk, RawCodec
from kvdepot.codec.format import open_blob
from kvdepot.errors import CorruptChunk
from kvdepot.keys import ChunkKey
from kvdepot.tiers.arena import ArenaAllocator, HostBuffer
from kvdepot.tiers.base import TierUsage
from kvdepot.tiers.disk import DiskTier
from kvdepot.tiers.memory import MemoryTier
from tests.helpers import chunk_bytes, make_chunk, random_key

SLOT = ArenaAllocator.footprint(make_chunk(0).nbytes)
CHUNK = 16
LAYOUT = KVLayout(2, 2, 8, DType.FLOAT16)


def make_store(tmp_path: Path, ram_slots: int = 16, queue: int = 64) -> TieredStore:
    metrics = Metrics()
    memory = MemoryTier(
        HostBuffer.allocate(ram_slots * SLOT, prefault=False), metrics=metrics.tier("memory")
    )
    disk = DiskTier.open(tmp_path / "disk", 1 << 30, fsync=False, metrics=metrics.tier("disk"))
    return TieredStore(memory, [disk], metrics=metrics, write_back_queue_chunks=queue).start()


def payload(blob: bytes | memoryview) -> bytes:
    """A blob's payload: disk copies differ from RAM ones only by the sealed header."""
    return bytes(blob[HEADER_NBYTES:])


def dropped(store: TieredStore, reason: str) -> float:
    value = store.metrics.registry.get_sample_value(
        "kvdepot_store_dropped_writes_total", {"reason": reason}
    )
    return value or 0.0


def test_put_writes_back_to_disk(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    keys = [random_key() for _ in range(3)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
    assert store.flush(5)
    assert store.lower[0].contains(keys) == [True, True, True]
    assert store.lower[0].get(keys[:1])[0] is not None
    store.close()


def test_disk_hit_is_promoted_to_ram(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    keys = [random_key() for _ in range(3)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
    store.flush(5)
    store.memory.clear()
    assert store.memory.contains(keys) == [False] * 3
    assert store.lookup(keys) == 3
    with store.read(keys) as blobs:
        assert [payload(b) for b in blobs] == [
            payload(chunk_bytes(make_chunk(i))) for i in range(3)
        ]
    assert store.memory.contains(keys) == [True] * 3
    store.close()


def test_read_joins_ram_head_and_disk_tail(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    keys = [random_key() for _ in range(4)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
    store.flush(5)
    store.memory.delete(keys[2:])
    store.lower[0].delete(keys[:1])
    with store.read(keys) as blobs:
        assert len(blobs) == 4
        assert payload(blobs[3]) == payload(chunk_bytes(make_chunk(3)))


def test_read_stops_at_first_gap(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    keys = [random_key() for _ in range(4)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
    store.flush(5)
    store.memory.delete(keys[1:2])
    store.lower[0].delete(keys[1:2])
    assert store.lookup(keys) == 1
    with store.read(keys) as blobs:
        assert len(blobs) == 1
    store.close()


def test_restart_serves_from_disk(tmp_path: Path) -> None:
    config = load_config(
        overrides={"memory.capacity_bytes": "16MiB", "disk.path": str(tmp_path / "d"),
                   "memory.prefault": False, "chunk_size_tokens": CHUNK}
    )  # fmt: skip
    tokens = list(range(5 * CHUNK))
    kv = torch.randn(LAYOUT.chunk_shape(len(tokens))).to(torch.float16)
    with open_store(config) as store:
        CacheEngine(store, LAYOUT, "m", chunk_size_tokens=CHUNK).store(tokens, kv)
    with open_store(config) as store:
        engine = CacheEngine(store, LAYOUT, "m", chunk_size_tokens=CHUNK)
        assert store.memory.usage().num_objects == 0
        assert engine.lookup(tokens) == 5 * CHUNK
        assert torch.equal(engine.retrieve(tokens), kv)


class _BlockingTier:
    """A lower tier whose puts wait for an event: a slow disk, injected."""

    name = "slow"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stored: list[ChunkKey] = []

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [k in self.stored for k in keys]

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        return [None] * len(keys)

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int:
        self.release.wait(10)
        self.stored += [k for k, _ in items]
        return len(items)

    def delete(self, keys: Sequence[ChunkKey]) -> None: ...

    def clear(self) -> None: ...

    def usage(self) -> TierUsage:
        return TierUsage(0, 0, len(self.stored))

    def close(self) -> None: ...


def test_full_write_back_queue_drops_instead_of_blocking() -> None:
    slow = _BlockingTier()
    memory = MemoryTier(HostBuffer.allocate(64 * SLOT, prefault=False))
    store = TieredStore(memory, [slow], metrics=Metrics(), write_back_queue_chunks=2).start()
    start = time.perf_counter()
    for i in range(10):
        store.put([(random_key(), make_chunk(i))])
    assert time.perf_counter() - start < 5.0  # never waited for the 10 s blocked tier
    assert dropped(store, "queue_full") >= 7  # one in flight, two queued
    assert store.memory.usage().num_objects == 10  # RAM got everything
    slow.release.set()
    assert store.flush(10)
    assert 1 <= len(slow.stored) <= 3
    store.close()


class _BrokenTier(_BlockingTier):
    """A lower tier that raises on every call: a dead server, injected."""

    name = "broken"

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        raise OSError("tier down")

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        raise OSError("tier down")

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int:
        raise OSError("tier down")


def test_failing_lower_tier_is_a_miss_not_an_error() -> None:
    memory = MemoryTier(HostBuffer.allocate(8 * SLOT, prefault=False))
    store = TieredStore(memory, [_BrokenTier()], metrics=Metrics()).start()
    keys = [random_key() for _ in range(2)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
    assert store.flush(5)
    other = [random_key()]
    assert store.lookup(keys + other) == 2
    assert store.contains(other) == [False]
    with store.read(other) as blobs:
        assert blobs == []
    store.close()


def test_corrupt_disk_chunk_is_a_miss_through_the_store(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    keys = [random_key() for _ in range(2)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
    store.flush(5)
    store.memory.clear()
    victim = next((tmp_path / "disk").rglob(keys[1].chunk_hash.hex() + "*"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with store.read(keys) as blobs:
        assert len(blobs) == 1
    assert store.lookup(keys) == 1
    value = store.metrics.registry.get_sample_value(
        "kvdepot_tier_corrupt_chunks_total", {"tier": "disk"}
    )
    assert value == 1.0
    store.close()


@pytest.mark.parametrize("policy", ["lru", "prefix-aware"])
def test_open_store_honours_config(tmp_path: Path, policy: str) -> None:
    config = load_config(
        overrides={"memory.capacity_bytes": "1MiB", "memory.eviction_policy": policy,
                   "memory.prefault": False}
    )  # fmt: skip
    with open_store(config) as store:
        assert store.usage()["memory"].capacity_bytes == 1 << 20
        assert store.lower == []


def test_unusable_disk_path_runs_without_disk_tier(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = load_config(
        overrides={"memory.capacity_bytes": "1MiB", "memory.prefault": False,
                   "disk.path": str(blocker / "sub")}
    )  # fmt: skip
    with open_store(config) as store:
        assert store.lower == []
        key = random_key()
        assert store.put([(key, make_chunk(1))]) == 1
        assert store.lookup([key]) == 1


def test_promotion_falls_back_to_bytes_when_ram_is_too_small(tmp_path: Path) -> None:
    store = make_store(tmp_path, ram_slots=1)
    keys = [random_key() for _ in range(3)]
    for i, key in enumerate(keys):  # one at a time: RAM holds only the last
        store.put([(key, make_chunk(i))])
        store.flush(5)
    store.memory.clear()
    with store.read(keys) as blobs:
        assert [payload(b) for b in blobs] == [
            payload(chunk_bytes(make_chunk(i))) for i in range(3)
        ]
    assert store.memory.usage().num_objects == 1
    store.close()


def test_disk_reads_count_as_disk_hits(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    keys = [random_key() for _ in range(2)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
    store.flush(5)
    store.memory.clear()
    with store.read(keys):
        pass
    sample = store.metrics.registry.get_sample_value
    assert sample("kvdepot_tier_ops_total", {"tier": "disk", "op": "get", "outcome": "hit"}) == 2
    read = sample("kvdepot_tier_bytes_total", {"tier": "disk", "op": "read"})
    assert read == 2 * make_chunk(0).nbytes
    store.close()


def test_chunks_queued_for_write_back_are_not_evicted_first() -> None:
    slow = _BlockingTier()
    memory = MemoryTier(HostBuffer.allocate(4 * SLOT, prefault=False))
    store = TieredStore(memory, [slow], metrics=Metrics()).start()
    first, second = random_key(), random_key()
    store.put([(first, make_chunk(1))])
    store.put([(second, make_chunk(2))])  # queued too: half the RAM may wait for write-back
    for i in range(6):  # more than RAM holds: evicts, but never what waits for the disk
        store.put([(random_key(), make_chunk(10 + i))])
    assert store.memory.contains([first, second]) == [True, True]
    assert dropped(store, "queue_full") == 6
    slow.release.set()
    assert store.flush(10)
    assert slow.stored == [first, second]
    store.close()


def test_write_back_queue_counts_chunks_not_batches() -> None:
    slow = _BlockingTier()
    memory = MemoryTier(HostBuffer.allocate(64 * SLOT, prefault=False))
    store = TieredStore(memory, [slow], metrics=Metrics(), write_back_queue_chunks=4).start()
    store.put([(random_key(), make_chunk(0))])  # taken by the writer, which blocks
    time.sleep(0.2)
    store.put([(random_key(), make_chunk(i)) for i in range(1, 4)])  # 1 + 3 chunks: fits
    store.put([(random_key(), make_chunk(i)) for i in range(4, 6)])  # 6 > 4: dropped
    assert dropped(store, "queue_full") == 2
    slow.release.set()
    assert store.flush(10)
    assert len(slow.stored) == 4
    store.close()


def test_chunks_ram_cannot_hold_are_counted_as_dropped() -> None:
    memory = MemoryTier(HostBuffer.allocate(SLOT // 2, prefault=False))
    store = TieredStore(memory, metrics=Metrics())
    assert store.put([(random_key(), make_chunk(0))]) == 0
    assert dropped(store, "ram_full") == 1
    store.close()


class _ExplodingDisk(_BlockingTier):
    """A tier that claims a chunk, then fails while reading it into RAM: injected."""

    name = "exploding"

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [True] * len(keys)

    def blob_sizes(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        return [make_chunk(0).nbytes] * len(keys)

    def read_into(self, items: Sequence[tuple[ChunkKey, memoryview]]) -> list[bool]:
        raise ConnectionResetError("injected")


def test_failed_promotion_leaks_no_ram_and_raises_nothing() -> None:
    memory = MemoryTier(HostBuffer.allocate(4 * SLOT, prefault=False))
    store = TieredStore(memory, [_ExplodingDisk()], metrics=Metrics())
    key = random_key()
    with store.read([key]) as blobs:
        assert blobs == []
    assert store.memory.usage().used_bytes == 0
    assert store.put([(key, make_chunk(1))]) == 1
    assert store.memory.contains([key]) == [True]
    store.close()


def test_read_serves_ram_chunks_after_a_gap_without_rereading_them(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    keys = [random_key() for _ in range(4)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
    store.flush(5)
    store.memory.delete(keys[:1])  # the head only is gone from RAM
    with store.read(keys) as blobs:
        assert len(blobs) == 4
    sample = store.metrics.registry.get_sample_value
    assert sample("kvdepot_tier_ops_total", {"tier": "disk", "op": "get", "outcome": "hit"}) == 1
    store.close()


def test_reserve_that_can_never_fit_evicts_nothing() -> None:
    memory = MemoryTier(HostBuffer.allocate(4 * SLOT, prefault=False))
    store = TieredStore(memory, metrics=Metrics())
    keys = [random_key() for _ in range(4)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
    with store.read(keys[:3]):  # 3 of 4 slots pinned: a 2-slot chunk cannot fit
        big = make_chunk(7, shape=(2, 2, 16, 2, 4))
        assert store.put([(random_key(), big)]) == 0
        assert store.memory.contains(keys) == [True] * 4
    store.close()


@pytest.mark.parametrize("codec", ["lossless", "int8", "cachegen"])
def test_disk_tier_in_its_own_codec_round_trips_through_ram(tmp_path: Path, codec: str) -> None:
    config = load_config(
        overrides={"memory.capacity_bytes": "16MiB", "memory.prefault": False,
                   "disk.path": str(tmp_path / "d"), "disk.codec": codec, "disk.fsync": False,
                   "chunk_size_tokens": CHUNK}
    )  # fmt: skip
    layout = KVLayout(2, 2, 32, DType.BFLOAT16)
    tokens = list(range(6 * CHUNK))
    kv = torch.randn(layout.chunk_shape(len(tokens))).to(torch.bfloat16)
    with open_store(config) as store:
        engine = CacheEngine(store, layout, "m", chunk_size_tokens=CHUNK)
        engine.store(tokens, kv)
        assert store.flush(10)
        raw_nbytes = store.usage()["memory"].used_bytes
        disk_nbytes = store.usage()["disk"].used_bytes
        store.memory.clear()
        out = engine.retrieve(tokens)  # from disk, decoded back to raw in RAM
        assert out.shape == kv.shape
        assert store.memory.usage().num_objects == 6
        keys = engine.chunk_keys(tokens)
        with store.memory.read(keys) as views:
            codecs = {
                open_blob(v, key=k, verify=False)[0].codec_id
                for v, k in zip(views, keys, strict=True)
                if v is not None
            }
        assert codecs == {RawCodec.codec_id}  # RAM holds raw chunks only
    assert disk_nbytes < raw_nbytes  # stored smaller than raw
    if codec == "lossless":
        assert torch.equal(out, kv)
    else:
        error = (out.float() - kv.float()).norm() / kv.float().norm()
        assert error < 0.1


def _disk_store(tmp_path: Path, codec: str) -> TieredStore:
    config = load_config(
        overrides={"memory.capacity_bytes": "16MiB", "memory.prefault": False,
                   "disk.path": str(tmp_path / "d"), "disk.codec": codec, "disk.fsync": False}
    )  # fmt: skip
    return open_store(config)


def test_chunks_written_in_another_codec_are_decoded_after_a_codec_change(
    tmp_path: Path,
) -> None:
    keys = [random_key() for _ in range(3)]
    with _disk_store(tmp_path, "lossless") as store:
        store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
        assert store.flush(5)
    # The files on disk are still lossless:
    with _disk_store(tmp_path, "raw") as store, store.read(keys) as blobs:
        assert [payload(b) for b in blobs] == [
            payload(chunk_bytes(make_chunk(i))) for i in range(3)
        ]
        pairs = zip(blobs, keys, strict=True)
        codecs = {open_blob(b, key=k, verify=False)[0].codec_id for b, k in pairs}
        assert codecs == {RawCodec.codec_id}  # decoded on promotion, as RAM holds raw only


class _UndecodableTier(_BlockingTier):
    """A codec tier whose decode fails after the store reserved room: injected."""

    name = "undecodable"

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [True] * len(keys)

    def read_decoded(self, key: ChunkKey, reserve: Callable[[int], memoryview | None]) -> bool:
        buffer = reserve(make_chunk(0).nbytes)
        assert buffer is not None
        raise CorruptChunk("injected: payload does not decode")


def test_a_chunk_that_does_not_decode_is_a_miss_counted_and_deleted() -> None:
    memory = MemoryTier(HostBuffer.allocate(4 * SLOT, prefault=False))
    tier = _UndecodableTier()
    store = TieredStore(memory, [tier], metrics=Metrics())
    deleted: list[ChunkKey] = []
    tier.delete = deleted.extend  # type: ignore[method-assign]
    key = random_key()
    with store.read([key]) as blobs:
        assert blobs == []
    assert store.memory.usage().used_bytes == 0  # the reserved slot given back
    assert _corrupt_count(store, "undecodable") == 1
    assert deleted == [key]
    store.close()


def test_unknown_tier_codec_is_a_clear_config_error(tmp_path: Path) -> None:
    overrides = {"memory.capacity_bytes": "1MiB", "memory.prefault": False,
                 "disk.path": str(tmp_path / "d"), "disk.codec": "zip9000"}  # fmt: skip
    with pytest.raises(ConfigError, match="zip9000"):
        load_config(overrides=overrides)  # with the rest of the config, not at open
    config = load_config(overrides={**overrides, "disk.codec": "raw"})
    config.disk.codec = "zip9000"  # set behind validation's back: open_store still refuses
    with pytest.raises(ConfigError, match="zip9000"):
        open_store(config)


def _corrupt_count(store: TieredStore, tier: str) -> float:
    value = store.metrics.registry.get_sample_value(
        "kvdepot_tier_corrupt_chunks_total", {"tier": tier}
    )
    return value or 0.0


@pytest.mark.parametrize("how", ["swap", "copy"])
def test_a_chunk_file_at_another_keys_path_is_never_a_hit(tmp_path: Path, how: str) -> None:
    store = make_store(tmp_path)
    keys = [random_key() for _ in range(6)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])  # same sizes, other bytes
    assert store.flush(5)
    store.close()
    paths = [next((tmp_path / "disk").rglob(k.chunk_hash.hex() + "*")) for k in keys]
    for a, b in zip(paths[0::2], paths[1::2], strict=True):  # a botched restore or rsync
        data_a, data_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(data_b)
        if how == "swap":
            b.write_bytes(data_a)
    store = make_store(tmp_path)
    for i, key in enumerate(keys):
        with store.read([key]) as blobs:
            if blobs:  # only a file that still holds its own chunk may be served
                assert payload(blobs[0]) == payload(chunk_bytes(make_chunk(i)))
    num_moved = len(keys) if how == "swap" else len(keys) // 2
    assert _corrupt_count(store, "disk") == num_moved
    assert sum(store.lower[0].contains(keys)) == len(keys) - num_moved  # deleted where they lay
    store.close()


class _MisplacingTier:
    """A plug-in tier with a bug: it answers every key with the blob of the first it stored."""

    name = "plugin"

    def __init__(self) -> None:
        self.blobs: dict[ChunkKey, bytes] = {}
        self.deleted: list[ChunkKey] = []

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [bool(self.blobs)] * len(keys)

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        first = next(iter(self.blobs.values()), None)
        return [first] * len(keys)

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int:
        for key, chunk in items:
            sealed = chunk.bound(key).sealed()
            self.blobs[key] = sealed.header.pack() + bytes(sealed.contiguous_payload())
        return len(items)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        self.deleted += keys

    def clear(self) -> None:
        self.blobs.clear()

    def usage(self) -> TierUsage:
        return TierUsage(0, 0, len(self.blobs))

    def close(self) -> None:
        pass


def test_a_plugin_tiers_blob_under_the_wrong_key_is_corrupt_and_a_miss() -> None:
    plugin = _MisplacingTier()
    store = TieredStore(
        MemoryTier(HostBuffer.allocate(8 * SLOT, prefault=False)), [plugin], metrics=Metrics()
    ).start()
    keys = [random_key() for _ in range(3)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
    assert store.flush(5)
    store.memory.clear()
    with store.read(keys) as blobs:
        assert len(blobs) == 1  # the first key's own blob; the others are strangers
        assert payload(blobs[0]) == payload(chunk_bytes(make_chunk(0)))
    assert _corrupt_count(store, "plugin") == 1
    assert plugin.deleted == [keys[1]]
    store.close()


def test_a_chain_promoted_from_disk_in_one_batch_stops_at_a_stranger(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    keys = [random_key() for _ in range(8)]
    store.put([(k, make_chunk(i)) for i, k in enumerate(keys)])
    assert store.flush(5)
    store.memory.clear()
    stranger = next((tmp_path / "disk").rglob(keys[7].chunk_hash.hex() + "*")).read_bytes()
    next((tmp_path / "disk").rglob(keys[4].chunk_hash.hex() + "*")).write_bytes(stranger)

    with store.read(keys) as blobs:
        assert [payload(b) for b in blobs] == [
            payload(chunk_bytes(make_chunk(i))) for i in range(4)
        ]
    assert store.memory.usage().num_objects == 4  # the slots read past the stranger given back
    assert _corrupt_count(store, "disk") == 1
    assert store.lookup(keys) == 4
    store.close()


def test_a_chain_bigger_than_ram_is_served_whole_from_disk(tmp_path: Path) -> None:
    store = make_store(tmp_path, ram_slots=3)
    keys = [random_key() for _ in range(6)]
    for i, key in enumerate(keys):  # one at a time: RAM holds 3
        store.put([(key, make_chunk(i))])
        assert store.flush(5)
    store.memory.clear()
    with store.read(keys) as blobs:
        assert [payload(b) for b in blobs] == [
            payload(chunk_bytes(make_chunk(i))) for i in range(6)
        ]
        assert store.memory.usage().num_objects == 3  # the rest came as bytes, not promoted
    store.close()
