"""The `fp8` codec (id 4): float8 e4m3 (the `float8_e4m3fn` of OCP / torch), scaled per slab.

Pure code, used in every process. e4m3 keeps ~2 significant decimal digits at every
magnitude, so unlike int8 it needs no per-channel scales for K's outlier channels; one fp32
scale per (layer, K or V) maps that slab's absmax to 448, the largest e4m3 value, which uses
the whole exponent range. Encoding rounds to nearest even (torch's conversion); decoding is a
256-entry table per slab with the scale folded in, so it is one gather per value.

Payload: scales `[L, S]` float32 | e4m3 bytes `[L, S, T, H, D]`. The encoder never writes the
two NaN codes (0x7F, 0xFF) and the decoder rejects them. Non-float dtypes are stored as
they are.
"""

from __future__ import annotations

import numpy as np
import torch

from kvdepot.codec._floats import (
    FLOAT_DTYPES,
    MAX_MAGNITUDE,
    as_float32,
    canonical_shape,
    layer_views,
    store_float32,
)
from kvdepot.codec.format import ChunkHeader
from kvdepot.errors import CorruptChunk
from kvdepot.layout import DType

E4M3_MAX = 448.0
_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def _num_slabs(shape: tuple[int, ...]) -> int:
    num_layers, num_slabs, *_ = canonical_shape(shape)
    return num_layers * num_slabs


class Fp8Codec:
    """float8 e4m3 with one fp32 scale per (layer, K/V) slab (lossy, 2x of 16-bit)."""

    name = "fp8"
    codec_id = 4
    is_lossless = False

    def encode(self, array: np.ndarray, dtype: DType) -> np.ndarray:
        if dtype not in FLOAT_DTYPES:
            return np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        num_slabs = _num_slabs(array.shape)
        values = as_float32(array, dtype).reshape(num_slabs, -1)
        amax = np.abs(values).max(axis=1)
        smallest = np.finfo(np.float32).tiny  # subnormal absmax: no scale may underflow to 0
        scales = np.where(amax > 0, np.maximum(amax / np.float32(E4M3_MAX), smallest), 1)
        scales = scales.astype("<f4")
        np.divide(values, scales[:, None], out=values)
        np.clip(values, -E4M3_MAX, E4M3_MAX, out=values)
        codes = torch.from_numpy(values).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        payload = np.empty(4 * num_slabs + values.size, dtype=np.uint8)
        payload[: 4 * num_slabs] = scales.view(np.uint8)
        payload[4 * num_slabs :] = codes.reshape(-1)
        return payload

    def decode_into(self, header: ChunkHeader, payload: memoryview, out: np.ndarray) -> None:
        if header.dtype not in FLOAT_DTYPES:
            if len(payload) != out.nbytes:
                raise CorruptChunk(f"fp8 payload is {len(payload)} bytes, expected {out.nbytes}")
            np.copyto(out, np.frombuffer(payload, dtype=out.dtype).reshape(out.shape))
            return
        num_slabs = _num_slabs(header.shape)
        if len(payload) != 4 * num_slabs + out.size:
            raise CorruptChunk(
                f"fp8 payload is {len(payload)} bytes, expected {4 * num_slabs + out.size}"
            )
        scales = np.frombuffer(payload, dtype="<f4", count=num_slabs)
        if not ((scales >= 0) & (scales <= MAX_MAGNITUDE)).all():
            raise CorruptChunk("fp8 scales must be in [0, MAX_MAGNITUDE]")
        codes = np.frombuffer(payload, dtype=np.uint8, offset=4 * num_slabs).reshape(num_slabs, -1)
        if ((codes | 0x80) == 0xFF).any():
            raise CorruptChunk("fp8 payload holds a NaN code")
        shape = canonical_shape(header.shape)
        by_slab = codes.reshape(shape[0], shape[1], -1)
        scales = scales.reshape(shape[0], shape[1])
        block = np.empty(by_slab.shape[1:], dtype=np.float32)
        for layer, view in enumerate(layer_views(out, shape)):
            for slab in range(shape[1]):
                table = _E4M3_VALUES * scales[layer, slab]
                np.take(table, by_slab[layer, slab], out=block[slab])
            store_float32(block, view, header.dtype)
