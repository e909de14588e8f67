"""An example kvdepot codec plug-in: fp32 KV stored as fp16, everything else as it is.

Halves fp32 KV at ~1e-3 relative error (fp16 keeps 11 significant bits; KV values are far
inside its range, and larger ones saturate to ±65504 instead of becoming inf). The worked
example of docs/codecs.md; tests/test_codec_plugins.py installs this folder and loads it
through its entry point.
"""

from __future__ import annotations

import numpy as np

from kvdepot.codec import ChunkHeader
from kvdepot.errors import CorruptChunk
from kvdepot.layout import DType

_FP16_MAX = float(np.finfo(np.float16).max)


class Fp16DowncastCodec:
    """fp32 -> fp16 (lossy); other dtypes unchanged."""

    name = "fp16-downcast"
    codec_id = 1000  # third-party ids: pick one >= 1000 and never reuse it
    is_lossless = False

    def encode(self, array: np.ndarray, dtype: DType) -> np.ndarray:
        if dtype is not DType.FLOAT32:
            return np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        values = np.nan_to_num(array, nan=0.0, posinf=_FP16_MAX, neginf=-_FP16_MAX)
        return np.clip(values, -_FP16_MAX, _FP16_MAX).astype("<f2").view(np.uint8).reshape(-1)

    def decode_into(self, header: ChunkHeader, payload: memoryview, out: np.ndarray) -> None:
        # Every size comes from the header, never from the payload: one exact check.
        width = 2 if header.dtype is DType.FLOAT32 else header.dtype.itemsize
        if len(payload) != out.size * width:
            raise CorruptChunk(
                f"fp16-downcast payload: {len(payload)} bytes, not {out.size * width}"
            )
        if header.dtype is not DType.FLOAT32:
            np.copyto(out, np.frombuffer(payload, dtype=out.dtype).reshape(out.shape))
            return
        halves = np.frombuffer(payload, dtype="<f2").reshape(out.shape)
        np.copyto(out, halves, casting="unsafe")  # fp16 -> fp32 is exact
