"""The Valkey/Redis client seam: connections built from `ValkeyConfig`, and zero-copy writes.

Used by `kvdepot.tiers.valkey`, in the process that owns the tier; the only module that imports
the `valkey` client library (the `[valkey]` extra), behind a typed facade (`NodeClient`).

Why a packer of our own: valkey-py's libvalkey packer copies each command, values included, into
one fresh buffer before sending, which made 6 MiB SETs about 5x slower than the network on the
reference machine (fresh memory fills at ~1.6 GB/s there). `ZeroCopyPacker` sends any value over
a few KiB as its own buffer, and a `Gather` (header + payload of a chunk) as one RESP bulk
string made of several buffers, so a chunk goes from its RAM-tier slot to the socket untouched.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from typing import Any

from kvdepot.remote_config import ValkeyConfig

try:
    import valkey
    from valkey.connection import ConnectionPool, SSLConnection
    from valkey.crc import key_slot as _key_slot
    from valkey.exceptions import TimeoutError as _ValkeyTimeout
    from valkey.exceptions import ValkeyError
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the Valkey tier needs the valkey client: pip install 'kvdepot[valkey]'"
    ) from exc

REMOTE_ERRORS = (ValkeyError, OSError)
"""What a call to a server may raise when the server or the network fails."""

_INLINE_NBYTES = 4096  # smaller values are copied into the command buffer (one sendall)
_SOCKET_READ_NBYTES = 1 << 20  # fewer recv calls for MiB-sized replies


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

    def command(self, *args: object) -> Any:
        return self._client.execute_command(*args)

    def scan_iter(self, match: str, count: int) -> Iterator[bytes]:
        yield from self._client.scan_iter(match=match, count=count)

    def close(self) -> None:
        self._client.close()


def open_client(config: ValkeyConfig, host: str, port: int) -> NodeClient:
    """A client for one server; it connects on its first command."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "username": config.username,
        "password": config.password,
        "socket_connect_timeout": config.connect_timeout_ms / 1000,
        "socket_timeout": config.timeout_ms / 1000,
        "socket_read_size": _SOCKET_READ_NBYTES,
        "command_packer": ZeroCopyPacker(),
        "client_name": "kvdepot",
    }
    if config.tls:
        options.update(
            connection_class=SSLConnection,
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
