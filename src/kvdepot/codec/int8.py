"""The `int8` codec (id 3): symmetric 8-bit quantization, K per channel, V per token.

Pure code, used in every process. Measured on SmolLM2-135M KV (see docs/codecs.md): K has a
few outlier channels (absmax up to ~4x the median channel's), so one scale per (layer, head,
channel) over the chunk's tokens keeps them from flattening every other channel; V has no
such channels and quantizes best with one scale per (layer, token, head) over `head_dim`.
Scales are bf16 rounded *up* (full fp32 range, 2 bytes, and no value can exceed ±127).
Versus 16-bit KV that is 64 + 2 bytes per 128: 1.94x; versus fp32 3.9x.

Payload: K scales `[L, H, D]` bf16 | V scales `[L, T, H]` bf16 (KV chunks only) |
int8 values `[L, S, T, H, D]`. Every size follows from the header's shape, so the decoder
checks one exact length. Non-float dtypes (fp8, int8, uint8) are stored as they are.
"""

from __future__ import annotations

import numpy as np

from kvdepot.codec._floats import (
    FLOAT_DTYPES,
    as_float32,
    bf16_round_up,
    canonical_shape,
    layer_views,
    read_bf16,
    store_float32,
)
from kvdepot.codec.format import ChunkHeader
from kvdepot.errors import CorruptChunk
from kvdepot.layout import DType

_QMAX = 127


def _scale_counts(shape: tuple[int, ...]) -> tuple[int, int]:
    """(K scales, V scales) of a chunk of `shape`."""
    num_layers, num_slabs, num_tokens, num_heads, head_dim = canonical_shape(shape)
    num_v = num_layers * num_tokens * num_heads if num_slabs == 2 else 0
    return num_layers * num_heads * head_dim, num_v


def _quantize(values: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    safe = np.where(scale > 0, scale, np.float32(1))
    np.clip(np.rint(values / safe), -_QMAX, _QMAX, out=values)
    np.copyto(out, values, casting="unsafe")


class Int8Codec:
    """8-bit integers with bf16 scales: K per channel, V per token (lossy, ~1.94x of 16-bit)."""

    name = "int8"
    codec_id = 3
    is_lossless = False

    def encode(self, array: np.ndarray, dtype: DType) -> np.ndarray:
        if dtype not in FLOAT_DTYPES:
            return np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        num_layers, num_slabs, num_tokens, num_heads, head_dim = canonical_shape(array.shape)
        values = as_float32(array, dtype).reshape(
            num_layers, num_slabs, num_tokens, num_heads, head_dim
        )
        num_k, num_v = _scale_counts(array.shape)
        payload = np.empty(2 * (num_k + num_v) + values.size, dtype=np.uint8)
        quantized = payload[2 * (num_k + num_v) :].view(np.int8).reshape(values.shape)
        keys = values[:, 0]
        k_bits, k_scale = bf16_round_up(np.abs(keys).max(axis=1) / _QMAX)
        _quantize(keys, k_scale[:, None], quantized[:, 0])
        payload[: 2 * num_k] = k_bits.view(np.uint8).reshape(-1)
        if num_slabs == 2:
            vals = values[:, 1]
            v_bits, v_scale = bf16_round_up(np.abs(vals).max(axis=3) / _QMAX)
            _quantize(vals, v_scale[..., None], quantized[:, 1])
            payload[2 * num_k : 2 * (num_k + num_v)] = v_bits.view(np.uint8).reshape(-1)
        return payload

    def decode_into(self, header: ChunkHeader, payload: memoryview, out: np.ndarray) -> None:
        if header.dtype not in FLOAT_DTYPES:
            if len(payload) != out.nbytes:
                raise CorruptChunk(f"int8 payload is {len(payload)} bytes, expected {out.nbytes}")
            np.copyto(out, np.frombuffer(payload, dtype=out.dtype).reshape(out.shape))
            return
        num_layers, num_slabs, num_tokens, num_heads, head_dim = canonical_shape(header.shape)
        num_k, num_v = _scale_counts(header.shape)
        num_values = out.size
        if len(payload) != 2 * (num_k + num_v) + num_values:
            raise CorruptChunk(
                f"int8 payload is {len(payload)} bytes, expected {2 * (num_k + num_v) + num_values}"
            )
        k_scale = read_bf16(payload, 0, num_k, what="int8 K scales")
        k_scale = k_scale.reshape(num_layers, 1, num_heads, head_dim)
        if num_slabs == 2:
            v_scale = read_bf16(payload, 2 * num_k, num_v, what="int8 V scales")
            v_scale = v_scale.reshape(num_layers, num_tokens, num_heads, 1)
        quantized = np.frombuffer(
            payload, dtype=np.int8, count=num_values, offset=2 * (num_k + num_v)
        ).reshape(num_layers, num_slabs, num_tokens, num_heads, head_dim)
        block = np.empty(quantized.shape[1:], dtype=np.float32)
        shape = (num_layers, num_slabs, num_tokens, num_heads, head_dim)
        for layer, view in enumerate(layer_views(out, shape)):
            np.multiply(quantized[layer, 0], k_scale[layer], out=block[0])
            if num_slabs == 2:
                np.multiply(quantized[layer, 1], v_scale[layer], out=block[1])
            store_float32(block, view, header.dtype)
