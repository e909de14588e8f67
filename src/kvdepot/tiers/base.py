"""The tier seam: one small, batch-first protocol every storage tier implements.

Tiers run in whichever process owns the `TieredStore` (the engine process when embedded, the
daemon otherwise). Contract, for implementers:
- Every method takes a batch. Keys of one batch that form a prefix chain come head first;
  eviction policies use that order.
- `get` returns only blobs that passed validation at this tier's trust boundary: a tier that
  stores outside this process (disk, remote) verifies the checksum, deletes a corrupt chunk,
  counts it and returns None for it. A tier never raises for a miss or a storage failure
  during `contains`/`get`/`put`; it logs (rate-limited), counts, and answers miss / not stored.
- `put` of a key already present is a no-op that counts as stored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvdepot.codec.format import EncodedChunk
from kvdepot.keys import ChunkKey


@dataclass(frozen=True, slots=True)
class TierUsage:
    """Occupancy of a tier."""

    used_bytes: int
    capacity_bytes: int
    num_objects: int


class Tier(Protocol):
    """A storage tier for encoded chunks."""

    name: str

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is stored (a hint: it may be evicted right after)."""
        ...

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        """Validated blobs (header + payload) for each key, None for a miss."""
        ...

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int:
        """Store chunks; returns how many are stored afterwards (new or already present)."""
        ...

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove keys if present."""
        ...

    def clear(self) -> None:
        """Remove every chunk."""
        ...

    def usage(self) -> TierUsage:
        """Current occupancy."""
        ...

    def close(self) -> None:
        """Release resources; the tier is unusable afterwards."""
        ...


@runtime_checkable
class ReadsInto(Protocol):
    """Optional tier capability: read a blob straight into caller-owned memory.

    The store uses it to promote chunks into RAM-tier slots with no intermediate buffer
    (fresh allocations are slow to fill, and a staging copy costs a pass over the bytes).
    Batch-first like `Tier`: a tier may keep several reads of one batch in flight.
    """

    def blob_sizes(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        """Stored blob length of each key, None for a miss."""
        ...

    def read_into(self, items: Sequence[tuple[ChunkKey, memoryview]]) -> list[bool]:
        """Fill each buffer (exactly its blob's length) with the validated blob of its key;
        False for a miss or a corrupt chunk (deleted and counted, as in `get`)."""
        ...


@runtime_checkable
class DecodesInto(Protocol):
    """Optional tier capability: a tier that stores chunks in a codec of its own decodes one
    straight into caller-owned memory as a raw blob (the form the RAM tier holds).

    The store uses it to promote such a chunk with one pass over its bytes: the decode.
    """

    def read_decoded(self, key: ChunkKey, reserve: Callable[[int], memoryview | None]) -> bool:
        """Fetch `key`, ask `reserve` for room for its raw blob (the blob's length), and
        decode the raw blob into that room. False on a miss or when `reserve` gives no room.

        Raises:
            CorruptChunk: the stored blob is not `key`'s, or does not decode; the caller
                deletes it.
        """
        ...
