"""Chunk keys: content addresses for the KV of token chunks.

Pure functions and value types, used in every process. Invariants:
- A key depends only on its inputs (token ids, tenant salt, model fingerprint, layout, shard
  rank, hash algorithm, hash version): never on the process, `PYTHONHASHSEED`, the machine or
  the installed engine version.
- Prefix chunks chain: `h_0 = H(version, salt, fingerprint)` and `h_i = H(h_{i-1}, tokens of
  chunk i as little-endian int32)`, so chunk i's key stands for the whole prefix up to it.
  A prompt's trailing partial chunk may get `H(h_prev, PARTIAL_TAG, its tokens)`: an exact
  match only, the end of a chain.
- A segment (a document that may appear anywhere in a prompt) chains from its own root,
  `H(h_0, SEGMENT_TAG)`, instead of `h_0`: its key depends on its own tokens only, never on
  what precedes it, and a segment key never equals a prefix key of the same tokens (the KV
  differs: a segment's KV is computed at positions 0..n-1 without the text before it).
- Everything that makes KV incompatible (model, layout, shard rank, salt, algorithm, version)
  goes into the key's namespace digest, so two namespaces never share a key.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NewType

import numpy as np
import xxhash

from kvdepot.errors import ConfigError

HASH_VERSION = 1
"""Bump when the hashing scheme changes; old keys then simply stop matching."""

CHUNK_FORMAT_VERSION = 2
"""The stored-chunk format (`kvdepot.codec.format`), part of every namespace: chunks written
in another format live under other keys, invisible to this build (a miss), so builds of two
formats sharing a disk, Valkey or S3 never read, or delete, each other's chunks."""

PARTIAL_TAG = b"\x00kvdepot-partial-chunk"
"""Domain separator of partial-chunk hashes (a full chunk's input never starts with it)."""

SEGMENT_TAG = b"\x00kvdepot-segment-root"
"""Domain separator of segment chains (position-independent KV of a segment's own tokens)."""

MAX_CHUNK_TOKENS = 8192
"""Largest chunk, in tokens: bounds every token list a chunk or a request can carry."""

ChunkHash = NewType("ChunkHash", bytes)
"""16-byte chained hash of a token prefix (or of a segment's own tokens)."""

TokenIds = Sequence[int] | np.ndarray
"""Token ids as a list or a 1-D integer array."""


class HashAlgorithm(Enum):
    """Chunk hash functions. blake2b is collision resistant (safe across tenants); xxh3 is fast."""

    BLAKE2B_128 = "blake2b-128"
    XXH3_128 = "xxh3-128"

    def digest(self, *parts: bytes | memoryview) -> bytes:
        """16-byte digest of the concatenation of `parts`."""
        if self is HashAlgorithm.BLAKE2B_128:
            b = hashlib.blake2b(digest_size=16)
            for part in parts:
                b.update(part)
            return b.digest()
        x = xxhash.xxh3_128()
        for part in parts:
            x.update(part)
        return bytes(x.digest())


def _field(value: bytes) -> bytes:
    """Length-prefixed field, so that adjacent fields can never be confused."""
    return struct.pack("<I", len(value)) + value


@dataclass(frozen=True, slots=True)
class CacheNamespace:
    """Everything besides the tokens that decides whether stored KV can be reused.

    Attributes:
        model_fingerprint: identity of the weights, e.g. "HuggingFaceTB/SmolLM2-135M@<sha>".
        layout_id: `KVLayout.layout_id` of the stored chunks.
        shard_rank: tensor-parallel rank whose heads the chunks hold.
        tenant_salt: isolates tenants; different salts never share a chunk.
        algorithm: chunk hash function.
    """

    model_fingerprint: str
    layout_id: str
    shard_rank: int = 0
    tenant_salt: bytes = b""
    algorithm: HashAlgorithm = HashAlgorithm.BLAKE2B_128
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model_fingerprint:
            raise ConfigError("model_fingerprint must be a non-empty string")
        if self.shard_rank < 0:
            raise ConfigError(f"shard_rank must be >= 0, got {self.shard_rank}")
        # blake2b always: the namespace is hashed once, and it must resist collisions.
        digest = hashlib.blake2b(
            _field(b"kvdepot-namespace")
            + _field(str(HASH_VERSION).encode())
            + _field(f"format-{CHUNK_FORMAT_VERSION}".encode())
            + _field(self.algorithm.value.encode())
            + _field(self.model_fingerprint.encode())
            + _field(self.layout_id.encode())
            + _field(str(self.shard_rank).encode())
            + _field(self.tenant_salt),
            digest_size=16,
        ).digest()
        object.__setattr__(self, "digest", digest)

    def root_hash(self) -> ChunkHash:
        """h_0 of every prefix chain in this namespace: H(version, salt, fingerprint)."""
        return ChunkHash(
            self.algorithm.digest(
                _field(str(HASH_VERSION).encode()),
                _field(self.tenant_salt),
                _field(self.model_fingerprint.encode()),
            )
        )

    def segment_root(self) -> ChunkHash:
        """Root of every segment chain in this namespace: H(h_0, SEGMENT_TAG)."""
        return ChunkHash(self.algorithm.digest(self.root_hash(), SEGMENT_TAG))


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """Storage key of one chunk: namespace digest + chunk hash (32 bytes in all)."""

    namespace: bytes
    chunk_hash: ChunkHash

    def to_bytes(self) -> bytes:
        return self.namespace + self.chunk_hash

    def hex(self) -> str:
        return self.to_bytes().hex()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ChunkKey:
        if len(raw) != 32:
            raise ValueError(f"a chunk key is 32 bytes, got {len(raw)}")
        return cls(raw[:16], ChunkHash(raw[16:]))

    @classmethod
    def from_hex(cls, text: str) -> ChunkKey:
        return cls.from_bytes(bytes.fromhex(text))


def token_bytes(tokens: TokenIds) -> bytes:
    """Token ids as little-endian int32 bytes; raises ValueError for ids outside int32."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(
                f"tokens must be a 1-D integer array, got {tokens.dtype}{tokens.shape}"
            )
        if tokens.size and (int(tokens.min()) < -(2**31) or int(tokens.max()) >= 2**31):
            raise ValueError("token ids must fit in int32")
        return tokens.astype("<i4", copy=False).tobytes()
    try:
        # struct is ~2x faster than numpy for converting Python lists.
        return struct.pack(f"<{len(tokens)}i", *tokens)
    except struct.error as exc:
        raise ValueError(f"token ids must be int32 integers: {exc}") from None


def chunk_hashes(
    tokens: TokenIds,
    chunk_size_tokens: int,
    namespace: CacheNamespace,
    *,
    parent: ChunkHash | None = None,
    include_partial: bool = False,
) -> list[ChunkHash]:
    """Chained hashes of every full chunk of `tokens`, and optionally of the partial tail.

    Args:
        tokens: the token ids, from the start of the prompt (or of a segment).
        chunk_size_tokens: tokens per chunk.
        namespace: decides h_0 and the hash function.
        parent: chain from this hash instead of the namespace root (segments, resumptions).
        include_partial: when `tokens` does not end on a chunk boundary, append the hash of
            the trailing partial chunk, `H(h_prev, PARTIAL_TAG, tail tokens)`: it matches only
            the exact same tail, and no chunk ever chains from it.
    """
    return chain_hashes(
        token_bytes(tokens),
        chunk_size_tokens,
        namespace,
        parent=parent,
        include_partial=include_partial,
    )


def chain_hashes(
    raw_tokens: bytes,
    chunk_size_tokens: int,
    namespace: CacheNamespace,
    *,
    parent: ChunkHash | None = None,
    include_partial: bool = False,
) -> list[ChunkHash]:
    """`chunk_hashes` of tokens given as little-endian int32 bytes (`token_bytes`), for
    callers that need those bytes anyway."""
    if chunk_size_tokens <= 0:
        raise ConfigError(f"chunk_size_tokens must be positive, got {chunk_size_tokens}")
    raw = memoryview(raw_tokens)
    step = 4 * chunk_size_tokens
    digest = namespace.algorithm.digest
    prev = namespace.root_hash() if parent is None else parent
    out: list[ChunkHash] = []
    num_full_bytes = len(raw) - len(raw) % step
    for start in range(0, num_full_bytes, step):
        prev = ChunkHash(digest(prev, raw[start : start + step]))
        out.append(prev)
    if include_partial and num_full_bytes < len(raw):
        out.append(ChunkHash(digest(prev, PARTIAL_TAG, raw[num_full_bytes:])))
    return out


def chunk_keys(
    tokens: TokenIds, chunk_size_tokens: int, namespace: CacheNamespace
) -> list[ChunkKey]:
    """`ChunkKey`s of every full prefix chunk of `tokens`, head first."""
    ns = namespace.digest
    return [ChunkKey(ns, h) for h in chunk_hashes(tokens, chunk_size_tokens, namespace)]
