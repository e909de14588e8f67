"""DaemonClient: the `ChunkStore` an engine process uses to reach `kvdepot serve`.

Runs in the engine process. It maps the daemon's shared-memory RAM tier and moves KV bytes
with one copy each way; only small control messages cross the socket.

Failure policy (no fate-sharing): when the daemon is unreachable, every call degrades to
"miss" (lookups, reads) or "dropped" (stores), counted in `kvdepot_client_degraded_calls_total`
and logged at most every few seconds; the client retries the connection at most every
`reconnect_interval_s` and carries on transparently once the daemon is back. Nothing raises
into the engine. The client is thread-safe (one request on the socket at a time).

Replies nobody needs (a lease's `Release`, `Remember`) are not waited for: the request is
sent and its reply read, and dropped, before the next call's (the daemon answers in order).
That takes two of a warm read's round trips off the critical path.

Memory safety: the daemon frees a client's leased and reserved arena memory when the
client's connection closes, so a connection is never closed while one of its reads or
writes still touches the arena: on a failure it is *parked* (kept open, unused) and closed
by the last such operation to finish. Only chunks the daemon reports stored (visible) count
as stored; a key another client is writing is not. Every chunk is bound to its key before it
is written (`EncodedChunk.bound`). The socket must belong to this user (or root): another
local user's fake daemon is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from kvdepot.codec.format import EncodedChunk
from kvdepot.config import KVDepotConfig
from kvdepot.continuations import Continuation, Root, TailQuery
from kvdepot.daemon import protocol as p
from kvdepot.errors import CorruptChunk
from kvdepot.keys import ChunkKey
from kvdepot.logutil import RateLimitedLog
from kvdepot.metrics import Metrics
from kvdepot.misses import TIER_UNAVAILABLE, miss, tier_label
from kvdepot.namespaces import Recipe
from kvdepot.store import Prefix, PrefixHit
from kvdepot.tiers.arena import HostBuffer
from kvdepot.tiers.base import TierUsage

logger = logging.getLogger(__name__)


class DaemonClient:
    """Talks to one daemon over a Unix socket (or TCP with a token)."""

    def __init__(
        self,
        *,
        socket_path: Path | None,
        tcp_address: tuple[str, int] | None = None,
        token: str = "",
        connect_timeout_s: float = 1.0,
        request_timeout_s: float = 10.0,
        reconnect_interval_s: float = 1.0,
        client_name: str = "",
        metrics: Metrics | None = None,
        eager_map: bool = True,
    ) -> None:
        """`eager_map=False`: map the daemon's shared memory only when a read or a store
        first needs it (a client that only looks up, such as vLLM's scheduler, never maps it:
        populating a GiB of page tables takes about a second)."""
        self.socket_path = socket_path
        self.tcp_address = tcp_address
        self.token = token
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.reconnect_interval_s = reconnect_interval_s
        self.client_name = client_name or f"{Path(sys.argv[0]).name}:{os.getpid()}"
        self.metrics = metrics if metrics is not None else Metrics()
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._buffer: HostBuffer | None = None
        self._shm_path = ""  # the daemon's shared memory, mapped by `_arena`
        self.eager_map = eager_map
        self._next_attempt_s = 0.0
        self._num_unread = 0  # replies to posted requests, still in the socket
        self._in_flight: dict[socket.socket, int] = {}  # reads/writes touching the arena
        self._parked: set[socket.socket] = set()  # failed, closed when no longer in flight
        self._recipes: list[Recipe] = []  # announced: sent again on every new connection
        self._log = RateLimitedLog(logger, interval_s=5.0)

    @classmethod
    def from_config(
        cls,
        config: KVDepotConfig,
        metrics: Metrics | None = None,
        *,
        socket_path: Path | None = None,
        client_name: str = "",
        eager_map: bool = True,
    ) -> DaemonClient:
        """A client of the daemon `config` names, or of the server on `socket_path` (an
        embedded store served to its engine's other processes), with `config`'s timeouts."""
        d = config.daemon
        tcp = d.tcp_host and socket_path is None
        return cls(
            socket_path=None if tcp else (socket_path or Path(d.socket_path)),
            tcp_address=(d.tcp_host, d.tcp_port) if tcp else None,
            token=d.token,
            connect_timeout_s=d.connect_timeout_s,
            request_timeout_s=d.request_timeout_s,
            reconnect_interval_s=d.reconnect_interval_s,
            metrics=metrics,
            client_name=client_name,
            eager_map=eager_map,
        )

    # ---- connection ----------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._sock is not None

    def _connect(self) -> None:
        if self.tcp_address is not None:
            sock = socket.create_connection(self.tcp_address, timeout=self.connect_timeout_s)
        else:
            _check_owner(Path(str(self.socket_path)))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.connect_timeout_s)
            try:
                sock.connect(str(self.socket_path))
            except OSError:
                sock.close()
                raise
        try:
            hello = p.Hello(p.PROTOCOL_VERSION, self.client_name, os.getpid(), self.token)
            p.send(sock, hello)
            welcome = p.recv_response(sock)
            if not isinstance(welcome, p.Welcome):
                raise ConnectionError(f"daemon refused the connection: {welcome}")
            if self._buffer is None or str(self._buffer.path) != welcome.shm_path:
                _check_owner(Path(welcome.shm_path))
                self._buffer = None  # another daemon's memory: mapped again when needed
                self._shm_path = welcome.shm_path
                if self.eager_map:
                    self._buffer = HostBuffer.map_shared(Path(welcome.shm_path))
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.request_timeout_s)
        self._sock = sock
        for recipe in self._recipes:  # replies read by the next call, like any posted one
            p.send(sock, p.Announce(recipe))
            self._num_unread += 1
        self.metrics.client_reconnects.inc()
        logger.info("connected to the kvdepot daemon (%s)", self.socket_path or self.tcp_address)

    def _arena(self) -> HostBuffer | None:
        """The daemon's shared memory, mapped on first use (call with the lock held)."""
        if self._buffer is None and self._shm_path and self._sock is not None:
            try:
                _check_owner(Path(self._shm_path))  # again: it is opened only now
                self._buffer = HostBuffer.map_shared(Path(self._shm_path))
            except (OSError, p.ProtocolError) as exc:
                self._log.warning("map", "kvdepot: cannot map the daemon's memory: %s", exc)
        return self._buffer

    def _disconnect(self, reason: object) -> None:
        self._num_unread = 0
        if self._sock is not None:
            if self._in_flight.get(self._sock):
                self._parked.add(self._sock)  # the daemon must not free what is in use
            else:
                self._sock.close()
            self._sock = None
            self._log.warning("lost", "kvdepot daemon unreachable (%s): serving misses", reason)
        self._next_attempt_s = time.monotonic() + self.reconnect_interval_s

    def _say_unreachable(self, exc: BaseException) -> None:
        """Once (then every few seconds at most): where no daemon answered, and what to do."""
        if self.tcp_address is not None:
            where, start = f"{self.tcp_address[0]}:{self.tcp_address[1]}", "--daemon-tcp-host"
        else:
            where = str(self.socket_path)
            start = f"--daemon-socket-path {where}"
        self._log.warning(
            "unreachable",
            "kvdepot: no daemon answers at %s (%s): every lookup is a miss and nothing is "
            "stored until one runs there; start one with `kvdepot serve %s`",
            where, exc, start,
        )  # fmt: skip

    def _call(self, request: p.Request, op: str, *, wait: bool = True) -> p.Response | None:
        """The daemon's answer, or None when it cannot be had (degraded: miss / drop).
        `wait=False` posts the request: its reply is read and dropped by the next call."""
        with self._lock:
            if self._sock is None:
                if time.monotonic() < self._next_attempt_s:
                    self.metrics.client_degraded.labels(op).inc()
                    return None
                try:
                    self._connect()
                except (OSError, p.ProtocolError) as exc:
                    self._disconnect(exc)
                    self._say_unreachable(exc)
                    self.metrics.client_degraded.labels(op).inc()
                    return None
            assert self._sock is not None
            try:
                p.send(self._sock, request)
                if not wait:
                    self._num_unread += 1
                    return None
                while self._num_unread:
                    p.recv_response(self._sock)  # a posted request's reply
                    self._num_unread -= 1
                response = p.recv_response(self._sock)
            except (OSError, p.ProtocolError) as exc:
                self._disconnect(exc)
                self.metrics.client_degraded.labels(op).inc()
                return None
        if isinstance(response, p.Failure):
            self._log.warning(f"fail-{op}", "kvdepot daemon: %s failed: %s", op, response.message)
            return None
        return response

    # ---- ChunkStore ----------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        response = self._call(p.Contains([k.to_bytes() for k in keys]), "contains")
        return response.found if isinstance(response, p.Found) else [False] * len(keys)

    def lookup(self, keys: Sequence[ChunkKey]) -> int:
        response = self._call(p.Lookup([k.to_bytes() for k in keys]), "lookup")
        return response.count if isinstance(response, p.Count) else 0

    def _hold(self) -> socket.socket | None:
        """Mark the current connection in use by an arena read/write (call under the lock)."""
        sock = self._sock
        if sock is not None:
            self._in_flight[sock] = self._in_flight.get(sock, 0) + 1
        return sock

    def _unhold(self, sock: socket.socket | None) -> None:
        """End `_hold`; closes a parked connection once nothing touches its memory."""
        if sock is None:
            return
        with self._lock:
            self._in_flight[sock] -= 1
            if self._in_flight[sock]:
                return
            del self._in_flight[sock]
            if sock in self._parked:
                self._parked.discard(sock)
                sock.close()

    def match(self, keys: Sequence[ChunkKey], tail: TailQuery | None) -> PrefixHit:
        wire_tail = None if tail is None else _wire_tail(tail, len(keys))
        request = p.Lookup([k.to_bytes() for k in keys], wire_tail, explain=True)
        response = self._call(request, "lookup")
        if isinstance(response, p.Count):  # a daemon from before `explain`
            return PrefixHit(response.count)
        if not isinstance(response, p.Matched):  # unreachable (or it failed): a miss here
            return PrefixHit(0, miss=miss(TIER_UNAVAILABLE, "daemon"))
        hit = _hit(response.num_chunks, response.partial_key, response.num_partial_tokens)
        return dataclasses.replace(
            hit, miss=response.miss[:64], held_elsewhere=max(0, response.held_elsewhere)
        )

    @contextlib.contextmanager
    def read(self, keys: Sequence[ChunkKey]) -> Iterator[list[memoryview | bytes]]:
        """Views into the shared arena of the leading hits, pinned by a daemon lease."""
        with self._read(p.Read([k.to_bytes() for k in keys])) as prefix:
            yield prefix.blobs

    @contextlib.contextmanager
    def read_prefix(self, keys: Sequence[ChunkKey], tail: TailQuery | None) -> Iterator[Prefix]:
        """`read` and (with a tail) the partial chunk after the leading run, in one round
        trip."""
        wire_tail = None if tail is None else _wire_tail(tail, len(keys))
        request = p.Read([k.to_bytes() for k in keys], wire_tail)
        with self._read(request) as prefix:
            yield prefix

    @contextlib.contextmanager
    def _read(self, request: p.Read) -> Iterator[Prefix]:
        with self._lock:
            response = self._call(request, "read")
            buffer = self._arena() if isinstance(response, p.Extents) else None
            sock = self._hold() if isinstance(response, p.Extents) else None
        if not isinstance(response, p.Extents) or buffer is None:
            self._unhold(sock)
            yield Prefix([], PrefixHit(0))
            return
        try:
            blobs: list[memoryview | bytes] = [
                buffer.view[offset : offset + size]
                for offset, size in zip(response.offsets, response.sizes, strict=True)
            ]
            num_partial = response.num_partial_tokens
            num_chunks = len(blobs) - (num_partial > 0)
            sources = response.sources if len(response.sources) == len(blobs) else []
            hit = _hit(num_chunks, response.partial_key, num_partial)
            yield Prefix(blobs, hit, tuple(tier_label(name[:16]) for name in sources))
        finally:
            with self._lock:
                if self._sock is sock:  # else the lease ends with its (parked) connection
                    self._call(p.Release(response.lease_id), "release", wait=False)
            self._unhold(sock)

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int:
        """Reserve arena slots, copy the chunks in, commit; returns chunks stored (visible
        now, or written by this call)."""
        raw_keys = [key.to_bytes() for key, _ in items]
        with self._lock:
            reply = self._call(p.Reserve(raw_keys, [c.nbytes for _, c in items]), "put")
            buffer = self._arena() if isinstance(reply, p.Slots) else None
            sock = self._hold() if isinstance(reply, p.Slots) else None
        try:
            if not isinstance(reply, p.Slots) or buffer is None:
                return 0
            written, aborted = self._write_slots(buffer, items, raw_keys, reply.offsets)
            with self._lock:
                is_same = self._sock is sock
            if not is_same:
                return 0  # the reservations end with their (parked) connection
            committed = self._call(p.Commit(written, aborted), "put")
        finally:
            self._unhold(sock)
        num_present = sum(offset == p.SLOT_STORED for offset in reply.offsets)
        return num_present + (committed.count if isinstance(committed, p.Count) else 0)

    def _write_slots(
        self,
        buffer: HostBuffer,
        items: Sequence[tuple[ChunkKey, EncodedChunk]],
        raw_keys: list[bytes],
        offsets: list[int],
    ) -> tuple[list[bytes], list[bytes]]:
        """Copy each chunk into its reserved slot: (written, aborted) keys. Whatever goes
        wrong, every reserved key is in one of the two, so none stays reserved."""
        written: list[bytes] = []
        reserved = [raw for raw, offset in zip(raw_keys, offsets, strict=False) if offset >= 0]
        if len(offsets) != len(items):
            self._log.warning("slots", "kvdepot daemon answered %d slots for %d chunks",
                              len(offsets), len(items))  # fmt: skip
            return [], reserved
        try:
            for raw, (key, chunk), offset in zip(raw_keys, items, offsets, strict=True):
                if offset < 0:
                    continue
                try:
                    chunk.bound(key).write_into(buffer.view[offset : offset + chunk.nbytes])
                    written.append(raw)
                except (ValueError, IndexError, CorruptChunk) as exc:
                    self._log.warning("write", "kvdepot: copying a chunk failed: %s", exc)
        except BaseException:
            written = []
            self._call(p.Commit([], reserved), "put", wait=False)
            raise
        done = set(written)
        return written, [raw for raw in reserved if raw not in done]

    def remember(self, entries: Sequence[Continuation], roots: Sequence[Root] = ()) -> None:
        if entries:
            parents, children, tokens = zip(*entries, strict=True)
            request = p.Remember(
                [k.to_bytes() for k in parents], [k.to_bytes() for k in children], list(tokens),
                [r[0].to_bytes() for r in roots], [r[1] for r in roots], [r[2] for r in roots],
            )  # fmt: skip
            self._call(request, "remember", wait=False)

    def announce(self, recipe: Recipe) -> None:
        """Posted; kept, and sent again whenever the client reconnects."""
        with self._lock:
            if recipe in self._recipes:
                return
            self._recipes.append(recipe)
        self._call(p.Announce(recipe), "announce", wait=False)

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
        """Posted (not waited for): the daemon counts tokens per model and per client."""
        request = p.Tokens(
            model, looked_up, hit, partial, stored, setup, dict(missed or {}), saved_s
        )
        self._call(request, "tokens", wait=False)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        self._call(p.Delete([k.to_bytes() for k in keys]), "delete")

    def flush(self, timeout_s: float = 30.0) -> bool:
        response = self._call(p.Flush(timeout_s), "flush")
        return isinstance(response, p.Done) and response.ok

    def clear(self) -> None:
        self._call(p.Clear(), "clear")

    def stats(self) -> dict[str, object]:
        """The daemon's state (empty when it is unreachable)."""
        response = self._call(p.Stats(), "stats")
        return response.stats if isinstance(response, p.StatsReply) else {}

    def usage(self) -> dict[str, TierUsage]:
        tiers = self.stats().get("tiers", {})
        if not isinstance(tiers, dict):
            return {}
        return {  # the stats hold more per tier (traffic): keep the usage fields
            name: TierUsage(fields["used_bytes"], fields["capacity_bytes"], fields["num_objects"])
            for name, fields in tiers.items()
        }

    def close(self) -> None:
        """Disconnect. A connection that a read or write still uses is parked (closed by
        the last of them), and the mapping stays while anything uses it."""
        with self._lock:
            if self._sock is not None:
                if self._in_flight.get(self._sock):
                    self._parked.add(self._sock)
                else:
                    self._sock.close()
                self._sock = None
            if self._buffer is not None and not self._in_flight:
                self._buffer.close()
            self._buffer = None


def _check_owner(path: Path) -> None:
    """Refuse a socket or shared-memory file another user owns (a fake daemon could serve
    wrong bytes, or read our KV): ConnectionError."""
    try:
        owner = os.stat(path).st_uid
    except OSError as exc:
        raise ConnectionError(f"{path}: {exc}") from None
    if owner not in (os.geteuid(), 0):
        raise ConnectionError(f"{path} belongs to uid {owner}, not to this user: refused")


_FRAME_HEADROOM_BYTES = 4096


def _wire_tail(tail: TailQuery, num_keys: int) -> p.Tail | None:
    """`tail` for the wire; None (no partial matching) when the frame would outgrow
    `MAX_FRAME_BYTES`, i.e. for prompts of ~250K tokens and more."""
    frame_nbytes = len(tail.tokens) + 34 * num_keys + _FRAME_HEADROOM_BYTES
    if frame_nbytes > p.MAX_FRAME_BYTES:
        return None
    return p.Tail(tail.root.to_bytes(), tail.tokens, tail.chunk_size_tokens, tail.min_tokens)


def _hit(num_chunks: int, partial_key: bytes, num_partial_tokens: int) -> PrefixHit:
    if not num_partial_tokens or len(partial_key) != 32:
        return PrefixHit(num_chunks)
    return PrefixHit(num_chunks, ChunkKey.from_bytes(partial_key), num_partial_tokens)
