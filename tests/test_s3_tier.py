"""S3Tier against a real SeaweedFS S3 server: round trips, batches, corruption, tenants,
clear, a killed server, and a second process."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from kvdepot.bench.servers import LocalServer, wait_until
from kvdepot.errors import ConfigError
from kvdepot.keys import CacheNamespace, ChunkKey, chunk_keys
from kvdepot.metrics import Metrics
from kvdepot.remote_config import S3Config
from kvdepot.tiers.s3 import S3Tier, open_s3_tier
from tests.helpers import blob_of, make_chunk, make_keys, tier_ops

pytest_plugins = ["tests.servers"]
pytestmark = pytest.mark.integration

TIMEOUT_MS = 1000
COOLDOWN_MS = 300
SHAPE = (4, 128)  # 512 fp16 values: a 1,152-byte blob


def object_name(config: S3Config, key: ChunkKey) -> str:
    """Where the documented layout puts `key`."""
    return f"{config.prefix}/{key.namespace.hex()}/{key.chunk_hash.hex()}"


def raw_client(config: S3Config) -> Any:
    return boto3.session.Session().client(
        "s3", endpoint_url=config.endpoint_url, region_name=config.region,
        aws_access_key_id=config.access_key_id, aws_secret_access_key=config.secret_access_key,
    )  # fmt: skip


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def open_tier(
    metrics: Metrics, s3_config_for: Callable[[LocalServer], S3Config]
) -> Iterator[Callable[..., tuple[S3Tier, S3Config]]]:
    """Opens tiers with short timeouts and an object prefix of the test's own; closes them."""
    tiers: list[S3Tier] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    def _open(server: LocalServer, **overrides: object) -> tuple[S3Tier, S3Config]:
        settings: dict[str, object] = {
            "prefix": prefix, "connect_timeout_ms": TIMEOUT_MS, "timeout_ms": TIMEOUT_MS,
            "max_attempts": 1, "breaker_cooldown_ms": COOLDOWN_MS, **overrides,
        }  # fmt: skip
        config = dataclasses.replace(s3_config_for(server), **settings)  # type: ignore[arg-type]
        tier = open_s3_tier(config, metrics.tier("s3"))
        tiers.append(tier)
        return tier, config

    yield _open
    for tier in tiers:
        tier.close()


def test_round_trip_in_concurrent_batches(
    s3_server: LocalServer, open_tier: Callable[..., tuple[S3Tier, S3Config]]
) -> None:
    tier, _ = open_tier(s3_server, max_workers=4)
    chunks = [make_chunk(i, (4, 16 * (i + 1))) for i in range(12)]
    keys = make_keys(12)
    assert tier.contains(keys) == [False] * 12
    assert tier.get(keys) == [None] * 12
    assert tier.put(list(zip(keys, chunks, strict=True))) == 12
    assert tier.contains(keys) == [True] * 12
    assert tier.get(keys) == [blob_of(c, k) for c, k in zip(chunks, keys, strict=True)]
    assert tier.get(keys[3:4]) == [blob_of(chunks[3], keys[3])]  # a batch of one runs inline
    assert tier.put([(keys[0], chunks[0])]) == 1  # present: counts as stored
    assert tier.usage().num_objects == 12
    tier.delete(keys[:5])
    assert tier.contains(keys) == [False] * 5 + [True] * 7
    tier.clear()
    assert tier.contains(keys) == [False] * 12
    assert tier.get([]) == [] and tier.put([]) == 0


def test_corrupt_objects_are_deleted_not_served(
    s3_server: LocalServer, open_tier: Callable[..., tuple[S3Tier, S3Config]], metrics: Metrics
) -> None:
    tier, config = open_tier(s3_server)
    chunk, keys = make_chunk(1, SHAPE), make_keys(4)
    tier.put([(key, chunk) for key in keys])
    client = raw_client(config)
    flipped = bytearray(blob_of(chunk, keys[0]))
    flipped[200] ^= 0x04
    # bit flip, junk, torn, and another key's whole valid object (a botched copy)
    bodies = [bytes(flipped), b"garbage", blob_of(chunk, keys[2])[:-1], blob_of(chunk, keys[0])]
    for key, body in zip(keys, bodies, strict=True):
        client.put_object(Bucket=config.bucket, Key=object_name(config, key), Body=body)
    assert tier.get(keys) == [None] * 4
    assert (
        metrics.registry.get_sample_value("kvdepot_tier_corrupt_chunks_total", {"tier": "s3"}) == 4
    )
    for key in keys:
        with pytest.raises(ClientError):
            client.head_object(Bucket=config.bucket, Key=object_name(config, key))


def test_tenants_do_not_see_each_other(
    s3_server: LocalServer, open_tier: Callable[..., tuple[S3Tier, S3Config]]
) -> None:
    tier, _ = open_tier(s3_server)
    tokens = list(range(64))
    alice = chunk_keys(tokens, 16, CacheNamespace("m", "l", tenant_salt=b"alice"))
    bob = chunk_keys(tokens, 16, CacheNamespace("m", "l", tenant_salt=b"bob"))
    tier.put([(key, make_chunk(i, SHAPE)) for i, key in enumerate(alice)])
    assert tier.contains(alice) == [True] * 4
    assert tier.contains(bob) == [False] * 4 and tier.get(bob) == [None] * 4
    same_hash = [ChunkKey(b.namespace, a.chunk_hash) for a, b in zip(alice, bob, strict=True)]
    assert tier.get(same_hash) == [None] * 4


def test_killed_server_is_a_miss_then_recovers(
    fresh_s3: LocalServer, open_tier: Callable[..., tuple[S3Tier, S3Config]], metrics: Metrics
) -> None:
    tier, _ = open_tier(fresh_s3)
    keys, chunk = make_keys(6), make_chunk(4, SHAPE)
    items = [(key, chunk) for key in keys]
    assert tier.put(items) == 6
    fresh_s3.kill()
    for _ in range(3):  # no exception, misses within the timeout, puts dropped
        start = time.monotonic()
        assert tier.get(keys) == [None] * 6
        assert tier.contains(keys) == [False] * 6
        assert tier.put(items) == 0
        assert time.monotonic() - start < 3 * TIMEOUT_MS / 1000
    assert tier_ops(metrics, "s3", "breaker", "opened") >= 1
    assert tier_ops(metrics, "s3", "get", "breaker_open") > 0
    fresh_s3.start()  # same data directory: the objects are still there
    assert wait_until(lambda: tier.get(keys) == [blob_of(chunk, k) for k in keys], timeout_s=20.0)
    assert tier_ops(metrics, "s3", "breaker", "closed") >= 1


def test_hung_server_times_out_and_breaker_opens(
    fresh_s3: LocalServer, open_tier: Callable[..., tuple[S3Tier, S3Config]], metrics: Metrics
) -> None:
    tier, _ = open_tier(fresh_s3, breaker_cooldown_ms=1500)  # no probe before resume
    keys, chunk = make_keys(4), make_chunk(5, SHAPE)
    tier.put([(key, chunk) for key in keys])
    fresh_s3.pause()
    try:
        start = time.monotonic()
        assert tier.get(keys) == [None] * 4  # concurrent requests: one read timeout
        assert time.monotonic() - start < 2 * TIMEOUT_MS / 1000
        start = time.monotonic()
        assert tier.get(keys) == [None] * 4  # breaker open: no request at all
        assert time.monotonic() - start < 0.2
        assert tier_ops(metrics, "s3", "breaker", "opened") == 1
    finally:
        fresh_s3.resume()
    assert wait_until(lambda: tier.get(keys) == [blob_of(chunk, k) for k in keys], timeout_s=10.0)


def test_a_closed_tier_answers_misses(
    s3_server: LocalServer, open_tier: Callable[..., tuple[S3Tier, S3Config]]
) -> None:
    tier, _ = open_tier(s3_server)
    keys, chunk = make_keys(2), make_chunk(6, SHAPE)
    tier.put([(key, chunk) for key in keys])
    tier.close()
    assert tier.get(keys) == [None, None] and tier.contains(keys) == [False, False]
    assert tier.put([(keys[0], chunk)]) == 0
    tier.delete(keys)
    tier.clear()


def test_a_second_process_reads_what_the_first_wrote(
    s3_server: LocalServer, open_tier: Callable[..., tuple[S3Tier, S3Config]]
) -> None:
    """Two processes (two hosts, in production) share chunks through the bucket."""
    tier, config = open_tier(s3_server)
    keys = chunk_keys(list(range(48)), 16, CacheNamespace("shared-model", "layout"))
    writer = f"""
import numpy as np
from kvdepot.codec import RawCodec, encode_chunk
from kvdepot.keys import CacheNamespace, chunk_keys
from kvdepot.layout import DType
from kvdepot.remote_config import S3Config
from kvdepot.tiers.s3 import open_s3_tier
tier = open_s3_tier(S3Config(**{dataclasses.asdict(config)!r}))
keys = chunk_keys(list(range(48)), 16, CacheNamespace("shared-model", "layout"))
data = [np.random.default_rng(i).standard_normal((4, 128)).astype(np.float16) for i in range(3)]
print(tier.put([(k, encode_chunk(d, DType.FLOAT16, RawCodec())) for k, d in zip(keys, data)]))
tier.close()
"""
    done = subprocess.run([sys.executable, "-c", writer], capture_output=True, timeout=60)
    assert done.stdout.strip() == b"3", done.stderr.decode()
    assert tier.get(keys) == [blob_of(make_chunk(i, SHAPE), k) for i, k in enumerate(keys)]


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="bucket"):
        open_s3_tier(S3Config())
    with pytest.raises(ConfigError, match="go together"):
        S3Config(bucket="b", access_key_id="x").validate()
    with pytest.raises(ConfigError, match="addressing_style"):
        S3Config(bucket="b", addressing_style="dns").validate()
    with pytest.raises(ConfigError, match="max_workers"):
        S3Config(bucket="b", max_workers=0).validate()
