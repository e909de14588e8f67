"""KV layouts: the shape and dtype of one model shard's KV cache, independent of any engine.

Pure value types, used in every process. A chunk is logically
`[num_layers, 2 (K, V), chunk_tokens, num_kv_heads, head_dim]` in the model's dtype; the layout
identity (`layout_id`) is part of every chunk key, so KV stored for one layout can never be
served to another.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from kvdepot.errors import ConfigError


class DType(IntEnum):
    """Element types a chunk can hold; the value is the on-disk code (never renumber)."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    FLOAT8_E4M3 = 4
    FLOAT8_E5M2 = 5
    INT8 = 6
    UINT8 = 7

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def storage_dtype(self) -> np.dtype[np.generic]:
        """The numpy dtype that holds this type's bits (bf16 and fp8 have no numpy type)."""
        return np.dtype(_STORAGE[self])

    @classmethod
    def from_name(cls, name: str) -> DType:
        """Parse 'bfloat16', 'torch.float16', 'fp32' and similar spellings."""
        key = name.lower().removeprefix("torch.")
        try:
            return _ALIASES[key]
        except KeyError:
            known = ", ".join(sorted(_ALIASES))
            raise ConfigError(f"unknown dtype {name!r}; expected one of: {known}") from None


_ITEMSIZE = {
    DType.FLOAT32: 4,
    DType.FLOAT16: 2,
    DType.BFLOAT16: 2,
    DType.FLOAT8_E4M3: 1,
    DType.FLOAT8_E5M2: 1,
    DType.INT8: 1,
    DType.UINT8: 1,
}
_STORAGE = {
    DType.FLOAT32: "<f4",
    DType.FLOAT16: "<f2",
    DType.BFLOAT16: "<u2",
    DType.FLOAT8_E4M3: "u1",
    DType.FLOAT8_E5M2: "u1",
    DType.INT8: "i1",
    DType.UINT8: "u1",
}
_ALIASES = {
    "float32": DType.FLOAT32,
    "fp32": DType.FLOAT32,
    "float": DType.FLOAT32,
    "float16": DType.FLOAT16,
    "fp16": DType.FLOAT16,
    "half": DType.FLOAT16,
    "bfloat16": DType.BFLOAT16,
    "bf16": DType.BFLOAT16,
    "float8_e4m3fn": DType.FLOAT8_E4M3,
    "fp8_e4m3": DType.FLOAT8_E4M3,
    "float8_e5m2": DType.FLOAT8_E5M2,
    "fp8_e5m2": DType.FLOAT8_E5M2,
    "int8": DType.INT8,
    "uint8": DType.UINT8,
}


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The KV cache shape of one model shard.

    Attributes:
        num_layers: attention layers that hold KV.
        num_kv_heads: KV heads held by this shard.
        head_dim: elements per head.
        dtype: element type of the KV tensors.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: DType

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"KVLayout.{name} must be a positive int, got {value!r}")

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Logical shape of the KV of `num_tokens` tokens."""
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def layout_id(self) -> str:
        """Stable text identity of this layout; part of every chunk key."""
        return (
            f"L{self.num_layers}-2-H{self.num_kv_heads}-D{self.head_dim}-{self.dtype.name.lower()}"
        )
