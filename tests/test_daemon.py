"""The cache daemon with real processes: crashes, restarts, concurrency, bad frames, auth."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvdepot.bench.servers import free_port
from kvdepot.codec import HEADER_NBYTES
from kvdepot.continuations import TailQuery
from kvdepot.daemon import protocol as p
from kvdepot.daemon.client import DaemonClient
from kvdepot.store import PrefixHit
from kvdepot.tiers.arena import ArenaAllocator
from tests.helpers import (  # Daemon: tests/test_vllm*.py import it from here too
    Daemon,
    blob_payload,
    chain,
    items_for,
    payload,
    plain_generate,
    tiny_llama,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, http_port=free_port()).start()
    yield d
    d.stop()


def run_client_script(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip


def test_round_trip_across_processes(daemon: Daemon) -> None:
    client = daemon.client()
    assert client.put(items_for(1)) == 4  # type: ignore[arg-type]
    code = """
        import sys
        from tests.helpers import Daemon, chain, payload, blob_payload
        from pathlib import Path
        client = Daemon(Path(sys.argv[1])).client()
        keys = chain(1)
        assert client.lookup(keys) == 4, client.lookup(keys)
        with client.read(keys) as blobs:
            ok = [blob_payload(b) == payload(1, i).tobytes() for i, b in enumerate(blobs)]
        print(len(blobs), all(ok))
    """
    proc = run_client_script(code, str(daemon.root))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == ["4", "True"]
    client.close()


def test_killed_client_mid_store_leaves_the_daemon_consistent(daemon: Daemon) -> None:
    code = """
        import sys, time
        from tests.helpers import Daemon, items_for, chain
        from kvdepot.daemon import protocol as p
        from pathlib import Path
        client = Daemon(Path(sys.argv[1])).client()
        assert client.put(items_for(2)) == 4  # committed
        half = items_for(3)  # reserved, half written, never committed
        keys, sizes = [k.to_bytes() for k, _ in half], [c.nbytes for _, c in half]
        reply = client._call(p.Reserve(keys, sizes), "put")
        key, chunk = half[0]
        chunk.write_into(client._buffer.view[reply.offsets[0]: reply.offsets[0] + chunk.nbytes])
        print("READY", flush=True)
        time.sleep(60)
    """
    proc = run_client_script(code, str(daemon.root))
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "READY", proc.communicate()[1]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # reaps it and closes its pipes
    client = daemon.client()
    deadline = time.monotonic() + 5
    while client.stats().get("clients") and len(client.stats()["clients"]) > 1:  # type: ignore[arg-type]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.lookup(chain(2)) == 4
    assert client.contains(chain(3)) == [False] * 4  # never made visible
    memory = client.usage()["memory"]
    assert memory.num_objects == 4
    chunk_nbytes = items_for(2)[0][1].nbytes  # type: ignore[attr-defined]
    assert memory.used_bytes == 4 * ArenaAllocator.footprint(chunk_nbytes)  # reservations freed
    with client.read(chain(2)) as blobs:
        assert [blob_payload(b) for b in blobs] == [payload(2, i).tobytes() for i in range(4)]
    client.close()


def test_killed_daemon_degrades_clients_then_they_reconnect(daemon: Daemon) -> None:
    client = daemon.client()
    client.put(items_for(4))  # type: ignore[arg-type]
    assert client.flush(10)
    daemon.kill()
    # The daemon is gone: misses and drops, never an exception.
    assert client.lookup(chain(4)) == 0
    assert client.contains(chain(4)) == [False] * 4
    with client.read(chain(4)) as blobs:
        assert blobs == []
    assert client.put(items_for(5)) == 0  # type: ignore[arg-type]
    assert (
        client.metrics.counter_value("kvdepot_client_degraded_calls_total", {"op": "lookup"}) >= 1
    )
    daemon.start()
    deadline = time.monotonic() + 10
    while client.lookup(chain(4)) != 4:
        assert time.monotonic() < deadline, "client did not reconnect"
        time.sleep(0.05)
    with client.read(chain(4)) as blobs:  # served from the disk tier, promoted to RAM
        assert [blob_payload(b) for b in blobs] == [payload(4, i).tobytes() for i in range(4)]
    client.close()


def test_four_clients_store_and_read_overlapping_chains(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path).start()
    code = """
        import sys, time
        from tests.helpers import Daemon, items_for, chain, payload, blob_payload
        from pathlib import Path
        client = Daemon(Path(sys.argv[1])).client()
        me = int(sys.argv[2])
        wrong = unseen = 0
        for round in range(15):
            seed = 10 + (me + round) % 6            # every chain is touched by every client
            assert client.put(items_for(seed, 3)) <= 3
            expected = [payload(seed, i).tobytes() for i in range(3)]
            # A chunk another client is still writing does not count as stored: it must
            # become visible within moments (its writer commits), whole and right.
            deadline = time.monotonic() + 10
            while True:
                with client.read(chain(seed, 3)) as blobs:
                    wrong += sum(blob_payload(b) != e for b, e in zip(blobs, expected))
                    if len(blobs) == 3:
                        break
                if time.monotonic() > deadline:
                    unseen += 1
                    break
                time.sleep(0.01)
        print(wrong, unseen)
    """
    try:
        procs = [run_client_script(code, str(daemon.root), str(i)) for i in range(4)]
        results = [(proc.communicate(timeout=120), proc.returncode) for proc in procs]
    finally:
        daemon.stop()
    for (out, err), returncode in results:
        assert returncode == 0, err
        assert out.split() == ["0", "0"]


def test_a_chunk_another_client_is_writing_is_not_counted_as_stored(daemon: Daemon) -> None:
    writer, other = daemon.client(), daemon.client()
    (key, chunk), *_ = items_for(6, 1)
    raw = key.to_bytes()
    reply = writer._call(p.Reserve([raw], [chunk.nbytes]), "put")  # type: ignore[attr-defined]
    assert isinstance(reply, p.Slots) and reply.offsets[0] >= 0
    again = other._call(p.Reserve([raw], [chunk.nbytes]), "put")  # type: ignore[attr-defined]
    assert isinstance(again, p.Slots) and again.offsets == [p.SLOT_PENDING]
    assert other.put([(key, chunk)]) == 0  # type: ignore[list-item]
    offset = reply.offsets[0]
    chunk.bound(key).write_into(writer._buffer.view[offset : offset + chunk.nbytes])  # type: ignore[attr-defined]
    writer._call(p.Commit([raw], []), "put")  # type: ignore[attr-defined]
    assert other.put([(key, chunk)]) == 1  # type: ignore[list-item]  # visible: stored
    with other.read([key]) as blobs:
        assert [blob_payload(b) for b in blobs] == [payload(6, 0).tobytes()]
    writer.close()
    other.close()


def test_a_writer_that_dies_never_makes_another_clients_put_a_lie(daemon: Daemon) -> None:
    other = daemon.client()
    for trial in range(5):
        writer = daemon.client()
        (key, chunk), *_ = items_for(20 + trial, 1)
        reply = writer._call(p.Reserve([key.to_bytes()], [chunk.nbytes]), "put")  # type: ignore[attr-defined]
        assert isinstance(reply, p.Slots) and reply.offsets[0] >= 0
        num_stored = other.put([(key, chunk)])  # type: ignore[list-item]
        writer.close()  # dies before its commit
        deadline = time.monotonic() + 5
        while len(other.stats().get("clients", [])) > 1:  # type: ignore[arg-type]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert other.lookup([key]) == num_stored == 0  # told "not stored", and it is not
        assert other.put([(key, chunk)]) == 1  # type: ignore[list-item]
        assert other.lookup([key]) == 1
    other.close()


def _raw_connection(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">I", 12) + b"\xc1" * 12,  # garbage msgpack
        struct.pack(">I", 100) + b"\x81\xa3",  # truncated, then the peer leaves
        struct.pack(">I", 1 << 30),  # oversized
        struct.pack(">I", 8) + b"\x82\xa3tag\xa4nope",  # unknown message
    ],
    ids=["garbage", "truncated", "oversized", "unknown"],
)
def test_bad_frames_close_that_connection_only(daemon: Daemon, frame: bytes) -> None:
    client = daemon.client()
    client.put(items_for(6))  # type: ignore[arg-type]
    bad = _raw_connection(daemon.socket_path)
    bad.sendall(frame)
    if b"\x81\xa3" in frame:
        bad.shutdown(socket.SHUT_WR)
    with contextlib.suppress(ConnectionResetError):  # closed with data pending: a reset
        assert bad.recv(1) == b""  # the daemon closed it
    bad.close()
    assert client.lookup(chain(6)) == 4  # everyone else carries on
    assert client.is_connected
    client.close()


def test_tcp_requires_the_token(tmp_path: Path) -> None:
    port = free_port()
    d = Daemon(tmp_path, extra=["--daemon-tcp-host", "127.0.0.1", "--daemon-tcp-port",
                                str(port), "--daemon-token", "s3cret"]).start()  # fmt: skip
    try:
        intruder = DaemonClient(socket_path=None, tcp_address=("127.0.0.1", port), token="wrong")
        assert intruder.lookup(chain(7)) == 0
        assert not intruder.is_connected
        friend = DaemonClient(socket_path=None, tcp_address=("127.0.0.1", port), token="s3cret")
        assert friend.put(items_for(7)) == 4  # type: ignore[arg-type]
        assert friend.lookup(chain(7)) == 4
        friend.close()
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        p.send(raw, p.Hello(p.PROTOCOL_VERSION, "raw", os.getpid(), ""))
        assert isinstance(p.recv_response(raw), p.Failure)
        raw.close()
    finally:
        d.stop()


def test_a_stalled_readers_lease_is_overdue_but_its_memory_is_never_reused(
    daemon: Daemon,
) -> None:
    # The fixture's leases are overdue after 1 s: the reader stalls longer while another
    # client churns the whole (32 MiB) RAM tier, then copies; every byte must be its chunk's.
    reader, filler = daemon.client(), daemon.client()
    reader.put(items_for(8, 2, big=True))  # type: ignore[arg-type]
    with reader.read(chain(8, 2)) as blobs:
        assert len(blobs) == 2
        deadline = time.monotonic() + 10
        while b"kvdepot_daemon_overdue_leases_total 1.0" not in daemon.http("/metrics")[1]:
            assert time.monotonic() < deadline, "the lease was never reported overdue"
            time.sleep(0.1)
        for seed in range(100, 112):  # 12 x 2 x 2 MiB: the tier turns over twice
            filler.put(items_for(seed, 2, big=True))  # type: ignore[arg-type]
        got = [blob_payload(b) for b in blobs]
    assert got == [payload(8, i, big=True).tobytes() for i in range(2)]
    reader.close()
    filler.close()


def test_http_admin(daemon: Daemon) -> None:
    client = daemon.client()
    client.put(items_for(9))  # type: ignore[arg-type]
    assert daemon.http("/healthz") == (200, b"ok\n")
    status, metrics = daemon.http("/metrics")
    assert status == 200 and b'kvdepot_tier_objects{tier="memory"} 4.0' in metrics
    status, body = daemon.http("/stats")
    assert status == 200 and json.loads(body)["tiers"]["memory"]["num_objects"] == 4
    assert daemon.http("/clear", "POST")[0] == 401
    assert daemon.http("/clear", "POST", token="wrong")[0] == 401
    token = (daemon.socket_path.parent / "daemon.sock.token").read_text()
    assert daemon.http("/clear", "POST", token=token)[0] == 200
    assert client.lookup(chain(9)) == 0
    client.close()


def test_restarted_daemon_serves_what_reached_disk(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    client = d.client()
    client.put(items_for(11))  # type: ignore[arg-type]
    assert client.flush(10)
    d.stop()  # clean stop: write-back finished, shared memory removed
    assert not list(Path("/dev/shm").glob(f"kvdepot-{d.proc.pid}-*.shm"))  # type: ignore[union-attr]
    d.start()
    deadline = time.monotonic() + 10
    while client.lookup(chain(11)) != 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client.close()
    d.stop()


def test_transformers_generation_through_the_daemon(daemon: Daemon) -> None:
    """One config switch: the same connector on a daemon client, hits across engines."""
    import torch

    from kvdepot import load_config
    from kvdepot.connectors.transformers import KVDepotGenerator
    from kvdepot.deployment import open_cache

    config = load_config(
        overrides={"mode": "daemon", "daemon.socket_path": str(daemon.socket_path),
                   "chunk_size_tokens": 16}
    )  # fmt: skip
    model = tiny_llama()
    prompt = list(range(7, 60))
    first, second = open_cache(config), open_cache(config)
    KVDepotGenerator.for_model(model, first, chunk_size_tokens=16).generate(
        prompt, max_new_tokens=4
    )
    generator = KVDepotGenerator.for_model(model, second, chunk_size_tokens=16)
    result = generator.generate(prompt, max_new_tokens=4)
    assert result.num_cached_tokens == len(prompt) - 1
    assert result.token_ids == plain_generate(model, prompt, 4)
    assert torch.is_tensor(torch.tensor(result.token_ids))
    first.close()
    second.close()


def test_blend_segments_through_the_daemon(daemon: Daemon) -> None:
    """A document stored by one engine's blend is reused, moved elsewhere, by another's."""
    from kvdepot import load_config
    from kvdepot.blend import Segment, prompt_ids
    from kvdepot.connectors.blend_transformers import BlendGenerator
    from kvdepot.connectors.transformers import KVDepotGenerator
    from kvdepot.deployment import open_cache

    config = load_config(
        overrides={"mode": "daemon", "daemon.socket_path": str(daemon.socket_path),
                   "chunk_size_tokens": 16}
    )  # fmt: skip
    model = tiny_llama(num_layers=4)  # layers past the check layer (1) to blend
    doc_a, doc_b = Segment(tuple(range(100, 140))), Segment(tuple(range(150, 170)))
    question = Segment((7, 8, 9), reuse=False)
    first, second = open_cache(config), open_cache(config)
    writer = BlendGenerator.for_generator(KVDepotGenerator.for_model(model, first))
    assert writer.index([doc_a, doc_b]) == 60
    reader = BlendGenerator.for_generator(KVDepotGenerator.for_model(model, second))
    segments = [Segment((5, 6)), doc_b, doc_a, question]
    result = reader.generate(segments, max_new_tokens=4, recompute_ratio=1.0)
    assert result.fallback_reason is None
    assert (result.num_reused_tokens, result.num_computed_tokens) == (60, 2)
    assert result.token_ids == plain_generate(model, prompt_ids(segments), 4)
    first.close()
    second.close()


def test_posted_releases_and_remembers_keep_replies_in_order(daemon: Daemon) -> None:
    """Release and Remember are sent without waiting; the next call reads their replies first,
    so every answer still belongs to its own request, and the leases are gone."""
    client = daemon.client()
    client.put(items_for(10))  # type: ignore[arg-type]
    keys = chain(10)
    for _ in range(3):
        with client.read(keys) as views:
            assert len(views) == 4
    as_bytes = [np.array(t, dtype="<i4").tobytes() for t in ([1, 2, 3, 4], [1, 2, 3, 9])]
    client.remember([(keys[0], keys[1], as_bytes[0])])
    assert client.lookup(keys) == 4  # not a stale Done
    tail = TailQuery(keys[0], as_bytes[0] + as_bytes[1], chunk_size_tokens=4, min_tokens=1)
    hit = client.match([keys[0], chain(11)[1]], tail)
    assert hit == PrefixHit(1, keys[1], 3, miss="never_stored")
    clients = client.stats()["clients"]
    assert isinstance(clients, list)
    assert [c["leases"] for c in clients if c["pid"] == os.getpid()] == [0]  # all released
    client.close()


def test_a_slow_writers_reservation_expires_but_its_memory_waits_for_it(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, extra=["--daemon-reservation-ttl-s", "0.5"]).start()
    slow, other = daemon.client(), daemon.client()
    try:
        (key, chunk), *_ = items_for(30, 1)
        raw = key.to_bytes()
        reply = slow._call(p.Reserve([raw], [chunk.nbytes]), "put")
        assert isinstance(reply, p.Slots) and reply.offsets[0] >= 0
        deadline = time.monotonic() + 10
        while other.put([(key, chunk)]) == 0:  # type: ignore[list-item]
            assert time.monotonic() < deadline, "the reservation never expired"
            time.sleep(0.1)
        slot_nbytes = ArenaAllocator.footprint(chunk.nbytes)  # type: ignore[attr-defined]
        assert other.usage()["memory"].used_bytes == 2 * slot_nbytes  # the slow slot is kept
        (_, wrong), *_ = items_for(31, 1)
        offset = reply.offsets[0]
        wrong.bound(key).write_into(slow._buffer.view[offset : offset + chunk.nbytes])  # type: ignore[attr-defined]
        assert slow._call(p.Commit([raw], []), "put") == p.Count(0)  # too late: not published
        with other.read([key]) as blobs:
            assert [blob_payload(b) for b in blobs] == [payload(30, 0).tobytes()]
        assert other.usage()["memory"].used_bytes == slot_nbytes  # freed once written
    finally:
        slow.close()
        other.close()
        daemon.stop()


def test_one_client_holds_at_most_its_share_of_the_arena(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, http_port=free_port(), extra=["--daemon-max-client-bytes", "5MiB"])
    daemon.start()
    hog, other = daemon.client(), daemon.client()
    try:
        items = items_for(40, 4, big=True)  # 4 x 2 MiB
        keys = [k.to_bytes() for k, _ in items]
        reply = hog._call(p.Reserve(keys, [c.nbytes for _, c in items]), "put")  # type: ignore[attr-defined]
        assert isinstance(reply, p.Slots)
        assert [o >= 0 for o in reply.offsets] == [True, True, False, False]
        assert reply.offsets[2:] == [p.SLOT_OVER_LIMIT] * 2
        assert (
            b'kvdepot_daemon_limit_hits_total{limit="client_bytes"} 2.0'
            in daemon.http("/metrics")[1]
        )
        assert other.put(items_for(41, 2, big=True)) == 2  # type: ignore[arg-type]
    finally:
        hog.close()
        other.close()
        daemon.stop()


def test_connections_are_capped_and_must_say_hello_in_time(tmp_path: Path) -> None:
    extra = ["--daemon-max-clients", "4", "--daemon-handshake-timeout-s", "0.5"]
    daemon = Daemon(tmp_path, extra=extra).start()
    try:
        silent = [_raw_connection(daemon.socket_path) for _ in range(4)]
        extra_one = _raw_connection(daemon.socket_path)
        assert extra_one.recv(1) == b""  # over the cap: closed at once
        extra_one.close()
        for sock in silent:  # no hello within 0.5 s: closed
            assert sock.recv(1) == b""
            sock.close()
        client = daemon.client()
        assert client.put(items_for(42, 1)) == 1  # type: ignore[arg-type]
        client.close()
    finally:
        daemon.stop()


@pytest.mark.parametrize("nbytes", [0, -5, HEADER_NBYTES, (1 << 30) + HEADER_NBYTES + 1])
def test_reserve_refuses_impossible_sizes(daemon: Daemon, nbytes: int) -> None:
    raw = _raw_connection(daemon.socket_path)
    p.send(raw, p.Hello(p.PROTOCOL_VERSION, "raw", os.getpid(), ""))
    assert isinstance(p.recv_response(raw), p.Welcome)
    p.send(raw, p.Reserve([bytes(32)], [nbytes]))
    with pytest.raises((ConnectionError, OSError)):
        p.recv_response(raw)  # a protocol error: that connection is closed
    raw.close()
    client = daemon.client()
    assert client.put(items_for(43, 1)) == 1  # type: ignore[arg-type]
    client.close()


def test_a_client_pins_at_most_its_share_of_the_arena(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, extra=["--daemon-max-client-bytes", "5MiB"]).start()
    writer, reader = daemon.client(), daemon.client()
    try:
        for half in (0, 1):  # 4 x 2 MiB, in two puts (one put may reserve 5 MiB)
            assert writer.put(items_for(50, 4, big=True)[2 * half : 2 * half + 2]) == 2  # type: ignore[arg-type]
        with reader.read(chain(50, 4)) as blobs:
            assert len(blobs) == 2  # 4 MiB pinned; a third chunk would pass 5 MiB
            assert [blob_payload(b) for b in blobs] == [
                payload(50, i, big=True).tobytes() for i in range(2)
            ]
            with reader.read(chain(50, 4)) as more:
                assert more == []  # 1 MiB left: not one more chunk
        with reader.read(chain(50, 4)) as blobs:
            assert len(blobs) == 2  # released: the share is back
    finally:
        writer.close()
        reader.close()
        daemon.stop()


def test_a_lookup_only_client_maps_the_shared_memory_only_when_it_moves_kv(
    daemon: Daemon,
) -> None:
    """vLLM's scheduler only looks up: its client must not populate a mapping of the whole
    RAM tier (about a second per GiB) on its first call; a read or a store maps it then."""
    writer = daemon.client()
    assert writer.put(items_for(3)) == 4  # type: ignore[arg-type]
    lazy = daemon.client(eager_map=False)
    try:
        assert lazy.lookup(chain(3)) == 4
        assert lazy.contains(chain(3)) == [True] * 4
        assert lazy._buffer is None  # connected, looked up, nothing mapped
        with lazy.read(chain(3)) as blobs:
            assert [blob_payload(b) for b in blobs] == [payload(3, i).tobytes() for i in range(4)]
        assert lazy._buffer is not None
        assert lazy.put(items_for(4)) == 4  # type: ignore[arg-type]
        assert writer.lookup(chain(4)) == 4
    finally:
        lazy.close()
        writer.close()
