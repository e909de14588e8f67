"""TieredStore: one cache over a RAM tier and slower tiers below it (disk, Valkey, S3).

Runs in the process that owns the cache: the engine process when embedded, the daemon
otherwise. Data flow:
- `put` copies chunks into the RAM tier at once, then queues their keys for write-back; a
  background thread copies them from RAM to every lower tier. The queue is bounded: when it
  is full the write-back is dropped and counted, never waited for.
- `read` serves a prefix chain: RAM first, then each lower tier for what is still missing;
  lower-tier hits are promoted into RAM. It yields the leading run of hits only.
- `lookup` counts the leading run of keys present in any tier.
- `remember` keeps the continuation index (`kvdepot.continuations`): which stored chunk
  shares the longest leading run of tokens with a prompt after a prefix. `match` and
  `read_prefix` answer a lookup or a read *with* its partial tail in one call (one round
  trip through the daemon instead of three).

Failure policy: a lower tier that raises is logged (rate-limited) and treated as a miss or a
dropped write; nothing from a lower tier's failure reaches the caller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from kvdepot.codec import (
    CodecRegistry,
    RawCodec,
    default_registry,
    load_registry,
)
from kvdepot.codec.format import EncodedChunk, open_blob
from kvdepot.config import KVDepotConfig
from kvdepot.continuations import Continuation, ContinuationIndex, Root, TailQuery
from kvdepot.errors import CorruptChunk, TierUnavailable
from kvdepot.keys import ChunkKey
from kvdepot.logutil import RateLimitedLog
from kvdepot.metrics import Metrics
from kvdepot.misses import CORRUPT, NEVER_STORED, TIER_UNAVAILABLE, miss
from kvdepot.namespaces import Answer, Recipe, Recipes, answer
from kvdepot.tiers.arena import HostBuffer
from kvdepot.tiers.base import DecodesInto, ReadsInto, Tier, TierUsage
from kvdepot.tiers.disk import DiskTier
from kvdepot.tiers.memory import Lease, MemoryTier, WriteSlot
from kvdepot.tiers.policy import make_policy
from kvdepot.tiers.transcode import CodecTier, decode_to_raw, raw_header

if TYPE_CHECKING:
    from kvdepot.events import KVEvents

logger = logging.getLogger(__name__)
_STOP = None
CONTINUATIONS_FILE = "continuations.msgpack"
"""The saved continuation index, in the disk tier's folder (its scan ignores the file)."""


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """A chain's leading run of whole chunks, then maybe the first `num_partial_tokens` of
    a stored chunk (`partial_key`) that follows it (partial matching).

    When the run ends before the chain does, `miss` says why its next chunk is not there
    ("reason" or "reason:tier", `kvdepot.misses`), and `held_elsewhere` how many leading
    tokens of the prompt another namespace holds (asked only when nothing hit)."""

    num_chunks: int
    partial_key: ChunkKey | None = None
    num_partial_tokens: int = 0
    miss: str = ""
    held_elsewhere: int = 0


@dataclass(frozen=True, slots=True)
class Prefix:
    """`PrefixHit` with the blobs: the leading run's, then the partial chunk's (when
    `hit.num_partial_tokens` > 0); valid inside the `read_prefix` block. `sources` names the
    tier each blob came from ("memory", or the lower tier it was promoted from), when known
    (else empty)."""

    blobs: list[memoryview | bytes]
    hit: PrefixHit
    sources: tuple[str, ...] = ()


class ChunkStore(Protocol):
    """What a cache engine needs from a store: the embedded `TieredStore` or a daemon client."""

    metrics: Metrics

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]: ...

    def lookup(self, keys: Sequence[ChunkKey]) -> int: ...

    def read(
        self, keys: Sequence[ChunkKey]
    ) -> AbstractContextManager[list[memoryview | bytes]]: ...

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int: ...

    def match(self, keys: Sequence[ChunkKey], tail: TailQuery | None) -> PrefixHit: ...

    def read_prefix(
        self, keys: Sequence[ChunkKey], tail: TailQuery | None
    ) -> AbstractContextManager[Prefix]: ...

    def remember(self, entries: Sequence[Continuation], roots: Sequence[Root] = ()) -> None: ...

    def announce(self, recipe: Recipe) -> None: ...

    def report_tokens(
        self,
        model: str,
        looked_up: int,
        hit: int,
        partial: int,
        stored: int,
        setup: str = "",
        missed: Mapping[str, int] | None = None,
        saved_s: float = 0.0,
    ) -> None: ...

    def delete(self, keys: Sequence[ChunkKey]) -> None: ...

    def flush(self, timeout_s: float = 30.0) -> bool: ...

    def clear(self) -> None: ...

    def usage(self) -> dict[str, TierUsage]: ...

    def close(self) -> None: ...


class TieredStore:
    """RAM tier + lower tiers with write-back and promotion."""

    def __init__(
        self,
        memory: MemoryTier,
        lower: Sequence[Tier] = (),
        *,
        metrics: Metrics | None = None,
        write_back_queue_chunks: int = 64,
        registry: CodecRegistry | None = None,
        continuations_path: Path | None = None,
        continuation_index_bytes: int = 64 << 20,
    ) -> None:
        """Args (besides the obvious):
        continuations_path: where the continuation index is loaded from now and saved
            to on `close` (beside the disk tier's files); None keeps it in memory only.
        continuation_index_bytes: byte budget of the continuation index.
        """
        self.memory = memory
        self.lower = list(lower)
        self.disabled_tiers: dict[str, str] = {}
        """Tiers the config asked for that could not be opened: name -> why."""
        self._on_close: list[Callable[[], None]] = []
        self.registry = registry if registry is not None else default_registry()
        self.metrics = metrics if metrics is not None else Metrics()
        self._queue: queue.Queue[tuple[Lease, int] | None] = queue.Queue()
        # Queued chunks stay pinned in RAM: cap them by count and by half of the RAM (an
        # empty queue takes any batch, so one large request still gets written down).
        self._max_queued_chunks = max(write_back_queue_chunks, 1)
        self._max_queued_bytes = memory.usage().capacity_bytes // 2
        self._idle = threading.Condition()
        self._num_queued = 0  # batches queued or in flight
        self._queued_chunks = 0
        self._queued_bytes = 0
        self._writer: threading.Thread | None = None
        self.metrics.write_back_queued.set_function(lambda: self._queued_chunks)
        self._log = RateLimitedLog(logger)
        self.continuations = ContinuationIndex(
            max_bytes=continuation_index_bytes, on_evict=self.metrics.continuation_evictions.inc
        )
        self._continuations_path = continuations_path
        if continuations_path is not None:
            self.continuations.load(continuations_path)
        self.recipes = Recipes()
        """How the engines of this store key their chunks (`kvdepot.namespaces`)."""
        self.events: KVEvents | None = None
        """The KV-event publisher (`kvdepot.events`), when on."""

    def start(self) -> TieredStore:
        """Start the write-back thread (only needed with lower tiers); returns self."""
        if self.lower and self._writer is None:
            self._writer = threading.Thread(
                target=self._write_back_loop, name="kvdepot-write-back", daemon=True
            )
            self._writer.start()
        return self

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is in any tier."""
        in_ram = self.memory.contains(keys)
        if all(in_ram) or not self.lower:
            return in_ram
        below = self._contains_lower(keys)
        return [a or b for a, b in zip(in_ram, below, strict=True)]

    def lookup(self, keys: Sequence[ChunkKey]) -> int:
        """Length of the leading run of `keys` (one chain, head first) present in any tier."""
        num_hit = _leading(self.contains(keys))
        self.metrics.lookup_chunks.inc(len(keys))
        self.metrics.hit_chunks.inc(num_hit)
        return num_hit

    @contextlib.contextmanager
    def read(
        self, keys: Sequence[ChunkKey], *, max_bytes: int | None = None
    ) -> Iterator[list[memoryview | bytes]]:
        """Blobs of the leading run of hits of `keys` (one chain, head first).

        The blobs are validated. A chunk missing from RAM is promoted from the first lower
        tier that has it; blobs that live in RAM are views pinned until the block exits.
        `max_bytes` bounds what is pinned (the daemon's per-client share): the run ends
        before the chunk that would exceed it.
        """
        with contextlib.ExitStack() as stack:
            yield self._read(keys, stack, max_bytes)[0]

    def _read(
        self, keys: Sequence[ChunkKey], stack: contextlib.ExitStack, max_bytes: int | None
    ) -> tuple[list[memoryview | bytes], list[str]]:
        """`read`'s blobs, pinned on `stack`, and the tier each came from."""
        views = stack.enter_context(self.memory.read(keys, max_bytes=max_bytes))
        left = None if max_bytes is None else max_bytes - sum(len(v) for v in views if v)
        blobs: list[memoryview | bytes] = []
        sources: list[str] = []
        i = 0
        while i < len(views):
            view = views[i]
            if view is not None:
                blobs.append(view)
                sources.append(self.memory.name)
                i += 1
                continue
            end = i
            while end < len(views) and views[end] is None:
                end += 1
            found, found_in = self._read_lower(keys[i:end], stack, left)
            blobs += found
            sources += found_in
            if left is not None:
                left -= sum(len(blob) for blob in found)
            if len(found) < end - i:
                break
            i = end
        return blobs, sources

    def _read_lower(
        self, keys: Sequence[ChunkKey], stack: contextlib.ExitStack, max_bytes: int | None
    ) -> tuple[list[memoryview | bytes], list[str]]:
        """The leading run of `keys` found below RAM, promoted and pinned where RAM has room,
        and the tier each came from."""
        if not self.lower:
            return [], []
        fetched = self._fetch_lower(keys[: _leading(self._contains_lower(keys))])
        promoted = [key for key, (blob, _) in zip(keys, fetched, strict=False) if blob is None]
        read = self.memory.read(promoted, record=False, max_bytes=max_bytes)
        pinned = iter(stack.enter_context(read))
        out: list[memoryview | bytes] = []
        sources: list[str] = []
        for blob, source in fetched:
            view = next(pinned, None) if blob is None else blob
            if view is None:
                break  # evicted between promotion and pinning (or over budget): the run ends
            out.append(view)
            sources.append(source)
        return out, sources

    def _contains_lower(self, keys: Sequence[ChunkKey]) -> list[bool]:
        found = [False] * len(keys)
        for tier in self.lower:
            missing = [i for i, hit in enumerate(found) if not hit]
            if not missing:
                break
            hits = self._safe_contains(tier, [keys[i] for i in missing])
            for i, hit in zip(missing, hits, strict=True):
                found[i] = hit
        return found

    def _fetch_lower(self, keys: Sequence[ChunkKey]) -> list[tuple[bytes | None, str]]:
        """Fetch `keys` (believed present below RAM) and promote them into RAM.

        Returns, for the leading run fetched: (None for a chunk now in RAM or the blob itself
        for one RAM had no room for, the tier it came from). Stops at the first chunk no tier
        could deliver. A run of chunks the first lower tier can read into memory is read as
        one batch (the disk keeps several reads in flight); whatever the batch does not
        deliver is fetched one by one from every tier in order.
        """
        out: list[tuple[bytes | None, str]] = []
        slots: list[WriteSlot] = []
        first = self.lower[0]
        sizes = self._safe_sizes(first, keys)
        may_batch = True
        try:
            while len(out) < len(keys):
                i = len(out)
                run = _leading([size is not None for size in sizes[i:]])
                if may_batch and run > 1:
                    batch = self._promote_run(first, keys[i : i + run], sizes[i : i + run])
                    slots += batch
                    out += [(None, first.name)] * len(batch)
                    may_batch = len(batch) == run  # a failure in the batch: go one by one
                    if batch:
                        continue
                got = next(
                    (
                        (g, t.name)
                        for t in self.lower
                        if (g := self._promote_one(t, keys[i])) is not None
                    ),
                    None,
                )
                if got is None:
                    break
                if isinstance(got[0], WriteSlot):
                    slots.append(got[0])
                    out.append((None, got[1]))
                else:
                    out.append((got[0], got[1]))
        finally:
            self.memory.commit(slots)
            if self.events is not None and slots:
                self.events.stored([slot.key for slot in slots], self.memory.name)
        return out

    def _safe_sizes(self, tier: Tier, keys: Sequence[ChunkKey]) -> list[int | None]:
        """Blob sizes from a tier that reads into memory; all None for any other tier."""
        if not isinstance(tier, ReadsInto):
            return [None] * len(keys)
        try:
            return tier.blob_sizes(keys)
        except Exception as exc:
            self._log.warning(f"get-{tier.name}", "tier %s failed: %s", tier.name, exc)
            return [None] * len(keys)

    def _promote_run(
        self, tier: Tier, keys: Sequence[ChunkKey], sizes: Sequence[int | None]
    ) -> list[WriteSlot]:
        """Read the leading run of `keys` from `tier` into RAM slots, as one batch.

        Returns the slots of the chunks read and bound to their keys, in order; the slots
        after the first failure are given back. Never raises (a failing tier is a miss).
        """
        if not isinstance(tier, ReadsInto):
            return []
        reserved: list[WriteSlot] = []
        for key, size in zip(keys, sizes, strict=True):
            slot = None if size is None else self.memory.reserve(key, size)
            if slot is None:
                break  # RAM has no room (or another writer has the key): one by one
            reserved.append(slot)
        try:
            hits = tier.read_into([(slot.key, slot.buffer) for slot in reserved])
        except Exception as exc:
            self._log.warning(f"get-{tier.name}", "tier %s read failed: %s", tier.name, exc)
            hits = [False] * len(reserved)
        done: list[WriteSlot] = []
        for i, (slot, hit) in enumerate(zip(reserved, hits, strict=True)):
            if hit and len(done) == i and self._holds_raw_blob(tier, slot):
                done.append(slot)
            else:
                self.memory.abort(slot)
        return done

    def _holds_raw_blob(self, tier: Tier, slot: WriteSlot) -> bool:
        """Whether the blob read into `slot` is raw and bound to its key. A stranger is
        deleted; a blob in another codec (written before a codec change) is not, and the
        one-by-one path decodes it."""
        try:
            header, _ = open_blob(slot.buffer, key=slot.key, verify=False)
            return header.codec_id == RawCodec.codec_id
        except CorruptChunk as exc:
            self._count_corrupt(tier, slot.key, exc)
            return False

    def _promote_one(self, tier: Tier, key: ChunkKey) -> WriteSlot | bytes | None:
        """One chunk from `tier` in a RAM slot (or its bytes if RAM has no room); None: miss.

        Whatever the tier hands back must be bound to `key` (a blob that landed under
        another key, e.g. by a plug-in tier's bug, is corrupt: deleted there, counted).
        Never raises: a failing tier is a miss, and a reserved slot is given back on error.
        """
        slot: WriteSlot | None = None
        try:
            if isinstance(tier, ReadsInto):
                (size,) = tier.blob_sizes([key])
                slot = None if size is None else self.memory.reserve(key, size)
                if slot is not None:
                    if not tier.read_into([(key, slot.buffer)])[0]:
                        self.memory.abort(slot)
                        return None
                    header, _ = open_blob(slot.buffer, key=key, verify=False)
                    if header.codec_id == RawCodec.codec_id:
                        return slot
                    self.memory.abort(slot)  # in another codec: decoded from `get` below
                    slot = None
            if isinstance(tier, DecodesInto):
                return self._promote_decoded(tier, key)
            (blob,) = tier.get([key])
            if blob is None:
                return None
            header, payload = open_blob(blob, key=key, verify=False)
            if header.codec_id != RawCodec.codec_id:  # e.g. written before a codec change
                slot = self.memory.reserve(key, raw_header(header).blob_nbytes)
                if slot is None:
                    return None  # RAM is full: a miss rather than an undecoded blob
                decode_to_raw(blob, header, slot.buffer, self.registry, key)
                return slot
            chunk = EncodedChunk(header, np.frombuffer(payload, dtype=np.uint8))
            slot = self.memory.reserve(key, chunk.nbytes)
            if slot is None:
                return blob
            chunk.write_into(slot.buffer)
            return slot
        except CorruptChunk as exc:
            if slot is not None:
                self.memory.abort(slot)
            self._count_corrupt(tier, key, exc)
            return None
        except Exception as exc:
            if slot is not None:
                self.memory.abort(slot)
            self._log.warning(f"get-{tier.name}", "tier %s read failed: %s", tier.name, exc)
            return None

    def _count_corrupt(self, tier: Tier, key: ChunkKey, exc: CorruptChunk) -> None:
        """A bad chunk from `tier`: counted, logged (rate-limited) and deleted there."""
        self.metrics.tier(tier.name).corrupt([key])
        self._log.warning(f"corrupt-{tier.name}", "tier %s: bad chunk, deleted: %s", tier.name, exc)
        with contextlib.suppress(Exception):
            tier.delete([key])

    def _promote_decoded(self, tier: DecodesInto, key: ChunkKey) -> WriteSlot | None:
        """One chunk from a tier in its own codec, decoded by it straight into a RAM slot."""
        slots: list[WriteSlot] = []

        def reserve(nbytes: int) -> memoryview | None:
            slot = None if slots else self.memory.reserve(key, nbytes)
            if slot is None:
                return None  # RAM is full: a miss rather than an undecoded blob
            slots.append(slot)
            return slot.buffer

        try:
            if tier.read_decoded(key, reserve) and slots:
                return slots[0]
        except BaseException:
            for slot in slots:
                self.memory.abort(slot)
            raise
        for slot in slots:
            self.memory.abort(slot)
        return None

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int:
        """Store chunks (one chain, head first) in RAM and queue their write-back.

        Chunks queued for write-back stay pinned in RAM until written down, so eviction
        cannot lose them first; the queue's caps (chunks, and half of the RAM) bound what
        is pinned that way. Chunks RAM has no room for are dropped and counted.
        """
        if not self.lower:
            num_stored = self.memory.put(items)
        else:
            num_stored, lease = self.memory.put_pinned(items)
            self._queue_write_back(lease, {key: chunk.nbytes for key, chunk in items})
        if num_stored < len(items):
            self.metrics.dropped_writes.labels("ram_full").inc(len(items) - num_stored)
        if self.events is not None:
            self._announce([key for key, _ in items], self.memory, num_stored)
        return num_stored

    def _announce(self, keys: list[ChunkKey], tier: Tier, num_stored: int) -> None:
        """KV events (callers check they are on): `tier` now holds `keys` (those it still
        holds when it stored fewer)."""
        if self.events is None or not keys:
            return
        if num_stored < len(keys):
            held = self._safe_contains(tier, keys)
            keys = [key for key, is_held in zip(keys, held, strict=True) if is_held]
        self.events.stored(keys, tier.name)

    def remember(self, entries: Sequence[Continuation], roots: Sequence[Root] = ()) -> None:
        """Note which chunks follow which parents (see `kvdepot.continuations`); `roots`:
        the namespace roots among the parents (`kvdepot.continuations.Root`)."""
        self.continuations.add(entries)
        if self.events is not None:
            self.events.learn(entries, roots)

    def announce(self, recipe: Recipe) -> None:
        """An engine's recipe, for lookups by model name (`lookup_prompt`)."""
        self.recipes.add(recipe.check())

    def lookup_prompt(self, model: str, tokens: Sequence[int], tenant_salt: bytes) -> Answer:
        """How many leading tokens of `tokens` this store holds for `model` and the tenant,
        by tier (`kvdepot.namespaces.answer`): a router's question, answered without
        reading, promoting or counting anything.

        Raises:
            KeyError: no engine announced `model`.
        """
        recipes = self.recipes.of(model)
        names = [self.memory.name, *(tier.name for tier in self.lower)]
        found = answer(recipes, tokens, tenant_salt, self.where, names)
        if found is None:
            raise KeyError(model)
        return found

    def where(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        """Per key, the index of the fastest tier that holds it (0: RAM, then the lower
        tiers in order), None where none does. Lower tiers are asked only for what the
        faster ones lack; one that fails answers "not here"."""
        found: list[int | None] = [0 if hit else None for hit in self.memory.contains(keys)]
        for index, tier in enumerate(self.lower, start=1):
            missing = [i for i, f in enumerate(found) if f is None]
            if not missing:
                break
            held = self._safe_contains(tier, [keys[i] for i in missing])
            for i, is_held in zip(missing, held, strict=True):
                if is_held:
                    found[i] = index
        return found

    def report_tokens(
        self,
        model: str,
        looked_up: int,
        hit: int,
        partial: int,
        stored: int,
        setup: str = "",
        missed: Mapping[str, int] | None = None,
        saved_s: float = 0.0,
    ) -> None:
        """An engine's token counts for `model` (`kvdepot_model_tokens_total`), its misses
        by reason (`kvdepot_model_miss_tokens_total`) and the prefill seconds it saved."""
        self.metrics.count_tokens(model, looked_up, hit, partial, stored, missed, saved_s)

    def continuation(self, parent: ChunkKey, tokens: bytes) -> tuple[ChunkKey, int] | None:
        """(child, m): a stored chunk after `parent` whose first m tokens equal the first m
        of `tokens` (int32 bytes), for the largest m >= 1; None when there is none."""
        return self.continuations.best(parent, tokens, self.contains)

    def match(self, keys: Sequence[ChunkKey], tail: TailQuery | None) -> PrefixHit:
        """`lookup`, then (with a tail) the partial match after the leading run, and why the
        run ended (see `PrefixHit`)."""
        since = time.monotonic()
        num_chunks = self.lookup(keys)
        found = None
        if tail is not None:
            self.continuations.note_root(tail.root)
            found = self._tail(keys, num_chunks, tail)
        hit = PrefixHit(num_chunks) if found is None else PrefixHit(num_chunks, *found)
        if num_chunks >= len(keys):
            return hit
        elsewhere = 0
        if tail is not None and num_chunks == 0 and found is None:
            elsewhere = self.continuations.held_elsewhere(tail.root, tail.tokens, self._nearby)
        why = self._why_missed(keys[num_chunks], since)
        return dataclasses.replace(hit, miss=why, held_elsewhere=elsewhere)

    def _why_missed(self, key: ChunkKey, since: float) -> str:
        """Why `key`, the first chunk a lookup missed, is not there (`kvdepot.misses`)."""
        failed = [
            name for name in self.metrics.tiers_failed_since(since) if name != self.memory.name
        ]
        if failed:
            return miss(TIER_UNAVAILABLE, failed[0])
        return self.metrics.ledger.why(key) or NEVER_STORED

    def _nearby(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is in RAM or on the local disk (remote tiers are not asked: the
        answer only explains a miss, and must not cost a round trip)."""
        found = self.memory.contains(keys)
        for tier in self.lower:
            if tier.name == "disk":
                on_disk = self._safe_contains(tier, list(keys))
                found = [a or b for a, b in zip(found, on_disk, strict=True)]
        return found

    @contextlib.contextmanager
    def read_prefix(
        self, keys: Sequence[ChunkKey], tail: TailQuery | None, *, max_bytes: int | None = None
    ) -> Iterator[Prefix]:
        """`read`, then (with a tail) the partial chunk after the leading run, pinned alike;
        with the tier each blob came from."""
        with contextlib.ExitStack() as stack:
            blobs, sources = self._read(keys, stack, max_bytes)
            found = None
            if tail is not None:
                self.continuations.note_root(tail.root)
                found = self._tail(keys, len(blobs), tail)
            if found is not None:
                left = None if max_bytes is None else max_bytes - sum(len(b) for b in blobs)
                child, child_in = self._read([found[0]], stack, left)
                if child:  # else it went between the index and the read: no partial hit
                    hit = PrefixHit(len(blobs), *found)
                    yield Prefix([*blobs, child[0]], hit, (*sources, *child_in))
                    return
            yield Prefix(blobs, PrefixHit(len(blobs)), tuple(sources))

    def _tail(
        self, keys: Sequence[ChunkKey], num_chunks: int, tail: TailQuery
    ) -> tuple[ChunkKey, int] | None:
        if num_chunks >= len(keys):
            return None
        found = self.continuation(*tail.after(keys, num_chunks))
        return found if found is not None and found[1] >= tail.min_tokens else None

    def commit(self, slots: Sequence[WriteSlot]) -> int:
        """Make RAM slots reserved with `memory.reserve` and filled by the caller visible,
        and queue their write-back (the daemon's two-phase store); returns how many were
        published. A slot whose blob is not a chunk bound to its key is aborted."""
        good = []
        for slot in slots:
            try:
                open_blob(slot.buffer, key=slot.key, verify=False)
                good.append(slot)
            except CorruptChunk as exc:
                self.memory.abort(slot)
                self.metrics.tier(self.memory.name).corrupt([slot.key])
                self._log.warning("commit", "refused a chunk written wrong: %s", exc)
        if not self.lower:
            num_committed, _ = self.memory.commit(good)
        else:
            num_committed, lease = self.memory.commit(good, pin=[slot.key for slot in good])
            self._queue_write_back(lease, {slot.key: len(slot.buffer) for slot in good})
        if self.events is not None:
            self._announce([slot.key for slot in good], self.memory, num_committed)
        return num_committed

    def _queue_write_back(self, lease: Lease, sizes: dict[ChunkKey, int]) -> None:
        if not lease.keys:
            return
        nbytes = sum(sizes[key] for key in lease.keys)
        with self._idle:
            fits = self._queued_chunks == 0 or (
                self._queued_chunks + len(lease.keys) <= self._max_queued_chunks
                and self._queued_bytes + nbytes <= self._max_queued_bytes
            )
            if fits:
                self._num_queued += 1
                self._queued_chunks += len(lease.keys)
                self._queued_bytes += nbytes
        if fits:
            self._queue.put((lease, nbytes))
            return
        self.memory.release(lease)
        self.metrics.dropped_writes.labels("queue_full").inc(len(lease.keys))
        self._log.warning("queue_full", "write-back queue full, dropped %d chunks", len(lease.keys))

    def _write_back_loop(self) -> None:
        while (job := self._queue.get()) is not _STOP:
            lease, nbytes = job
            try:
                self._write_back(lease.keys)
            except Exception:
                logger.exception("write-back failed")
            finally:
                self.memory.release(lease)
                self._done_one(len(lease.keys), nbytes)

    def _write_back(self, keys: list[ChunkKey]) -> None:
        with self.memory.read(keys, record=False) as views:
            items, bad = [], []
            for key, view in zip(keys, views, strict=True):
                if view is None:  # pinned since put: only a delete/clear removes it
                    continue
                try:
                    header, payload = open_blob(view, key=key, verify=False)
                except CorruptChunk as exc:  # never copied down; the others still are
                    self._log.warning("write-back", "not writing back a bad chunk: %s", exc)
                    bad.append(key)
                    continue
                chunk = EncodedChunk(header, np.frombuffer(payload, dtype=np.uint8))
                items.append((key, chunk))
            for tier in self.lower:
                try:
                    num_stored = tier.put(items)
                except Exception as exc:
                    self._log.warning(f"put-{tier.name}", "tier %s put failed: %s", tier.name, exc)
                    continue
                if self.events is not None:
                    self._announce([key for key, _ in items], tier, num_stored)
        if bad:
            self.memory.delete(bad)

    def _done_one(self, num_chunks: int, nbytes: int) -> None:
        with self._idle:
            self._num_queued -= 1
            self._queued_chunks -= num_chunks
            self._queued_bytes -= nbytes
            self._idle.notify_all()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued write-backs are done; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._num_queued == 0, timeout=timeout_s)

    def _safe_contains(self, tier: Tier, keys: list[ChunkKey]) -> list[bool]:
        try:
            return tier.contains(keys)
        except Exception as exc:
            self._log.warning(
                f"contains-{tier.name}", "tier %s contains failed: %s", tier.name, exc
            )
            return [False] * len(keys)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove `keys` from every tier: chunks a reader found unusable (a later miss on
        them counts as corrupt)."""
        self.metrics.ledger.note(keys, CORRUPT, self.memory.name)
        self.memory.delete(keys)
        if self.events is not None:
            for tier in [self.memory, *self.lower]:
                self.events.removed(keys, tier.name)
        for tier in self.lower:
            try:
                tier.delete(keys)
            except Exception as exc:
                self._log.warning(
                    f"delete-{tier.name}", "tier %s delete failed: %s", tier.name, exc
                )

    def clear(self) -> None:
        """Drop every chunk from every tier (after pending write-backs)."""
        self.flush()
        self.continuations.clear()
        self.metrics.ledger.clear()
        self.memory.clear()
        for tier in self.lower:
            tier.clear()
        if self.events is not None:
            self.events.cleared()

    def usage(self) -> dict[str, TierUsage]:
        return {t.name: t.usage() for t in [self.memory, *self.lower]}

    @property
    def queued_chunks(self) -> int:
        """Chunks waiting for (or in) write-back to the lower tiers."""
        return self._queued_chunks

    def on_close(self, stop: Callable[[], None]) -> None:
        """Run `stop` when the store closes (e.g. the embedded /metrics server)."""
        self._on_close.append(stop)

    def close(self) -> None:
        """Finish queued write-backs, stop the writer and close every tier."""
        for stop in self._on_close:
            stop()
        self._on_close = []
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        for tier in [self.memory, *self.lower]:
            tier.close()
        if self.events is not None:
            self.events.close()
            self.events = None
        if self._continuations_path is not None:
            try:
                self.continuations.save(self._continuations_path)
            except OSError as exc:  # a hint only: the next start matches whole chunks
                self._log.warning("save-index", "continuation index not saved: %s", exc)

    def __enter__(self) -> TieredStore:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _leading(flags: Sequence[bool]) -> int:
    for i, flag in enumerate(flags):
        if not flag:
            return i
    return len(flags)


def open_store(
    config: KVDepotConfig, metrics: Metrics | None = None, *, buffer: HostBuffer | None = None
) -> TieredStore:
    """Build and start the tiered store a config describes, in this process.

    Args:
        buffer: RAM-tier memory (the daemon passes a shared-memory file); by default an
            anonymous mapping of `memory.capacity_bytes`, touched up front.
    """
    metrics = metrics if metrics is not None else Metrics()
    if buffer is None:
        buffer = HostBuffer.allocate(config.memory.capacity_bytes, prefault=config.memory.prefault)
    memory = MemoryTier(
        buffer, policy=make_policy(config.memory.eviction_policy), metrics=metrics.tier("memory")
    )
    registry = load_registry([p.strip() for p in config.codec_plugins.split(",") if p.strip()])
    lower: list[Tier] = []
    disabled: dict[str, str] = {}
    continuations_path: Path | None = None
    if config.disk.path:
        try:
            disk = DiskTier.open(
                Path(config.disk.path),
                config.disk.capacity_bytes,
                fsync=config.disk.fsync,
                policy=make_policy(config.disk.eviction_policy),
                metrics=metrics.tier("disk"),
                file_mode=config.disk.file_mode_bits(),
                dir_mode=config.disk.dir_mode_bits(),
                read_threads=config.disk.read_threads,
            )
            lower.append(_with_codec(disk, config.disk.codec, registry))
            continuations_path = Path(config.disk.path) / CONTINUATIONS_FILE
        except TierUnavailable as exc:
            # Fail open: a cache without its disk tier still serves from RAM (the daemon
            # refuses to start instead, unless told to tolerate it: `disk.required`).
            logger.error("running without the disk tier: %s", exc)
            disabled["disk"] = str(exc)
    if config.valkey.address:
        from kvdepot.tiers.valkey import open_valkey_tier

        valkey = open_valkey_tier(config.valkey, metrics.tier("valkey"))
        lower.append(_with_codec(valkey, config.valkey.codec, registry))
    if config.s3.bucket:
        from kvdepot.tiers.s3 import open_s3_tier

        s3 = open_s3_tier(config.s3, metrics.tier("s3"))
        lower.append(_with_codec(s3, config.s3.codec, registry))
    store = TieredStore(
        memory,
        lower,
        metrics=metrics,
        write_back_queue_chunks=config.write_back_queue_chunks,
        registry=registry,
        continuations_path=continuations_path,
        continuation_index_bytes=config.continuation_index_bytes,
    )
    store.disabled_tiers.update(disabled)
    if config.events.enabled:
        from kvdepot.events import EventsSettings, KVEvents

        store.events = KVEvents(EventsSettings.from_config(config.events), metrics)
    for name in [memory.name, *(tier.name for tier in lower), *disabled]:
        metrics.tier_disabled.labels(name).set(1 if name in disabled else 0)
        # Known series start at 0, so that the first event shows as an increase in PromQL.
        metrics.corrupt_chunks.labels(name)
        metrics.tier_evictions.labels(name)
    for reason in ("queue_full", "ram_full"):
        metrics.dropped_writes.labels(reason)
    return store.start()


def _with_codec(tier: Tier, codec_name: str, registry: CodecRegistry) -> Tier:
    """`tier` itself for raw chunks, else wrapped to store them in `codec_name`."""
    codec = registry.by_name(codec_name)
    return tier if codec.codec_id == RawCodec.codec_id else CodecTier(tier, codec, registry)
