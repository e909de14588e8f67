"""CodecTier: a lower tier that stores chunks in its own codec (e.g. lossless on disk,
CacheGen-style on Valkey/S3), wrapping any `Tier`; and the one place that turns a blob in
another codec back into a raw one.

Runs wherever the wrapped tier runs. The RAM tier always holds `raw` chunks (one copy in,
one copy out); `put` here re-encodes them into this tier's codec before the inner tier
seals and writes them; `get` returns them as stored, and `read_decoded` (the `DecodesInto`
capability the store promotes with) decodes one straight into a raw RAM slot. The wrapper
does not offer `ReadsInto`: a blob in another codec cannot be read into a raw slot as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from kvdepot.codec.base import Codec, CodecRegistry, decode_chunk_into, encode_chunk
from kvdepot.codec.format import HEADER_NBYTES, ChunkHeader, EncodedChunk, open_blob
from kvdepot.codec.raw import RawCodec
from kvdepot.keys import ChunkKey
from kvdepot.tiers.base import Tier, TierUsage


def raw_header(header: ChunkHeader) -> ChunkHeader:
    """The header of `header`'s chunk as a raw, unsealed blob (what the RAM tier holds)."""
    return replace(
        header, codec_id=RawCodec.codec_id, payload_nbytes=header.logical_nbytes, checksum=None
    )


def decode_to_raw(
    blob: bytes | memoryview,
    header: ChunkHeader,
    buffer: memoryview,
    registry: CodecRegistry,
    key: ChunkKey,
) -> None:
    """Write `key`'s blob (`header` is its opened header) into `buffer` as a raw blob:
    `raw_header(header)`, then the decoded payload. CorruptChunk if it does not decode."""
    raw = raw_header(header)
    buffer[:HEADER_NBYTES] = raw.pack()
    out = np.frombuffer(buffer, dtype=header.dtype.storage_dtype, offset=HEADER_NBYTES)
    decode_chunk_into(blob, out.reshape(header.shape), registry, verify=False, key=key)


class CodecTier:
    """`inner`, with every chunk written in `codec`."""

    def __init__(self, inner: Tier, codec: Codec, registry: CodecRegistry) -> None:
        self.inner = inner
        self.codec = codec
        self.registry = registry
        self.name = inner.name

    def transcode(self, chunk: EncodedChunk) -> EncodedChunk:
        """`chunk` in this tier's codec (unchanged if it already is)."""
        header = chunk.header
        if header.codec_id == self.codec.codec_id:
            return chunk
        array = np.empty(header.shape, dtype=header.dtype.storage_dtype)
        blob = header.pack() + bytes(chunk.contiguous_payload())
        decode_chunk_into(blob, array, self.registry, verify=False)  # not a stored blob: no key
        return encode_chunk(array, header.dtype, self.codec)

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self.inner.contains(keys)

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        return self.inner.get(keys)

    def read_decoded(self, key: ChunkKey, reserve: Callable[[int], memoryview | None]) -> bool:
        (blob,) = self.inner.get([key])  # validated there (checksum) or None
        if blob is None:
            return False
        header, _ = open_blob(blob, key=key, verify=False)
        buffer = reserve(raw_header(header).blob_nbytes)
        if buffer is None:
            return False
        decode_to_raw(blob, header, buffer, self.registry, key)
        return True

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int:
        # Bound before and after: a chunk of another key is refused, never re-keyed.
        return self.inner.put(
            [(key, self.transcode(chunk.bound(key)).bound(key)) for key, chunk in items]
        )

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        self.inner.delete(keys)

    def clear(self) -> None:
        self.inner.clear()

    def usage(self) -> TierUsage:
        return self.inner.usage()

    def close(self) -> None:
        self.inner.close()
