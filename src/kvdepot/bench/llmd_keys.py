"""llm-d's block keys, computed as its KV-cache indexer computes them from token ids.

Pure code, used by the tests of KV events (tests/test_events.py) and by the reference router
(benchmarks/router.py) to show that a router keyed on llm-d's scheme can map kvdepot's
chunks onto its own blocks. The scheme (llm-d's token processor, `cbor-fnv`, empty hash
seed): the root is H(H(seed), nil, model); each block of `block_size` tokens chains
H(parent, tokens, nil), where H is FNV-1a 64 over canonical CBOR; a partial last block has no
key.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

LLMD_BLOCK_TOKENS = 16
"""llm-d's default block size."""

CborValue = int | str | None | Sequence["CborValue"]


def cbor(value: CborValue) -> bytes:
    """Canonical CBOR of unsigned ints, null, text and arrays of them (what llm-d hashes)."""

    def head(major: int, n: int) -> bytes:
        if n < 24:
            return bytes([major << 5 | n])
        for extra, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
            if n < 1 << (8 * struct.calcsize(fmt)):
                return bytes([major << 5 | extra]) + struct.pack(fmt, n)
        raise ValueError(f"{n} does not fit CBOR's 64-bit lengths")

    if value is None:
        return b"\xf6"
    if isinstance(value, int):
        return head(0, value)
    if isinstance(value, str):
        raw = value.encode()
        return head(3, len(raw)) + raw
    return head(4, len(value)) + b"".join(cbor(v) for v in value)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def root_key(model: str) -> int:
    """The parent of a prompt's first block, for `model`."""
    return fnv1a64(cbor([fnv1a64(b""), None, model]))


def block_keys(
    tokens: Sequence[int], parent: int, block_size: int = LLMD_BLOCK_TOKENS
) -> list[int]:
    """Keys of the whole blocks of `tokens`, chained from `parent`."""
    keys, prefix = [], parent
    for i in range(0, len(tokens) // block_size * block_size, block_size):
        prefix = fnv1a64(cbor([prefix, list(tokens[i : i + block_size]), None]))
        keys.append(prefix)
    return keys
