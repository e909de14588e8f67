"""CacheEngine: token-level lookup / store / retrieve on the embedded RAM tier."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kvdepot import CacheEngine, LayoutMismatch, Metrics, TieredStore
from kvdepot.codec import HEADER_NBYTES
from kvdepot.keys import HashAlgorithm
from kvdepot.tiers.arena import HostBuffer
from kvdepot.tiers.memory import MemoryTier
from tests.helpers import CHUNK, LAYOUTS, corrupt_header, kv_for, make_engine


@pytest.fixture
def store() -> Iterator[TieredStore]:
    s = TieredStore(MemoryTier(HostBuffer.allocate(8 << 20, prefault=False)), metrics=Metrics())
    yield s
    s.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(store: TieredStore, dtype: torch.dtype) -> None:
    engine = make_engine(store, dtype)
    tokens = list(range(100, 100 + 3 * CHUNK + 5))
    kv = kv_for(engine, len(tokens))
    assert engine.lookup(tokens) == 0
    assert engine.store(tokens, kv) == len(tokens)  # 3 chunks and the 5-token tail
    assert engine.lookup(tokens) == len(tokens)
    out = engine.retrieve(tokens)
    assert out.dtype == dtype and out.shape == engine.layout.chunk_shape(len(tokens))
    assert torch.equal(out, kv)


def test_partial_tail_serves_only_the_exact_same_tokens(store: TieredStore) -> None:
    """Without partial matching (tests/test_partial_match.py has it on)."""
    engine = make_engine(store, partial_match=False)
    tokens = list(range(2 * CHUNK + 5))
    kv = kv_for(engine, len(tokens))
    engine.store(tokens, kv)
    assert engine.lookup(tokens) == len(tokens)
    assert engine.lookup([*tokens, 99]) == 2 * CHUNK  # longer prompt: the tail differs
    assert engine.lookup(tokens[:-1]) == 2 * CHUNK  # shorter tail: no match either
    assert torch.equal(engine.retrieve([*tokens, 99]), kv[:, :, : 2 * CHUNK])


def test_store_partial_false_keeps_only_whole_chunks(store: TieredStore) -> None:
    engine = make_engine(store)
    tokens = list(range(2 * CHUNK + 5))
    assert engine.store(tokens, kv_for(engine, len(tokens)), store_partial=False) == 2 * CHUNK
    assert engine.lookup(tokens) == 2 * CHUNK


def test_prefix_semantics(store: TieredStore) -> None:
    engine = make_engine(store)
    tokens = list(range(4 * CHUNK))
    kv = kv_for(engine, len(tokens))
    engine.store(tokens[: 2 * CHUNK], kv[:, :, : 2 * CHUNK])
    assert engine.lookup(tokens) == 2 * CHUNK
    other = tokens[:CHUNK] + [7] * CHUNK + tokens[2 * CHUNK :]
    assert engine.lookup(other) == CHUNK  # diverges in chunk 1
    assert torch.equal(engine.retrieve(other), kv[:, :, :CHUNK])


def test_only_missing_chunks_are_written(store: TieredStore) -> None:
    engine = make_engine(store)
    tokens = list(range(4 * CHUNK))
    kv = kv_for(engine, len(tokens))
    assert engine.store(tokens[: 2 * CHUNK], kv) == 2 * CHUNK
    assert engine.store(tokens, kv) == 2 * CHUNK
    assert engine.store(tokens, kv) == 0
    assert store.usage()["memory"].num_objects == 4


def test_kv_shorter_than_tokens_stores_what_it_covers(store: TieredStore) -> None:
    engine = make_engine(store)
    tokens = list(range(4 * CHUNK))
    kv = kv_for(engine, 2 * CHUNK + 3)
    assert engine.store(tokens, kv, store_partial=False) == 2 * CHUNK
    assert engine.lookup(tokens) == 2 * CHUNK


def test_tenant_salt_isolates(store: TieredStore) -> None:
    engine = make_engine(store)
    tokens = list(range(2 * CHUNK))
    engine.store(tokens, kv_for(engine, len(tokens)), tenant_salt=b"alice")
    assert engine.lookup(tokens, tenant_salt=b"alice") == 2 * CHUNK
    assert engine.lookup(tokens, tenant_salt=b"bob") == 0
    assert engine.lookup(tokens) == 0
    assert engine.retrieve(tokens, tenant_salt=b"bob").shape[2] == 0


def test_other_model_or_layout_never_hits(store: TieredStore) -> None:
    engine = make_engine(store)
    tokens = list(range(2 * CHUNK))
    engine.store(tokens, kv_for(engine, len(tokens)))
    other_model = CacheEngine(store, engine.layout, "other-model", chunk_size_tokens=CHUNK)
    other_layout = make_engine(store, torch.float16)
    other_hash = make_engine(store, hash_algorithm=HashAlgorithm.XXH3_128)
    for other in (other_model, other_layout, other_hash):
        assert other.lookup(tokens) == 0


def test_layout_mismatch_is_a_clear_error(store: TieredStore) -> None:
    engine = make_engine(store)
    with pytest.raises(LayoutMismatch, match="does not match"):
        engine.store(list(range(CHUNK)), torch.zeros(3, 2, CHUNK, 4, 8))
    with pytest.raises(LayoutMismatch):
        engine.store(list(range(CHUNK)), torch.zeros(3, 2, CHUNK, 2, 8, dtype=torch.float16))


def test_retrieve_into_preallocated_out(store: TieredStore) -> None:
    engine = make_engine(store)
    tokens = list(range(3 * CHUNK))
    kv = kv_for(engine, len(tokens))
    engine.store(tokens, kv)
    out = torch.full(engine.layout.chunk_shape(4 * CHUNK), 5.0)
    view = engine.retrieve(tokens, out=out)
    assert view.data_ptr() == out.data_ptr()
    assert torch.equal(out[:, :, : 3 * CHUNK], kv)
    assert torch.all(out[:, :, 3 * CHUNK :] == 5.0)
    with pytest.raises(LayoutMismatch, match="room"):
        engine.retrieve(tokens, out=torch.empty(engine.layout.chunk_shape(CHUNK)))


def test_token_inputs_list_numpy_tensor_agree(store: TieredStore) -> None:
    engine = make_engine(store)
    tokens = list(range(2 * CHUNK))
    engine.store(tokens, kv_for(engine, len(tokens)))
    assert engine.lookup(np.array(tokens, dtype=np.int64)) == 2 * CHUNK
    assert engine.lookup(torch.tensor(tokens)) == 2 * CHUNK


def test_hit_rate_counts_tokens(store: TieredStore) -> None:
    engine = make_engine(store)
    tokens = list(range(2 * CHUNK + 8))
    engine.lookup(tokens)
    engine.store(tokens, kv_for(engine, len(tokens)))
    engine.lookup(tokens)
    looked_up = 2 * len(tokens)
    assert engine.metrics.hit_rate() == pytest.approx(len(tokens) / looked_up)
    text = engine.metrics.render().decode()
    assert f"kvdepot_engine_lookup_tokens_total {float(looked_up)}" in text


def test_undecodable_chunk_is_served_as_a_shorter_prefix(store: TieredStore) -> None:
    engine = make_engine(store)
    tokens = list(range(3 * CHUNK))
    kv = kv_for(engine, len(tokens))
    engine.store(tokens, kv)
    corrupt_header(store, engine.chunk_keys(tokens)[1])
    out = engine.retrieve(tokens)
    assert out.shape[2] == CHUNK
    assert torch.equal(out, kv[:, :, :CHUNK])
    # The unusable chunk is deleted: a miss from now on, so it can be stored afresh.
    assert engine.lookup(tokens) == CHUNK
    assert engine.store(tokens, kv) == CHUNK
    assert torch.equal(engine.retrieve(tokens), kv)


def _num_pins(store: TieredStore) -> int:
    return sum(entry.pins for entry in store.memory._entries.values())


def _inside(tensor: torch.Tensor, memory: memoryview) -> bool:
    base = np.frombuffer(memory, dtype=np.uint8).ctypes.data
    return base <= tensor.data_ptr() < base + len(memory)


@pytest.mark.parametrize("dtype", list(LAYOUTS))
def test_retrieve_views_are_the_stores_own_memory_for_raw_chunks(
    store: TieredStore, dtype: torch.dtype
) -> None:
    engine = make_engine(store, dtype)
    tokens = list(range(2 * CHUNK + 5))
    kv = kv_for(engine, len(tokens))
    engine.store(tokens, kv)
    with engine.retrieve_views(tokens) as pieces:
        assert [p.shape[2] for p in pieces] == [CHUNK, CHUNK, 5]
        assert all(p.dtype == dtype for p in pieces)
        assert all(_inside(p, store.memory._buffer.view) for p in pieces)  # no copy
        assert torch.equal(torch.cat(pieces, dim=2), kv)
        assert _num_pins(store) == 3  # held while viewed
    assert _num_pins(store) == 0


def test_retrieve_views_decode_other_codecs_into_out(store: TieredStore) -> None:
    from kvdepot.codec import LosslessCodec

    engine = make_engine(store, codec=LosslessCodec())
    tokens = list(range(2 * CHUNK + 5))
    kv = kv_for(engine, len(tokens))
    engine.store(tokens, kv)
    out = torch.empty(engine.layout.chunk_shape(len(tokens)))
    with engine.retrieve_views(tokens, out=out) as pieces:
        assert [p.shape[2] for p in pieces] == [CHUNK, CHUNK, 5]
        assert [p.data_ptr() for p in pieces] == [out[:, :, i].data_ptr() for i in (0, 16, 32)]
    assert torch.equal(out, kv)
    with engine.retrieve_views(tokens) as pieces:  # no out: new memory
        assert torch.equal(torch.cat(pieces, dim=2), kv)
    with (
        pytest.raises(LayoutMismatch, match="room"),
        engine.retrieve_views(tokens, out=out[:, :, :CHUNK]),
    ):
        pass


def test_store_with_kv_start_offset(store: TieredStore) -> None:
    engine = make_engine(store)
    tokens = list(range(4 * CHUNK))
    kv = kv_for(engine, len(tokens))
    engine.store(tokens, kv[:, :, : 2 * CHUNK])
    assert engine.store(tokens, kv[:, :, 2 * CHUNK :], kv_start_token=2 * CHUNK) == 2 * CHUNK
    assert torch.equal(engine.retrieve(tokens), kv)
    with pytest.raises(ValueError, match="multiple"):
        engine.store(tokens, kv[:, :, CHUNK:], kv_start_token=CHUNK // 2)


def test_store_counts_only_what_the_store_holds() -> None:
    layout = LAYOUTS[torch.float32]
    chunk_nbytes = layout.bytes_per_token * CHUNK + HEADER_NBYTES
    small = TieredStore(
        MemoryTier(HostBuffer.allocate(2 * chunk_nbytes + 128, prefault=False)), metrics=Metrics()
    )
    engine = CacheEngine(small, layout, "test-model", chunk_size_tokens=CHUNK)
    tokens = list(range(4 * CHUNK))
    engine.store(tokens[:CHUNK], kv_for(engine, CHUNK))
    with small.read(engine.chunk_keys(tokens[:CHUNK])):  # pin chunk 0: 1 free slot left
        written = engine.store(tokens, kv_for(engine, len(tokens)))
    assert written == CHUNK
    assert engine.metrics.registry.get_sample_value("kvdepot_engine_stored_tokens_total") == (
        2 * CHUNK
    )
    small.close()


def test_a_chunk_whose_memory_holds_another_keys_chunk_is_a_miss(store: TieredStore) -> None:
    # As if the RAM under a reader were reused: chunk 1's slot now holds chunk 0's blob.
    engine = make_engine(store)
    tokens = list(range(3 * CHUNK))
    kv = kv_for(engine, len(tokens))
    engine.store(tokens, kv)
    keys = engine.chunk_keys(tokens)
    with store.memory.read(keys[:2], record=False) as (first, second):
        assert first is not None and second is not None and len(first) == len(second)
        second[:] = first
    out = engine.retrieve(tokens)
    assert out.shape[2] == CHUNK and torch.equal(out, kv[:, :, :CHUNK])
    corrupt = store.metrics.counter_value("kvdepot_tier_corrupt_chunks_total", {"tier": "memory"})
    assert corrupt == 1
    assert engine.lookup(tokens) == CHUNK  # deleted: a miss from now on
