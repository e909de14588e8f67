"""RAM tier: round trips, eviction order, pins under eviction, the arena allocator."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdepot.codec import decode_chunk, default_registry
from kvdepot.codec.format import open_blob
from kvdepot.tiers.arena import ArenaAllocator
from kvdepot.tiers.memory import MemoryTier, Refusal, WriteSlot
from kvdepot.tiers.policy import LRUPolicy, PrefixAwarePolicy
from tests.helpers import chunk_bytes, make_chunk, random_key

Factory = Callable[[int], MemoryTier]
CHUNK_NBYTES = make_chunk(0).nbytes
SLOT = ArenaAllocator.footprint(CHUNK_NBYTES)


def test_round_trip_bytes_identical(memory_tier: Factory) -> None:
    tier = memory_tier(10 * SLOT)
    keys = [random_key() for _ in range(3)]
    chunks = [make_chunk(i) for i in range(3)]
    assert tier.put(list(zip(keys, chunks, strict=True))) == 3
    assert tier.get(keys) == [chunk_bytes(c, k) for c, k in zip(chunks, keys, strict=True)]
    assert tier.contains([*keys, random_key()]) == [True, True, True, False]


def test_put_existing_key_is_noop(memory_tier: Factory) -> None:
    tier = memory_tier(10 * SLOT)
    key = random_key()
    tier.put([(key, make_chunk(1))])
    assert tier.put([(key, make_chunk(2))]) == 1
    assert tier.get([key]) == [chunk_bytes(make_chunk(1), key)]
    assert tier.usage().num_objects == 1


def test_budget_evicts_tail_of_chain_first(memory_tier: Factory) -> None:
    tier = memory_tier(4 * SLOT)
    chain = [random_key() for _ in range(4)]
    tier.put([(k, make_chunk(i)) for i, k in enumerate(chain)])
    newcomer = random_key()
    tier.put([(newcomer, make_chunk(9))])
    assert tier.contains(chain) == [True, True, True, False]
    tier.put([(random_key(), make_chunk(10))])
    assert tier.contains(chain) == [True, True, False, False]
    assert tier.usage().used_bytes <= tier.usage().capacity_bytes


def test_lru_policy_evicts_head_first_when_chosen(memory_tier: Factory) -> None:
    from kvdepot.tiers.arena import HostBuffer

    tier = MemoryTier(HostBuffer.allocate(3 * SLOT, prefault=False), policy=LRUPolicy())
    chain = [random_key() for _ in range(3)]
    tier.put([(k, make_chunk(i)) for i, k in enumerate(chain)])
    tier.put([(random_key(), make_chunk(7))])
    assert tier.contains(chain) == [False, True, True]
    tier.close()


def test_recently_read_chain_survives(memory_tier: Factory) -> None:
    tier = memory_tier(4 * SLOT)
    a, b = [random_key() for _ in range(2)], [random_key() for _ in range(2)]
    tier.put([(k, make_chunk(i)) for i, k in enumerate(a)])
    tier.put([(k, make_chunk(i + 5)) for i, k in enumerate(b)])
    tier.get(a)  # a is now more recent than b
    tier.put([(random_key(), make_chunk(20)), (random_key(), make_chunk(21))])
    assert tier.contains(a) == [True, True]
    assert tier.contains(b) == [False, False]


def test_pinned_chunk_is_never_evicted(memory_tier: Factory) -> None:
    tier = memory_tier(2 * SLOT)
    pinned = random_key()
    tier.put([(pinned, make_chunk(1))])
    with tier.read([pinned]) as views:
        for i in range(10):
            tier.put([(random_key(), make_chunk(100 + i))])
        assert views[0] is not None
        assert bytes(views[0]) == chunk_bytes(make_chunk(1), pinned)
        assert tier.contains([pinned]) == [True]


def test_full_of_pins_refuses_put(memory_tier: Factory) -> None:
    tier = memory_tier(1 * SLOT)
    key = random_key()
    tier.put([(key, make_chunk(1))])
    with tier.read([key]):
        other = random_key()
        assert tier.put([(other, make_chunk(2))]) == 0
        assert tier.contains([other]) == [False]


def test_delete_while_pinned_keeps_reader_data(memory_tier: Factory) -> None:
    tier = memory_tier(2 * SLOT)
    key = random_key()
    tier.put([(key, make_chunk(3))])
    with tier.read([key]) as views:
        tier.delete([key])
        assert tier.contains([key]) == [False]
        tier.put([(random_key(), make_chunk(4))])  # must not reuse the pinned bytes
        assert views[0] is not None and bytes(views[0]) == chunk_bytes(make_chunk(3), key)
    assert tier.usage().num_objects == 1
    tier.put([(random_key(), make_chunk(5))])  # memory freed at unpin: two slots fit again
    assert tier.usage().num_objects == 2


def test_chunk_larger_than_budget_is_refused(memory_tier: Factory) -> None:
    tier = memory_tier(CHUNK_NBYTES // 2)
    assert tier.put([(random_key(), make_chunk(1))]) == 0
    assert tier.usage().num_objects == 0


def test_concurrent_reader_while_evicting(memory_tier: Factory) -> None:
    tier = memory_tier(6 * SLOT)
    expected: dict[int, bytes] = {}
    keys = {}
    for i in range(6):
        keys[i] = random_key()
        tier.put([(keys[i], make_chunk(i))])
        expected[i] = chunk_bytes(make_chunk(i), keys[i])
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for i in range(6):
                with tier.read([keys[i]]) as views:
                    if views[0] is not None and bytes(views[0]) != expected[i]:
                        errors.append(f"chunk {i} changed under its reader")

    thread = threading.Thread(target=reader)
    thread.start()
    for j in range(300):
        tier.put([(random_key(), make_chunk(1000 + j))])
    stop.set()
    thread.join()
    assert errors == []


def test_decoded_tensor_matches(memory_tier: Factory) -> None:
    tier = memory_tier(4 * SLOT)
    key = random_key()
    chunk = make_chunk(42)
    tier.put([(key, chunk)])
    blob = tier.get([key])[0]
    assert blob is not None
    _, arr = decode_chunk(blob, default_registry(), verify=False)
    np.testing.assert_array_equal(arr, chunk.payload)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=60))
def test_arena_never_overlaps_and_coalesces(ops: list[tuple[bool, int]]) -> None:
    arena = ArenaAllocator(64 * 1024)
    live: list[tuple[int, int]] = []
    for is_alloc, nbytes in ops:
        if is_alloc or not live:
            offset = arena.alloc(nbytes)
            if offset is not None:
                live.append((offset, ArenaAllocator.footprint(nbytes)))
        else:
            offset, size = live.pop(nbytes % len(live))
            arena.free(offset, size)
        spans = sorted(live)
        for (a, sa), (b, _) in itertools.pairwise(spans):
            assert a + sa <= b
        assert all(o + s <= arena.capacity_bytes for o, s in spans)
        assert arena.used_bytes == sum(s for _, s in live)
    for offset, size in live:
        arena.free(offset, size)
    assert arena.largest_free() == arena.capacity_bytes


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=12))
def test_prefix_aware_keeps_prefixes(chain_lengths: list[int]) -> None:
    """Whatever is evicted, what remains of every chain is a prefix of it."""
    policy = PrefixAwarePolicy()
    chains = [[random_key() for _ in range(n)] for n in chain_lengths]
    alive: set[object] = set()
    for chain in chains:
        policy.touch(chain)
        alive.update(chain)
        while len(alive) > 8:
            victim = policy.pop_victim(lambda k: False)
            assert victim is not None
            alive.discard(victim)
    for chain in chains:
        present = [k in alive for k in chain]
        assert present == sorted(present, reverse=True)


def test_a_key_another_writer_holds_is_not_stored(memory_tier: Factory) -> None:
    tier = memory_tier(10 * SLOT)
    key = random_key()
    got = tier.try_reserve(key, CHUNK_NBYTES)
    assert isinstance(got, WriteSlot)
    assert tier.try_reserve(key, CHUNK_NBYTES) is Refusal.PENDING
    assert tier.put([(key, make_chunk(1))]) == 0  # the first writer may never commit
    tier.abort(got)  # ... and it does not
    assert tier.contains([key]) == [False]
    assert tier.put([(key, make_chunk(1))]) == 1
    assert tier.try_reserve(key, CHUNK_NBYTES) is Refusal.STORED


def test_a_forfeited_slot_gives_up_its_key_but_not_its_memory(memory_tier: Factory) -> None:
    tier = memory_tier(10 * SLOT)
    key = random_key()
    slow = tier.reserve(key, CHUNK_NBYTES)
    assert slow is not None
    tier.forfeit(slow)
    assert tier.usage().used_bytes == SLOT  # the slow writer may still be writing there
    assert tier.put([(key, make_chunk(2))]) == 1  # another writer stores the key meanwhile
    make_chunk(9).bound(key).write_into(slow.buffer)  # the slow writer finishes ...
    tier.commit([slow])  # ... and commits: not published, and its memory comes back
    assert tier.get([key]) == [chunk_bytes(make_chunk(2), key)]
    assert tier.usage().used_bytes == SLOT and tier.usage().num_objects == 1


def test_chunks_are_stored_bound_to_their_keys(memory_tier: Factory) -> None:
    tier = memory_tier(10 * SLOT)
    key = random_key()
    tier.put([(key, make_chunk(1))])
    (blob,) = tier.get([key])
    assert blob is not None
    assert open_blob(blob, key=key, verify=False)[0].key == key.to_bytes()
