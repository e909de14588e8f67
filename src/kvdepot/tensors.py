"""Torch tensors <-> kvdepot dtypes and raw bits: the conversions every KV copy needs.

Pure functions, used in every process that holds KV tensors (the engine, the connectors, the
benchmarks). A chunk stores a tensor's bits in its DType's numpy storage dtype (bf16 and fp16
as int16, fp8 as uint8); these views move between the two without copying.
"""

from __future__ import annotations

import numpy as np
import torch

from kvdepot.errors import LayoutMismatch
from kvdepot.layout import DType

_TORCH_DTYPES = {
    torch.float32: DType.FLOAT32,
    torch.float16: DType.FLOAT16,
    torch.bfloat16: DType.BFLOAT16,
    torch.float8_e4m3fn: DType.FLOAT8_E4M3,
    torch.float8_e5m2: DType.FLOAT8_E5M2,
    torch.uint8: DType.UINT8,  # a quantized KV cache's bytes (vLLM's fp8 pages), moved as is
}
_TORCH_STORAGE = {1: torch.uint8, 2: torch.int16, 4: torch.float32}
_NUMPY_STORAGE = {1: np.uint8, 2: np.int16, 4: np.float32}


def dtype_from_torch(dtype: torch.dtype) -> DType:
    """The kvdepot DType of a torch float dtype (or uint8: bytes of a quantized KV cache)."""
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise LayoutMismatch(f"KV dtype {dtype} is not supported; use a float dtype") from None


def torch_dtype(dtype: DType) -> torch.dtype:
    """The torch dtype of a kvdepot DType."""
    return next(t for t, d in _TORCH_DTYPES.items() if d is dtype)


def torch_from_bits(bits: np.ndarray, dtype: DType) -> torch.Tensor:
    """A tensor over the memory of `bits` (DType storage dtype; no copy): `as_numpy_bits`'s
    inverse. `bits` must be writable."""
    if dtype is DType.FLOAT32:
        return torch.from_numpy(bits)
    as_int = bits.view(_NUMPY_STORAGE[dtype.itemsize])
    return torch.from_numpy(as_int).view(torch_dtype(dtype))


def as_numpy_bits(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy) of a CPU tensor's bits, in the DType's storage dtype."""
    dtype = dtype_from_torch(tensor.dtype)
    if dtype is DType.FLOAT32:
        return tensor.numpy()
    bits = tensor.view(_TORCH_STORAGE[dtype.itemsize]).numpy()
    return bits.view(dtype.storage_dtype)
