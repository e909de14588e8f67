"""The Valkey/Redis client seam: connections built from `ValkeyConfig`, and zero-copy writes.

Used by `kvdepot.tiers.valkey`, in the process that owns the tier; the only module that imports
the `valkey` client library (the `[valkey]` extra), behind a typed facade (`NodeClient`).

Why a packer of our own: valkey-py's libvalkey packer copies each command, values included, into
one fresh buffer before sending, which made 6 MiB SETs about 5x slower than the network on the
reference machine (fresh memory fills at ~1.6 GB/s there). `ZeroCopyPacker` sends any value over
a few KiB as its own buffer, and a `Gather` (header + payload of a chunk) as one RESP bulk
string made of several buffers, so a chunk goes from its RAM-tier slot to the socket untouched.

Why a reader of our own: valkey-py's parser (libvalkey) copies each value twice on the way in
(its read buffer into the reader's growing buffer, then into a new `bytes`), both times into
fresh memory. `NodeClient.get` and `NodeClient.get_into` read GET replies from the socket
straight into their final memory: a `bytes` of the value's size (`BytesBuilder`) or a caller's
buffer, such as one slice of a split blob. They run on connections of the pool (the libvalkey
parser has nothing buffered between commands) and consume exactly the replies they asked for;
any failure disconnects the connection, as valkey-py does.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from kvdepot.remote_config import ValkeyConfig

try:
    import valkey
    from valkey._parsers import BaseParser
    from valkey.connection import Connection, ConnectionPool, SSLConnection
    from valkey.crc import key_slot as _key_slot
    from valkey.exceptions import ConnectionError as _ValkeyConnectionError
    from valkey.exceptions import InvalidResponse, ValkeyError
    from valkey.exceptions import TimeoutError as _ValkeyTimeout
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the Valkey tier needs the valkey client: pip install 'kvdepot[valkey]'"
    ) from exc

REMOTE_ERRORS = (ValkeyError, OSError)
"""What a call to a server may raise when the server or the network fails."""

_INLINE_NBYTES = 4096  # smaller values are copied into the command buffer (one sendall)
_HEAD_RECV_NBYTES = 4096  # one recv for reply headers (and small values, several at a time)
_SMALL_VALUE_NBYTES = 64 << 10  # smaller values are sliced out of the received bytes
_RECV_NBYTES = 256 << 10  # at most per recv into a value: a piece a tap sees is still cached
_MAX_LINE_NBYTES = 64 << 10  # a longer header or error line is a protocol error
_MAX_VALUE_NBYTES = 4 << 30  # a longer value is a protocol error (Valkey's own cap: 512 MiB)
T = TypeVar("T")
Tap = Callable[[memoryview], object]
"""Sees each piece of a value right after it is read, in order (e.g. to hash it while it is
still in the CPU's cache)."""
_parse_error: Callable[[str], ValkeyError] = BaseParser.parse_error  # valkey-py's error classes


class Gather:
    """One value made of several buffers, sent back to back and never joined in memory."""

    __slots__ = ("nbytes", "pieces")

    def __init__(self, *pieces: bytes | memoryview) -> None:
        self.pieces = [memoryview(p).cast("B") for p in pieces]
        self.nbytes = sum(len(p) for p in self.pieces)


class ZeroCopyPacker:
    """RESP2 command packer that never copies a large value (see the module docstring)."""

    def pack(self, *args: object) -> list[bytes | memoryview]:
        if isinstance(args[0], str):  # "CLUSTER SLOTS" style: one word per argument
            args = (*args[0].encode().split(), *args[1:])
        out: list[bytes | memoryview] = []
        buff = b"*%d\r\n" % len(args)
        for arg in args:
            pieces: Sequence[bytes | memoryview] = (
                arg.pieces if isinstance(arg, Gather) else [_encode(arg)]
            )
            nbytes = sum(len(p) for p in pieces)
            if len(pieces) == 1 and nbytes <= _INLINE_NBYTES:
                buff += b"$%d\r\n%s\r\n" % (nbytes, pieces[0])
            else:
                out.append(buff + b"$%d\r\n" % nbytes)
                out.extend(pieces)
                buff = b"\r\n"
        out.append(buff)
        return out


def _encode(value: object) -> bytes | memoryview:
    if isinstance(value, bytes):
        return value
    if isinstance(value, memoryview):
        return value.cast("B")
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value
    raise TypeError(f"cannot send a {type(value).__name__} to Valkey")


class BytesBuilder:
    """A `bytes` object of a known size, filled in place through `view`, then handed out by
    `finish` without a copy.

    A `BytesIO` made from a `bytes` object that nothing else holds lends that object's memory
    through `getbuffer()` and returns the object itself from `getvalue()` once no view of it is
    left (CPython; elsewhere `getvalue()` copies, slower but as correct). `bytes(n)` comes
    zeroed from calloc, so its pages are first written by the socket read that fills them.
    """

    __slots__ = ("_io", "view")

    def __init__(self, nbytes: int) -> None:
        self._io = io.BytesIO(bytes(nbytes))
        self.view = self._io.getbuffer()

    def finish(self) -> bytes:
        """The filled bytes. Drop every slice of `view` first: one still alive costs a copy."""
        self.view.release()
        return self._io.getvalue()


class _Replies:
    """GET replies (RESP2 bulk strings, nils, errors) read from one connection's socket.

    Reply heads and small values are received a few KiB at a time; a large value goes from
    the socket into its final memory. Bytes received past the reply being read belong to the
    next one; after the last reply nothing may be left (`done`).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._pending = bytearray()  # received, not consumed yet

    def head(self) -> int | ValkeyError | None:
        """The next reply: its value's length, None for an absent key, or the error reply."""
        line = self._line()
        if line[:1] == b"$" and (line[1:].isdigit() or line == b"$-1"):
            nbytes = int(line[1:])
            if nbytes > _MAX_VALUE_NBYTES:
                raise InvalidResponse(f"a value of {nbytes} bytes is above any server's limit")
            return None if nbytes < 0 else nbytes
        if line[:1] == b"-":
            error = _parse_error(line[1:].decode(errors="replace"))
            if isinstance(error, _ValkeyConnectionError):
                raise error  # e.g. NOAUTH: the connection is unusable (valkey-py raises too)
            return error
        raise InvalidResponse(f"unexpected reply to GET: {line[:64]!r}")

    def value(self, nbytes: int, tap: Tap | None = None) -> bytes:
        """The value of the reply whose head was `nbytes`."""
        if nbytes >= _SMALL_VALUE_NBYTES:
            builder = BytesBuilder(nbytes)
            self.into(builder.view, tap)
            return builder.finish()
        self._fill(nbytes + 2)
        value = bytes(self._pending[:nbytes])
        del self._pending[:nbytes]
        self._end()
        if tap is not None:
            tap(memoryview(value))
        return value

    def into(self, target: memoryview, tap: Tap | None = None) -> None:
        """Reads the value of the reply whose head was `len(target)` into `target`."""
        num_filled = min(len(self._pending), len(target))
        target[:num_filled] = self._pending[:num_filled]
        del self._pending[:num_filled]
        if tap is not None:
            tap(target[:num_filled])
        while num_filled < len(target):
            start = num_filled
            num_filled += self._recv_into(target[start : start + _RECV_NBYTES])
            if tap is not None:
                tap(target[start:num_filled])
        self._end()

    def skip(self, nbytes: int) -> None:
        """Reads past the value of the reply whose head was `nbytes`."""
        num_left = nbytes - min(len(self._pending), nbytes)
        del self._pending[: nbytes - num_left]
        scratch = memoryview(bytearray(min(num_left, _RECV_NBYTES)))
        while num_left:
            num_left -= self._recv_into(scratch[: min(num_left, len(scratch))])
        self._end()

    def done(self) -> None:
        """Checks that the replies read were all the server sent."""
        if self._pending:
            raise InvalidResponse(f"{len(self._pending)} bytes past the last reply")

    def _line(self) -> bytes:
        while (end := self._pending.find(b"\r\n")) < 0:
            if len(self._pending) > _MAX_LINE_NBYTES:
                raise InvalidResponse("a reply line is too long")
            self._recv(_HEAD_RECV_NBYTES)
        line = bytes(self._pending[:end])
        del self._pending[: end + 2]
        return line

    def _end(self) -> None:
        self._fill(2)
        if self._pending[:2] != b"\r\n":
            raise InvalidResponse("a value does not end with CRLF")
        del self._pending[:2]

    def _fill(self, nbytes: int) -> None:
        while len(self._pending) < nbytes:
            self._recv(max(_HEAD_RECV_NBYTES, nbytes - len(self._pending)))

    def _recv(self, nbytes: int) -> None:
        data = self._sock.recv(nbytes)
        if not data:
            raise _ValkeyConnectionError("connection closed by the server")
        self._pending += data

    def _recv_into(self, view: memoryview) -> int:
        num_read = self._sock.recv_into(view)
        if not num_read:
            raise _ValkeyConnectionError("connection closed by the server")
        return num_read


class _ReadsReplies:
    """Lets `NodeClient` read a connection's GET replies itself (see `_Replies`)."""

    _sock: socket.socket | None

    def replies(self) -> _Replies:
        if self._sock is None:
            raise _ValkeyConnectionError("not connected")
        return _Replies(self._sock)


def _replies_of(connection: object) -> _Replies:
    if not isinstance(connection, _ReadsReplies):
        raise TypeError("NodeClient.get reads only connections made by open_client")
    return connection.replies()


class _Connection(_ReadsReplies, Connection):
    """A TCP connection whose GET replies `NodeClient` reads itself."""


class _SSLConnection(_ReadsReplies, SSLConnection):
    """A TLS connection whose GET replies `NodeClient` reads itself."""


class NodeClient:
    """Typed facade over a valkey-py client (thread-safe: a pool of connections) to one server."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def pipeline(self, commands: Sequence[tuple[object, ...]]) -> list[object]:
        """Replies of `commands`, sent in one round trip; error replies come back as values."""
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))

    def get(
        self, names: Sequence[str], taps: Sequence[Tap] | None = None
    ) -> list[bytes | ValkeyError | None]:
        """GET of each name in one round trip, each value read straight into its own bytes
        (and shown to `taps[i]` piece by piece); None for an absent key, an error reply as a
        value."""

        _check_one_each(names, taps)

        def read(replies: _Replies) -> list[bytes | ValkeyError | None]:
            values: list[bytes | ValkeyError | None] = []
            for i in range(len(names)):
                head = replies.head()
                tap = None if taps is None else taps[i]
                values.append(replies.value(head, tap) if isinstance(head, int) else head)
            return values

        return self._read_gets(names, read)

    def get_into(
        self,
        names: Sequence[str],
        targets: Sequence[memoryview],
        taps: Sequence[Tap] | None = None,
    ) -> list[int | ValkeyError | None]:
        """GET of each name in one round trip, value i read straight into `targets[i]` (and
        shown to `taps[i]` piece by piece).

        Returns each value's length: `targets[i]` holds the value only when that is
        `len(targets[i])` (a value of another size is read past, unseen); None for an absent
        key, an error reply as a value.
        """

        _check_one_each(names, targets, taps)

        def read(replies: _Replies) -> list[int | ValkeyError | None]:
            heads: list[int | ValkeyError | None] = []
            for i, target in enumerate(targets):
                head = replies.head()
                if isinstance(head, int) and head == len(target):
                    replies.into(target, None if taps is None else taps[i])
                elif isinstance(head, int):
                    replies.skip(head)
                heads.append(head)
            return heads

        return self._read_gets(names, read)

    def _read_gets(self, names: Sequence[str], read: Callable[[_Replies], list[T]]) -> list[T]:
        """Sends GETs of `names` in one write and reads their replies with `read`."""
        if not names:
            return []
        pool = self._client.connection_pool
        connection = pool.get_connection("GET")
        try:
            connection.send_packed_command(
                connection.pack_commands([("GET", name) for name in names])
            )
            replies = _replies_of(connection)
            values = read(replies)
            replies.done()
            return values
        except BaseException:
            connection.disconnect()  # replies half read: the connection is out of step
            raise
        finally:
            pool.release(connection)

    def command(self, *args: object) -> Any:
        return self._client.execute_command(*args)

    def scan_iter(self, match: str, count: int) -> Iterator[bytes]:
        yield from self._client.scan_iter(match=match, count=count)

    def close(self) -> None:
        self._client.close()


def _check_one_each(names: Sequence[str], *per_name: Sequence[object] | None) -> None:
    if any(each is not None and len(each) != len(names) for each in per_name):
        raise ValueError("give one target and one tap per name")


def open_client(config: ValkeyConfig, host: str, port: int) -> NodeClient:
    """A client for one server; it connects on its first command."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "username": config.username,
        "password": config.password,
        "socket_connect_timeout": config.connect_timeout_ms / 1000,
        "socket_timeout": config.timeout_ms / 1000,
        "command_packer": ZeroCopyPacker(),
        "connection_class": _Connection,
        "client_name": "kvdepot",
    }
    if config.tls:
        options.update(
            connection_class=_SSLConnection,
            ssl_cert_reqs="required",
            ssl_ca_certs=config.tls_ca_file,
            ssl_certfile=config.tls_cert_file,
            ssl_keyfile=config.tls_key_file,
            ssl_check_hostname=config.tls_check_hostname,
        )
    return NodeClient(valkey.Valkey.from_pool(ConnectionPool(**options)))


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, _ValkeyTimeout | socket.timeout)


def key_slot(key: bytes) -> int:
    """Cluster slot of `key` (CRC16 of its hash tag, mod 16384)."""
    return int(_key_slot(key))
