"""The daemon's socket server: sessions, two-phase stores, leased reads, liveness.

Runs in the `kvdepot serve` process, one thread per client connection plus a lease reaper.
The `TieredStore` it serves has its RAM tier in a shared-memory file that clients map, so
a store is: `Reserve` (the daemon allocates arena slots) → the client copies its chunks into
them → `Commit` (visible, write-back queued). A read is: `Read` (the daemon pins the leading
run and answers arena offsets under a lease) → the client copies out → `Release`.

Invariants:
- Reserved slots belong to their connection; they become visible only through `Commit`. A
  client that disconnects (or dies) has its uncommitted slots aborted: never made visible.
- A lease pins its chunks until `Release`, its connection closes, or `lease_ttl_s` passes
  (then the reaper releases it): a vanished client never pins memory forever.
- A protocol error closes that connection only; other clients are unaffected.
- TCP connections must present the token in `Hello`; the Unix socket is mode 0600.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvdepot.daemon import protocol as p
from kvdepot.keys import ChunkKey
from kvdepot.metrics import Metrics
from kvdepot.store import TieredStore
from kvdepot.tiers.arena import HostBuffer
from kvdepot.tiers.memory import WriteSlot

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Lease:
    stack: contextlib.ExitStack
    deadline: float


@dataclass(slots=True)
class _Session:
    """One client connection's state; `lock` guards leases against the reaper."""

    name: str
    pid: int
    transport: str
    connected_at: float = field(default_factory=time.time)
    leases: dict[int, _Lease] = field(default_factory=dict)
    reserved: dict[bytes, WriteSlot] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def release_all(self, abort: Callable[[WriteSlot], None]) -> None:
        with self.lock:
            leases, self.leases = list(self.leases.values()), {}
        for lease in leases:
            lease.stack.close()
        for slot in self.reserved.values():
            abort(slot)
        self.reserved.clear()


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
        lease_ttl_s: float = 30.0,
    ) -> None:
        if tcp_address is not None and not token:
            raise ValueError("a TCP listener needs a token")
        self.store = store
        self.buffer = buffer
        self.socket_path = socket_path
        self.tcp_address = tcp_address
        self.token = token
        self.lease_ttl_s = lease_ttl_s
        self.metrics: Metrics = store.metrics
        self.started_at = time.time()
        self._listeners: list[socket.socket] = []
        self._sessions: dict[int, _Session] = {}
        self._sessions_lock = threading.Lock()
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
        """Stop accepting, drop every session (their leases and reservations)."""
        self._stopping.set()
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.release_all(self.store.memory.abort)

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
            transport = "unix" if listener.family == socket.AF_UNIX else "tcp"
            threading.Thread(target=self._serve, args=(conn, transport), daemon=True).start()

    def _reap_loop(self) -> None:
        while not self._stopping.wait(min(1.0, self.lease_ttl_s / 4)):
            now = time.monotonic()
            with self._sessions_lock:
                sessions = list(self._sessions.values())
            for session in sessions:
                with session.lock:
                    expired = [i for i, lease in session.leases.items() if lease.deadline < now]
                    leases = [session.leases.pop(i) for i in expired]
                for lease in leases:
                    lease.stack.close()
                if leases:
                    self.metrics.daemon_expired_leases.inc(len(leases))
                    logger.warning("released %d expired leases of %s", len(leases), session.name)

    # ---- one connection ----------------------------------------------------------------

    def _serve(self, conn: socket.socket, transport: str) -> None:
        session: _Session | None = None
        try:
            session = self._handshake(conn, transport)
            if session is None:
                return
            while True:
                request = p.recv_request(conn)
                p.send(conn, self._handle(session, request))
        except (ConnectionError, OSError):
            pass  # the client left
        except p.ProtocolError as exc:
            self.metrics.daemon_protocol_errors.inc()
            logger.warning("closing a connection after a protocol error: %s", exc)
        finally:
            if session is not None:
                with self._sessions_lock:
                    self._sessions.pop(id(session), None)
                    self.metrics.daemon_clients.set(len(self._sessions))
                session.release_all(self.store.memory.abort)
            conn.close()

    def _handshake(self, conn: socket.socket, transport: str) -> _Session | None:
        hello = p.recv_request(conn)
        if not isinstance(hello, p.Hello):
            raise p.ProtocolError(f"expected hello, got {type(hello).__name__}")
        if transport == "tcp" and not hmac.compare_digest(hello.token, self.token):
            self.metrics.daemon_protocol_errors.inc()
            logger.warning("refused a TCP client without the right token")
            p.send(conn, p.Failure("authentication failed"))
            return None
        if hello.version != p.PROTOCOL_VERSION:
            p.send(conn, p.Failure(f"protocol {hello.version}, daemon speaks {p.PROTOCOL_VERSION}"))
            return None
        session = _Session(hello.client_name, hello.pid, transport)
        with self._sessions_lock:
            self._sessions[id(session)] = session
            self.metrics.daemon_clients.set(len(self._sessions))
        path = str(self.buffer.path or "")
        p.send(conn, p.Welcome(p.PROTOCOL_VERSION, path, self.buffer.nbytes, self.lease_ttl_s))
        return session

    def _handle(self, session: _Session, request: p.Request) -> p.Response:
        try:
            return self._dispatch(session, request)
        except Exception as exc:  # a bad request must not kill the connection or the daemon
            logger.exception("request %s failed", type(request).__name__)
            return p.Failure(f"{type(exc).__name__}: {exc}")

    def _dispatch(self, session: _Session, request: p.Request) -> p.Response:
        store = self.store
        match request:
            case p.Contains(keys=keys):
                return p.Found(store.contains(_keys(keys)))
            case p.Lookup(keys=keys):
                return p.Count(store.lookup(_keys(keys)))
            case p.Reserve(keys=keys, sizes=sizes):
                return p.Slots(self._reserve(session, keys, sizes))
            case p.Commit(keys=keys, aborted=aborted):
                slots = [session.reserved.pop(k) for k in keys if k in session.reserved]
                for key in aborted:
                    if (slot := session.reserved.pop(key, None)) is not None:
                        store.memory.abort(slot)
                return p.Count(store.commit(slots))
            case p.Read(keys=keys):
                return self._read(session, keys)
            case p.Release(lease_id=lease_id):
                with session.lock:
                    lease = session.leases.pop(lease_id, None)
                if lease is not None:
                    lease.stack.close()
                return p.Done(lease is not None)
            case p.Delete(keys=keys):
                store.delete(_keys(keys))
                return p.Done()
            case p.Remember(parents=parents, children=children, tokens=tokens):
                store.remember(list(zip(_keys(parents), _keys(children), tokens, strict=True)))
                return p.Done()
            case p.Continue(parent=parent, tokens=tokens):
                found = store.continuation(ChunkKey.from_bytes(parent), tokens)
                return p.Match() if found is None else p.Match(found[0].to_bytes(), found[1])
            case p.Flush(timeout_s=timeout_s):
                return p.Done(store.flush(timeout_s))
            case p.Stats():
                return p.StatsReply(self.stats())
            case p.Clear():
                store.clear()
                return p.Done()
            case p.Hello():
                raise p.ProtocolError("hello twice")
        raise p.ProtocolError(f"unexpected {type(request).__name__}")

    def _reserve(self, session: _Session, keys: list[bytes], sizes: list[int]) -> list[int]:
        if len(keys) != len(sizes):
            raise p.ProtocolError("reserve: keys and sizes differ in length")
        offsets = []
        for raw, nbytes in zip(keys, sizes, strict=True):
            if raw in session.reserved:
                offsets.append(-1)  # this client is writing it already
                continue
            slot, is_present = self.store.memory.try_reserve(ChunkKey.from_bytes(raw), nbytes)
            if slot is None:  # stored, or being written by another client: skip; else no room
                offsets.append(-1 if is_present else -2)
                continue
            session.reserved[raw] = slot
            offsets.append(self.buffer.offset_of(slot.buffer))
        return offsets

    def _read(self, session: _Session, keys: list[bytes]) -> p.Extents:
        stack = contextlib.ExitStack()
        blobs = stack.enter_context(self.store.read(_keys(keys)))
        offsets, sizes = [], []
        for blob in blobs:
            if not isinstance(blob, memoryview):
                break  # RAM had no room to promote it: clients can only read the arena
            offsets.append(self.buffer.offset_of(blob))
            sizes.append(len(blob))
        lease_id = next(self._lease_ids)
        with session.lock:
            session.leases[lease_id] = _Lease(stack, time.monotonic() + self.lease_ttl_s)
        return p.Extents(lease_id, offsets, sizes)

    def stats(self) -> dict[str, object]:
        with self._sessions_lock:
            clients = [
                {"name": s.name, "pid": s.pid, "transport": s.transport,
                 "connected_s": round(time.time() - s.connected_at, 1), "leases": len(s.leases)}
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
                }
                for name, u in self.store.usage().items()
            },
            "lookup_chunks": self.metrics.counter_value("kvdepot_store_lookup_chunks_total"),
            "hit_chunks": self.metrics.counter_value("kvdepot_store_hit_chunks_total"),
            "continuations": len(self.store.continuations),
            "clients": clients,
        }


def _keys(raw: list[bytes]) -> list[ChunkKey]:
    return [ChunkKey.from_bytes(k) for k in raw]


def _unix_listener(path: Path) -> socket.socket:
    """A Unix socket at `path` (mode 0600, in a 0700 directory); a stale file is replaced."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
    listener.listen(64)
    return listener
