"""CodecTier: a lower tier that stores chunks in its own codec (e.g. lossless on disk,
CacheGen-style on Valkey/S3), wrapping any `Tier`.

Runs wherever the wrapped tier runs. The RAM tier always holds `raw` chunks (one copy in,
one copy out); `put` here re-encodes them into this tier's codec before the inner tier
seals and writes them, and `get` returns them as stored: the store decodes them back to raw
when it promotes them into RAM. The wrapper deliberately does not offer `ReadsInto`, because a
blob in another codec cannot be read straight into a raw RAM slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvdepot.codec.base import Codec, CodecRegistry, decode_chunk_into, encode_chunk
from kvdepot.codec.format import EncodedChunk
from kvdepot.keys import ChunkKey
from kvdepot.tiers.base import Tier, TierUsage


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
