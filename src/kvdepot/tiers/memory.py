"""The host-RAM tier: chunks in one pre-touched buffer, with pins, leases and eviction.

Runs in the process that owns the `TieredStore`. The buffer is the tier's whole byte budget,
mapped once (`HostBuffer`). A put copies the chunk into the buffer once (from a possibly
strided tensor view, no staging copy); a `read` lends views into the buffer, pinned for the
duration of the `with` block, so a reader never sees its chunk evicted or overwritten.

Invariants (all under `self._lock`):
- A chunk is visible (`contains`/`get`/`read`) only after its bytes are fully copied.
- A key has at most one writer: a reservation claims it until `commit`, `abort` or `forfeit`;
  a second writer is refused with `Refusal.PENDING`, which is *not* "stored" (the first
  writer may die). Only the claim's owner (its slot) can commit or release it.
- A reservation's memory returns to the arena only at `commit` or `abort`, i.e. when its
  writer is done: `forfeit` (a writer too slow) gives up the key claim but keeps the extent.
- A pinned chunk is never evicted or reused; a chunk deleted while pinned stays readable by
  its pinners and its memory is freed at the last unpin.
- Every chunk put here is bound to its key (`EncodedChunk.bound`). Blobs here are trusted
  (this process wrote or verified them), so reads skip the checksum.
"""

from __future__ import annotations

import enum
import itertools
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


class Refusal(enum.Enum):
    """Why `MemoryTier.try_reserve` gave no slot."""

    STORED = "stored"  # the key is visible already: counts as stored
    PENDING = "pending"  # another writer holds the key: not stored (it may never commit)
    NO_ROOM = "no_room"  # nothing evictable would make room


@dataclass(frozen=True, slots=True)
class WriteSlot:
    """Reserved, not yet visible room for one chunk: write the blob into `buffer`.
    `slot_id` is unique for the tier's life: a claim on a key belongs to one slot."""

    key: ChunkKey
    offset: int
    buffer: memoryview
    slot_id: int


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
    num_asked: int = 0  # how many of the asked keys it covers (fewer when a budget cut it)


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
        self._pending: dict[ChunkKey, int] = {}  # key -> id of the slot that claims it
        self._slot_ids = itertools.count(1)
        self._unpinned_bytes = 0  # arena footprint of visible chunks nobody pins: evictable
        self._log = RateLimitedLog(logger)

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [key in self._entries for key in keys]

    @contextmanager
    def read(
        self, keys: Sequence[ChunkKey], *, record: bool = True, max_bytes: int | None = None
    ) -> Iterator[list[memoryview | None]]:
        """Pinned views of each key's blob (None for a miss), valid inside the block.

        Args:
            keys: one batch, chain order.
            record: count this as an access (eviction order and metrics); internal readers
                such as write-back pass False.
            max_bytes: pin at most this many bytes: the views then stop (the list is shorter
                than `keys`) before the first present chunk that would exceed it.
        """
        start = time.perf_counter()
        lease = self.pin(keys, max_bytes)
        found = dict(zip(lease.keys, lease.entries, strict=True))
        views = [
            None if (e := found.get(key)) is None else self._slice(e.offset, e.nbytes)
            for key in keys[: lease.num_asked]
        ]
        if record:
            with self._lock:
                self._policy.touch([key for key in lease.keys if key in self._entries])
            self._record_read(views, time.perf_counter() - start)
        try:
            yield views
        finally:
            self.release(lease)

    def pin(self, keys: Sequence[ChunkKey], max_bytes: int | None = None) -> Lease:
        """Pin the present `keys` (in order, up to `max_bytes` of them) until `release`; the
        lease names the keys pinned."""
        with self._lock:
            return self._pin_locked(keys, max_bytes)

    def _pin_locked(self, keys: Sequence[ChunkKey], max_bytes: int | None = None) -> Lease:
        pinned: list[tuple[ChunkKey, _Entry]] = []
        num_asked, total = len(keys), 0
        for i, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is None:
                continue
            if max_bytes is not None and total + entry.nbytes > max_bytes:
                num_asked = i
                break
            total += entry.nbytes
            pinned.append((key, entry))
        for _, entry in pinned:
            if entry.pins == 0:
                self._unpinned_bytes -= ArenaAllocator.footprint(entry.nbytes)
            entry.pins += 1
        return Lease([key for key, _ in pinned], [entry for _, entry in pinned], num_asked)

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
                got = self.try_reserve(key, chunk.nbytes)
                num_present += got is Refusal.STORED
                if isinstance(got, WriteSlot):
                    slots.append(got)
                    chunk.bound(key).write_into(got.buffer)
        except BaseException:
            for slot in slots:
                self.abort(slot)
            raise
        keys = [key for key, _ in items]
        num_committed, lease = self.commit(slots, touch=keys, pin=keys if pin else ())
        self._metrics.latency("put", time.perf_counter() - start)
        return num_present + num_committed, lease

    def reserve(self, key: ChunkKey, nbytes: int) -> WriteSlot | None:
        """Room for a new chunk, invisible until `commit`; None if `key` is stored or being
        written, or if no room can be made. Write exactly `nbytes` into `slot.buffer`: the
        blob bound to `key`."""
        got = self.try_reserve(key, nbytes)
        return got if isinstance(got, WriteSlot) else None

    def try_reserve(self, key: ChunkKey, nbytes: int) -> WriteSlot | Refusal:
        """`reserve`, saying why when there is no slot."""
        got = self._reserve(key, nbytes)
        if isinstance(got, Refusal):
            return got
        offset, slot_id = got
        return WriteSlot(key, offset, self._slice(offset, nbytes), slot_id)

    def commit(
        self,
        slots: Sequence[WriteSlot],
        *,
        touch: Sequence[ChunkKey] = (),
        pin: Sequence[ChunkKey] = (),
    ) -> tuple[int, Lease]:
        """Make reserved chunks visible and pin the present keys of `pin`, atomically.

        `touch` (default: the slots' keys) sets the eviction order. Returns how many slots
        were published (a forfeited one is not: its memory is freed instead) and the lease
        of what was pinned (empty if `pin` is).
        """
        with self._lock:
            committed = []
            for slot in slots:
                if self._pending.get(slot.key) != slot.slot_id:
                    # Forfeited (another writer may hold the key now): not this slot's to
                    # publish, and its writer is done with the memory.
                    self._arena.free(slot.offset, len(slot.buffer))
                    continue
                del self._pending[slot.key]
                self._entries[slot.key] = _Entry(slot.offset, len(slot.buffer))
                self._unpinned_bytes += ArenaAllocator.footprint(len(slot.buffer))
                committed.append(slot)
            order = touch or [slot.key for slot in committed]
            self._policy.touch([key for key in order if key in self._entries])
            lease = self._pin_locked(pin)
            self._publish_usage()
        self._metrics.op("put", "ok", len(committed))
        self._metrics.bytes("write", sum(len(slot.buffer) for slot in committed))
        return len(committed), lease

    def abort(self, slot: WriteSlot) -> None:
        """Give back a reserved slot that will not be committed (its writer is done)."""
        with self._lock:
            if self._pending.get(slot.key) == slot.slot_id:
                del self._pending[slot.key]
            self._arena.free(slot.offset, len(slot.buffer))

    def forfeit(self, slot: WriteSlot) -> None:
        """Give up `slot`'s claim on its key (another writer may store it now) but keep its
        memory, which a slow writer may still be writing: `abort` frees it later, once the
        writer is known to be done (or dead)."""
        with self._lock:
            if self._pending.get(slot.key) == slot.slot_id:
                del self._pending[slot.key]

    def _slice(self, offset: int, nbytes: int) -> memoryview:
        return self._buffer.view[offset : offset + nbytes]

    def _reserve(self, key: ChunkKey, nbytes: int) -> tuple[int, int] | Refusal:
        """(offset, slot id) for a new chunk, or why there is none.

        Evicts unpinned chunks in policy order until the chunk fits.
        """
        with self._lock:
            if key in self._entries:
                return Refusal.STORED
            if key in self._pending:
                self._metrics.op("put", "pending")
                return Refusal.PENDING
            offset = self._arena.alloc(nbytes)
            reachable = self._arena.capacity_bytes - self._arena.used_bytes + self._unpinned_bytes
            if offset is None and ArenaAllocator.footprint(nbytes) > reachable:
                # Evicting everything evictable could not make room: evict nothing.
                self._metrics.op("put", "no_room")
                return Refusal.NO_ROOM
            victims = []
            while offset is None:
                victim = self._policy.pop_victim(self._is_pinned)
                if victim is None:
                    break
                self._drop(victim)
                victims.append(victim)
                offset = self._arena.alloc(nbytes)
            if victims:
                self._metrics.evicted(victims)
            if offset is None:
                self._metrics.op("put", "no_room")
                self._log.warning("full", "RAM tier has no room for a %d-byte chunk", nbytes)
                return Refusal.NO_ROOM
            slot_id = next(self._slot_ids)
            self._pending[key] = slot_id
            return offset, slot_id

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
