"""Partial matching: the leading tokens of a stored chunk that continues the same prefix.

The continuation index alone, then `CacheEngine` on the embedded store (bit-exact KV, tenant
and segment isolation, corrupt and vanished chunks), then through a real daemon, and on a
tiny Llama (greedy outputs identical to a cache-less run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvdepot import CacheEngine, TieredStore
from kvdepot.bench.servers import free_port
from kvdepot.continuations import ENTRY_OVERHEAD_BYTES, ContinuationIndex, common_prefix_len
from kvdepot.keys import MAX_CHUNK_TOKENS, token_bytes
from kvdepot.store import ChunkStore
from tests.helpers import (
    CHUNK,
    Daemon,
    corrupt_header,
    kv_for,
    make_engine,
    plain_generate,
    random_key,
    tiny_llama,
)


def partial_engine(store: ChunkStore, **kw: object) -> CacheEngine:
    """A test engine that reuses partial matches of 4 tokens or more."""
    kw.setdefault("min_partial_tokens", 4)
    return make_engine(store, **kw)


def all_present(keys: object) -> list[bool]:
    return [True] * len(keys)  # type: ignore[arg-type]


# ---- the index --------------------------------------------------------------------------


def test_common_prefix_len() -> None:
    a = np.array([1, 2, 3, 4], dtype="<i4")
    assert common_prefix_len(a, np.array([1, 2, 9], dtype="<i4")) == 2
    assert common_prefix_len(a, a[:3]) == 3
    assert common_prefix_len(a, np.array([7], dtype="<i4")) == 0
    assert common_prefix_len(a, np.array([], dtype="<i4")) == 0


def test_index_picks_the_longest_present_continuation() -> None:
    index = ContinuationIndex()
    parent, short, long, other = (random_key() for _ in range(4))
    index.add(
        [(parent, short, token_bytes([1, 2, 3, 9])), (parent, long, token_bytes([1, 2, 3, 4, 5]))]
    )
    index.add([(other, random_key(), token_bytes([1, 2, 3, 4, 5]))])
    assert index.best(parent, token_bytes([1, 2, 3, 4, 7]), all_present) == (long, 4)
    assert index.best(parent, token_bytes([1, 2, 3, 9, 9]), all_present) == (short, 4)
    assert index.best(parent, token_bytes([2, 2]), all_present) is None  # first token differs
    assert index.best(random_key(), token_bytes([1, 2]), all_present) is None
    # The longest is gone from the tiers: dropped, and the next best is answered.
    assert index.best(parent, token_bytes([1, 2, 3, 4]), lambda ks: [k != long for k in ks]) == (
        short,
        3,
    )
    assert len(index) == 2


def test_index_is_bounded() -> None:
    index = ContinuationIndex(max_entries=6, max_children=2)
    parents = [random_key() for _ in range(4)]
    for parent in parents:
        index.add([(parent, random_key(), token_bytes([i])) for i in range(3)])
    assert len(index) == 6  # 2 children each (the newest), 3 parents (the newest)
    assert index.best(parents[0], token_bytes([2]), all_present) is None
    assert index.best(parents[3], token_bytes([0]), all_present) is None  # oldest child dropped
    assert index.best(parents[3], token_bytes([2]), all_present) is not None
    with pytest.raises(ValueError):
        ContinuationIndex(max_children=0)


def test_index_is_bounded_in_bytes_and_keeps_chunk_sized_token_lists_only() -> None:
    chunk_tokens = 1024
    cost = 4 * chunk_tokens + ENTRY_OVERHEAD_BYTES
    index = ContinuationIndex(max_bytes=10 * cost)
    parents = [random_key() for _ in range(30)]
    for i, parent in enumerate(parents):
        index.add([(parent, random_key(), token_bytes(list(range(i, i + chunk_tokens))))])
        assert index.nbytes <= 10 * cost
    assert len(index) == 10 and index.nbytes == 10 * cost  # the 10 most recent parents
    assert index.best(parents[-1], token_bytes([29, 30]), all_present) is not None
    assert index.best(parents[0], token_bytes([0, 1]), all_present) is None
    huge = token_bytes(list(range(MAX_CHUNK_TOKENS + 1)))  # more than any chunk holds
    index.add([(random_key(), random_key(), huge), (random_key(), random_key(), b"\x01\x02")])
    assert len(index) == 10 and index.nbytes == 10 * cost


# ---- CacheEngine ------------------------------------------------------------------------


def prompts() -> tuple[list[int], list[int]]:
    """A stored prompt (3 chunks + a 6-token tail) and a new one that shares its first
    2 chunks + 10 tokens, then differs (a new question on the same document)."""
    stored = list(range(100, 100 + 3 * CHUNK + 6))
    new = [*stored[: 2 * CHUNK + 10], *range(7, 20)]
    return stored, new


def test_a_new_prompt_reuses_the_shared_tokens_of_a_stored_chunk(store: TieredStore) -> None:
    engine = partial_engine(store)
    stored, new = prompts()
    kv = kv_for(engine, len(stored))
    engine.store(stored, kv)
    assert engine.lookup(new) == 2 * CHUNK + 10
    assert engine.metrics.partial_hit_tokens._value.get() == 10
    out = engine.retrieve(new)
    assert out.shape[2] == 2 * CHUNK + 10
    assert torch.equal(out, kv[:, :, : 2 * CHUNK + 10])  # bit-exact: the stored prefix's KV
    # Into a caller's buffer with room for the prompt only (the whole chunk does not fit).
    buffer = torch.full(engine.layout.chunk_shape(2 * CHUNK + 11), float("nan"))
    assert torch.equal(engine.retrieve(new, out=buffer), kv[:, :, : 2 * CHUNK + 10])
    assert engine.metrics.retrieved_tokens._value.get() == 2 * (2 * CHUNK + 10)


def test_a_stored_tail_continues_into_a_longer_prompt(store: TieredStore) -> None:
    """The next turn of a chat: last turn's partial tail is this turn's prefix."""
    engine = partial_engine(store)
    stored = list(range(2 * CHUNK + 5))
    kv = kv_for(engine, len(stored))
    engine.store(stored, kv)
    longer = [*stored, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert engine.lookup(longer) == len(stored)
    assert torch.equal(engine.retrieve(longer), kv)


def test_the_index_holds_only_the_tokens_the_kv_covered(store: TieredStore) -> None:
    """Tokens past the end of the stored KV never reach the index (they have no KV)."""
    engine = partial_engine(store)
    tokens = list(range(100, 100 + 2 * CHUNK + 12))
    kv = kv_for(engine, 2 * CHUNK + 6)  # the KV stops 6 tokens short of the prompt
    engine.store(tokens, kv)
    longer = [*tokens, 1, 2, 3]
    assert engine.lookup(longer) == 2 * CHUNK + 6
    assert torch.equal(engine.retrieve(longer), kv)


def test_prompts_sharing_less_than_a_chunk_match_at_the_root(store: TieredStore) -> None:
    engine = partial_engine(store)
    system = [5, 6, 7, 8, 9]
    kv = kv_for(engine, 2 * CHUNK)
    engine.store([*system, *range(200, 200 + 2 * CHUNK - 5)], kv)
    other = [*system, *range(300, 330)]
    assert engine.lookup(other) == 5
    assert torch.equal(engine.retrieve(other), kv[:, :, :5])
    # Below the minimum, reading a whole chunk for a few tokens is not worth it.
    strict = partial_engine(store, min_partial_tokens=6)
    assert strict.lookup(other) == 0
    assert strict.retrieve(other).shape[2] == 0


def test_partial_matches_respect_tenants_segments_and_the_switch(store: TieredStore) -> None:
    engine = partial_engine(store)
    stored, new = prompts()
    engine.store(stored, kv_for(engine, len(stored)), tenant_salt=b"alice")
    assert engine.lookup(new, tenant_salt=b"alice") == 2 * CHUNK + 10
    assert engine.lookup(new, tenant_salt=b"bob") == 0
    assert engine.lookup(new) == 0
    # Segments are exact: position-independent KV is looked up by its own tokens only.
    engine.store(stored, kv_for(engine, len(stored)), segment=True)
    assert engine.lookup(new, segment=True) == 2 * CHUNK
    off = partial_engine(store, partial_match=False)
    assert off.lookup(new, tenant_salt=b"alice") == 2 * CHUNK
    assert off.retrieve(new, tenant_salt=b"alice").shape[2] == 2 * CHUNK


def test_a_corrupt_continuation_is_a_miss_and_deleted(store: TieredStore) -> None:
    engine = partial_engine(store)
    stored, new = prompts()
    kv = kv_for(engine, len(stored))
    engine.store(stored, kv)
    corrupt_header(store, engine.chunk_keys(stored)[2])  # the continuation
    out = engine.retrieve(new)
    assert torch.equal(out, kv[:, :, : 2 * CHUNK])  # the whole chunks still load
    assert store.contains([engine.chunk_keys(stored)[2]]) == [False]
    assert engine.lookup(new) == 2 * CHUNK  # and the index forgot it


def test_an_evicted_continuation_is_forgotten(store: TieredStore) -> None:
    engine = partial_engine(store)
    stored, new = prompts()
    engine.store(stored, kv_for(engine, len(stored)))
    store.delete([engine.chunk_keys(stored)[2]])
    assert engine.lookup(new) == 2 * CHUNK
    assert engine.retrieve(new).shape[2] == 2 * CHUNK


def test_partial_match_through_the_daemon(tmp_path: Path) -> None:
    """One engine stores through the daemon; another's prompt reuses part of a chunk."""
    daemon = Daemon(tmp_path, http_port=free_port()).start()
    try:
        writer, reader = daemon.client(), daemon.client()
        a, b = partial_engine(writer), partial_engine(reader)
        stored, new = prompts()
        kv = kv_for(a, len(stored))
        a.store(stored, kv)
        assert b.lookup(new) == 2 * CHUNK + 10
        assert torch.equal(b.retrieve(new), kv[:, :, : 2 * CHUNK + 10])
        assert reader.stats()["continuations"] == 4  # 3 chunks + the tail, each after its parent
        daemon.kill()  # a dead daemon: misses, never errors
        assert b.lookup(new) == 0
        writer.close()
        reader.close()
    finally:
        daemon.stop()


def test_generation_on_a_partial_match_equals_a_plain_run(store: TieredStore) -> None:
    from kvdepot.connectors.transformers import KVDepotGenerator

    model = tiny_llama()
    generator = KVDepotGenerator.for_model(model, store, chunk_size_tokens=32)
    document = list(range(20, 104))  # 2 chunks + 20 tokens (>= the minimum of 16)
    generator.generate([*document, 3, 4, 5], max_new_tokens=4)
    question = [*document, 9, 8, 7, 6]
    result = generator.generate(question, max_new_tokens=6)
    assert result.num_cached_tokens == len(document)
    assert result.token_ids == plain_generate(model, question, 6)


def test_a_prefix_too_short_to_pay_off_is_not_loaded(store: TieredStore) -> None:
    """Prefilling on top of a cache is slower per token than a plain prefill: a hit below
    `min_reuse_fraction` of the prompt is left unused (and the output is the same)."""
    from kvdepot.connectors.transformers import KVDepotGenerator

    model = tiny_llama()
    generator = KVDepotGenerator.for_model(model, store, chunk_size_tokens=16)
    system = list(range(20, 52))  # 2 chunks
    generator.generate([*system, *range(60, 100)], max_new_tokens=2)
    long = [*system, *range(100, 300)]  # 32 of 232 tokens cached: 14 %
    result = generator.generate(long, max_new_tokens=4)
    assert result.num_cached_tokens == 0
    assert result.token_ids == plain_generate(model, long, 4)
    eager = KVDepotGenerator.for_model(model, store, chunk_size_tokens=16, min_reuse_fraction=0)
    other = [*system, *reversed(range(100, 280))]
    assert eager.generate(other, max_new_tokens=4).num_cached_tokens == len(system)
    with pytest.raises(ValueError):
        KVDepotGenerator.for_model(model, store, min_reuse_fraction=1.5)


def test_the_index_survives_a_clean_restart_and_ignores_a_bad_file(tmp_path: Path) -> None:
    """Chunks on disk outlive the process; so does the index that finds partial matches."""
    from kvdepot import load_config
    from kvdepot.store import CONTINUATIONS_FILE, open_store

    config = load_config(
        overrides={"disk.path": str(tmp_path), "memory.capacity_bytes": "64MiB",
                   "memory.prefault": False}
    )  # fmt: skip
    stored, new = prompts()
    with open_store(config) as first:
        engine = partial_engine(first)
        kv = kv_for(engine, len(stored))
        engine.store(stored, kv)
        first.flush()
    with open_store(config) as second:
        engine = partial_engine(second)
        assert engine.lookup(new) == 2 * CHUNK + 10
        assert torch.equal(engine.retrieve(new), kv[:, :, : 2 * CHUNK + 10])
    (tmp_path / CONTINUATIONS_FILE).write_bytes(b"\x93not an index")
    with open_store(config) as third:
        assert partial_engine(third).lookup(new) == 2 * CHUNK  # whole chunks from disk only
