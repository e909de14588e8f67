"""The stored-chunk format: a fixed 128-byte header followed by the codec's payload.

Pure functions, used in every process. Header (little-endian), format version 2:

    magic "KVDC" | version u16 | codec id u16 | dtype u8 | ndim u8 | flags u16 |
    shape 6 x u32 | payload length u64 | chunk key 32 bytes | checksum u64 | 44 reserved bytes

The chunk key binds the blob to the key it was stored under (`EncodedChunk.bound`): every
tier binds a chunk as it stores it, and every reader names the key it asked for
(`open_blob(key=...)`), so a whole valid blob that lands under another key (a swapped or
copied file, a botched restore, a buggy plug-in tier) is corrupt, never a hit. The checksum is
xxh3-64 over the header's first 76 bytes (key included) and the payload, and the reserved
bytes must be zero, so a flipped bit anywhere is caught. It is *sealed* (computed) when a
chunk crosses a trust boundary: written to disk or a remote tier, or handed to another
process. A chunk that stays in this process's RAM tier is not sealed, because hashing costs
about half a memory copy on the hot path; its key is still checked (32 bytes, free).

Invariants: `open_blob` never returns a payload whose sizes disagree with the header, never
trusts a size larger than `MAX_CHUNK_BYTES`, never returns a chunk bound to another key than
the one asked for, and with `verify=True` returns only sealed chunks whose checksum matches.
Every violation raises `CorruptChunk`. Chunks of format version 1 (64-byte header, no key)
are never even asked for: the format version is part of every key's namespace
(`kvdepot.keys.CHUNK_FORMAT_VERSION`); one met anyway is corrupt.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace

import numpy as np
import xxhash

from kvdepot.codec.copies import copy_array
from kvdepot.errors import CorruptChunk
from kvdepot.keys import CHUNK_FORMAT_VERSION, ChunkKey
from kvdepot.layout import DType

MAGIC = b"KVDC"
FORMAT_VERSION = CHUNK_FORMAT_VERSION  # 2: the key in the header (128 bytes); 1: 64, no key
HEADER_NBYTES = 128
MAX_NDIM = 6
MAX_CHUNK_BYTES = 1 << 30
"""Upper bound on a chunk's logical and payload size: decoders never allocate more."""

FLAG_SEALED = 0x1
KEY_NBYTES = 32
UNBOUND_KEY = bytes(KEY_NBYTES)
"""The key field of a chunk not yet bound to a key (freshly encoded): never a valid read."""
_HEADER = struct.Struct("<4sHHBBH6IQ32sQ44x")
_KEY_START = 44
_CHECKED_PREFIX = 76  # header bytes covered by the checksum: all up to the checksum field
_RESERVED_START = 84  # the 44 reserved bytes must be zero
assert _HEADER.size == HEADER_NBYTES


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """Decoded header of a stored chunk.

    Attributes:
        codec_id: registry id of the codec that wrote the payload.
        dtype: element type of the decoded tensor.
        shape: shape of the decoded tensor.
        payload_nbytes: length of the payload after the header.
        checksum: xxh3-64 of header prefix + payload, or None while unsealed.
        key: the 32-byte key the chunk is stored under (`UNBOUND_KEY` until bound).
    """

    codec_id: int
    dtype: DType
    shape: tuple[int, ...]
    payload_nbytes: int
    checksum: int | None = None
    key: bytes = UNBOUND_KEY

    @property
    def logical_nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def blob_nbytes(self) -> int:
        return HEADER_NBYTES + self.payload_nbytes

    def pack(self) -> bytes:
        dims = list(self.shape) + [0] * (MAX_NDIM - len(self.shape))
        flags = FLAG_SEALED if self.checksum is not None else 0
        return _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            self.codec_id,
            int(self.dtype),
            len(self.shape),
            flags,
            *dims,
            self.payload_nbytes,
            self.key,
            self.checksum or 0,
        )

    def bound(self, key: ChunkKey) -> ChunkHeader:
        """This header bound to `key`; CorruptChunk if it is bound to another key already
        (a chunk read under one key must never be stored under another)."""
        raw = key.to_bytes()
        if self.key == raw:
            return self
        if self.key != UNBOUND_KEY:
            raise CorruptChunk(f"chunk of key {self.key.hex()} cannot be stored as {key.hex()}")
        return replace(self, key=raw, checksum=None)


def _checksum(header: ChunkHeader, payload: memoryview | bytes) -> int:
    prefix = replace(header, checksum=0).pack()[:_CHECKED_PREFIX]
    h = xxhash.xxh3_64(prefix)
    h.update(payload)
    return int(h.intdigest())


def seal(header: ChunkHeader, payload: memoryview | bytes) -> ChunkHeader:
    """The header with its checksum computed over `payload` (which must be contiguous)."""
    if len(memoryview(payload).cast("B")) != header.payload_nbytes:
        raise ValueError("payload length does not match the header")
    return replace(header, checksum=_checksum(header, payload))


def parse_header(blob: memoryview | bytes) -> ChunkHeader:
    """Structurally validate and decode a header; raises CorruptChunk."""
    if len(blob) < HEADER_NBYTES:
        raise CorruptChunk(
            f"chunk is {len(blob)} bytes, shorter than its {HEADER_NBYTES}-byte header"
        )
    magic, version, codec_id, dtype_code, ndim, flags, *rest = _HEADER.unpack_from(blob)
    dims, payload_nbytes = rest[:MAX_NDIM], rest[MAX_NDIM]
    key, checksum = rest[MAX_NDIM + 1], rest[MAX_NDIM + 2]
    if magic != MAGIC:
        raise CorruptChunk(f"bad magic {magic!r}: not a kvdepot chunk")
    if version != FORMAT_VERSION:
        raise CorruptChunk(f"chunk format version {version}, this build reads {FORMAT_VERSION}")
    try:
        dtype = DType(dtype_code)
    except ValueError:
        raise CorruptChunk(f"unknown dtype code {dtype_code}") from None
    if not 1 <= ndim <= MAX_NDIM or any(dims[ndim:]) or not all(dims[:ndim]):
        raise CorruptChunk(f"bad shape {dims} with ndim {ndim}")
    if flags & ~FLAG_SEALED:
        raise CorruptChunk(f"unknown header flags {flags:#x}")
    if any(blob[_RESERVED_START:HEADER_NBYTES]):
        raise CorruptChunk("reserved header bytes are not zero")
    header = ChunkHeader(
        codec_id,
        dtype,
        tuple(dims[:ndim]),
        payload_nbytes,
        checksum if flags & FLAG_SEALED else None,
        key,
    )
    if header.logical_nbytes > MAX_CHUNK_BYTES or payload_nbytes > MAX_CHUNK_BYTES:
        raise CorruptChunk(f"chunk claims {header.logical_nbytes} bytes, above the limit")
    if len(blob) != header.blob_nbytes:
        raise CorruptChunk(
            f"chunk is {len(blob)} bytes but its header says {header.blob_nbytes} (torn write?)"
        )
    return header


class ChecksumStream:
    """The checksum of a blob hashed piece by piece as its bytes arrive, in order.

    A reader that copies a blob from a socket feeds each piece right after copying it, while
    it is still in the CPU's cache: hashing runs at cache speed, not memory speed, and no
    second pass over the blob is needed (`open_blob(streamed=...)`). The bytes hashed are the
    blob's own: a header that is not byte for byte the one `seal` packed fails the check.
    """

    __slots__ = ("_hash", "nbytes")

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_64()
        self.nbytes = 0
        """Bytes fed so far."""

    def update(self, piece: memoryview | bytes) -> None:
        view = memoryview(piece).cast("B")
        start, self.nbytes = self.nbytes, self.nbytes + len(view)
        if start < HEADER_NBYTES:  # the checksum covers the header up to its checksum field
            self._hash.update(view[: max(0, _CHECKED_PREFIX - start)])
            view = view[HEADER_NBYTES - start :]
        self._hash.update(view)

    def digest(self) -> int:
        return int(self._hash.intdigest())


def open_blob(
    blob: memoryview | bytes,
    *,
    key: ChunkKey | None,
    verify: bool,
    streamed: ChecksumStream | None = None,
) -> tuple[ChunkHeader, memoryview]:
    """Validate a stored chunk and return its header and payload view.

    Args:
        blob: header + payload.
        key: the key the blob was read under: a blob bound to any other key (or to none) is
            corrupt. None only where the caller checked the key already (or holds a blob
            that is not a stored chunk yet).
        verify: require a sealed chunk and check its checksum (for data from disk, remote
            tiers or other processes). Without it only the structure is checked.
        streamed: the blob's bytes as they were read (`ChecksumStream`): with `verify`, its
            digest is checked instead of hashing the blob again, if it saw as many bytes.
    """
    view = memoryview(blob).cast("B")
    header = parse_header(view)
    if key is not None and header.key != key.to_bytes():
        raise CorruptChunk(
            f"chunk is bound to key {header.key.hex()}, read as {key.hex()} (misplaced blob)"
        )
    payload = view[HEADER_NBYTES:]
    if verify:
        if header.checksum is None:
            raise CorruptChunk("chunk carries no checksum")
        if streamed is not None and streamed.nbytes == len(view):
            digest = streamed.digest()
        else:
            digest = _checksum(header, payload)
        if digest != header.checksum:
            raise CorruptChunk("checksum mismatch: the chunk was corrupted")
    return header, payload


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    """A chunk ready to store: header plus payload array (possibly strided, not yet copied)."""

    header: ChunkHeader
    payload: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.header.blob_nbytes

    def contiguous_payload(self) -> memoryview:
        return np.ascontiguousarray(self.payload).data.cast("B")

    def bound(self, key: ChunkKey) -> EncodedChunk:
        """This chunk bound to `key` (see `ChunkHeader.bound`); tiers bind what they store."""
        header = self.header.bound(key)
        return self if header is self.header else EncodedChunk(header, self.payload)

    def sealed(self) -> EncodedChunk:
        if self.header.checksum is not None:
            return self
        payload = np.ascontiguousarray(self.payload)
        return EncodedChunk(seal(self.header, payload.data.cast("B")), payload)

    def write_into(self, buf: memoryview) -> None:
        """Copy header and payload into `buf`, which must be exactly `nbytes` long."""
        if len(buf) != self.nbytes:
            raise ValueError(f"buffer is {len(buf)} bytes, chunk needs {self.nbytes}")
        buf[:HEADER_NBYTES] = self.header.pack()
        dst = np.frombuffer(
            buf, dtype=self.payload.dtype, count=self.payload.size, offset=HEADER_NBYTES
        )
        copy_array(dst.reshape(self.payload.shape), self.payload)
