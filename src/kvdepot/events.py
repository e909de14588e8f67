"""KV events: the cache's whole lifecycle, from every tier, in vLLM's `KVEventBatch` format.

Runs in the process that owns the `TieredStore` (the daemon, or an embedded engine): the
store reports what each tier gained and lost (`KVEvents.stored` / `removed` / `cleared`),
and one publisher thread batches the events and sends them on a ZeroMQ PUB socket, as
vLLM's own `ZmqEventPublisher` does, so that cache-aware routers (llm-d's indexer, NVIDIA
Dynamo's KV router, anything that reads vLLM's events) learn where each prompt's KV sits.

Wire format (vLLM >= 0.24, which the routers above decode):
- each message is three frames: topic, an 8-byte big-endian sequence number (0, 1, ... per
  publisher), and the msgpack payload;
- the payload is `[ts, events, data_parallel_rank]`; each event a map tagged by `type`:
  `BlockStored` {block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name}, `BlockRemoved` {block_hashes, medium}, `AllBlocksCleared` {};
- a block is one kvdepot chunk: `block_size` is the chunk size in tokens, and its hash is a
  uint64 derived from the chunk's key (`event_hash`); the parent is the previous chunk of the
  same prompt, or nil for a prompt's first chunk;
- `medium` names the tier (`EventsConfig.media`: RAM is `CPU` as in vLLM's offloading, then
  `DISK`, `VALKEY`, `S3` by default) and `locality` says `LOCAL` (RAM, disk) or `REMOTE` (a
  tier every instance shares);
- an optional ROUTER socket answers replay requests (an 8-byte start sequence number) with
  the buffered batches from there on, then a batch numbered -1, as vLLM's publisher does.

Invariants:
- Off by default (`events.enabled`); nothing here ever blocks or fails a store operation:
  events go to a bounded queue, and what does not fit is dropped and counted
  (`kvdepot_events_dropped_total{reason}`).
- A stored event is published only with its chunk's tokens and parent (its lineage, which
  engines send with each store): a chunk whose lineage this process never learned (a
  segment, a partial tail, a chunk another machine wrote to a shared tier) is not announced,
  and counted as dropped (`no_lineage`). A removed event needs only the key.
- Only namespaces an engine marked public are announced: a tenant-salted namespace (a
  `cache_salt`, a LoRA adapter, multimodal inputs) never puts its token ids on the bus.
- Each event's topic names its model (`{model}`: the first name the engine announced).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from kvdepot.config import EventsConfig
from kvdepot.continuations import Root
from kvdepot.errors import ConfigError
from kvdepot.keys import ChunkKey
from kvdepot.metrics import Metrics

logger = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The sequence number that ends a replay (vLLM's)."""
SHARED_TIERS = frozenset({"valkey", "s3"})
"""Tiers every instance reads: their chunks are REMOTE to any one publisher."""
_MASK64 = (1 << 64) - 1


# ---- the wire: vLLM's event types, field for field --------------------------------------


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    locality: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[int]
    medium: str | None
    locality: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


def event_hash(key: ChunkKey) -> int:
    """A chunk's block hash on the bus: 64 bits of its key (namespace and chained hash both,
    so two namespaces' chunks of the same tokens never share a block hash)."""
    raw = key.to_bytes()
    return (int.from_bytes(raw[:8], "big") ^ int.from_bytes(raw[16:24], "big")) & _MASK64


# ---- configuration ----------------------------------------------------------------------


def offset_endpoint(endpoint: str, offset: int) -> str:
    """`endpoint` for the `offset`-th of several publishers on one host (a TP rank's own
    embedded store): a TCP port moved up by `offset` (0 stays: the OS picks), another
    transport's address suffixed; unchanged for offset 0."""
    if not endpoint or offset == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        return endpoint if port == "0" else f"{base}:{int(port) + offset}"
    return f"{endpoint}_{offset}"


@dataclass(frozen=True, slots=True)
class EventsSettings:
    """`EventsConfig`, checked and resolved (see `kvdepot.config.EventsConfig`)."""

    endpoint: str
    replay_endpoint: str
    topic: str
    instance: str
    media: dict[str, str]
    batch_interval_s: float
    max_queue_events: int
    replay_batches: int
    lineage_bytes: int
    data_parallel_rank: int = 0

    @classmethod
    def from_config(cls, e: EventsConfig) -> EventsSettings:
        """The `events` section, checked (ConfigError naming what is wrong) and resolved."""
        e.validate()
        return cls(e.endpoint, e.replay_endpoint, e.topic, e.instance or socket.gethostname(),
                   e.media_map(), e.batch_interval_s, e.max_queue_events, e.replay_batches,
                   e.lineage_bytes)  # fmt: skip

    def medium(self, tier: str) -> str:
        return self.media.get(tier, tier.upper())

    def locality(self, tier: str) -> str:
        return "REMOTE" if tier in SHARED_TIERS else "LOCAL"

    def topic_of(self, model: str) -> bytes:
        return self.topic.replace("{instance}", self.instance).replace("{model}", model).encode()


# ---- what the store calls ---------------------------------------------------------------


class Lineage:
    """Each announced chunk's parent and tokens, and each public namespace's model name
    (bounded: `max_bytes` of tokens, least recently learned first)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._chunks: OrderedDict[ChunkKey, tuple[ChunkKey, bytes]] = OrderedDict()
        self._roots: OrderedDict[ChunkKey, None] = OrderedDict()
        self._models: dict[bytes, tuple[str, int]] = {}  # namespace -> (model, chunk size)
        self._nbytes = 0
        self._lock = threading.Lock()

    def learn_root(self, root: ChunkKey, model: str, chunk_size_tokens: int) -> None:
        with self._lock:
            self._roots[root] = None
            self._roots.move_to_end(root)
            self._models[root.namespace] = (model, chunk_size_tokens)
            while len(self._roots) > 4096:
                old, _ = self._roots.popitem(last=False)
                self._models.pop(old.namespace, None)

    def learn(self, parent: ChunkKey, child: ChunkKey, tokens: bytes) -> None:
        with self._lock:
            if child.namespace not in self._models:
                return  # not a public namespace: never announced
            old = self._chunks.pop(child, None)
            if old is not None:
                self._nbytes -= len(old[1])
            self._chunks[child] = (parent, tokens)
            self._nbytes += len(tokens) + 96
            while self._nbytes > self.max_bytes and self._chunks:
                _, (_, dropped) = self._chunks.popitem(last=False)
                self._nbytes -= len(dropped) + 96

    def of(self, key: ChunkKey) -> tuple[ChunkKey | None, bytes] | None:
        """(parent, or None for a prompt's first chunk; tokens), None if unknown."""
        with self._lock:
            found = self._chunks.get(key)
            if found is None:
                return None
            parent, tokens = found
            return (None if parent in self._roots else parent), tokens

    def namespace_of(self, key: ChunkKey) -> tuple[str, int] | None:
        """(model, chunk size) of a public namespace's key; None for any other."""
        with self._lock:
            return self._models.get(key.namespace)

    def models(self) -> list[str]:
        with self._lock:
            return sorted({model for model, _ in self._models.values()})


class KVEvents:
    """The store's side: turns tier changes into events and queues them for the publisher."""

    def __init__(self, settings: EventsSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.lineage = Lineage(settings.lineage_bytes)
        self._queue: queue.Queue[tuple[bytes, Event] | None] = queue.Queue(
            settings.max_queue_events
        )
        self.publisher = ZmqPublisher(settings, self._queue, metrics)
        metrics.note_gone_listeners.append(self._gone)

    def learn(
        self,
        entries: Sequence[tuple[ChunkKey, ChunkKey, bytes]],
        roots: Sequence[Root] = (),
    ) -> None:
        """Lineage from an engine: public roots (with their model), then (parent, child,
        tokens) of chunks it stores."""
        for root, model, chunk_size_tokens in roots:
            if model:
                self.lineage.learn_root(root, model, chunk_size_tokens)
        for parent, child, tokens in entries:
            self.lineage.learn(parent, child, tokens)

    def stored(self, keys: Sequence[ChunkKey], tier: str) -> None:
        """`keys` (one chain, head first) are now held by `tier`."""
        s = self.settings
        medium, locality = s.medium(tier), s.locality(tier)
        for key in keys:
            namespace = self.lineage.namespace_of(key)
            if namespace is None:
                continue  # not a public namespace
            model, chunk_size_tokens = namespace
            found = self.lineage.of(key)
            if found is None:
                self.metrics.events_dropped.labels("no_lineage").inc()
                continue
            parent, tokens = found
            if len(tokens) != 4 * chunk_size_tokens:
                continue  # a partial tail: not a block (vLLM announces full blocks only)
            event = BlockStored(
                block_hashes=[event_hash(key)],
                parent_block_hash=None if parent is None else event_hash(parent),
                token_ids=np.frombuffer(tokens, dtype="<i4").tolist(),
                block_size=chunk_size_tokens,
                lora_id=None,
                medium=medium,
                lora_name=None,
                locality=locality,
            )
            self._put(s.topic_of(model), event)

    def removed(self, keys: Sequence[ChunkKey], tier: str) -> None:
        """`keys` left `tier` (evicted, found corrupt, deleted)."""
        s = self.settings
        by_model: dict[str, list[int]] = {}
        for key in keys:
            namespace = self.lineage.namespace_of(key)
            if namespace is not None:
                by_model.setdefault(namespace[0], []).append(event_hash(key))
        for model, hashes in by_model.items():
            event = BlockRemoved(hashes, s.medium(tier), s.locality(tier))
            self._put(s.topic_of(model), event)

    def cleared(self) -> None:
        """Every tier was emptied: one `AllBlocksCleared` per known model's topic."""
        for model in self.lineage.models():
            self._put(self.settings.topic_of(model), AllBlocksCleared())

    def _gone(self, keys: Sequence[ChunkKey], reason: str, tier: str) -> None:
        self.removed(keys, tier)

    def _put(self, topic: bytes, event: Event) -> None:
        try:
            self._queue.put_nowait((topic, event))
        except queue.Full:
            self.metrics.events_dropped.labels("queue_full").inc()

    def close(self) -> None:
        if self._gone in self.metrics.note_gone_listeners:
            self.metrics.note_gone_listeners.remove(self._gone)
        self.publisher.close()


# ---- the publisher thread ---------------------------------------------------------------


class ZmqPublisher:
    """Batches queued events per topic every `batch_interval_s` and publishes them (PUB),
    keeping the last `replay_batches` for replay (ROUTER)."""

    def __init__(
        self,
        settings: EventsSettings,
        events: queue.Queue[tuple[bytes, Event] | None],
        metrics: Metrics,
    ) -> None:
        import zmq  # an optional dependency: only when events are on

        self.settings = settings
        self.metrics = metrics
        self._events = events
        self._ctx: Any = zmq.Context.instance()
        self._pub: Any = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay: Any = None
        try:
            self._pub.bind(settings.endpoint)
            if settings.replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(settings.replay_endpoint)
        except zmq.ZMQError as exc:
            self._pub.close()
            if self._replay is not None:
                self._replay.close()
            raise ConfigError(f"events: cannot bind {settings.endpoint}: {exc}") from None
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = (
            self._replay.getsockopt_string(zmq.LAST_ENDPOINT) if self._replay else ""
        )
        self._buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=settings.replay_batches)
        self._seq = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvdepot-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        interval = self.settings.batch_interval_s
        while True:
            stopping = self._stop.is_set()
            pending: dict[bytes, list[Event]] = {}
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0 or stopping:
                try:
                    item = (
                        self._events.get(timeout=max(left, 0.0))
                        if not stopping
                        else (self._events.get_nowait())
                    )
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    continue
                topic, event = item
                pending.setdefault(topic, []).append(event)
            for topic, events in pending.items():
                self._send(topic, events)
            if self._replay is not None:
                while poller.poll(0):
                    self._serve_replay()
            if stopping:
                return

    def _send(self, topic: bytes, events: list[Event]) -> None:
        batch = KVEventBatch(time.time(), events, self.settings.data_parallel_rank)
        payload = self._encoder.encode(batch)
        seq = self._seq
        self._seq += 1
        try:
            self._pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
        except Exception as exc:  # a send never blocks a PUB socket; anything else: count
            logger.warning("kvdepot: publishing KV events failed: %s", exc)
            self.metrics.events_dropped.labels("send_failed").inc(len(events))
            return
        self._buffer.append((seq, topic, payload))
        for event in events:
            self.metrics.events.labels(type(event).__name__).inc()

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            return
        client, start = frames[0], int.from_bytes(frames[2], "big")
        for seq, topic, payload in list(self._buffer):
            if seq >= start:
                self._replay.send_multipart((client, b"", topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))

    def close(self) -> None:
        """Publish what is queued, then stop."""
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._events.put(None, timeout=1.0)
        self._thread.join(timeout=5.0)
        self._pub.close()
        if self._replay is not None:
            self._replay.close()
