"""The `raw` codec: the tensor's bytes as they are, C order. Zero encode work."""

from __future__ import annotations

import numpy as np

from kvdepot.codec.copies import copy_array
from kvdepot.codec.format import ChunkHeader
from kvdepot.errors import CorruptChunk
from kvdepot.layout import DType


class RawCodec:
    """Stores the bits unchanged; `encode` returns the input (a copy happens at the tier)."""

    name = "raw"
    codec_id = 1
    is_lossless = True

    def encode(self, array: np.ndarray, dtype: DType) -> np.ndarray:
        return array

    def decode_into(self, header: ChunkHeader, payload: memoryview, out: np.ndarray) -> None:
        if len(payload) != out.nbytes:
            raise CorruptChunk(f"raw payload is {len(payload)} bytes, expected {out.nbytes}")
        copy_array(out, np.frombuffer(payload, dtype=out.dtype).reshape(out.shape))


def raw_view(header: ChunkHeader, payload: memoryview) -> np.ndarray | None:
    """The payload of a raw chunk in writable memory as an array of the header's shape and
    storage dtype, without a copy (it lives as long as that memory); None for another codec
    or read-only memory (numpy and torch want writable arrays)."""
    if header.codec_id != RawCodec.codec_id or payload.readonly:
        return None
    if len(payload) != header.logical_nbytes:
        raise CorruptChunk(f"raw payload is {len(payload)} bytes, expected {header.logical_nbytes}")
    return np.frombuffer(payload, dtype=header.dtype.storage_dtype).reshape(header.shape)
