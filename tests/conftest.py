"""Shared fixtures: small layouts, chunk builders and stores with tiny budgets."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from kvdepot import Metrics, TieredStore
from kvdepot.codec import EncodedChunk, RawCodec, encode_chunk
from kvdepot.keys import ChunkHash, ChunkKey
from kvdepot.layout import DType
from kvdepot.tiers.arena import HostBuffer
from kvdepot.tiers.memory import MemoryTier


def random_key() -> ChunkKey:
    return ChunkKey(bytes(16), ChunkHash(os.urandom(16)))


def make_chunk(seed: int, shape: tuple[int, ...] = (2, 2, 8, 2, 4)) -> EncodedChunk:
    """A raw fp16 chunk whose content is determined by `seed`."""
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float16)
    return encode_chunk(data, DType.FLOAT16, RawCodec())


def chunk_bytes(chunk: EncodedChunk, key: ChunkKey | None = None) -> bytes:
    """The blob of `chunk` (bound to `key`, as a tier stores it, when given)."""
    buf = bytearray(chunk.nbytes)
    (chunk if key is None else chunk.bound(key)).write_into(memoryview(buf))
    return bytes(buf)


@pytest.fixture
def memory_tier() -> Iterator[Callable[[int], MemoryTier]]:
    """Factory of RAM tiers with a given byte budget, closed after the test."""
    made: list[MemoryTier] = []

    def make(capacity_bytes: int) -> MemoryTier:
        tier = MemoryTier(HostBuffer.allocate(capacity_bytes, prefault=False))
        made.append(tier)
        return tier

    yield make
    for tier in made:
        tier.close()


@pytest.fixture
def store() -> Iterator[TieredStore]:
    """A RAM-only TieredStore of 256 MiB (not prefaulted)."""
    s = TieredStore(MemoryTier(HostBuffer.allocate(256 << 20, prefault=False)), metrics=Metrics())
    yield s
    s.close()
