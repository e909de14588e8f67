"""Eviction policies: named strategies that order a tier's chunks for eviction.

Used inside a tier, under that tier's lock (policies are not thread-safe themselves).

- `lru`: least recently used first, keys of one batch touched in the order given.
- `prefix-aware` (default): like LRU, but the keys of one batch (a prefix chain, head first)
  are touched tail first, so the head is the most recent. Eviction then takes a chain's tail
  before its head: a later chunk is useless once an earlier one is gone, so as long as reads
  are prefix reads, what stays of a chain is always a prefix of it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

from kvdepot.errors import ConfigError
from kvdepot.keys import ChunkKey


class EvictionPolicy(Protocol):
    """Orders keys for eviction."""

    name: str

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        """Record an insert or an access of `keys` (one batch, chain order)."""
        ...

    def remove(self, key: ChunkKey) -> None:
        """Forget `key` (deleted or evicted)."""
        ...

    def pop_victim(self, is_pinned: Callable[[ChunkKey], bool]) -> ChunkKey | None:
        """Forget and return the next key to evict that is not pinned, or None."""
        ...


class LRUPolicy:
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ChunkKey, None] = OrderedDict()

    def _touch_in_order(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            self._order[key] = None
            self._order.move_to_end(key)

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        self._touch_in_order(keys)

    def remove(self, key: ChunkKey) -> None:
        self._order.pop(key, None)

    def pop_victim(self, is_pinned: Callable[[ChunkKey], bool]) -> ChunkKey | None:
        for key in self._order:
            if not is_pinned(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)


class PrefixAwarePolicy(LRUPolicy):
    """LRU across batches; within a batch, a chain's tail is evicted before its head."""

    name = "prefix-aware"

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        self._touch_in_order(keys[::-1])


POLICIES: dict[str, type[LRUPolicy]] = {"lru": LRUPolicy, "prefix-aware": PrefixAwarePolicy}


def make_policy(name: str) -> EvictionPolicy:
    """A new policy by its config name."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(
            f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}"
        ) from None
