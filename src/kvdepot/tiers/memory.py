"""The host-RAM tier: chunks in one pre-touched buffer, with pins, leases and eviction.

Runs in the process that owns the `TieredStore`. The buffer is the tier's whole byte budget,
mapped once (`HostBuffer`). A put copies the chunk into the buffer once (from a possibly
strided tensor view, no staging copy); a `read` lends views into the buffer, pinned for the
duration of the `with` block, so a reader never sees its chunk evicted or overwritten.

Invariants (all under `self._lock`):
- A chunk is visible (`contains`/`get`/`read`) only after its bytes are fully copied.
- A pinned chunk is never evicted or reused; a chunk deleted while pinned stays readable by
  its pinners and its memory is freed at the last unpin.
- Blobs here are trusted (this process wrote or verified them), so reads skip the checksum.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from kvdepot.codec.format import EncodedChunk
from kvdepot.keys import ChunkKey
from kvdepot.logutil import RateLimitedLog
from kvdepot.metrics import Metrics, TierMetrics
from kvdepot.tiers.arena import ArenaAllocator, HostBuffer
from kvdepot.tiers.base import TierUsage
from kvdepot.tiers.policy import EvictionPolicy, PrefixAwarePolicy

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WriteSlot:
    """Reserved, not yet visible room for one chunk: write the blob into `buffer`."""

    key: ChunkKey
    offset: int
    buffer: memoryview


@dataclass(slots=True)
class _Entry:
    offset: int
    nbytes: int
    pins: int = 0
    is_deleted: bool = False


@dataclass(slots=True)
class Lease:
    """Pins on chunks, taken by `MemoryTier.pin` and given back by `MemoryTier.release`."""

    keys: list[ChunkKey]
    entries: list[_Entry]


class MemoryTier:
    """Chunks in host RAM, LRU/prefix-aware eviction, pins for readers."""

    name = "memory"

    def __init__(
        self,
        buffer: HostBuffer,
        *,
        policy: EvictionPolicy | None = None,
        metrics: TierMetrics | None = None,
    ) -> None:
        self._buffer = buffer
        self._arena = ArenaAllocator(buffer.nbytes)
        self._policy = policy if policy is not None else PrefixAwarePolicy()
        self._metrics = metrics if metrics is not None else Metrics().tier(self.name)
        self._lock = threading.Lock()
        self._entries: dict[ChunkKey, _Entry] = {}
        self._pending: set[ChunkKey] = set()
        self._unpinned_bytes = 0  # arena footprint of visible chunks nobody pins: evictable
        self._log = RateLimitedLog(logger)

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [key in self._entries for key in keys]

    @contextmanager
    def read(
        self, keys: Sequence[ChunkKey], *, record: bool = True
    ) -> Iterator[list[memoryview | None]]:
        """Pinned views of each key's blob (None for a miss), valid inside the block.

        Args:
            keys: one batch, chain order.
            record: count this as an access (eviction order and metrics); internal readers
                such as write-back pass False.
        """
        start = time.perf_counter()
        lease = self.pin(keys)
        found = dict(zip(lease.keys, lease.entries, strict=True))
        views = [
            None if (e := found.get(key)) is None else self._slice(e.offset, e.nbytes)
            for key in keys
        ]
        if record:
            with self._lock:
                self._policy.touch([key for key in lease.keys if key in self._entries])
            self._record_read(views, time.perf_counter() - start)
        try:
            yield views
        finally:
            self.release(lease)

    def pin(self, keys: Sequence[ChunkKey]) -> Lease:
        """Pin the present `keys` until `release`; the lease names the keys pinned."""
        with self._lock:
            return self._pin_locked(keys)

    def _pin_locked(self, keys: Sequence[ChunkKey]) -> Lease:
        pinned = [(key, self._entries[key]) for key in keys if key in self._entries]
        for _, entry in pinned:
            if entry.pins == 0:
                self._unpinned_bytes -= ArenaAllocator.footprint(entry.nbytes)
            entry.pins += 1
        return Lease([key for key, _ in pinned], [entry for _, entry in pinned])

    def release(self, lease: Lease) -> None:
        """Drop a lease's pins; a chunk deleted while pinned is freed at its last pin."""
        with self._lock:
            for entry in lease.entries:
                entry.pins -= 1
                if entry.pins == 0:
                    if entry.is_deleted:
                        self._arena.free(entry.offset, entry.nbytes)
                    else:
                        self._unpinned_bytes += ArenaAllocator.footprint(entry.nbytes)
            lease.entries.clear()

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        with self.read(keys) as views:
            return [None if v is None else bytes(v) for v in views]

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int:
        num_stored, _ = self._put(items, pin=False)
        return num_stored

    def put_pinned(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> tuple[int, Lease]:
        """`put`, and pin every stored key of `items` in the same step (nothing can evict
        them in between); release the lease when done with them."""
        return self._put(items, pin=True)

    def _put(
        self, items: Sequence[tuple[ChunkKey, EncodedChunk]], *, pin: bool
    ) -> tuple[int, Lease]:
        start = time.perf_counter()
        slots: list[WriteSlot] = []
        num_present = 0
        try:
            for key, chunk in items:
                offset, is_present = self._reserve(key, chunk.nbytes)
                num_present += is_present
                if offset is not None:
                    slots.append(WriteSlot(key, offset, self._slice(offset, chunk.nbytes)))
                    chunk.write_into(slots[-1].buffer)
        except BaseException:
            for slot in slots:
                self.abort(slot)
            raise
        keys = [key for key, _ in items]
        lease = self.commit(slots, touch=keys, pin=keys if pin else ())
        self._metrics.latency("put", time.perf_counter() - start)
        return num_present + len(slots), lease

    def reserve(self, key: ChunkKey, nbytes: int) -> WriteSlot | None:
        """Room for a new chunk, invisible until `commit`; None if `key` is stored or being
        written, or if no room can be made. Write exactly `nbytes` into `slot.buffer`."""
        return self.try_reserve(key, nbytes)[0]

    def try_reserve(self, key: ChunkKey, nbytes: int) -> tuple[WriteSlot | None, bool]:
        """`reserve`, and whether a None means the key is stored or being written (True)
        rather than that no room could be made (False)."""
        offset, is_present = self._reserve(key, nbytes)
        if offset is None:
            return None, is_present
        return WriteSlot(key, offset, self._slice(offset, nbytes)), False

    def commit(
        self,
        slots: Sequence[WriteSlot],
        *,
        touch: Sequence[ChunkKey] = (),
        pin: Sequence[ChunkKey] = (),
    ) -> Lease:
        """Make reserved chunks visible and pin the present keys of `pin`, atomically.

        `touch` (default: the slots' keys) sets the eviction order. Returns the lease of
        what was pinned (empty if `pin` is).
        """
        with self._lock:
            for slot in slots:
                self._pending.discard(slot.key)
                self._entries[slot.key] = _Entry(slot.offset, len(slot.buffer))
                self._unpinned_bytes += ArenaAllocator.footprint(len(slot.buffer))
            order = touch or [slot.key for slot in slots]
            self._policy.touch([key for key in order if key in self._entries])
            lease = self._pin_locked(pin)
            self._publish_usage()
        self._metrics.op("put", "ok", len(slots))
        self._metrics.bytes("write", sum(len(slot.buffer) for slot in slots))
        return lease

    def abort(self, slot: WriteSlot) -> None:
        """Give back a reserved slot that will not be committed."""
        with self._lock:
            self._pending.discard(slot.key)
            self._arena.free(slot.offset, len(slot.buffer))

    def _slice(self, offset: int, nbytes: int) -> memoryview:
        return self._buffer.view[offset : offset + nbytes]

    def _reserve(self, key: ChunkKey, nbytes: int) -> tuple[int | None, bool]:
        """(offset for a new chunk or None, whether the key is already stored or pending).

        Evicts unpinned chunks in policy order until the chunk fits.
        """
        with self._lock:
            if key in self._entries or key in self._pending:
                return None, True
            offset = self._arena.alloc(nbytes)
            reachable = self._arena.capacity_bytes - self._arena.used_bytes + self._unpinned_bytes
            if offset is None and ArenaAllocator.footprint(nbytes) > reachable:
                # Evicting everything evictable could not make room: evict nothing.
                self._metrics.op("put", "no_room")
                return None, False
            num_evicted = 0
            while offset is None:
                victim = self._policy.pop_victim(self._is_pinned)
                if victim is None:
                    break
                self._drop(victim)
                num_evicted += 1
                offset = self._arena.alloc(nbytes)
            if num_evicted:
                self._metrics.evicted(num_evicted)
            if offset is None:
                self._metrics.op("put", "no_room")
                self._log.warning("full", "RAM tier has no room for a %d-byte chunk", nbytes)
                return None, False
            self._pending.add(key)
            return offset, False

    def _is_pinned(self, key: ChunkKey) -> bool:
        return self._entries[key].pins > 0

    def _drop(self, key: ChunkKey) -> None:
        entry = self._entries.pop(key)
        if entry.pins:
            entry.is_deleted = True
        else:
            self._unpinned_bytes -= ArenaAllocator.footprint(entry.nbytes)
            self._arena.free(entry.offset, entry.nbytes)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                if key in self._entries:
                    self._policy.remove(key)
                    self._drop(key)
            self._publish_usage()

    def clear(self) -> None:
        with self._lock:
            keys = list(self._entries)
        self.delete(keys)

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._arena.used_bytes, self._arena.capacity_bytes, len(self._entries))

    def close(self) -> None:
        """Forget every chunk and unmap the buffer (views still held keep it mapped)."""
        with self._lock:
            self._entries.clear()
        self._buffer.close()

    def _publish_usage(self) -> None:
        self._metrics.usage(self._arena.used_bytes, self._arena.capacity_bytes, len(self._entries))

    def _record_read(self, views: Sequence[memoryview | None], seconds: float) -> None:
        num_hits = sum(v is not None for v in views)
        self._metrics.op("get", "hit", num_hits)
        self._metrics.op("get", "miss", len(views) - num_hits)
        self._metrics.bytes("read", sum(len(v) for v in views if v is not None))
        self._metrics.latency("get", seconds)
