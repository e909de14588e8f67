"""Shared fixtures: RAM tiers and stores with tiny budgets. The shared helpers (chunks, keys,
engines, a daemon process, tiny models) live in tests/helpers.py, registered here for assert
rewriting."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from kvdepot import Metrics, TieredStore
from kvdepot.tiers.arena import HostBuffer
from kvdepot.tiers.memory import MemoryTier

pytest.register_assert_rewrite("tests.helpers")  # before a test module imports it


@pytest.fixture(autouse=True)
def _no_kvdepot_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_config` reads KVDEPOT_* variables by default: a developer's own settings must not
    change what a test sees (tests that want them set them with `monkeypatch`)."""
    for name in [n for n in os.environ if n.startswith("KVDEPOT_")]:
        monkeypatch.delenv(name)


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
