"""KV events (`kvdepot.events`): the whole lifecycle, from every tier, in vLLM's format, read
by a real ZeroMQ subscriber; and a router's block keys (llm-d's) rebuilt from them.

The conformance check against vLLM's own event classes is in tests/test_vllm.py (vLLM lives
in its own environment)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from kvdepot import CacheEngine, load_config
from kvdepot.bench.llmd_keys import block_keys, root_key
from kvdepot.events import END_SEQ, event_hash
from kvdepot.store import TieredStore, open_store
from kvdepot.tiers.disk import DiskTier
from tests.helpers import LAYOUTS, Daemon, free_port, kv_for

zmq = pytest.importorskip("zmq")

CHUNK = 64
ROOM = 3 * 2 * CHUNK * 2 * 8 * 4 + 256  # one float32 chunk of this layout, stored


def prompt(seed: int, num_tokens: int = 4 * CHUNK) -> list[int]:
    return [seed * 1000 + i for i in range(num_tokens)]


def engine_on(store: Any, **kw: Any) -> CacheEngine:
    kw.setdefault("names", ["smol"])
    return CacheEngine(store, LAYOUTS[torch.float32], "test-model", chunk_size_tokens=CHUNK,
                       **kw)  # fmt: skip


class Subscriber:
    """A SUB socket on the store's events, decoding them as plain msgpack (what a router in
    any language sees)."""

    def __init__(self, endpoint: str, topic: bytes = b"kv@") -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        time.sleep(0.3)  # a SUB socket misses what is sent before it has joined

    def batches(self, timeout_s: float = 3.0) -> list[tuple[bytes, int, list[Any]]]:
        """(topic, seq, [ts, events, dp_rank]) of every message until `timeout_s` of quiet."""
        out = []
        while self.sock.poll(int(timeout_s * 1000)):
            topic, seq, payload = self.sock.recv_multipart()
            assert len(seq) == 8
            out.append((topic, int.from_bytes(seq, "big"), msgspec.msgpack.decode(payload)))
            timeout_s = 0.5
        return out

    def events(self, timeout_s: float = 3.0) -> list[dict[str, Any]]:
        return [event for _, _, batch in self.batches(timeout_s) for event in batch[1]]

    def close(self) -> None:
        self.sock.close(linger=0)


def events_config(port: int, **more: object) -> dict[str, object]:
    return {"events.enabled": True, "events.endpoint": f"tcp://127.0.0.1:{port}",
            "events.instance": "pod-a", "events.batch_interval_s": 0.005, **more}  # fmt: skip


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def store(tmp_path: Path, port: int) -> Iterator[TieredStore]:
    """RAM for 6 chunks over a disk for 20, publishing events."""
    overrides = {"memory.capacity_bytes": 6 * ROOM, "memory.prefault": False,
                 "disk.path": str(tmp_path / "disk"), "disk.fsync": False,
                 "disk.capacity_bytes": 20 * ROOM,
                 "events.replay_endpoint": f"tcp://127.0.0.1:{free_port()}",
                 **events_config(port)}  # fmt: skip
    s = open_store(load_config(env={}, overrides=overrides))
    yield s
    s.close()


def test_events_are_off_by_default(tmp_path: Path) -> None:
    with open_store(load_config(env={}, overrides={"memory.prefault": False})) as s:
        assert s.events is None


def test_a_stored_prompt_is_announced_chunk_by_chunk_per_tier(
    store: TieredStore, port: int
) -> None:
    sub = Subscriber(f"tcp://127.0.0.1:{port}")
    engine = engine_on(store)
    tokens = [*prompt(1), 5, 6, 7]  # 4 whole chunks and a partial tail (not a block)
    engine.store(tokens, kv_for(engine, len(tokens)), store_partial=True)
    assert store.flush()
    batches = sub.batches()
    sub.close()
    assert {topic for topic, _, _ in batches} == {b"kv@pod-a@smol"}
    assert [seq for _, seq, _ in batches] == list(range(len(batches)))
    assert all(len(batch) == 3 and batch[2] == 0 for _, _, batch in batches)
    events = [event for _, _, batch in batches for event in batch[1]]
    keys = engine.chunk_keys(tokens)
    hashes = [event_hash(key) for key in keys]
    for medium, locality in (("CPU", "LOCAL"), ("DISK", "LOCAL")):
        stored = [e for e in events if e["type"] == "BlockStored" and e["medium"] == medium]
        assert [e["block_hashes"] for e in stored] == [[h] for h in hashes]
        assert [e["parent_block_hash"] for e in stored] == [None, *hashes[:-1]]
        assert [e["token_ids"] for e in stored] == [
            tokens[i * CHUNK : (i + 1) * CHUNK] for i in range(4)
        ]
        assert all(e["block_size"] == CHUNK and e["locality"] == locality for e in stored)
        assert all(e["lora_id"] is None and e["lora_name"] is None for e in stored)
    assert all(e["type"] == "BlockStored" for e in events)


def test_evictions_corruption_deletes_and_clears_are_announced(
    store: TieredStore, port: int
) -> None:
    engine = engine_on(store, partial_match=False)
    sub = Subscriber(f"tcp://127.0.0.1:{port}")
    engine.store(prompt(0), kv_for(engine, 4 * CHUNK))
    assert store.flush()
    first = [event_hash(k) for k in engine.chunk_keys(prompt(0))]
    engine.store(prompt(1), kv_for(engine, 4 * CHUNK, 1))  # RAM holds 6: 2 of prompt 0 go
    assert store.flush()
    events = sub.events()
    removed = [e for e in events if e["type"] == "BlockRemoved"]
    assert removed and all(e["medium"] == "CPU" for e in removed)
    gone = [h for e in removed for h in e["block_hashes"]]
    assert set(gone) <= set(first) and len(gone) == 2
    # A chunk whose disk file is damaged: found corrupt on read, deleted there, announced.
    keys = engine.chunk_keys(prompt(0))
    store.memory.delete(keys)
    disk = store.lower[0]
    assert isinstance(disk, DiskTier)
    path = disk._path(keys[1])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    engine.retrieve(prompt(0))
    events = sub.events()
    corrupt = [e for e in events if e["type"] == "BlockRemoved" and e["medium"] == "DISK"]
    assert corrupt == [{"type": "BlockRemoved", "block_hashes": [first[1]], "medium": "DISK",
                        "locality": "LOCAL"}]  # fmt: skip
    # The chunk before the damaged one was promoted back into RAM: announced again.
    promoted = [e for e in events if e["type"] == "BlockStored" and e["medium"] == "CPU"]
    assert [e["block_hashes"] for e in promoted] == [[first[0]]]
    # Deleting removes from every tier; clearing announces AllBlocksCleared.
    store.delete(engine.chunk_keys(prompt(1))[:1])
    store.clear()
    events = sub.events()
    sub.close()
    deleted = [e for e in events if e["type"] == "BlockRemoved"]
    second = event_hash(engine.chunk_keys(prompt(1))[0])
    assert {e["medium"] for e in deleted if e["block_hashes"] == [second]} == {"CPU", "DISK"}
    assert events[-1] == {"type": "AllBlocksCleared"}


def test_a_tenants_namespace_never_reaches_the_bus(store: TieredStore, port: int) -> None:
    sub = Subscriber(f"tcp://127.0.0.1:{port}")
    engine = engine_on(store)
    engine.store(prompt(2), kv_for(engine, 4 * CHUNK), tenant_salt=b"alice")
    assert store.flush()
    assert sub.events(timeout_s=1.0) == []
    sub.close()
    sample = store.metrics.registry.get_sample_value
    assert not sample("kvdepot_events_dropped_total", {"reason": "no_lineage"})


def test_replay_sends_the_buffered_batches_then_the_end_marker(
    store: TieredStore, port: int
) -> None:
    engine = engine_on(store)
    engine.store(prompt(3), kv_for(engine, 4 * CHUNK))
    assert store.flush()
    time.sleep(0.3)  # published
    assert store.events is not None
    # vLLM's replay protocol: [empty, start] in, then [empty, topic, seq, payload] per batch
    # and a batch numbered -1 to end; a DEALER takes every reply (a REQ only the first).
    req = zmq.Context.instance().socket(zmq.DEALER)
    req.connect(store.events.publisher.replay_endpoint)

    def replay(start: int) -> tuple[list[int], int]:
        """(sequence numbers, events) replayed from `start` on."""
        req.send_multipart((b"", start.to_bytes(8, "big")))
        seqs, num_events = [], 0
        while True:
            assert req.poll(5000), "no replay answer"
            empty, topic, seq, payload = req.recv_multipart()
            assert empty == b""
            if seq == END_SEQ:
                return seqs, num_events
            assert topic == b"kv@pod-a@smol"
            seqs.append(int.from_bytes(seq, "big"))
            num_events += len(msgspec.msgpack.decode(payload)[1])

    seqs, num_events = replay(0)
    assert seqs == list(range(len(seqs))) and num_events == 8  # 4 chunks in RAM, 4 on disk
    assert replay(len(seqs)) == ([], 0)  # nothing after the last
    if len(seqs) > 1:
        assert replay(1)[0] == seqs[1:]
    req.close(linger=0)
    sample = store.metrics.registry.get_sample_value
    assert sample("kvdepot_events_total", {"type": "BlockStored"}) == 8


def test_the_daemon_publishes_what_its_clients_store(tmp_path: Path) -> None:
    port = free_port()
    args = ["--events-enabled", "true", "--events-endpoint", f"tcp://127.0.0.1:{port}",
            "--events-instance", "pod-b"]  # fmt: skip
    d = Daemon(tmp_path, extra=args)
    d.start()
    client = d.client()
    try:
        sub = Subscriber(f"tcp://127.0.0.1:{port}")
        engine = engine_on(client)
        engine.store(prompt(4), kv_for(engine, 4 * CHUNK))
        client.flush()
        batches = sub.batches()
        sub.close()
    finally:
        client.close()
        d.stop()
    assert {topic for topic, _, _ in batches} == {b"kv@pod-b@smol"}
    events = [e for _, _, batch in batches for e in batch[1]]
    hashes = [event_hash(k) for k in engine.chunk_keys(prompt(4))]
    for medium in ("CPU", "DISK"):
        stored = [e for e in events if e["medium"] == medium]
        assert [e["block_hashes"][0] for e in stored] == hashes


def test_bad_event_settings_are_refused_at_start(port: int) -> None:
    from kvdepot.errors import ConfigError

    with pytest.raises(ConfigError, match="tier=MEDIUM"):
        load_config(env={}, overrides={**events_config(port), "events.media": "memory"})
    with pytest.raises(ConfigError, match="ZeroMQ address"):
        load_config(env={}, overrides={**events_config(port), "events.endpoint": "localhost"})
    busy = zmq.Context.instance().socket(zmq.PUB)
    busy.bind(f"tcp://127.0.0.1:{port}")
    try:
        with pytest.raises(ConfigError, match="cannot bind"):
            open_store(load_config(env={}, overrides={**events_config(port),
                                                      "memory.prefault": False}))  # fmt: skip
    finally:
        busy.close(linger=0)


# ---- a router's view: llm-d's block keys from our events ----------------------------------


class LlmdIndex:
    """llm-d's documented key scheme (its token processor, `cbor-fnv`, empty hash seed):
    root = H(seed, nil, model); each block of `block_size` tokens chains
    H(parent, tokens, nil). An event's tokens are re-cut into the router's blocks, and its
    engine hashes mapped to the router's keys (for the parent of the next event)."""

    def __init__(self, model: str, block_size: int = 16) -> None:
        self.block_size = block_size
        self.root = root_key(model)
        self.engine_to_router: dict[int, int] = {}
        self.blocks: set[int] = set()

    def keys(self, tokens: list[int], parent: int | None = None) -> list[int]:
        return block_keys(tokens, self.root if parent is None else parent, self.block_size)

    def apply(self, event: dict[str, Any]) -> None:
        if event["type"] != "BlockStored":
            return
        parent = event["parent_block_hash"]
        start = None if parent is None else self.engine_to_router[parent]  # known first
        keys = self.keys(event["token_ids"], start)
        self.blocks.update(keys)
        self.engine_to_router[event["block_hashes"][-1]] = keys[-1]


def test_a_router_maps_our_chunks_onto_its_own_block_keys(store: TieredStore, port: int) -> None:
    sub = Subscriber(f"tcp://127.0.0.1:{port}")
    engine = engine_on(store)
    tokens = prompt(5, 3 * CHUNK)
    engine.store(tokens, kv_for(engine, len(tokens)))
    longer = [*tokens, *prompt(6, 2 * CHUNK)]  # shares the first 3 chunks
    engine.store(longer, kv_for(engine, len(longer)), kv_start_token=0)
    events = [e for e in sub.events() if e.get("medium") == "CPU"]
    sub.close()
    index = LlmdIndex("smol")
    for event in events:
        index.apply(event)
    # What llm-d computes for an incoming request: the keys of its 16-token blocks. Every
    # block of the 5 stored chunks is indexed (4 router blocks per 64-token chunk)...
    request = [*longer, 1, 2, 3]
    wanted = index.keys(request)
    assert len(wanted) == 5 * CHUNK // 16
    assert all(key in index.blocks for key in wanted)
    # ...and a request that differs in the third chunk matches 2 chunks' blocks only.
    other = list(request)
    other[2 * CHUNK + 3] = 7
    hits = [key in index.blocks for key in index.keys(other)]
    assert hits == [True] * (2 * CHUNK // 16) + [False] * (len(hits) - 2 * CHUNK // 16)


def test_each_tp_ranks_embedded_store_publishes_on_its_own_endpoint() -> None:
    from kvdepot.events import offset_endpoint

    assert offset_endpoint("tcp://127.0.0.1:5557", 0) == "tcp://127.0.0.1:5557"
    assert offset_endpoint("tcp://127.0.0.1:5557", 1) == "tcp://127.0.0.1:5558"
    assert offset_endpoint("tcp://*:0", 3) == "tcp://*:0"
    assert offset_endpoint("ipc:///tmp/kv", 2) == "ipc:///tmp/kv_2"
    assert offset_endpoint("", 2) == ""


def test_the_llm_d_key_scheme_encodes_cbor_as_cbor2_does() -> None:
    """The canonical CBOR of llm-d's root input, as the reference library writes it
    (`cbor2.dumps([fnv1a64(b""), None, "m"])`)."""
    from kvdepot.bench.llmd_keys import cbor, fnv1a64

    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert cbor([fnv1a64(b""), None, "m"]) == bytes.fromhex("831bcbf29ce484222325f6616d")
    assert cbor([1, [0, 23, 24, 255, 256, 65536], None]) == bytes.fromhex(
        "8301" + "86" + "00" + "17" + "1818" + "18ff" + "190100" + "1a00010000" + "f6"
    )
