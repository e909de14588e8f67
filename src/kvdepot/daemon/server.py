"""The daemon's socket server: sessions, two-phase stores, leased reads, limits.

Runs in the `kvdepot serve` process (or a vLLM worker hosting the cache), one thread per
client connection plus a reaper. The `TieredStore` it serves has its RAM tier in a
shared-memory file that clients map, so a store is: `Reserve` (the daemon allocates arena
slots) → the client copies its chunks into them → `Commit` (visible, write-back queued). A
read is: `Read` (the daemon pins the leading run and answers arena offsets under a lease) →
the client copies out → `Release`.

Invariants (see `kvdepot.daemon.session` for what a client holds):
- Reserved slots belong to their connection; they become visible only through `Commit`.
  `Reserve` answers -1 only for a key that is visible (stored); a key another writer holds
  is -3, never "stored" (that writer may die).
- Memory a client may still touch is never reused: leases end at `Release` or when the
  client closes its end, reservations free their memory at commit/abort or then; time
  limits only take a slow writer's key claim and report overdue leases. After a protocol
  error the daemon stops serving the connection and waits for the client to close it.
- Everything a client can make the daemon hold is bounded, with a metric when a bound
  bites: connections (`max_clients`), the hello (`handshake_timeout_s`), frames
  (`protocol.MAX_FRAME_BYTES`), token lists (`MAX_CHUNK_TOKENS`), chunk sizes, and the arena
  bytes one client holds reserved or leased (`max_client_bytes`).
- A protocol error closes that connection only; other clients are unaffected.
- TCP connections must present the token in `Hello`; the Unix socket is mode 0600 in a
  private (0700, ours) directory.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvdepot.codec.format import HEADER_NBYTES, MAX_CHUNK_BYTES
from kvdepot.config import DaemonConfig
from kvdepot.continuations import TailQuery
from kvdepot.daemon import protocol as p
from kvdepot.daemon.auth import ensure_private_dir, tokens_match
from kvdepot.daemon.session import Session
from kvdepot.keys import MAX_CHUNK_TOKENS, ChunkKey
from kvdepot.metrics import Metrics
from kvdepot.misses import clamp_missed, miss
from kvdepot.store import PrefixHit, TieredStore
from kvdepot.tiers.arena import HostBuffer
from kvdepot.tiers.memory import Refusal, WriteSlot

logger = logging.getLogger(__name__)
_MAX_TOKEN_BYTES = 4 * MAX_CHUNK_TOKENS
_REFUSAL_CODES = {Refusal.STORED: p.SLOT_STORED, Refusal.PENDING: p.SLOT_PENDING,
                  Refusal.NO_ROOM: p.SLOT_NO_ROOM}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one client may make the daemon hold, and for how long (see `DaemonConfig`)."""

    lease_ttl_s: float = 30.0
    reservation_ttl_s: float = 30.0
    max_clients: int = 128
    handshake_timeout_s: float = 5.0
    max_client_bytes: int = 0  # 0: half the arena

    @classmethod
    def from_config(cls, d: DaemonConfig) -> ServerLimits:
        return cls(
            d.lease_ttl_s,
            d.reservation_ttl_s,
            d.max_clients,
            d.handshake_timeout_s,
            d.max_client_bytes,
        )


class DaemonServer:
    """Serves one `TieredStore` (RAM tier on `buffer`, a shared-memory file) to clients."""

    def __init__(
        self,
        store: TieredStore,
        buffer: HostBuffer,
        *,
        socket_path: Path | None,
        tcp_address: tuple[str, int] | None = None,
        token: str = "",
        limits: ServerLimits | None = None,
    ) -> None:
        if tcp_address is not None and not token:
            raise ValueError("a TCP listener needs a token")
        self.store = store
        self.buffer = buffer
        self.socket_path = socket_path
        self.tcp_address = tcp_address
        self.token = token
        self.limits = limits if limits is not None else ServerLimits()
        self.max_client_bytes = self.limits.max_client_bytes or buffer.nbytes // 2
        self.metrics: Metrics = store.metrics
        self.started_at = time.time()
        self._listeners: list[socket.socket] = []
        self._sessions: dict[int, Session] = {}
        self._num_connections = 0  # accepted and not closed, handshake or not
        self._conns: set[socket.socket] = set()
        self._sessions_lock = threading.Lock()
        self._setups: dict[str, set[str]] = {}  # model label -> setups it was used with
        self._lease_ids = itertools.count(1)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> DaemonServer:
        """Open the listeners and start accepting; returns self."""
        if self.socket_path is not None:
            self._listeners.append(_unix_listener(self.socket_path))
        if self.tcp_address is not None:
            tcp = socket.create_server(self.tcp_address, reuse_port=False)
            self.tcp_address = tcp.getsockname()[:2]
            self._listeners.append(tcp)
        for listener in self._listeners:
            self._spawn(self._accept_loop, listener)
        self._spawn(self._reap_loop)
        return self

    def stop(self) -> None:
        """Stop accepting and serving. Connected clients see the end of their connections
        (and serve misses); what they hold is *not* freed, since they may still be copying
        into or out of it while the store drains its write-back: the arena goes with the
        process."""
        self._stopping.set()
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        with self._sessions_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._sessions_lock:
                is_full = self._num_connections >= self.limits.max_clients
                if not is_full:
                    self._num_connections += 1
                    self._conns.add(conn)
            if is_full:
                self.metrics.daemon_limit_hits.labels("clients").inc()
                conn.close()
                continue
            transport = "unix" if listener.family == socket.AF_UNIX else "tcp"
            try:
                if transport == "tcp":
                    _keep_alive(conn)
                thread = threading.Thread(target=self._serve, args=(conn, transport), daemon=True)
                thread.start()
            except Exception as exc:  # one bad connection must not stop the listener
                logger.warning("could not serve a new connection: %s", exc)
                conn.close()
                self._end(conn, None)

    def _reap_loop(self) -> None:
        interval_s = min(1.0, self.limits.lease_ttl_s / 4, self.limits.reservation_ttl_s / 4)
        while not self._stopping.wait(interval_s):
            now = time.monotonic()
            with self._sessions_lock:
                sessions = list(self._sessions.values())
            for session in sessions:
                num_expired, num_overdue = session.expire(self.store.memory, now)
                if num_expired:
                    self.metrics.daemon_expired_reservations.inc(num_expired)
                    logger.warning("%d reservations of %s expired", num_expired, session.name)
                if num_overdue:
                    self.metrics.daemon_overdue_leases.inc(num_overdue)
                    logger.warning("%d read leases of %s are overdue", num_overdue, session.name)
            self.metrics.daemon_held_bytes.set(sum(s.held_bytes for s in sessions))

    # ---- one connection ----------------------------------------------------------------

    def _serve(self, conn: socket.socket, transport: str) -> None:
        session: Session | None = None
        try:
            conn.settimeout(self.limits.handshake_timeout_s)
            session = self._handshake(conn, transport)
            if session is None:
                return
            conn.settimeout(None)
            while True:
                request = p.recv_request(conn)
                p.send(conn, self._handle(session, request))
        except TimeoutError:
            self.metrics.daemon_limit_hits.labels("handshake").inc()
        except (ConnectionError, OSError):
            pass  # the client left
        except p.ProtocolError as exc:
            self.metrics.daemon_protocol_errors.inc()
            logger.warning("closing a connection after a protocol error: %s", exc)
            if session is not None:
                _wait_for_close(conn)
        finally:
            conn.close()
            self._end(conn, session)

    def _end(self, conn: socket.socket, session: Session | None) -> None:
        """Forget a connection; its session's memory is free: its client closed its end,
        so nothing of it touches the arena any more (unless the daemon is stopping: then
        the connection was cut under the client, and its memory is left alone)."""
        with self._sessions_lock:
            self._num_connections -= 1
            self._conns.discard(conn)
            if session is not None:
                self._sessions.pop(id(session), None)
                self.metrics.daemon_clients.set(len(self._sessions))
        if session is not None and not self._stopping.is_set():
            session.close(self.store.memory)

    def _handshake(self, conn: socket.socket, transport: str) -> Session | None:
        deadline = time.monotonic() + self.limits.handshake_timeout_s
        hello = p.recv_request(conn, max_frame_bytes=p.MAX_HELLO_BYTES, deadline=deadline)
        if not isinstance(hello, p.Hello):
            raise p.ProtocolError(f"expected hello, got {type(hello).__name__}")
        if transport == "tcp" and not tokens_match(hello.token, self.token):
            self.metrics.daemon_protocol_errors.inc()
            logger.warning("refused a TCP client without the right token")
            p.send(conn, p.Failure("authentication failed"))
            return None
        if hello.version != p.PROTOCOL_VERSION:
            p.send(conn, p.Failure(f"protocol {hello.version}, daemon speaks {p.PROTOCOL_VERSION}"))
            return None
        session = Session(hello.client_name[:200], hello.pid, transport)
        with self._sessions_lock:
            self._sessions[id(session)] = session
            self.metrics.daemon_clients.set(len(self._sessions))
        path = str(self.buffer.path or "")
        welcome = p.Welcome(p.PROTOCOL_VERSION, path, self.buffer.nbytes, self.limits.lease_ttl_s)
        p.send(conn, welcome)
        return session

    def _handle(self, session: Session, request: p.Request) -> p.Response:
        try:
            return self._dispatch(session, request)
        except p.ProtocolError:
            raise
        except Exception as exc:  # a bad request must not kill the connection or the daemon
            logger.exception("request %s failed", type(request).__name__)
            return p.Failure(f"{type(exc).__name__}: {exc}")

    def _dispatch(self, session: Session, request: p.Request) -> p.Response:
        store = self.store
        if self._stopping.is_set():
            return p.Failure("the daemon is stopping")
        match request:
            case p.Contains(keys=keys):
                return p.Found(store.contains(_keys(keys)))
            case p.Lookup(keys=keys, tail=tail, explain=explain):
                if tail is None and not explain:
                    return p.Count(store.lookup(_keys(keys)))
                query = None if tail is None else _tail(tail, len(keys))
                hit = store.match(_keys(keys), query)
                return p.Matched(hit.num_chunks, *_partial(hit), hit.miss, hit.held_elsewhere)
            case p.Reserve(keys=keys, sizes=sizes):
                return p.Slots(self._reserve(session, keys, sizes))
            case p.Commit(keys=keys, aborted=aborted):
                return p.Count(self._commit(session, keys, aborted))
            case p.Read(keys=keys, tail=tail):
                return self._read(session, keys, tail)
            case p.Release(lease_id=lease_id):
                return p.Done(session.release_lease(lease_id))
            case p.Delete(keys=keys):
                store.delete(_keys(keys))
                return p.Done()
            case p.Remember(parents=parents, children=children, tokens=tokens) as remember:
                _check_tokens(*tokens)
                roots = list(zip(_keys(remember.roots), remember.root_models,
                                 remember.root_chunk_tokens, strict=True))  # fmt: skip
                store.remember(
                    list(zip(_keys(parents), _keys(children), tokens, strict=True)), roots
                )
                return p.Done()
            case p.Announce(recipe=recipe):
                store.announce(recipe)
                return p.Done()
            case p.Tokens() as report:
                self._count_tokens(session, report)
                return p.Done()
            case p.Flush(timeout_s=timeout_s):
                return p.Done(store.flush(min(max(timeout_s, 0.0), 300.0)))
            case p.Stats():
                return p.StatsReply(self.stats())
            case p.Clear():
                store.clear()
                return p.Done()
            case p.Hello():
                raise p.ProtocolError("hello twice")
        raise p.ProtocolError(f"unexpected {type(request).__name__}")

    def _reserve(self, session: Session, keys: list[bytes], sizes: list[int]) -> list[int]:
        if len(keys) != len(sizes):
            raise p.ProtocolError("reserve: keys and sizes differ in length")
        if any(not HEADER_NBYTES < nbytes <= HEADER_NBYTES + MAX_CHUNK_BYTES for nbytes in sizes):
            raise p.ProtocolError(f"reserve: a chunk size outside ({HEADER_NBYTES}, 1 GiB]")
        chunk_keys = _keys(keys)  # all parsed before anything is reserved
        offsets = []
        for raw, key, nbytes in zip(keys, chunk_keys, sizes, strict=True):
            if raw in session.reservations:
                offsets.append(p.SLOT_PENDING)  # this client is writing it already
                continue
            if session.held_bytes + nbytes > self.max_client_bytes:
                self.metrics.daemon_limit_hits.labels("client_bytes").inc()
                offsets.append(p.SLOT_OVER_LIMIT)
                continue
            got = self.store.memory.try_reserve(key, nbytes)
            if not isinstance(got, WriteSlot):
                offsets.append(_REFUSAL_CODES[got])
                continue
            session.add_reservation(raw, got, self.limits.reservation_ttl_s)
            offsets.append(self.buffer.offset_of(got.buffer))
        return offsets

    def _commit(self, session: Session, keys: list[bytes], aborted: list[bytes]) -> int:
        """Publish the reserved `keys` (the client wrote them) and free the `aborted`; a
        reservation that expired meanwhile is freed, not published."""
        slots: list[WriteSlot] = []
        for raw in keys:
            reservation = session.take_reservation(raw)
            if reservation is None:
                continue
            if reservation.is_expired:
                self.store.memory.abort(reservation.slot)
            else:
                slots.append(reservation.slot)
        for raw in aborted:
            if (reservation := session.take_reservation(raw)) is not None:
                self.store.memory.abort(reservation.slot)
        return self.store.commit(slots)

    def _read(self, session: Session, keys: list[bytes], tail: p.Tail | None) -> p.Extents:
        budget = self.max_client_bytes - session.held_bytes  # what this client may pin more
        if budget <= 0:
            self.metrics.daemon_limit_hits.labels("client_bytes").inc()
            return p.Extents(0, [], [])
        chunk_keys = _keys(keys)
        stack = contextlib.ExitStack()
        try:
            query = None if tail is None else _tail(tail, len(keys))
            prefix = stack.enter_context(
                self.store.read_prefix(chunk_keys, query, max_bytes=budget)
            )
            blobs, hit = prefix.blobs, prefix.hit
            offsets, sizes = [], []
            for blob in blobs:
                if not isinstance(blob, memoryview):
                    break  # RAM had no room to promote it: clients can only read the arena
                offsets.append(self.buffer.offset_of(blob))
                sizes.append(len(blob))
        except BaseException:
            stack.close()  # nothing of it reaches the client: unpin now
            raise
        lease_id = next(self._lease_ids)
        pinned = sum(len(blob) for blob in blobs if isinstance(blob, memoryview))
        session.add_lease(lease_id, stack, pinned, self.limits.lease_ttl_s)
        sources = list(prefix.sources)
        if hit.num_partial_tokens and len(offsets) == len(blobs):
            return p.Extents(lease_id, offsets, sizes, *_partial(hit), sources)
        num_whole = min(len(offsets), len(blobs) - (hit.num_partial_tokens > 0))
        return p.Extents(
            lease_id, offsets[:num_whole], sizes[:num_whole], sources=sources[:num_whole]
        )

    def _tier_traffic(self, tier: str) -> dict[str, int]:
        """A tier's get hits and misses, bytes read and written, and evictions, so far."""
        value = self.metrics.counter_value
        ops = "kvdepot_tier_ops_total"
        return {
            "get_hits": int(value(ops, {"tier": tier, "op": "get", "outcome": "hit"})),
            "get_misses": int(value(ops, {"tier": tier, "op": "get", "outcome": "miss"})),
            "read_bytes": int(value("kvdepot_tier_bytes_total", {"tier": tier, "op": "read"})),
            "written_bytes": int(value("kvdepot_tier_bytes_total", {"tier": tier, "op": "write"})),
            "evictions": int(value("kvdepot_tier_evictions_total", {"tier": tier})),
        }

    def _dropped_writes(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for family in self.metrics.dropped_writes.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value:
                    found[sample.labels["reason"]] = int(sample.value)
        return found

    def _count_tokens(self, session: Session, report: p.Tokens) -> None:
        """A client's token counts, clamped (a client is not trusted with label values)."""
        looked, hit, partial, stored = (
            max(0, int(n)) for n in (report.looked_up, report.hit, report.partial, report.stored)
        )
        saved_s = report.saved_s if 0.0 < report.saved_s < 1e6 else 0.0
        label = self.metrics.count_tokens(
            report.model[:256], looked, hit, partial, stored, clamp_missed(report.missed), saved_s
        )
        session.count_tokens(label, looked, hit, partial, stored)
        self._note_setup(label, report.setup[:200])

    def _note_setup(self, label: str, setup: str) -> None:
        """Remember which setups (layout, chunk size, hash) each model label was used with:
        engines of one model in two setups miss each other's chunks (`stats` flags it)."""
        if setup:
            with self._sessions_lock:
                setups = self._setups.setdefault(label, set())
                if len(setups) < 8:
                    setups.add(setup)

    def _model_tokens(self) -> dict[str, dict[str, object]]:
        """Per model label: tokens (`kvdepot_model_tokens_total`), hit rate, misses by
        reason, estimated prefill seconds saved and the setups it was used with."""
        models: dict[str, dict[str, object]] = {}
        for family in self.metrics.model_tokens.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    kinds = models.setdefault(sample.labels["model"], {})
                    kinds[sample.labels["kind"]] = int(sample.value)
        for family in self.metrics.model_miss_tokens.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value:
                    kinds = models.setdefault(sample.labels["model"], {})
                    missed = kinds.setdefault("missed", {})
                    assert isinstance(missed, dict)
                    missed[miss(sample.labels["reason"], sample.labels["tier"])] = int(sample.value)
        for family in self.metrics.model_seconds_saved.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    kinds = models.setdefault(sample.labels["model"], {})
                    kinds["prefill_seconds_saved"] = round(sample.value, 3)
        with self._sessions_lock:
            setups = {label: sorted(found) for label, found in self._setups.items()}
        for label, kinds in models.items():
            hit, looked = kinds.get("hit", 0), kinds.get("looked_up", 0)
            assert isinstance(hit, int) and isinstance(looked, int)
            kinds["hit_rate"] = _rate(hit, looked)
            kinds["setups"] = setups.get(label, [])
        return models

    def stats(self) -> dict[str, object]:
        with self._sessions_lock:
            clients = [
                {"name": s.name, "pid": s.pid, "transport": s.transport,
                 "connected_s": round(time.time() - s.connected_at, 1), "leases": len(s.leases),
                 "held_bytes": s.held_bytes, "models": sorted(s.models),
                 "looked_up_tokens": s.tokens["looked_up"], "hit_tokens": s.tokens["hit"],
                 "hit_rate": _rate(s.tokens["hit"], s.tokens["looked_up"])}
                for s in self._sessions.values()
            ]  # fmt: skip
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "tiers": {
                name: {
                    "used_bytes": u.used_bytes,
                    "capacity_bytes": u.capacity_bytes,
                    "num_objects": u.num_objects,
                    **self._tier_traffic(name),
                }
                for name, u in self.store.usage().items()
            },
            "write_back": {
                "queued_chunks": self.store.queued_chunks,
                "dropped": self._dropped_writes(),
            },
            "disabled_tiers": dict(self.store.disabled_tiers),
            "lookup_chunks": self.metrics.counter_value("kvdepot_store_lookup_chunks_total"),
            "hit_chunks": self.metrics.counter_value("kvdepot_store_hit_chunks_total"),
            "continuations": len(self.store.continuations),
            "models": self._model_tokens(),
            "clients": clients,
        }


def _rate(hit: int, looked_up: int) -> float | None:
    return round(hit / looked_up, 4) if looked_up else None


def _keys(raw: list[bytes]) -> list[ChunkKey]:
    return [ChunkKey.from_bytes(k) for k in raw]


def _tail(tail: p.Tail, num_keys: int) -> TailQuery:
    """A client's tail query, checked: ProtocolError for what no prompt of `num_keys` chunks
    could send."""
    c = tail.chunk_size_tokens
    if not 0 < c <= MAX_CHUNK_TOKENS or len(tail.tokens) > 4 * c * num_keys:
        raise p.ProtocolError(f"a tail of {len(tail.tokens)} token bytes, chunks of {c}")
    if len(tail.tokens) % 4:
        raise p.ProtocolError("tail tokens are not int32 ids")
    return TailQuery(ChunkKey.from_bytes(tail.root), tail.tokens, c, max(tail.min_tokens, 1))


def _partial(hit: PrefixHit) -> tuple[bytes, int]:
    if hit.partial_key is None or not hit.num_partial_tokens:
        return b"", 0
    return hit.partial_key.to_bytes(), hit.num_partial_tokens


def _check_tokens(*token_lists: bytes) -> None:
    for tokens in token_lists:
        if len(tokens) > _MAX_TOKEN_BYTES or len(tokens) % 4:
            raise p.ProtocolError(f"a token list of {len(tokens)} bytes: not int32 ids of a chunk")


def _wait_for_close(conn: socket.socket) -> None:
    """After a protocol error: serve nothing more, and wait until the client closes its end
    (or dies) before its memory is freed, since it may still be copying into or out of it.
    A client that never closes holds its connection slot and its bounded share meanwhile."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)  # the client's next read sees the end
        conn.settimeout(None)
        while conn.recv(1 << 16):
            pass


def _keep_alive(conn: socket.socket) -> None:
    """Notice a TCP peer that vanished (its leases then go) within about a minute."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _unix_listener(path: Path) -> socket.socket:
    """A Unix socket at `path` (mode 0600, in a private 0700 directory); a stale file is
    replaced. ConfigError if the directory is not safely ours."""
    ensure_private_dir(path.parent)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: a crashed daemon's leftover
        else:
            raise OSError(f"a daemon already listens on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(128)
    return listener
