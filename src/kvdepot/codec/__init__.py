"""Chunk serialization: the stored-chunk format and the codecs that fill its payload.

Imports flow down only: this package depends on `layout` and `errors`, nothing above.
"""

from kvdepot.codec.base import (
    Codec,
    CodecRegistry,
    decode_chunk,
    decode_chunk_into,
    encode_chunk,
)
from kvdepot.codec.format import (
    HEADER_NBYTES,
    MAX_CHUNK_BYTES,
    ChunkHeader,
    EncodedChunk,
    open_blob,
    parse_header,
    seal,
)
from kvdepot.codec.lossless import LosslessCodec
from kvdepot.codec.raw import RawCodec


def default_registry() -> CodecRegistry:
    """A new registry holding the built-in codecs."""
    return CodecRegistry([RawCodec(), LosslessCodec()])


__all__ = [
    "HEADER_NBYTES",
    "MAX_CHUNK_BYTES",
    "ChunkHeader",
    "Codec",
    "CodecRegistry",
    "EncodedChunk",
    "LosslessCodec",
    "RawCodec",
    "decode_chunk",
    "decode_chunk_into",
    "default_registry",
    "encode_chunk",
    "open_blob",
    "parse_header",
    "seal",
]
