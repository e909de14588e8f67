"""Chaos scenarios for what one client can make the daemon hold, and for its front door:
a stalled writer's reservations, connection floods, oversized continuation entries, and
tokens that are not ASCII.

Runs in the benchmark or test process; spawns `kvdepot serve` daemons (with the limit flags
when this kvdepot has them) and client scripts, and measures the daemon from outside
(`/proc/PID`): threads, RSS. Each scenario reproduces its hole where it is open (a bound
exceeded, a refusal not given, a stored chunk lost) and passes where it is fixed.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from kvdepot.bench.chaos_holes import RESERVING_WRITER
from kvdepot.bench.chaos_kit import (
    ScenarioResult,
    chain,
    chain_items,
    count_wrong,
    guarded,
    num_clients,
    read_copies,
    run_trials,
    wait_for,
)
from kvdepot.bench.chaos_procs import (
    DaemonProcess,
    is_closed_by_peer,
    kill_group,
    known_flags,
    raw_connection,
    read_line,
    sampling,
    scripts,
    spawn_script,
)
from kvdepot.bench.servers import free_ports
from kvdepot.codec.format import EncodedChunk
from kvdepot.daemon import protocol as p
from kvdepot.daemon.client import DaemonClient
from kvdepot.keys import ChunkKey

RESERVATION_TTL_S = 1.0
CLIENT_CAP_MIB = 8
STALL_KIB = 256
STALL_CHUNKS = 120
"""The stalled writer asks for ~30 MiB of the 32 MiB arena."""
MAX_CLIENTS = 16
HANDSHAKE_TIMEOUT_S = 1.0
NUM_SILENT = 300
THREAD_SLACK = 6
"""Daemon threads besides one per client (main, accept, reaper, HTTP, write-back, ...)."""
INDEX_MIB = 4
NUM_BIG_ENTRIES = 200
BIG_ENTRY_TOKENS = 128 << 10
"""512 KiB of tokens per entry: 16x what a chunk of `MAX_CHUNK_TOKENS` can hold."""
NUM_CHUNK_ENTRIES = 1000
CHUNK_ENTRY_TOKENS = 8192
RSS_SLACK_MIB = 24
TOKEN = "chaos-token-s3cret"


def stalled_writer(budget_s: float, workdir: Path) -> ScenarioResult:
    """Hole 5a: a SIGSTOPped client that reserved most of the arena blocks nobody: its keys
    are released after the reservation TTL and the per-client cap leaves room for others."""
    result = ScenarioResult("stalled_writer")

    def trial(i: int) -> None:
        optional = [
            "--daemon-reservation-ttl-s", str(RESERVATION_TTL_S),
            "--daemon-max-client-bytes", f"{CLIENT_CAP_MIB}MiB",
        ]  # fmt: skip
        root = workdir / f"trial{i}"
        with DaemonProcess(root, optional=optional, result=result) as daemon, scripts() as procs:
            _stall_trial(result, daemon, procs, seed=50_000 + 10 * i)

    return run_trials(result, budget_s, trial)


def _stall_trial(
    result: ScenarioResult,
    daemon: DaemonProcess,
    procs: list[subprocess.Popen[str]],
    seed: int,
) -> None:
    items = chain_items(seed, STALL_CHUNKS, STALL_KIB)
    size = items[0][1].nbytes
    hex_keys = ",".join(key.hex() for key, _ in items)
    writer = spawn_script(RESERVING_WRITER, str(daemon.socket_path), str(size), hex_keys)
    procs.append(writer)
    offsets = [int(o) for o in read_line(writer).split()[1:]]
    granted = [j for j, offset in enumerate(offsets) if offset >= 0]
    result.peak("stalled_writer_reserved_mib", round(len(granted) * size / 2**20, 1))
    os.killpg(writer.pid, signal.SIGSTOP)
    client = daemon.client()
    early = _put_batches(result, client, [items[j] for j in granted])  # still claimed
    time.sleep(RESERVATION_TTL_S + 1.0)
    late = _put_batches(result, client, [items[j] for j in granted])
    if late < len(granted):
        result.violate(
            f"a stalled writer's keys stayed blocked past the reservation TTL: "
            f"{late} of {len(granted)} stored"
        )
    fresh = chain_items(seed + 1, 16, STALL_KIB)
    _put_batches(result, client, fresh)
    num_fresh = sum(
        guarded(result, "contains", partial(client.contains, chain(seed + 1, 16))) or []
    )
    if num_fresh < len(fresh):
        result.violate(f"a stalled writer left room for {num_fresh} of 16 new chunks")
    _peak_arena(result, client)
    kill_group(writer)  # SIGKILL works on a stopped process
    if not wait_for(lambda: num_clients(client) == 1, 10):
        result.violate("the daemon did not notice a dead writer within 10 s")
    num_visible = 0
    for j in granted:
        key = items[j][0]
        blobs = guarded(result, "read", partial(read_copies, client, [key])) or []
        num_visible += len(blobs)
        result.wrong_bytes_served += count_wrong(blobs, seed, STALL_KIB, first=j)
    # Nothing evicts them where the per-client cap works (20 of 32 MiB used at most).
    result.committed_lost += max(0, max(early, late) - num_visible)
    for j, key in enumerate(chain(seed + 1, 16)):
        blobs = guarded(result, "read", partial(read_copies, client, [key])) or []
        result.wrong_bytes_served += count_wrong(blobs, seed + 1, STALL_KIB, first=j)
    client.close()


def _put_batches(
    result: ScenarioResult, client: DaemonClient, items: Sequence[tuple[ChunkKey, EncodedChunk]]
) -> int:
    stored = 0
    for start in range(0, len(items), 4):
        batch = items[start : start + 4]
        stored += guarded(result, "put", partial(client.put, batch)) or 0
    return stored


def _peak_arena(result: ScenarioResult, client: DaemonClient) -> None:
    stats = client.stats()
    tiers, clients = stats.get("tiers", {}), stats.get("clients", [])
    if isinstance(tiers, dict) and "memory" in tiers:
        result.peak("arena_used_mib", round(tiers["memory"]["used_bytes"] / 2**20, 1))
    if isinstance(clients, list):
        held = [c.get("held_bytes", 0) for c in clients if isinstance(c, dict)]
        result.peak("client_held_mib", round(max(held, default=0) / 2**20, 1))


def connection_flood(budget_s: float, workdir: Path) -> ScenarioResult:
    """Hole 5b: connections beyond `--daemon-max-clients` are closed at once, silent ones
    after the handshake timeout; the daemon's threads stay bounded; a good client gets in."""
    result = ScenarioResult("connection_flood")

    def trial(i: int) -> None:
        optional = [
            "--daemon-max-clients", str(MAX_CLIENTS),
            "--daemon-handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S),
        ]  # fmt: skip
        with DaemonProcess(workdir / f"trial{i}", optional=optional, result=result) as daemon:
            _flood_trial(result, daemon, seed=60_000 + 10 * i)

    return run_trials(result, budget_s, trial)


def _flood_trial(result: ScenarioResult, daemon: DaemonProcess, seed: int) -> None:
    warm = daemon.client()
    guarded(result, "put", lambda: warm.put(chain_items(seed, 4, 64)))
    warm.close()
    time.sleep(0.3)
    baseline = daemon.threads()
    result.peak("daemon_threads_idle", baseline)
    socks: list[socket.socket] = []
    with sampling(result, daemon):
        try:
            for _ in range(NUM_SILENT):
                sock = _silent_connection(daemon.socket_path)
                if sock is not None:
                    socks.append(sock)
            result.peak("silent_connections", len(socks))
            time.sleep(HANDSHAKE_TIMEOUT_S + 1.5)
            still_open = sum(not is_closed_by_peer(sock) for sock in socks)
            if still_open:
                result.violate(
                    f"{still_open} of {len(socks)} connections that never sent a hello were "
                    f"still open {HANDSHAKE_TIMEOUT_S + 1.5:.1f} s later"
                )
            good = daemon.client()
            items = chain_items(seed + 1, 4, 64)
            if not wait_for(lambda: guarded(result, "put", lambda: good.put(items)) == 4, 10):
                result.violate("a well-behaved client could not store during the flood")
            blobs = guarded(result, "read", lambda: read_copies(good, chain(seed + 1, 4))) or []
            result.wrong_bytes_served += count_wrong(blobs, seed + 1, 64)
            good.close()
        finally:
            for sock in socks:
                sock.close()
    bound = baseline + MAX_CLIENTS + THREAD_SLACK
    if result.high_water.get("daemon_threads", 0) > bound:
        result.violate(
            f"daemon threads peaked at {result.high_water['daemon_threads']:.0f} "
            f"(bound {bound}: idle {baseline} + {MAX_CLIENTS} clients + {THREAD_SLACK})"
        )
    if not daemon.is_alive:
        result.crashes_hangs += 1


def _silent_connection(path: Path) -> socket.socket | None:
    """A connection that will never send a hello (None if the daemon refused it). A full
    accept backlog refuses a Unix-socket connect at once: retried for a while."""
    for _ in range(50):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            time.sleep(0.01)
            continue
        except OSError:
            sock.close()
            return None
        return sock
    return None


def continuation_flood(budget_s: float, workdir: Path) -> ScenarioResult:
    """Hole 5c: `Remember` entries longer than a chunk are refused and the continuation
    index stays within `--continuation-index-bytes`: the daemon's RSS barely grows."""
    result = ScenarioResult("continuation_flood")

    def trial(i: int) -> None:
        optional = ["--continuation-index-bytes", f"{INDEX_MIB}MiB"]
        with DaemonProcess(workdir / f"trial{i}", optional=optional, result=result) as daemon:
            _index_trial(result, daemon, seed=70_000 + 10 * i)

    return run_trials(result, budget_s, trial)


def _index_trial(result: ScenarioResult, daemon: DaemonProcess, seed: int) -> None:
    small = np.arange(16, dtype="<i4").tobytes()
    parents, children = chain(seed, NUM_CHUNK_ENTRIES), chain(seed + 1, NUM_CHUNK_ENTRIES)
    _send_each(daemon, [p.Remember([parents[0].to_bytes()], [children[0].to_bytes()], [small])])
    baseline = daemon.memory_mib("RssAnon")
    big = np.arange(BIG_ENTRY_TOKENS, dtype="<i4").tobytes()
    oversized: list[p.Request] = [
        p.Remember([parents[j].to_bytes()], [children[j].to_bytes()], [big])
        for j in range(NUM_BIG_ENTRIES)
    ]
    refused = _send_each(daemon, oversized, lambda: _peak_growth(result, daemon, baseline))
    result.peak("oversized_refused", refused)
    entry = np.arange(CHUNK_ENTRY_TOKENS, dtype="<i4").tobytes()
    full: list[p.Request] = [
        p.Remember(
            [k.to_bytes() for k in parents[j : j + 16]],
            [k.to_bytes() for k in children[j : j + 16]],
            [entry] * len(parents[j : j + 16]),
        )
        for j in range(0, NUM_CHUNK_ENTRIES, 16)
    ]
    _send_each(daemon, full, lambda: _peak_growth(result, daemon, baseline))
    time.sleep(0.5)
    _peak_growth(result, daemon, baseline)
    growth = result.high_water.get("daemon_anon_growth_mib", 0.0)
    if growth > INDEX_MIB + RSS_SLACK_MIB:
        result.violate(
            f"the daemon grew by {growth:.0f} MiB from continuation entries (index budget "
            f"{INDEX_MIB} MiB + {RSS_SLACK_MIB} MiB slack)"
        )
    client = daemon.client()
    _round = chain_items(seed + 2, 4, 64)
    if guarded(result, "put", lambda: client.put(_round)) != 4:
        result.violate("the daemon stopped storing after the continuation flood")
    client.close()
    if not daemon.is_alive:
        result.crashes_hangs += 1


def _peak_growth(result: ScenarioResult, daemon: DaemonProcess, baseline: float) -> None:
    result.peak("daemon_anon_growth_mib", round(daemon.memory_mib("RssAnon") - baseline, 1))


def _send_each(
    daemon: DaemonProcess, requests: list[p.Request], after: Callable[[], None] | None = None
) -> int:
    """Send each request on a raw connection (a new one whenever the daemon closed the last)
    and read its reply; returns how many were refused (a failure or a closed connection)."""
    sock: socket.socket | None = None
    refused = 0
    try:
        for request in requests:
            try:
                if sock is None:
                    sock = raw_connection(daemon.socket_path, timeout_s=20)
                p.send(sock, request)
                refused += isinstance(p.recv_response(sock), p.Failure)
            except (OSError, p.ProtocolError):
                refused += 1
                if sock is not None:
                    sock.close()
                sock = None
            if after is not None:
                after()
    finally:
        if sock is not None:
            sock.close()
    return refused


def auth_tokens(budget_s: float, workdir: Path) -> ScenarioResult:
    """Hole 6: a non-ASCII token (TCP hello, HTTP bearer) is refused without a traceback,
    and POST /clear wants `Authorization: Bearer <token>`, not the bare token."""
    result = ScenarioResult("auth_tokens")

    def trial(i: int) -> None:
        port, http_port = free_ports(2)
        root = workdir / f"trial{i}"
        root.mkdir(parents=True, exist_ok=True)
        token_flags = ["--daemon-token", TOKEN]
        if "--daemon-token-file" in known_flags():
            token_file = root / "token"
            token_file.write_text(TOKEN)
            token_file.chmod(0o600)
            token_flags = ["--daemon-token-file", str(token_file)]
        flags = [
            "--daemon-tcp-host", "127.0.0.1", "--daemon-tcp-port", str(port),
            "--daemon-http-port", str(http_port), *token_flags,
        ]  # fmt: skip
        with DaemonProcess(root, flags, result=result) as daemon:
            _auth_trial(result, daemon, port, http_port, seed=80_000 + 10 * i)

    return run_trials(result, budget_s, trial)


def _auth_trial(
    result: ScenarioResult, daemon: DaemonProcess, port: int, http_port: int, seed: int
) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        p.send(raw, p.Hello(p.PROTOCOL_VERSION, "chaos", os.getpid(), "tökén"))
        try:
            reply: p.Response | None = p.recv_response(raw)
        except (OSError, p.ProtocolError):
            reply = None
    if isinstance(reply, p.Welcome):
        result.violate("a TCP hello with a non-ASCII token was let in")
    friend = DaemonClient(socket_path=None, tcp_address=("127.0.0.1", port), token=TOKEN)
    stored = guarded(result, "put", lambda: friend.put(chain_items(seed, 4, 64)))
    blobs = guarded(result, "read", lambda: read_copies(friend, chain(seed, 4))) or []
    result.wrong_bytes_served += count_wrong(blobs, seed, 64)
    if stored != 4 or len(blobs) != 4:
        result.violate("the daemon did not serve a TCP client with the right token")
    friend.close()
    if not wait_for(lambda: _post_clear(http_port, None) is not None, 10):
        result.violate("the HTTP admin endpoint did not come up")
    status = _post_clear(http_port, "Bearer t\xf6ken")
    if status is None or not 400 <= status < 500:
        result.violate(f"POST /clear with a non-ASCII bearer token answered {status}")
    status = _post_clear(http_port, TOKEN)
    if status != 401:
        result.violate(f"POST /clear with the bare token (no 'Bearer ') answered {status}")
    if _post_clear(http_port, f"Bearer {TOKEN}") != 200:
        result.note("POST /clear with the right bearer token was not answered 200")
    if "Traceback" in daemon.log_text():
        result.violate("the daemon logged a traceback")
    if not daemon.is_alive:
        result.crashes_hangs += 1


def _post_clear(port: int, authorization: str | None) -> int | None:
    """The status of POST /clear (None when the connection failed or was dropped)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("POST", "/clear")
        if authorization is not None:
            conn.putheader("Authorization", authorization)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        with contextlib.suppress(OSError):
            conn.close()
