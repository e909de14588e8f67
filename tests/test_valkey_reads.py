"""Valkey reads that land in place, against a real valkey-server: `NodeClient.get` and
`get_into` (values of every size, absent keys, error replies, values of another size, the
connection kept in step), and `ValkeyTier` reading split values (a torn one is a miss)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from kvdepot.bench.servers import HOST, LocalServer
from kvdepot.metrics import Metrics
from kvdepot.remote_config import ValkeyConfig
from kvdepot.tiers.valkey import open_valkey_tier
from kvdepot.tiers.valkey_wire import NodeClient, open_client
from tests.helpers import blob_of, make_chunk, make_keys

pytest_plugins = ["tests.servers"]
pytestmark = pytest.mark.integration


@pytest.fixture
def client(valkey: LocalServer) -> Iterator[NodeClient]:
    config = ValkeyConfig(address=f"{HOST}:{valkey.port}", timeout_ms=2000)
    node = open_client(config, HOST, valkey.port)
    yield node
    node.command("FLUSHALL")
    node.close()


def test_get_reads_values_of_every_size_and_stays_in_step(client: NodeClient) -> None:
    values = {
        "empty": b"",
        "one": b"x",
        "crlf": b"\r\n$5\r\n" * 20_000,  # looks like replies: must be read as bytes
        "mid": os.urandom(5_000),
        "big": os.urandom(3 << 20),
    }
    client.pipeline([("SET", name, value) for name, value in values.items()])
    client.command("RPUSH", "a-list", "x")
    got = client.get([*values, "absent", "a-list", "big"])
    assert got[: len(values)] == list(values.values())
    assert got[len(values)] is None
    assert isinstance(got[-2], Exception) and "WRONGTYPE" in str(got[-2])
    assert got[-1] == values["big"]
    pieces: list[bytes] = []
    assert client.get(["big"], [lambda piece: pieces.append(bytes(piece))]) == [values["big"]]
    assert b"".join(pieces) == values["big"]
    assert client.pipeline([("EXISTS", "mid"), ("GET", "one")]) == [1, b"x"]


def test_get_into_fills_targets_and_reads_past_other_sizes(client: NodeClient) -> None:
    big, short = os.urandom(1 << 20), b"short"
    client.pipeline([("SET", "big", big), ("SET", "short", short)])
    memory = bytearray(len(big) + 10)
    view = memoryview(memory)
    targets = [view[: len(big)], view[len(big) :], view[:3]]
    lengths = client.get_into(["big", "short", "absent"], targets)
    assert lengths == [len(big), len(short), None]
    assert memory == big + bytes(10)  # the 5-byte value was not written into 10 bytes
    assert client.get(["short", "big"]) == [short, big]


def test_a_torn_split_value_is_a_miss_and_deleted(valkey: LocalServer) -> None:
    metrics = Metrics()
    config = ValkeyConfig(
        address=f"{HOST}:{valkey.port}", key_prefix=f"test-{uuid.uuid4().hex[:8]}",
        part_size_bytes=4096,
    )  # fmt: skip
    tier = open_valkey_tier(config, metrics.tier("valkey"))
    raw = open_client(config, HOST, valkey.port)
    try:
        chunk, keys = make_chunk(0, (4, 2500)), make_keys(4)  # a 20,128-byte blob: 5 parts
        assert tier.put([(key, chunk) for key in keys]) == 4
        names = [tier._name(key) for key in keys]
        (part,) = raw.get([f"{names[0]}:2"])
        assert isinstance(part, bytes)
        raw.pipeline([("SET", f"{names[0]}:2", part[:-1]), ("SET", f"{names[1]}:4", part)])
        raw.pipeline([("DEL", f"{names[2]}:0")])
        blobs = tier.get(keys)
        assert blobs[:3] == [None] * 3
        assert blobs[3] == blob_of(chunk, keys[3])
        labels = {"tier": "valkey"}
        assert metrics.registry.get_sample_value("kvdepot_tier_corrupt_chunks_total", labels) == 3
        left = raw.pipeline([("EXISTS", n, *(f"{n}:{p}" for p in range(5))) for n in names])
        assert left == [0, 0, 0, 6]  # torn values deleted with all their parts
        assert tier.put([(keys[0], chunk)]) == 1 and tier.get(keys[:1])[0] is not None
    finally:
        tier.close()
        raw.close()
