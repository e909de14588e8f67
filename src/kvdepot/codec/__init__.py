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
from kvdepot.codec.cachegen import CacheGenCodec
from kvdepot.codec.format import (
    HEADER_NBYTES,
    MAX_CHUNK_BYTES,
    ChunkHeader,
    EncodedChunk,
    open_blob,
    parse_header,
    seal,
)
from kvdepot.codec.fp8 import Fp8Codec
from kvdepot.codec.int8 import Int8Codec
from kvdepot.codec.lossless import LosslessCodec
from kvdepot.codec.plugins import (
    ENTRY_POINT_GROUP,
    builtin_codecs,
    default_registry,
    load_registry,
)
from kvdepot.codec.raw import RawCodec

__all__ = [
    "ENTRY_POINT_GROUP",
    "HEADER_NBYTES",
    "MAX_CHUNK_BYTES",
    "CacheGenCodec",
    "ChunkHeader",
    "Codec",
    "CodecRegistry",
    "EncodedChunk",
    "Fp8Codec",
    "Int8Codec",
    "LosslessCodec",
    "RawCodec",
    "builtin_codecs",
    "decode_chunk",
    "decode_chunk_into",
    "default_registry",
    "encode_chunk",
    "load_registry",
    "open_blob",
    "parse_header",
    "seal",
]
