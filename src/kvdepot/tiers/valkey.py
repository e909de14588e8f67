"""The Valkey/Redis tier: sealed chunks as values on one server or a cluster, shared by hosts.

Runs in the process that owns the `TieredStore` (engine or daemon); many such processes, on
many hosts, may share one server. Key of a chunk: `<prefix>:<namespace hex>:{<hash hex>}`. The
namespace digest carries model fingerprint, layout, shard rank and tenant salt, so namespaces
never share a key; the braces are a cluster hash tag, which puts all parts of one chunk on the
same node. A blob of at most `part_size_bytes` is one value; a larger one is stored as parts
`<key>:0 .. <key>:n-1` of near-equal size, and `<key>` holds a 16-byte manifest ("KVDP", part
count, blob length) written after the parts, so a reader that finds the manifest finds the parts.
A read is one round trip for the values (or manifests), then one for all the parts of all split
blobs, each part read from the socket straight into its place in its blob's memory.

Invariants:
- `get` serves only blobs whose checksum verifies (`open_blob(verify=True)`); a corrupt or
  incomplete value (a part evicted, expired or of another size) is deleted and answered as a
  miss.
- Every server call has a connect and a read timeout and goes through the node's circuit
  breaker; a failure is a miss or a dropped put, counted and logged (rate-limited), never an
  exception out of `contains` / `get` / `put` / `delete` / `clear`.
- Writes send the header and the payload straight from the chunk's memory, and reads land in
  the returned blob's memory: no copy of a value is made in this process (see
  `kvdepot.tiers.valkey_wire`).
- Cluster mode routes each key to the primary that owns its slot (`CLUSTER SLOTS`, refreshed
  on a MOVED reply or when a node's breaker opens); a node that is down costs misses for its
  slots only. Servers should keep serving with slots uncovered
  (`cluster-require-full-coverage no`) and evict with `maxmemory-policy allkeys-lru` (or use
  `ttl_s`).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kvdepot.codec.format import (
    HEADER_NBYTES,
    MAX_CHUNK_BYTES,
    ChecksumStream,
    EncodedChunk,
    open_blob,
)
from kvdepot.errors import ConfigError, CorruptChunk
from kvdepot.keys import ChunkKey
from kvdepot.logutil import RateLimitedLog
from kvdepot.metrics import Metrics, TierMetrics
from kvdepot.remote_config import ValkeyConfig
from kvdepot.tiers.base import TierUsage
from kvdepot.tiers.breaker import CircuitBreaker
from kvdepot.tiers.valkey_wire import (
    REMOTE_ERRORS,
    BytesBuilder,
    Gather,
    NodeClient,
    Tap,
    is_timeout,
    key_slot,
    open_client,
)

logger = logging.getLogger(__name__)

_MANIFEST = struct.Struct("<4sIQ")
_MANIFEST_MAGIC = b"KVDP"
_MIN_PART_NBYTES = 1024  # the least `part_size_bytes`: bounds a manifest's part count
_NUM_SLOTS = 16384
_REFRESH_INTERVAL_S = 1.0
_SCAN_COUNT = 512
T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class _Node:
    address: str
    client: NodeClient
    breaker: CircuitBreaker


class ValkeyTier:
    """Chunks in Valkey or Redis, with per-node circuit breakers."""

    name = "valkey"

    def __init__(self, config: ValkeyConfig, metrics: TierMetrics | None = None) -> None:
        """Wire a tier; nothing connects until the first call (see `open_valkey_tier`).

        Raises:
            ConfigError: `config` is invalid or names no address.
        """
        self.config = config.validate()
        self._seeds = config.addresses()
        if not self._seeds:
            raise ConfigError("valkey.address is not set: give host:port of the server")
        self._prefix = config.key_prefix
        self._metrics = metrics if metrics is not None else Metrics().tier(self.name)
        self._log = RateLimitedLog(logger)
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._slots: list[_Node | None] | None = None  # cluster mode: owner of each slot
        self._last_refresh_s = -_REFRESH_INTERVAL_S
        self._num_objects = 0
        self._num_bytes = 0
        self._is_closed = False

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        found = [False] * len(keys)
        for node, idx in self._route(keys, "contains"):
            replies = self._pipeline(
                node, "contains", [("EXISTS", self._name(keys[i])) for i in idx]
            )
            for i, reply in zip(idx, replies or [], strict=False):
                found[i] = reply == 1
        return found

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        start = time.perf_counter()
        blobs: list[bytes | None] = [None] * len(keys)
        for node, idx in self._route(keys, "get"):
            for i, blob in zip(idx, self._get_on(node, [keys[i] for i in idx]), strict=True):
                blobs[i] = blob
        num_hits = sum(blob is not None for blob in blobs)
        self._metrics.op("get", "hit", num_hits)
        self._metrics.bytes("read", sum(len(blob) for blob in blobs if blob is not None))
        self._metrics.latency("get", time.perf_counter() - start)
        return blobs

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int:
        start = time.perf_counter()
        batch = dict(items)
        keys = list(batch)
        num_stored = 0
        for node, idx in self._route(keys, "put"):
            num_stored += self._put_on(node, [(keys[i], batch[keys[i]]) for i in idx])
        self._metrics.op("put", "ok", num_stored)
        self._metrics.latency("put", time.perf_counter() - start)
        return num_stored

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        unique = list(dict.fromkeys(keys))
        for node, idx in self._route(unique, "delete"):
            names = [self._name(unique[i]) for i in idx]
            probes: list[tuple[object, ...]] = []
            for name in names:
                probes += [("GETRANGE", name, 0, _MANIFEST.size - 1), ("STRLEN", name)]
            replies = self._pipeline(node, "delete", probes, len(names))
            if not replies:
                continue
            doomed: list[str] = []
            num_bytes = num_objects = 0
            for name, head, size in zip(names, replies[::2], replies[1::2], strict=True):
                found = _manifest(head)
                doomed += _names_of(name, found)
                if isinstance(size, int) and size > 0:
                    num_objects += 1
                    num_bytes += size if found is None else found[1]
            if self._pipeline(node, "delete", [("UNLINK", *doomed)], len(names)) is not None:
                self._account(-num_bytes, -num_objects)

    def clear(self) -> None:
        """Remove every chunk under this tier's key prefix (all namespaces and tenants)."""
        for node in self._primaries():
            self._call(node, "clear", 0, self._clear_node)
        with self._lock:
            self._num_objects = self._num_bytes = 0

    def usage(self) -> TierUsage:
        """Approximate: blobs this instance stored minus those it deleted. Writes of other
        processes, expiry and server eviction are not seen; capacity is the server's
        `maxmemory` and is reported as 0 (unknown)."""
        with self._lock:
            return TierUsage(self._num_bytes, 0, self._num_objects)

    def close(self) -> None:
        """Disconnect; later calls answer misses."""
        with self._lock:
            self._is_closed = True
            nodes, self._nodes, self._slots = list(self._nodes.values()), {}, None
        for node in nodes:
            node.client.close()

    def _name(self, key: ChunkKey) -> str:
        return f"{self._prefix}:{key.namespace.hex()}:{{{key.chunk_hash.hex()}}}"

    def _get_on(self, node: _Node, keys: list[ChunkKey]) -> list[bytes | None]:
        names = [self._name(key) for key in keys]
        streams = {name: ChecksumStream() for name in names}
        taps = [streams[name].update for name in names]
        values = self._replies(node, "get", len(names), lambda client: client.get(names, taps))
        if values is None:
            return [None] * len(names)  # counted as breaker_open or error
        manifests = {j: m for j, v in enumerate(values) if (m := _manifest(v)) is not None}
        split = {names[j]: m for j, m in manifests.items()}
        streams.update({name: ChecksumStream() for name in split})
        joined = self._get_parts(node, split, streams)
        blobs: list[bytes | None] = []
        num_misses = 0
        for j, value in enumerate(values):
            found, stream = manifests.get(j), streams[names[j]]
            if found is None:
                blobs.append(self._validated(node, keys[j], None, value, stream))
            elif joined is None:
                blobs.append(None)  # the node failed meanwhile: counted there
                continue
            else:
                blobs.append(self._validated(node, keys[j], found, joined[names[j]], stream))
            num_misses += blobs[-1] is None
        self._metrics.op("get", "miss", num_misses)
        return blobs

    def _get_parts(
        self,
        node: _Node,
        manifests: dict[str, tuple[int, int]],
        streams: dict[str, ChecksumStream],
    ) -> dict[str, object] | None:
        """Each split blob (name: its manifest), its parts read in one round trip straight into
        their places in the blob's memory (and hashed into `streams[name]` on the way): the
        blob, or the `CorruptChunk` that says why it is torn, or an error reply. None if the
        node failed."""
        if not manifests:
            return {}
        builders = {name: BytesBuilder(nbytes) for name, (_, nbytes) in manifests.items()}
        lengths = self._read_parts(node, manifests, builders, streams)
        if lengths is None:
            return None
        heads = iter(lengths)
        joined: dict[str, object] = {}
        for name, (num_parts, nbytes) in manifests.items():
            expected = [end - start for start, end in _part_bounds(nbytes, num_parts)]
            got = [next(heads) for _ in expected]
            torn = _torn(got, expected)
            joined[name] = builders[name].finish() if torn is None else torn
        return joined

    def _read_parts(
        self,
        node: _Node,
        manifests: dict[str, tuple[int, int]],
        builders: dict[str, BytesBuilder],
        streams: dict[str, ChecksumStream],
    ) -> Sequence[int | Exception | None] | None:
        """GETs of every part into its slice of its builder, in order (the slices die on
        return, so `finish` hands the bytes out without a copy)."""
        names: list[str] = []
        targets: list[memoryview] = []
        taps: list[Tap] = []
        for name, (num_parts, nbytes) in manifests.items():
            for p, (start, end) in enumerate(_part_bounds(nbytes, num_parts)):
                names.append(f"{name}:{p}")
                targets.append(builders[name].view[start:end])
                taps.append(streams[name].update)
        return self._replies(
            node, "get", len(manifests), lambda client: client.get_into(names, targets, taps)
        )

    def _validated(
        self,
        node: _Node,
        key: ChunkKey,
        found: tuple[int, int] | None,
        value: object,
        stream: ChecksumStream,
    ) -> bytes | None:
        """`value` if it is a blob of `key` that verifies (`stream`: its bytes hashed as they
        were read); otherwise deletes it (and its parts)."""
        name = self._name(key)
        if value is None or (isinstance(value, Exception) and not isinstance(value, CorruptChunk)):
            return None  # absent, or an error reply (counted where it was sent)
        try:
            if isinstance(value, CorruptChunk):
                raise value
            if not isinstance(value, bytes):
                raise CorruptChunk(f"not a value: {type(value).__name__}")
            if found is not None and len(value) != found[1]:
                raise CorruptChunk(f"parts add up to {len(value)} bytes, not {found[1]}")
            open_blob(value, key=key, verify=True, streamed=stream)
        except CorruptChunk as exc:
            self._metrics.corrupt([key])
            self._log.warning("corrupt", "valkey tier: deleting bad chunk %s: %s", name, exc)
            self._pipeline(node, "delete", [("UNLINK", *_names_of(name, found))], 1)
            return None
        return value

    def _put_on(self, node: _Node, items: list[tuple[ChunkKey, EncodedChunk]]) -> int:
        exists = self._pipeline(node, "put", [("EXISTS", self._name(key)) for key, _ in items])
        if exists is None:
            return 0
        commands: list[tuple[object, ...]] = []
        owners: list[tuple[str, int, int]] = []  # name, number of commands, blob bytes
        for (key, chunk), present in zip(items, exists, strict=True):
            if present != 1:
                name = self._name(key)
                cmds = self._set_commands(name, chunk.bound(key).sealed())
                commands += cmds
                owners.append((name, len(cmds), chunk.nbytes))
        replies = iter(self._pipeline(node, "put", commands, len(owners)) or [])
        num_stored = len(items) - len(owners)
        for name, num_cmds, nbytes in owners:
            outcomes = [next(replies, None) for _ in range(num_cmds)]
            if all(reply is True for reply in outcomes):
                num_stored += 1
                self._metrics.bytes("write", nbytes)
                self._account(nbytes, 1)
            elif any(isinstance(reply, Exception) for reply in outcomes):
                self._metrics.op("put", "error")
                self._log.warning("put-reply", "valkey tier: SET refused: %s", outcomes)
                split = (num_cmds - 1, nbytes) if num_cmds > 1 else None
                self._pipeline(node, "delete", [("UNLINK", *_names_of(name, split))], 1)
        return num_stored

    def _set_commands(self, name: str, chunk: EncodedChunk) -> list[tuple[object, ...]]:
        """SET commands for a sealed chunk: one value, or the parts then the manifest."""
        header, payload = chunk.header.pack(), chunk.contiguous_payload()
        expiry: tuple[object, ...] = ("EX", self.config.ttl_s) if self.config.ttl_s else ()
        nbytes = len(header) + len(payload)
        num_parts = -(-nbytes // self.config.part_size_bytes)
        if num_parts == 1:
            return [("SET", name, Gather(header, payload), *expiry)]
        commands: list[tuple[object, ...]] = []
        for p, (offset, end) in enumerate(_part_bounds(nbytes, num_parts)):
            value = (
                Gather(header, payload[: end - HEADER_NBYTES])
                if offset == 0
                else Gather(payload[offset - HEADER_NBYTES : end - HEADER_NBYTES])
            )
            commands.append(("SET", f"{name}:{p}", value, *expiry))
        manifest = _MANIFEST.pack(_MANIFEST_MAGIC, num_parts, nbytes)
        return [*commands, ("SET", name, manifest, *expiry)]

    def _clear_node(self, client: NodeClient) -> None:
        batch: list[bytes] = []
        for name in client.scan_iter(f"{self._prefix}:*", _SCAN_COUNT):
            batch.append(name)
            if len(batch) >= _SCAN_COUNT:
                client.pipeline([("UNLINK", *batch)])
                batch = []
        if batch:
            client.pipeline([("UNLINK", *batch)])

    def _account(self, nbytes: int, num_objects: int = 0) -> None:
        with self._lock:
            self._num_bytes = max(0, self._num_bytes + nbytes)
            self._num_objects = max(0, self._num_objects + num_objects)

    def _pipeline(
        self, node: _Node, op: str, commands: list[tuple[object, ...]], num_chunks: int = -1
    ) -> list[object] | None:
        """Replies of `commands` sent in one round trip (errors as values), or None if the
        node is down; `num_chunks` (default: one per command) is what a failure counts."""
        if not commands:
            return []
        count = len(commands) if num_chunks < 0 else num_chunks
        return self._replies(node, op, count, lambda client: client.pipeline(commands))

    def _replies(
        self, node: _Node, op: str, count: int, fn: Callable[[NodeClient], list[R]]
    ) -> list[R] | None:
        """`_call` of a batch of commands, whose replies may say a slot moved."""
        replies = self._call(node, op, count, fn)
        if replies is not None and any(_is_moved(reply) for reply in replies):
            self._refresh(force=True)
        return replies

    def _call(self, node: _Node, op: str, count: int, fn: Callable[[NodeClient], T]) -> T | None:
        """`fn(client)` through the node's breaker; None (counted, logged) if it failed."""
        if not node.breaker.allow():
            self._metrics.op(op, "breaker_open", count)
            return None
        try:
            result = fn(node.client)
        except REMOTE_ERRORS as exc:
            node.breaker.record_failure(exc, is_timeout=is_timeout(exc))
            self._metrics.op(op, "error", count)
            self._log.warning(
                f"{op}-{node.address}", "valkey %s: %s failed: %r", node.address, op, exc
            )
            if self.config.cluster and op != "topology":
                self._refresh()  # a failover may have moved its slots to another node
            return None
        node.breaker.record_success()
        return result

    def _route(self, keys: Sequence[ChunkKey], op: str) -> Iterator[tuple[_Node, list[int]]]:
        """(node, indices of its keys) for each node that owns some of `keys`."""
        if not keys:
            return
        if not self.config.cluster:
            node = self._node(self._seeds[0])
            if node is not None:
                yield node, list(range(len(keys)))
            return
        slots = self._slot_owners()
        groups: dict[str, tuple[_Node, list[int]]] = {}
        unrouted = 0
        for i, key in enumerate(keys):
            owner = None if slots is None else slots[key_slot(key.chunk_hash.hex().encode())]
            if owner is None:
                unrouted += 1
            else:
                groups.setdefault(owner.address, (owner, []))[1].append(i)
        self._metrics.op(op, "unrouted", unrouted)
        yield from groups.values()

    def _primaries(self) -> list[_Node]:
        if not self.config.cluster:
            node = self._node(self._seeds[0])
            return [] if node is None else [node]
        slots = self._slot_owners()
        return list({n.address: n for n in slots or [] if n is not None}.values())

    def _slot_owners(self) -> list[_Node | None] | None:
        with self._lock:
            slots = self._slots
        return slots if slots is not None else self._refresh()

    def _node(self, address: str) -> _Node | None:
        with self._lock:
            if self._is_closed:
                return None
            node = self._nodes.get(address)
            if node is None:
                host, _, port = address.rpartition(":")
                cfg = self.config
                breaker = CircuitBreaker(
                    f"valkey {address}", self._metrics,
                    failure_threshold=cfg.breaker_failures,
                    cooldown_s=cfg.breaker_cooldown_ms / 1000,
                )  # fmt: skip
                node = _Node(address, open_client(cfg, host, int(port)), breaker)
                self._nodes[address] = node
            return node

    def _refresh(self, *, force: bool = False) -> list[_Node | None] | None:
        """Re-read the slot map from any reachable node (at most once a second)."""
        with self._refresh_lock:
            now = time.monotonic()
            if now - self._last_refresh_s < _REFRESH_INTERVAL_S and not force:
                return self._slots
            self._last_refresh_s = now
            with self._lock:
                known = list(self._nodes)
            for address in dict.fromkeys([*self._seeds, *known]):
                node = self._node(address)
                reply = None if node is None else self._call(node, "topology", 1, _cluster_slots)
                if node is not None and reply is not None:
                    slots = self._slot_table(reply, node.address.rpartition(":")[0])
                    with self._lock:
                        if not self._is_closed:
                            self._slots = slots
                    return slots
            return self._slots

    def _slot_table(self, reply: list[Any], default_host: str) -> list[_Node | None]:
        table: list[_Node | None] = [None] * _NUM_SLOTS
        for start, end, primary, *_replicas in reply:
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            node = self._node(f"{host or default_host}:{int(primary[1])}")
            table[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
        return table


def open_valkey_tier(config: ValkeyConfig, metrics: TierMetrics | None = None) -> ValkeyTier:
    """A Valkey tier for `config` (which must name an address); connects on first use, so a
    server that is down at start only costs misses until it is up.

    Raises:
        ConfigError: `config` is invalid or names no address.
    """
    return ValkeyTier(config, metrics)


def _cluster_slots(client: NodeClient) -> list[Any]:
    reply = client.command("CLUSTER SLOTS")
    return list(reply)


def _manifest(value: object) -> tuple[int, int] | None:
    """(number of parts, blob length) if `value` is a well-formed manifest, else None."""
    if not isinstance(value, bytes) or len(value) != _MANIFEST.size:
        return None
    magic, num_parts, nbytes = _MANIFEST.unpack(value)
    if magic != _MANIFEST_MAGIC or not 2 <= num_parts <= -(-nbytes // _MIN_PART_NBYTES):
        return None
    if -(-nbytes // -(-nbytes // num_parts)) != num_parts:
        return None  # not a split `_part_bounds` makes
    return (num_parts, nbytes) if nbytes <= MAX_CHUNK_BYTES + HEADER_NBYTES else None


def _part_bounds(nbytes: int, num_parts: int) -> list[tuple[int, int]]:
    """(start, end) of each part of a blob of `nbytes` split into `num_parts` near-equal
    parts (the last one may be shorter)."""
    part_nbytes = -(-nbytes // num_parts)
    return [(start, min(start + part_nbytes, nbytes)) for start in range(0, nbytes, part_nbytes)]


def _torn(lengths: Sequence[object], expected: list[int]) -> object:
    """What keeps the parts read (their lengths) from making up the blob, or None if they do:
    an error reply, or the `CorruptChunk` of a part missing (evicted or expired) or resized."""
    for p, (length, want) in enumerate(zip(lengths, expected, strict=True)):
        if isinstance(length, Exception):
            return length
        if length != want:
            what = "missing (evicted or expired)" if length is None else f"{length} bytes"
            return CorruptChunk(f"part {p} is {what}, not {want} bytes")
    return None


def _names_of(name: str, found: tuple[int, int] | None) -> list[str]:
    """`name` and, when it holds a manifest, the names of its parts."""
    return [name] if found is None else [name, *(f"{name}:{p}" for p in range(found[0]))]


def _is_moved(reply: object) -> bool:
    return isinstance(reply, Exception) and str(reply).startswith(("MOVED", "ASK"))
