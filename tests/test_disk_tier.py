"""DiskTier: round trips, byte budget, restart recovery, corruption, disk faults, concurrency."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdepot.codec import (
    HEADER_NBYTES,
    decode_chunk,
    default_registry,
)
from kvdepot.errors import ConfigError, TierUnavailable
from kvdepot.keys import CacheNamespace, ChunkHash, ChunkKey, chunk_keys
from kvdepot.layout import DType
from kvdepot.metrics import Metrics
from kvdepot.tiers.disk import DiskTier
from kvdepot.tiers.policy import LRUPolicy
from tests.helpers import blob_of, fp16_array, random_key, raw_chunk

SHAPE = (4, 8)  # 64-byte float16 payload
CHUNK_NBYTES = HEADER_NBYTES + 64


def make_array(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return fp16_array(seed, shape)


def decoded(blob: bytes) -> np.ndarray:
    dtype, array = decode_chunk(blob, default_registry())
    assert dtype is DType.FLOAT16
    return array


def flip_bit(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1 :]


def chunk_path(root: Path, key: ChunkKey) -> Path:
    """Where the documented layout puts `key`'s file."""
    chunk_hex = key.chunk_hash.hex()
    return root / key.namespace.hex() / chunk_hex[:2] / f"{chunk_hex}.kvc"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"tier": "disk", **labels})
    return value or 0.0


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def open_tier(tmp_path: Path, metrics: Metrics) -> Iterator[Callable[..., DiskTier]]:
    """Opens tiers on `tmp_path / "disk"` (fsync off for speed) and closes them afterwards."""
    tiers: list[DiskTier] = []

    def _open(capacity_bytes: int = 1 << 20, *, fsync: bool = False) -> DiskTier:
        tier = DiskTier.open(
            tmp_path / "disk", capacity_bytes, fsync=fsync, metrics=metrics.tier("disk")
        )
        tiers.append(tier)
        return tier

    yield _open
    for tier in tiers:
        tier.close()


def test_round_trip_is_byte_identical(tmp_path: Path) -> None:
    tier = DiskTier.open(tmp_path, 1 << 20)  # defaults: fsync on, own metrics
    key, array = random_key(), make_array(0)
    chunk = raw_chunk(array)
    assert tier.put([(key, chunk)]) == 1
    assert tier.contains([key, random_key()]) == [True, False]
    blob, miss = tier.get([key, random_key()])
    assert miss is None
    assert blob == blob_of(chunk, key)
    np.testing.assert_array_equal(decoded(blob), array)
    assert tier.usage().used_bytes == CHUNK_NBYTES
    assert tier.usage().num_objects == 1
    tier.close()


def test_strided_payload_round_trips(open_tier: Callable[..., DiskTier]) -> None:
    tier = open_tier()
    array = make_array(1, (8, 8))[:, ::2]  # not contiguous
    key = random_key()
    assert tier.put([(key, raw_chunk(array))]) == 1
    np.testing.assert_array_equal(decoded(tier.get([key])[0] or b""), array)


def test_put_of_existing_key_is_a_noop(open_tier: Callable[..., DiskTier], tmp_path: Path) -> None:
    tier = open_tier()
    key = random_key()
    first = raw_chunk(make_array(0))
    assert tier.put([(key, first)]) == 1
    path = chunk_path(tmp_path / "disk", key)
    mtime_ns = path.stat().st_mtime_ns
    assert tier.put([(key, raw_chunk(make_array(1)))]) == 1
    assert tier.get([key]) == [blob_of(first, key)]
    assert path.stat().st_mtime_ns == mtime_ns
    assert tier.usage().num_objects == 1


def test_files_follow_the_documented_layout(
    open_tier: Callable[..., DiskTier], tmp_path: Path
) -> None:
    tier = open_tier()
    key = ChunkKey(os.urandom(16), ChunkHash(os.urandom(16)))
    chunk = raw_chunk(make_array(0))
    tier.put([(key, chunk)])
    assert chunk_path(tmp_path / "disk", key).read_bytes() == blob_of(chunk, key)
    assert list((tmp_path / "disk" / ".tmp").iterdir()) == []


def test_eviction_keeps_the_byte_budget(
    open_tier: Callable[..., DiskTier], metrics: Metrics
) -> None:
    tier = open_tier(capacity_bytes=3 * CHUNK_NBYTES)
    keys = [random_key() for _ in range(10)]
    for i, key in enumerate(keys):
        assert tier.put([(key, raw_chunk(make_array(i)))]) == 1
        assert tier.usage().used_bytes <= tier.capacity_bytes
    assert tier.contains(keys) == [False] * 7 + [True] * 3
    assert tier.get(keys[:7]) == [None] * 7
    assert sample(metrics, "kvdepot_tier_evictions_total") == 7
    assert sample(metrics, "kvdepot_tier_used_bytes") == 3 * CHUNK_NBYTES


def test_eviction_takes_a_chain_tail_before_its_head(open_tier: Callable[..., DiskTier]) -> None:
    tier = open_tier(capacity_bytes=3 * CHUNK_NBYTES)
    namespace = CacheNamespace("test/model", "layout")
    chain = chunk_keys(list(range(48)), 16, namespace)
    assert tier.put([(key, raw_chunk(make_array(i))) for i, key in enumerate(chain)]) == 3
    other = random_key()
    tier.put([(other, raw_chunk(make_array(9)))])
    assert tier.contains([*chain, other]) == [True, True, False, True]
    tier.put([(random_key(), raw_chunk(make_array(10)))])
    assert tier.contains(chain) == [True, False, False]
    assert tier.get(chain[1:]) == [None, None]


def test_chunk_bigger_than_capacity_is_skipped(open_tier: Callable[..., DiskTier]) -> None:
    tier = open_tier(capacity_bytes=2 * CHUNK_NBYTES)
    small = random_key()
    tier.put([(small, raw_chunk(make_array(0)))])
    big = random_key()
    assert tier.put([(big, raw_chunk(make_array(1, (64, 64))))]) == 0
    assert tier.contains([small, big]) == [True, False]


def test_delete_and_clear(open_tier: Callable[..., DiskTier], tmp_path: Path) -> None:
    tier = open_tier()
    keys = [random_key() for _ in range(4)]
    tier.put([(key, raw_chunk(make_array(i))) for i, key in enumerate(keys)])
    tier.delete([keys[0], random_key()])
    assert tier.contains(keys) == [False, True, True, True]
    assert not chunk_path(tmp_path / "disk", keys[0]).exists()
    tier.clear()
    assert tier.contains(keys) == [False] * 4
    assert tier.usage().used_bytes == 0
    assert list((tmp_path / "disk").rglob("*.kvc")) == []


def test_restart_recovers_chunks_and_removes_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    tier = DiskTier.open(root, 1 << 20)
    keys = [random_key() for _ in range(5)]
    chunks = [raw_chunk(make_array(i)) for i in range(5)]
    tier.put(list(zip(keys, chunks, strict=True)))
    tier.close()
    leftover = root / ".tmp" / "crashed-write.tmp"
    leftover.write_bytes(b"half a chunk")

    reopened = DiskTier.open(root, 1 << 20)
    assert not leftover.exists()
    assert reopened.get(keys) == [blob_of(c, k) for c, k in zip(chunks, keys, strict=True)]
    assert reopened.usage().num_objects == 5
    assert reopened.usage().used_bytes == 5 * CHUNK_NBYTES
    reopened.close()


def test_restart_ignores_foreign_names_and_deletes_headerless_files(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    DiskTier.open(root, 1 << 20).close()
    short_key = random_key()
    short = chunk_path(root, short_key)
    short.parent.mkdir(parents=True)
    short.write_bytes(b"\x00" * 10)
    foreign = root / "not-a-namespace" / "ab" / "notes.kvc"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"\x00" * 100)

    tier = DiskTier.open(root, 1 << 20)
    assert not short.exists()
    assert foreign.exists()
    assert tier.contains([short_key]) == [False]
    assert tier.usage().num_objects == 0
    tier.close()


def test_restart_over_budget_evicts_oldest_mtime_first(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    tier = DiskTier.open(root, 1 << 20, fsync=False)
    keys = [random_key() for _ in range(4)]
    tier.put([(key, raw_chunk(make_array(i))) for i, key in enumerate(keys)])
    tier.close()
    for age_s, key in zip([10, 40, 20, 30], keys, strict=True):  # oldest: keys[1], keys[3]
        os.utime(chunk_path(root, key), (1e9 - age_s, 1e9 - age_s))

    smaller = DiskTier.open(root, 2 * CHUNK_NBYTES, policy=LRUPolicy())
    assert smaller.contains(keys) == [True, False, True, False]
    assert not chunk_path(root, keys[1]).exists()
    smaller.close()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) - 5], id="torn-write"),
        pytest.param(lambda data: flip_bit(data, len(data) - 1), id="payload-bit-flip"),
        pytest.param(lambda data: flip_bit(data, 6), id="header-bit-flip"),
        pytest.param(lambda data: flip_bit(data, 44), id="checksum-bit-flip"),
        pytest.param(lambda data: b"", id="emptied"),
    ],
)
def test_damaged_chunk_is_deleted_and_missed(
    damage: Callable[[bytes], bytes],
    open_tier: Callable[..., DiskTier],
    metrics: Metrics,
    tmp_path: Path,
) -> None:
    tier = open_tier()
    key, intact = random_key(), random_key()
    tier.put([(key, raw_chunk(make_array(0))), (intact, raw_chunk(make_array(1)))])
    path = chunk_path(tmp_path / "disk", key)
    path.write_bytes(damage(path.read_bytes()))

    assert tier.get([key, intact])[0] is None
    assert not path.exists()
    assert tier.contains([key, intact]) == [False, True]
    assert sample(metrics, "kvdepot_tier_corrupt_chunks_total") == 1
    assert tier.usage().num_objects == 1


def test_file_removed_behind_the_tiers_back_is_a_miss(
    open_tier: Callable[..., DiskTier], tmp_path: Path
) -> None:
    tier = open_tier()
    key = random_key()
    tier.put([(key, raw_chunk(make_array(0)))])
    chunk_path(tmp_path / "disk", key).unlink()
    assert tier.get([key]) == [None]
    assert tier.contains([key]) == [False]
    assert tier.usage().used_bytes == 0


def _failing_os_open(monkeypatch: pytest.MonkeyPatch, under: Path, exc: OSError) -> None:
    """Make os.open fail for paths under `under` (everything else keeps working)."""
    real_open = os.open

    def fake_open(path: str | Path, flags: int, *args: int) -> int:
        if str(path).startswith(str(under)):
            raise exc
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EROFS, "Read-only file system"),
        PermissionError(errno.EACCES, "Permission denied"),
    ],
    ids=["ENOSPC", "EROFS", "EACCES"],
)
def test_full_or_denied_disk_disables_writes_but_not_reads(
    exc: OSError,
    open_tier: Callable[..., DiskTier],
    metrics: Metrics,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tier = open_tier()
    early, early_chunk = random_key(), raw_chunk(make_array(0))
    tier.put([(early, early_chunk)])
    _failing_os_open(monkeypatch, tmp_path, exc)

    keys = [random_key(), random_key()]
    assert tier.put([(key, raw_chunk(make_array(1))) for key in keys]) == 0
    monkeypatch.undo()
    assert tier.put([(random_key(), raw_chunk(make_array(2)))]) == 0
    assert tier.put([(early, early_chunk)]) == 1  # already stored still counts

    assert tier.contains(keys) == [False, False]
    assert tier.get([early]) == [blob_of(early_chunk, early)]
    assert tier.usage().used_bytes == CHUNK_NBYTES
    assert list((tmp_path / "disk" / ".tmp").iterdir()) == []
    assert sample(metrics, "kvdepot_tier_ops_total", op="put", outcome="disabled") == 2
    assert sample(metrics, "kvdepot_tier_ops_total", op="put", outcome="error") == 1
    errors = [
        r for r in caplog.records if r.name == "kvdepot.tiers.disk" and r.levelname == "ERROR"
    ]
    assert len(errors) == 1


def test_enospc_at_fsync_leaves_no_temp_file(
    open_tier: Callable[..., DiskTier], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = open_tier(fsync=True)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    key = random_key()
    assert tier.put([(key, raw_chunk(make_array(0)))]) == 0
    assert tier.contains([key]) == [False]
    assert tier.usage().used_bytes == 0
    assert list((tmp_path / "disk").rglob("*.kvc")) == []
    assert list((tmp_path / "disk" / ".tmp").iterdir()) == []


def test_transient_write_error_skips_the_chunk_only(
    open_tier: Callable[..., DiskTier],
    metrics: Metrics,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tier = open_tier()
    _failing_os_open(monkeypatch, tmp_path, OSError(errno.EIO, "Input/output error"))
    assert tier.put([(random_key(), raw_chunk(make_array(0)))]) == 0
    monkeypatch.undo()
    key = random_key()
    assert tier.put([(key, raw_chunk(make_array(1)))]) == 1
    assert tier.contains([key]) == [True]
    assert tier.usage().used_bytes == CHUNK_NBYTES
    assert sample(metrics, "kvdepot_tier_ops_total", op="put", outcome="error") == 1


def test_open_on_an_unusable_root_raises_tier_unavailable(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(TierUnavailable):
        DiskTier.open(not_a_dir, 1 << 20)


def test_closed_tier_misses_and_stores_nothing(open_tier: Callable[..., DiskTier]) -> None:
    tier = open_tier()
    key = random_key()
    tier.put([(key, raw_chunk(make_array(0)))])
    tier.close()
    assert tier.get([key]) == [None]
    assert tier.put([(random_key(), raw_chunk(make_array(1)))]) == 0


def test_concurrent_reader_while_evicting_never_sees_garbage(
    open_tier: Callable[..., DiskTier],
) -> None:
    tier = open_tier(capacity_bytes=8 * CHUNK_NBYTES)
    num_chunks = 300
    keys = [random_key() for _ in range(num_chunks)]
    arrays = [make_array(i) for i in range(num_chunks)]
    tier.put([(keys[i], raw_chunk(arrays[i])) for i in range(8)])
    done = threading.Event()
    failures: list[BaseException] = []
    num_hits = [0]

    def writer() -> None:
        try:
            for i in range(8, num_chunks):
                tier.put([(keys[i], raw_chunk(arrays[i]))])
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    def reader() -> None:
        try:
            while True:
                is_last_pass = done.is_set()  # one pass after the writer is done, at least
                for i, blob in enumerate(tier.get(keys)):
                    if blob is not None:
                        np.testing.assert_array_equal(decoded(blob), arrays[i])
                        num_hits[0] += 1
                if is_last_pass:
                    return
        except BaseException as exc:
            failures.append(exc)
            done.set()

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert num_hits[0] > 0
    assert tier.usage().used_bytes <= tier.capacity_bytes
    assert sum(tier.contains(keys)) == 8


def test_concurrent_restores_of_evicted_keys_keep_index_and_files_in_step(
    open_tier: Callable[..., DiskTier], tmp_path: Path
) -> None:
    """Writers keep re-storing and deleting keys that other writers evict, while a reader reads."""
    tier = open_tier(capacity_bytes=6 * CHUNK_NBYTES)
    keys = [random_key() for _ in range(16)]
    arrays = [make_array(i) for i in range(16)]
    failures: list[BaseException] = []
    num_rounds = 60

    def writer(offset: int) -> None:
        try:
            for r in range(num_rounds):
                i, j = (offset + 5 * r) % 16, (offset + 5 * r + 1) % 16
                tier.put([(keys[i], raw_chunk(arrays[i])), (keys[j], raw_chunk(arrays[j]))])
                if r % 5 == 0:
                    tier.delete([keys[(i + 7) % 16]])
        except BaseException as exc:
            failures.append(exc)

    def reader() -> None:
        try:
            for _ in range(num_rounds):
                for i, blob in enumerate(tier.get(keys)):
                    if blob is not None:
                        np.testing.assert_array_equal(decoded(blob), arrays[i])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    threads.append(threading.Thread(target=reader))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    indexed = [key for key, hit in zip(keys, tier.contains(keys), strict=True) if hit]
    assert all(blob is not None for blob in tier.get(indexed))
    files = sorted((tmp_path / "disk").rglob("*.kvc"))
    assert files == sorted(chunk_path(tmp_path / "disk", key) for key in indexed)
    assert tier.usage().used_bytes == sum(f.stat().st_size for f in files)
    assert tier.usage().used_bytes <= tier.capacity_bytes


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "get", "delete"]), st.integers(0, 7)),
        max_size=40,
    ),
    capacity_chunks=st.integers(1, 4),
)
def test_random_ops_respect_budget_and_return_exact_bytes(
    ops: list[tuple[str, int]], capacity_chunks: int
) -> None:
    keys = [ChunkKey(bytes(16), ChunkHash(bytes([i]) * 16)) for i in range(8)]
    # Sizes vary so that one put may evict several chunks.
    chunks = [raw_chunk(make_array(i, (1 + i % 3, 8))) for i in range(8)]
    capacity = capacity_chunks * CHUNK_NBYTES
    with tempfile.TemporaryDirectory() as root:
        tier = DiskTier.open(Path(root), capacity, fsync=False)
        for op, i in ops:
            if op == "put":
                assert tier.put([(keys[i], chunks[i])]) == 1
                assert tier.contains([keys[i]]) == [True]
            elif op == "get":
                blob = tier.get([keys[i]])[0]
                assert blob is None or blob == blob_of(chunks[i], keys[i])
            else:
                tier.delete([keys[i]])
                assert tier.get([keys[i]]) == [None]
            usage = tier.usage()
            assert usage.used_bytes <= capacity
            on_disk = sum(p.stat().st_size for p in Path(root).rglob("*.kvc"))
            assert on_disk == usage.used_bytes
        tier.close()


@pytest.mark.parametrize("read_threads", [1, 4])
def test_read_into_a_batch_fills_each_buffer_and_misses_the_bad_ones(
    read_threads: int, tmp_path: Path
) -> None:
    metrics = Metrics()
    tier = DiskTier.open(tmp_path, 1 << 20, fsync=False, read_threads=read_threads,
                         metrics=metrics.tier("disk"))  # fmt: skip
    keys = [random_key() for _ in range(6)]
    chunks = [raw_chunk(make_array(i)) for i in range(6)]
    tier.put(list(zip(keys[:5], chunks[:5], strict=True)))  # the last is never stored
    path = chunk_path(tmp_path, keys[2])
    path.write_bytes(flip_bit(path.read_bytes(), HEADER_NBYTES + 3))
    buffers = [memoryview(bytearray(CHUNK_NBYTES)) for _ in keys]

    hits = tier.read_into(list(zip(keys, buffers, strict=True)))

    assert hits == [True, True, False, True, True, False]
    for i in (0, 1, 3, 4):
        assert bytes(buffers[i]) == blob_of(chunks[i], keys[i])
    assert not path.exists()  # the corrupt one is deleted, the rest stay
    assert tier.contains(keys) == [True, True, False, True, True, False]
    assert sample(metrics, "kvdepot_tier_corrupt_chunks_total") == 1
    assert sample(metrics, "kvdepot_tier_ops_total", op="get", outcome="hit") == 4
    assert sample(metrics, "kvdepot_tier_ops_total", op="get", outcome="miss") == 2
    tier.close()


def test_read_threads_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="read_threads"):
        DiskTier(tmp_path, 1 << 20, read_threads=0)
