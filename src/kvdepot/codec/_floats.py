"""Shared plumbing of the lossy codecs: float conversion, the canonical KV view, bf16 scales.

Pure code, used in every process. Lossy codecs quantize float KV (fp32, fp16, bf16) and
decode back into the same dtype. They see a chunk as `[layers, slabs, tokens, heads, dim]`:
a KV chunk `[L, 2, T, H, D]` as it is (slab 0 = K, slab 1 = V); any other shape as one
slab of rows `[1, 1, rows, 1, last_dim]`. The view is a pure function of the header's shape,
so the decoder needs no mode bits.

Invariants: `as_float32` returns a fresh, writable, C-contiguous array (callers may modify it
in place) whose values lie within ±`MAX_MAGNITUDE`;
`read_bf16` accepts only values within that bound too. So no arithmetic of a codec can
overflow float32, whatever a payload says (numpy would warn, and warnings are errors here).
"""

from __future__ import annotations

import math

import numpy as np

from kvdepot.errors import CorruptChunk
from kvdepot.layout import DType

MAX_MAGNITUDE = 2.0**40
"""Largest magnitude a lossy codec stores or trusts (KV values are below ~1e4); squares of
values this large, summed over 2**32 tokens, still fit float32."""
_FP16_MAX = float(np.finfo(np.float16).max)
FLOAT_DTYPES = frozenset({DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16})


def canonical_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    """`shape` as `[layers, slabs, tokens, heads, dim]` (see the module docstring)."""
    if len(shape) == 5 and shape[1] == 2:
        return (shape[0], 2, shape[2], shape[3], shape[4])
    return (1, 1, math.prod(shape[:-1]), 1, shape[-1])


def as_float32(array: np.ndarray, dtype: DType) -> np.ndarray:
    """A fresh float32 copy of `array` (storage dtype of `dtype`), NaN and ±inf set to 0 and
    the rest clipped to ±MAX_MAGNITUDE.

    KV never holds non-finite values; mapping them to 0 keeps one bad element from
    poisoning the scales of everything quantized with it.
    """
    if dtype is DType.BFLOAT16:
        values = (array.astype(np.uint32) << 16).view(np.float32)
    else:
        values = array.astype(np.float32, order="C")
    values = np.ascontiguousarray(values)
    bad = ~np.isfinite(values)
    if bad.any():
        values[bad] = 0.0
    np.clip(values, -MAX_MAGNITUDE, MAX_MAGNITUDE, out=values)
    return values


def layer_views(out: np.ndarray, shape: tuple[int, int, int, int, int]) -> list[np.ndarray]:
    """`out` split by the canonical view's layers (one view when `out` is not KV-shaped).

    Decoders work one layer at a time: a layer's float32 block stays in the CPU cache
    across the few passes that build it, which about halves decode time on this machine.
    """
    if out.shape == shape:
        return [out[i] for i in range(shape[0])]
    return [out]


def store_float32(values: np.ndarray, out: np.ndarray, dtype: DType) -> None:
    """Round `values` (float32, finite, owned by the caller: it is overwritten) into `out`.

    bf16 rounds half away from zero on the bit pattern (cheaper than half-to-even, and the
    difference is far below any lossy codec's error). numpy only: torch's thread pool
    stalls on a busy 2-core machine.
    """
    values = values.reshape(out.shape)
    if dtype is DType.FLOAT32:
        np.copyto(out, values)
    elif dtype is DType.FLOAT16:
        # Saturate: a scale rounded up can put fp16's largest values a hair past its range.
        np.clip(values, -_FP16_MAX, _FP16_MAX, out=values)
        np.copyto(out, values, casting="same_kind")
    else:
        bits = values.view(np.uint32)
        bits += 0x8000
        bits >>= 16
        np.copyto(out, bits, casting="unsafe")


def bf16_round_up(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative finite float32 `values` rounded up to bf16: (uint16 bits, float32 values).

    Rounding a scale *up* keeps every quantized value inside its integer range.
    """
    bits32 = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits16 = np.minimum((bits32 + 0xFFFF) >> 16, 0x7F7F).astype(np.uint16)
    return bits16, bf16_to_float32(bits16)


def bf16_round_nearest(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Finite float32 `values` rounded to the nearest bf16: (uint16 bits, float32 values)."""
    bits32 = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits16 = ((bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16).astype(np.uint16)
    return bits16, bf16_to_float32(bits16)


def bf16_to_float32(bits16: np.ndarray) -> np.ndarray:
    return (bits16.astype(np.uint32) << 16).view(np.float32)


def read_bf16(payload: memoryview, offset: int, count: int, *, what: str) -> np.ndarray:
    """`count` bf16 values at `offset` as float32; CorruptChunk unless all are within
    ±MAX_MAGNITUDE (NaN and inf included)."""
    values = bf16_to_float32(np.frombuffer(payload, dtype="<u2", count=count, offset=offset))
    if not (np.abs(values) <= MAX_MAGNITUDE).all():
        raise CorruptChunk(f"{what}: value out of range or not finite")
    return values
