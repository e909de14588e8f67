"""The `raw` codec: the tensor's bytes as they are, C order. Zero encode work."""

from __future__ import annotations

import numpy as np

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
        np.copyto(out, np.frombuffer(payload, dtype=out.dtype).reshape(out.shape))
