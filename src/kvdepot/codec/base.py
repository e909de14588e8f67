"""The codec seam: how a chunk's tensor becomes a payload and back.

Pure code, used in every process. A codec is a small object with a stable numeric id (written
into every chunk header, so ids are never reused) and two methods. Registries are plain
objects passed to whoever needs them; there is no process-wide registry.

Invariant for implementers: `decode_into` either fills `out` completely with the decoded
tensor or raises `CorruptChunk`; it never allocates more than a small multiple of
`out.nbytes`, whatever the payload says.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np

from kvdepot.codec.format import MAX_NDIM, ChunkHeader, EncodedChunk, open_blob
from kvdepot.errors import ConfigError, CorruptChunk, UnknownCodec
from kvdepot.keys import ChunkKey
from kvdepot.layout import DType


@runtime_checkable
class Codec(Protocol):
    """Encodes a tensor's bits to a payload and decodes them back.

    Attributes:
        name: unique, stable name used in configs ("raw", "lossless").
        codec_id: unique, stable id in [1, 65535] written into chunk headers.
        is_lossless: whether decode(encode(x)) == x bit for bit.
    """

    name: str
    codec_id: int
    is_lossless: bool

    def encode(self, array: np.ndarray, dtype: DType) -> np.ndarray:
        """Payload for `array` (storage dtype of `dtype`, any strides); may return a view."""
        ...

    def decode_into(self, header: ChunkHeader, payload: memoryview, out: np.ndarray) -> None:
        """Decode `payload` into `out` (storage dtype, `header.shape`, any strides)."""
        ...


class CodecRegistry:
    """Codecs by id and by name."""

    def __init__(self, codecs: Iterable[Codec] = ()) -> None:
        self._by_id: dict[int, Codec] = {}
        self._by_name: dict[str, Codec] = {}
        for codec in codecs:
            self.register(codec)

    def register(self, codec: Codec) -> None:
        if not 1 <= codec.codec_id <= 0xFFFF:
            raise ConfigError(f"codec {codec.name!r}: id {codec.codec_id} not in [1, 65535]")
        if codec.codec_id in self._by_id or codec.name in self._by_name:
            raise ConfigError(f"codec {codec.name!r} (id {codec.codec_id}) is already registered")
        self._by_id[codec.codec_id] = codec
        self._by_name[codec.name] = codec

    def by_name(self, name: str) -> Codec:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name))
            raise ConfigError(f"unknown codec {name!r}; registered: {known}") from None

    def by_id(self, codec_id: int) -> Codec:
        try:
            return self._by_id[codec_id]
        except KeyError:
            raise UnknownCodec(f"chunk written with codec id {codec_id}, not registered") from None

    def names(self) -> list[str]:
        return sorted(self._by_name)


def encode_chunk(array: np.ndarray, dtype: DType, codec: Codec) -> EncodedChunk:
    """Encode `array` (the storage dtype of `dtype`) into an unsealed chunk."""
    if array.dtype != dtype.storage_dtype:
        raise ValueError(f"array dtype {array.dtype} does not hold {dtype.name}")
    if not 1 <= array.ndim <= MAX_NDIM or array.size == 0 or max(array.shape) >= 1 << 32:
        raise ValueError(f"a chunk must have 1-{MAX_NDIM} non-empty dims, got {array.shape}")
    payload = codec.encode(array, dtype)
    header = ChunkHeader(codec.codec_id, dtype, tuple(array.shape), payload.nbytes)
    return EncodedChunk(header, payload)


def decode_chunk_into(
    blob: memoryview | bytes,
    out: np.ndarray,
    registry: CodecRegistry,
    *,
    verify: bool,
    key: ChunkKey | None = None,
) -> ChunkHeader:
    """Validate `blob` (bound to `key`, when given) and decode it into `out`, whose shape and
    dtype must match its header."""
    header, payload = open_blob(blob, key=key, verify=verify)
    if out.shape != header.shape or out.dtype != header.dtype.storage_dtype:
        raise CorruptChunk(
            f"chunk holds {header.dtype.name}{list(header.shape)}, "
            f"caller expected {out.dtype}{list(out.shape)}"
        )
    registry.by_id(header.codec_id).decode_into(header, payload, out)
    return header


def decode_chunk(
    blob: memoryview | bytes, registry: CodecRegistry, *, verify: bool = True
) -> tuple[DType, np.ndarray]:
    """Validate and decode `blob` into a new array; returns its dtype and the array."""
    header, _ = open_blob(blob, key=None, verify=False)
    out = np.empty(header.shape, dtype=header.dtype.storage_dtype)
    decode_chunk_into(blob, out, registry, verify=verify)
    return header.dtype, out
