"""ValkeyTier against real valkey-server processes: round trips, parts, corruption, tenants,
TTL, a killed or hung server, a cluster node stopped and restarted, and a second process."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import valkey as valkey_client

from kvdepot.bench.servers import (
    NUM_SLOTS,
    LocalServer,
    valkey_server,
    wait_cluster_ok,
    wait_until,
)
from kvdepot.codec import decode_chunk, default_registry
from kvdepot.errors import ConfigError
from kvdepot.keys import CacheNamespace, ChunkKey, chunk_keys
from kvdepot.metrics import Metrics
from kvdepot.remote_config import ValkeyConfig
from kvdepot.tiers.valkey import ValkeyTier, open_valkey_tier
from kvdepot.tiers.valkey_wire import key_slot
from tests.helpers import blob_of, make_chunk, make_keys, tier_ops

pytest_plugins = ["tests.servers"]
pytestmark = pytest.mark.integration

TIMEOUT_MS = 500
COOLDOWN_MS = 300
SHAPE = (4, 128)  # 512 fp16 values: a 1,152-byte blob


def node_of(slot: int, num_nodes: int = 3) -> int:
    """Which node of `valkey_cluster` owns `slot`."""
    return max(i for i in range(num_nodes) if slot >= i * NUM_SLOTS // num_nodes)


def raw(server: LocalServer) -> valkey_client.Valkey:
    return valkey_client.Valkey(host="127.0.0.1", port=server.port, socket_timeout=2)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def open_tier(metrics: Metrics) -> Iterator[Callable[..., ValkeyTier]]:
    """Opens tiers with short timeouts and a key prefix of the test's own; closes them."""
    tiers: list[ValkeyTier] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    def _open(server: LocalServer, **overrides: object) -> ValkeyTier:
        settings: dict[str, object] = {
            "address": f"127.0.0.1:{server.port}", "key_prefix": prefix,
            "connect_timeout_ms": TIMEOUT_MS, "timeout_ms": TIMEOUT_MS,
            "breaker_cooldown_ms": COOLDOWN_MS, **overrides,
        }  # fmt: skip
        tier = open_valkey_tier(ValkeyConfig(**settings), metrics.tier("valkey"))  # type: ignore[arg-type]
        tiers.append(tier)
        return tier

    yield _open
    for tier in tiers:
        tier.close()


def test_round_trip(valkey: LocalServer, open_tier: Callable[..., ValkeyTier]) -> None:
    tier = open_tier(valkey)
    chunks = [make_chunk(i, (4, 16 * (i + 1))) for i in range(3)]
    keys = make_keys(3)
    assert tier.contains(keys) == [False] * 3
    assert tier.get(keys) == [None] * 3
    assert tier.put(list(zip(keys, chunks, strict=True))) == 3
    assert tier.contains(keys) == [True] * 3
    blobs = tier.get(keys)
    assert blobs == [blob_of(c, k) for c, k in zip(chunks, keys, strict=True)]
    _, array = decode_chunk(blobs[1] or b"", default_registry())
    assert np.array_equal(array, chunks[1].payload.view(np.float16).reshape(array.shape))
    assert tier.usage().num_objects == 3
    assert tier.put([(keys[0], chunks[0])]) == 1  # present: counts as stored
    tier.delete(keys[:2])
    assert tier.contains(keys) == [False, False, True]
    assert tier.usage().num_objects == 1
    assert tier.get([]) == [] and tier.put([]) == 0 and tier.contains([]) == []


def test_large_value_is_split_into_parts(
    valkey: LocalServer, open_tier: Callable[..., ValkeyTier]
) -> None:
    tier = open_tier(valkey, part_size_bytes=4096)
    chunk, (key,) = make_chunk(7, (4, 2500)), make_keys(1)  # 20,064-byte blob: 5 parts
    assert tier.put([(key, chunk)]) == 1
    client = raw(valkey)
    name = tier._name(key)
    assert len(client.get(name) or b"") == 16  # the manifest
    part_sizes = [client.strlen(f"{name}:{p}") for p in range(5)]
    assert max(part_sizes) <= 4096 and sum(part_sizes) == chunk.nbytes
    assert tier.get([key]) == [blob_of(chunk, key)]
    tier.delete([key])
    assert list(client.scan_iter(match=f"{tier.config.key_prefix}:*")) == []
    client.close()


def test_corrupt_values_are_deleted_not_served(
    valkey: LocalServer, open_tier: Callable[..., ValkeyTier], metrics: Metrics
) -> None:
    tier = open_tier(valkey, part_size_bytes=4096)
    small, large = make_chunk(1, SHAPE), make_chunk(2, (4, 2500))
    keys = make_keys(5)
    tier.put([(keys[0], small), (keys[1], small), (keys[2], large), (keys[3], large)])
    tier.put([(keys[4], small)])
    client = raw(valkey)
    names = [tier._name(key) for key in keys]
    flipped = bytearray(blob_of(small, keys[0]))
    flipped[100] ^= 0x10
    client.set(names[0], bytes(flipped))  # one bit of the payload
    client.set(names[1], b"garbage")
    part = bytearray(client.get(f"{names[2]}:3") or b"")
    part[0] ^= 0x01
    client.set(f"{names[2]}:3", bytes(part))  # one bit of one part
    client.delete(f"{names[3]}:1")  # a part evicted
    client.set(names[4], blob_of(small, keys[0]))  # another key's valid value (a bad copy)
    assert tier.get(keys) == [None] * 5
    assert (
        metrics.registry.get_sample_value("kvdepot_tier_corrupt_chunks_total", {"tier": "valkey"})
        == 5
    )
    assert list(client.scan_iter(match=f"{tier.config.key_prefix}:*")) == []  # parts too
    client.close()


def test_tenants_do_not_see_each_other(
    valkey: LocalServer, open_tier: Callable[..., ValkeyTier]
) -> None:
    tier = open_tier(valkey)
    tokens = list(range(64))
    alice = chunk_keys(tokens, 16, CacheNamespace("m", "l", tenant_salt=b"alice"))
    bob = chunk_keys(tokens, 16, CacheNamespace("m", "l", tenant_salt=b"bob"))
    tier.put([(key, make_chunk(i, SHAPE)) for i, key in enumerate(alice)])
    assert tier.contains(alice) == [True] * 4
    assert tier.contains(bob) == [False] * 4 and tier.get(bob) == [None] * 4
    # Even the same chunk hash under another namespace digest is another key.
    same_hash = [ChunkKey(b.namespace, a.chunk_hash) for a, b in zip(alice, bob, strict=True)]
    assert tier.get(same_hash) == [None] * 4


def test_ttl_applies_to_every_part(
    valkey: LocalServer, open_tier: Callable[..., ValkeyTier]
) -> None:
    tier = open_tier(valkey, ttl_s=60, part_size_bytes=4096)
    (key,) = make_keys(1)
    tier.put([(key, make_chunk(3, (4, 2500)))])
    client = raw(valkey)
    name = tier._name(key)
    ttls = [client.ttl(n) for n in [name, *(f"{name}:{p}" for p in range(5))]]
    assert all(0 < ttl <= 60 for ttl in ttls), ttls
    client.close()


def test_acl_user_and_password(
    tmp_path: Path, open_tier: Callable[..., ValkeyTier], metrics: Metrics
) -> None:
    acl = ["user default off", "user kvdepot on >s3cret ~test-* +@all"]
    server = valkey_server(tmp_path / "acl", extra_config=acl).start()
    try:
        tier = open_tier(server, username="kvdepot", password="s3cret")
        keys, chunk = make_keys(2), make_chunk(7, SHAPE)
        assert tier.put([(key, chunk) for key in keys]) == 2
        assert tier.get(keys) == [blob_of(chunk, k) for k in keys]
        intruder = open_tier(server, username="kvdepot", password="wrong")
        assert intruder.get(keys) == [None, None]  # refused: a miss, not an exception
        assert intruder.put([(keys[0], chunk)]) == 0
        assert tier_ops(metrics, "valkey", "get", "error") >= 1
    finally:
        server.stop()


def test_tls_against_a_plain_server_is_a_miss(
    valkey: LocalServer, open_tier: Callable[..., ValkeyTier], metrics: Metrics
) -> None:
    """The TLS settings reach the connection (the PyPI server build has no TLS to test a
    real handshake): a handshake that fails is a miss, never an exception."""
    tier = open_tier(valkey, tls=True, tls_check_hostname=False)
    (key,) = make_keys(1)
    assert tier.get([key]) == [None]
    assert tier.put([(key, make_chunk(8, SHAPE))]) == 0
    assert tier_ops(metrics, "valkey", "get", "error") == 1


def test_killed_server_is_a_miss_then_recovers(
    fresh_valkey: LocalServer, open_tier: Callable[..., ValkeyTier], metrics: Metrics
) -> None:
    tier = open_tier(fresh_valkey)
    keys, chunk = make_keys(8), make_chunk(4, SHAPE)
    items = [(key, chunk) for key in keys]
    assert tier.put(items) == 8
    fresh_valkey.kill()
    for _ in range(5):  # no exception, misses at once, puts dropped
        start = time.monotonic()
        assert tier.get(keys) == [None] * 8
        assert tier.contains(keys) == [False] * 8
        assert tier.put(items) == 0
        assert time.monotonic() - start < 3 * TIMEOUT_MS / 1000
    assert tier_ops(metrics, "valkey", "breaker", "opened") >= 1
    assert tier_ops(metrics, "valkey", "get", "breaker_open") > 0
    fresh_valkey.start()  # empty: no persistence

    def round_trip() -> bool:
        return tier.put(items) == 8 and tier.get(keys) == [blob_of(chunk, k) for k in keys]

    assert wait_until(round_trip, timeout_s=5.0)
    assert tier_ops(metrics, "valkey", "breaker", "closed") >= 1


def test_hung_server_times_out_and_breaker_opens(
    fresh_valkey: LocalServer, open_tier: Callable[..., ValkeyTier], metrics: Metrics
) -> None:
    tier = open_tier(fresh_valkey, breaker_cooldown_ms=1500)  # no probe before resume
    keys, chunk = make_keys(4), make_chunk(5, SHAPE)
    tier.put([(key, chunk) for key in keys])
    fresh_valkey.pause()
    try:
        start = time.monotonic()
        assert tier.get(keys) == [None] * 4  # one read timeout
        assert time.monotonic() - start < 2 * TIMEOUT_MS / 1000
        start = time.monotonic()
        assert tier.get(keys) == [None] * 4  # breaker open: no wait at all
        assert time.monotonic() - start < 0.2
        assert tier_ops(metrics, "valkey", "breaker", "opened") == 1
    finally:
        fresh_valkey.resume()
    assert wait_until(lambda: tier.get(keys) == [blob_of(chunk, k) for k in keys], timeout_s=5.0)


def test_a_closed_tier_answers_misses(
    valkey: LocalServer, open_tier: Callable[..., ValkeyTier]
) -> None:
    tier = open_tier(valkey)
    keys, chunk = make_keys(2), make_chunk(6, SHAPE)
    tier.put([(key, chunk) for key in keys])
    tier.close()
    assert tier.get(keys) == [None, None] and tier.contains(keys) == [False, False]
    assert tier.put([(keys[0], chunk)]) == 0
    tier.delete(keys)
    tier.clear()


def test_cluster_node_down_costs_only_its_slots(
    valkey_nodes: list[LocalServer], open_tier: Callable[..., ValkeyTier]
) -> None:
    seeds = ",".join(f"127.0.0.1:{node.port}" for node in valkey_nodes[:2])
    tier = open_tier(valkey_nodes[0], address=seeds, cluster=True, part_size_bytes=4096)
    chunks = [make_chunk(i, (4, 1000)) for i in range(60)]  # 2 parts each
    keys = make_keys(60)
    items = list(zip(keys, chunks, strict=True))
    assert tier.put(items) == 60
    assert tier.get(keys) == [blob_of(c, k) for c, k in zip(chunks, keys, strict=True)]
    owner = [node_of(key_slot(k.chunk_hash.hex().encode())) for k in keys]
    assert set(owner) == {0, 1, 2}
    victim = valkey_nodes[1]
    victim.kill()
    try:
        for _ in range(3):
            blobs = tier.get(keys)
            for blob, chunk, key, node in zip(blobs, chunks, keys, owner, strict=True):
                assert blob == (None if node == 1 else blob_of(chunk, key))
            assert tier.put(items) == owner.count(0) + owner.count(2)
    finally:
        victim.start()
    wait_cluster_ok(valkey_nodes)

    def all_back() -> bool:
        return tier.put(items) == 60 and tier.get(keys) == [
            blob_of(c, k) for c, k in zip(chunks, keys, strict=True)
        ]

    assert wait_until(all_back, timeout_s=10.0)


def test_a_second_process_reads_what_the_first_wrote(
    valkey: LocalServer, open_tier: Callable[..., ValkeyTier]
) -> None:
    """Two processes (two hosts, in production) share chunks through the server."""
    tier = open_tier(valkey)
    keys = chunk_keys(list(range(48)), 16, CacheNamespace("shared-model", "layout"))
    writer = f"""
import numpy as np
from kvdepot.codec import RawCodec, encode_chunk
from kvdepot.keys import CacheNamespace, chunk_keys
from kvdepot.layout import DType
from kvdepot.remote_config import ValkeyConfig
from kvdepot.tiers.valkey import open_valkey_tier
config = ValkeyConfig(address="127.0.0.1:{valkey.port}", key_prefix="{tier.config.key_prefix}")
tier = open_valkey_tier(config)
keys = chunk_keys(list(range(48)), 16, CacheNamespace("shared-model", "layout"))
data = [np.random.default_rng(i).standard_normal((4, 128)).astype(np.float16) for i in range(3)]
print(tier.put([(k, encode_chunk(d, DType.FLOAT16, RawCodec())) for k, d in zip(keys, data)]))
tier.close()
"""
    done = subprocess.run([sys.executable, "-c", writer], capture_output=True, timeout=60)
    assert done.stdout.strip() == b"3", done.stderr.decode()
    assert tier.get(keys) == [blob_of(make_chunk(i, SHAPE), k) for i, k in enumerate(keys)]


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="address"):
        open_valkey_tier(ValkeyConfig())
    with pytest.raises(ConfigError, match="host:port"):
        open_valkey_tier(ValkeyConfig(address="localhost"))
    with pytest.raises(ConfigError, match="key_prefix"):
        ValkeyConfig(address="h:1", key_prefix="a*b").validate()
    with pytest.raises(ConfigError, match="part_size_bytes"):
        ValkeyConfig(address="h:1", part_size_bytes=10).validate()
