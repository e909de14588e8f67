"""Wire protocol between daemon clients and the daemon: length-prefixed msgpack frames.

Pure code, used in both processes. A frame is a 4-byte big-endian length followed by one
msgpack-encoded, tagged message (msgspec Structs: decoding validates every field; no pickle).
Requests and responses alternate on a connection; the first request is `Hello`. Keys travel
as 32-byte strings (`ChunkKey.to_bytes`); chunk bytes never travel, only arena offsets.

Invariant: a frame longer than `MAX_FRAME_BYTES`, a truncated frame or one that does not
decode as a known message is a protocol error; the peer closes that connection only.
"""

from __future__ import annotations

import socket
import struct
import time

import msgspec

from kvdepot.namespaces import Recipe

PROTOCOL_VERSION = 4
"""4: Announce (an engine's recipe, for lookups by model name: `kvdepot.namespaces`);
Remember.roots/.root_models/.root_chunk_tokens (KV events: `kvdepot.events`).
3: Reserve answers SLOT_PENDING / SLOT_OVER_LIMIT; Lookup and Read take a `Tail` (partial
matching in the same call, `Continue` is gone); fields added since, with defaults (an older
peer ignores them): Lookup.explain, Matched.miss/.held_elsewhere, Tokens.missed/.saved_s,
Extents.sources.
2: Remember / Continue."""
MAX_FRAME_BYTES = 1 << 20
MAX_HELLO_BYTES = 4096
"""A `Hello` is small: a client that has not said who it is gets no more buffer than this."""
SLOT_STORED = -1
"""`Slots` offset: the key is stored (visible) already; counts as stored."""
SLOT_NO_ROOM = -2
"""`Slots` offset: no room could be made (everything else is pinned or reserved)."""
SLOT_PENDING = -3
"""`Slots` offset: another writer holds the key; not stored (that writer may never commit)."""
SLOT_OVER_LIMIT = -4
"""`Slots` offset: this client holds its limit of arena bytes already."""
_LENGTH = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame or message."""


class Hello(msgspec.Struct, tag="hello"):
    version: int
    client_name: str
    pid: int
    token: str = ""


class Contains(msgspec.Struct, tag="contains"):
    keys: list[bytes]


class Tail(msgspec.Struct):
    """`kvdepot.continuations.TailQuery` on the wire (`root` is a 32-byte key)."""

    root: bytes
    tokens: bytes
    chunk_size_tokens: int
    min_tokens: int


class Lookup(msgspec.Struct, tag="lookup"):
    """The leading run of `keys` present (`Count`); with `tail`, then the partial match, or
    with `explain`, why the run ended (`Matched`)."""

    keys: list[bytes]
    tail: Tail | None = None
    explain: bool = False


class Reserve(msgspec.Struct, tag="reserve"):
    """Room for new chunks; the client then writes each blob at its offset."""

    keys: list[bytes]
    sizes: list[int]


class Commit(msgspec.Struct, tag="commit"):
    """Make reserved chunks visible (and queue their write-back); abort the others."""

    keys: list[bytes]
    aborted: list[bytes] = []


class Read(msgspec.Struct, tag="read"):
    """Pin the leading run of hits of one chain under a lease, promoting from lower tiers;
    with `tail`, the partial chunk after the run too (the last extent)."""

    keys: list[bytes]
    tail: Tail | None = None


class Release(msgspec.Struct, tag="release"):
    lease_id: int


class Delete(msgspec.Struct, tag="delete"):
    keys: list[bytes]


class Flush(msgspec.Struct, tag="flush"):
    timeout_s: float = 30.0


class Remember(msgspec.Struct, tag="remember"):
    """Continuations: `children[i]` (holding `tokens[i]`, int32 bytes) follows `parents[i]`;
    `roots[j]` is a namespace root among the parents, announced in KV events under model
    `root_models[j]` ("": not announced), its chunks `root_chunk_tokens[j]` tokens long."""

    parents: list[bytes]
    children: list[bytes]
    tokens: list[bytes]
    roots: list[bytes] = []
    root_models: list[str] = []
    root_chunk_tokens: list[int] = []


class Announce(msgspec.Struct, tag="announce"):
    """An engine's `kvdepot.namespaces.Recipe` (posted, not waited for; sent again after a
    reconnection, so a restarted daemon learns it)."""

    recipe: Recipe


class Tokens(msgspec.Struct, tag="tokens"):
    """An engine's token counts since its last report, for one model (posted, not waited
    for): tokens looked up, found (partial matches included), found by partial matching,
    stored; and its setup, so that engines of one model that cannot share are seen."""

    model: str
    looked_up: int
    hit: int
    partial: int
    stored: int
    setup: str = ""  # what else keys its chunks: layout, chunk size, hash (not the tenant)
    missed: dict[str, int] = {}  # looked-up tokens not found, by `kvdepot.misses` reason
    saved_s: float = 0.0  # estimated prefill seconds its hits saved


class Stats(msgspec.Struct, tag="stats"):
    pass


class Clear(msgspec.Struct, tag="clear"):
    pass


Request = (
    Hello
    | Contains
    | Lookup
    | Reserve
    | Commit
    | Read
    | Release
    | Delete
    | Remember
    | Announce
    | Tokens
    | Flush
    | Stats
    | Clear
)


class Welcome(msgspec.Struct, tag="welcome"):
    version: int
    shm_path: str
    shm_nbytes: int
    lease_ttl_s: float


class Found(msgspec.Struct, tag="found"):
    found: list[bool]


class Count(msgspec.Struct, tag="count"):
    count: int


class Slots(msgspec.Struct, tag="slots"):
    offsets: list[int]  # >= 0: where to write; else one of the SLOT_* codes


class Extents(msgspec.Struct, tag="extents"):
    """Arena extents of the leading run; with `num_partial_tokens` > 0 the last one is the
    partial chunk `partial_key`."""

    lease_id: int
    offsets: list[int]
    sizes: list[int]
    partial_key: bytes = b""
    num_partial_tokens: int = 0
    sources: list[str] = []  # the tier each extent came from (RAM, or promoted from ...)


class Done(msgspec.Struct, tag="done"):
    ok: bool = True


class Matched(msgspec.Struct, tag="matched"):
    """Answer to a `Lookup` with a tail: `num_partial_tokens` 0 means no partial match;
    `miss` and `held_elsewhere` as in `kvdepot.store.PrefixHit`."""

    num_chunks: int
    partial_key: bytes = b""
    num_partial_tokens: int = 0
    miss: str = ""
    held_elsewhere: int = 0


class StatsReply(msgspec.Struct, tag="stats_reply"):
    stats: dict[str, object]


class Failure(msgspec.Struct, tag="failure"):
    message: str


Response = Welcome | Found | Count | Slots | Extents | Done | Matched | StatsReply | Failure

_encoder = msgspec.msgpack.Encoder()
_request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
_response_decoder: msgspec.msgpack.Decoder[Response] = msgspec.msgpack.Decoder(Response)


def send(sock: socket.socket, message: Request | Response) -> None:
    body = _encoder.encode(message)
    sock.sendall(_LENGTH.pack(len(body)) + body)


def _recv_exactly(sock: socket.socket, nbytes: int, deadline: float | None = None) -> bytes:
    chunks, remaining = [], nbytes
    while remaining:
        if deadline is not None:  # one limit for the whole frame, not for each recv
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise TimeoutError("the peer is too slow")
            sock.settimeout(left_s)
        data = sock.recv(min(remaining, 1 << 16))
        if not data:
            raise ConnectionError("peer closed the connection")
        chunks.append(data)
        remaining -= len(data)
    return b"".join(chunks)


def _recv_frame(
    sock: socket.socket, max_frame_bytes: int = MAX_FRAME_BYTES, deadline: float | None = None
) -> bytes:
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size, deadline))
    if length > max_frame_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds {max_frame_bytes}")
    return _recv_exactly(sock, length, deadline)


def recv_request(
    sock: socket.socket, *, max_frame_bytes: int = MAX_FRAME_BYTES, deadline: float | None = None
) -> Request:
    """The next request; ConnectionError when the peer left, ProtocolError on garbage,
    TimeoutError past `deadline` (a `time.monotonic()` value) for the whole frame."""
    try:
        return _request_decoder.decode(_recv_frame(sock, max_frame_bytes, deadline))
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable request: {exc}") from None


def recv_response(sock: socket.socket) -> Response:
    try:
        return _response_decoder.decode(_recv_frame(sock))
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable response: {exc}") from None
