"""Chaos scenarios for the holes an outside test found in the data path: misplaced chunk
files, reused memory under a slow reader, "stored" chunks that never appear, and a live
daemon's shared memory deleted by another daemon's start.

Runs in the benchmark or test process; spawns `kvdepot serve` daemons and client scripts.
Each scenario reproduces its hole on code that has it (a wrong byte served, a stored chunk
lost, or a violated invariant) and passes where it is fixed.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

from kvdepot.bench.chaos_kit import (
    ScenarioResult,
    chain,
    chain_items,
    check_visible,
    chunk_key,
    count_wrong,
    disk_chunk_path,
    disk_store_config,
    guarded,
    num_clients,
    read_copies,
    run_trials,
    wait_for,
    write_to_disk,
)
from kvdepot.bench.chaos_procs import (
    DaemonProcess,
    kill_group,
    raw_connection,
    read_line,
    scripts,
    spawn_script,
)
from kvdepot.daemon import protocol as p
from kvdepot.daemon.client import DaemonClient
from kvdepot.metrics import Metrics
from kvdepot.store import open_store

MISPLACED_CHUNKS = 12
MISPLACED_KIB = 16
LEASE_TTL_S = 2.0
"""The slow reader's daemon lease TTL; the reader holds its views `HOLD_S`."""
HOLD_S = 3.0
READER_KIB = 256
FAKE_PID = 4_194_000
"""Above Linux's largest pid_max: a PID no process here has (as if in another namespace)."""

RESERVING_WRITER = """
    import sys, time
    from pathlib import Path
    from kvdepot.bench.chaos_procs import raw_connection
    from kvdepot.daemon import protocol as p
    sock = raw_connection(Path(sys.argv[1]))
    keys = [bytes.fromhex(k) for k in sys.argv[3].split(",")]
    p.send(sock, p.Reserve(keys, [int(sys.argv[2])] * len(keys)))
    reply = p.recv_response(sock)
    print("READY", *getattr(reply, "offsets", []), flush=True)
    time.sleep(3600)
"""
"""Reserves keys (socket, blob size, comma-separated hex keys), prints the offsets, never
commits: it is killed or stopped by the scenario."""

FILLER = """
    import sys
    from pathlib import Path
    from kvdepot.bench.chaos_kit import client_for, span_items
    client = client_for(Path(sys.argv[1]))
    print("READY", flush=True)
    for line in sys.stdin:
        seed, num_chunks, kib = map(int, line.split())
        stored = sum(client.put(span_items(seed, start, min(start + 8, num_chunks), kib))
                     for start in range(0, num_chunks, 8))
        print(stored, flush=True)
"""
"""Fills the daemon's RAM with new chunks on each stdin line `seed num_chunks kib`."""


def misplaced_chunks(budget_s: float, workdir: Path) -> ScenarioResult:
    """Hole 1: valid chunk files swapped or copied over each other on disk are never served
    under the wrong key; they are counted corrupt, deleted and missed."""
    result = ScenarioResult("misplaced_chunks")

    def trial(i: int) -> None:
        seed, root = 10_000 + i, workdir / f"trial{i}" / "disk"
        config = disk_store_config(root)
        write_to_disk(root, chain_items(seed, MISPLACED_CHUNKS, MISPLACED_KIB))
        paths = [disk_chunk_path(root, chunk_key(seed, j)) for j in range(MISPLACED_CHUNKS)]
        if not all(path.exists() for path in paths):
            result.note("write-back did not write every chunk file")
            return
        a, b, c, d, e, *_ = random.Random(seed).sample(range(MISPLACED_CHUNKS), MISPLACED_CHUNKS)
        stranger = chunk_key(seed, MISPLACED_CHUNKS)  # never stored
        tmp = paths[a].with_suffix(".swap")
        os.rename(paths[a], tmp)
        os.rename(paths[b], paths[a])
        os.rename(tmp, paths[b])
        shutil.copyfile(paths[c], paths[d])
        disk_chunk_path(root, stranger).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths[e], disk_chunk_path(root, stranger))
        misplaced = {a, b, d, MISPLACED_CHUNKS}
        metrics = Metrics()
        with open_store(config, metrics) as store:
            for j in range(MISPLACED_CHUNKS + 1):
                blobs = guarded(result, "read", partial(read_copies, store, [chunk_key(seed, j)]))
                if blobs:
                    result.wrong_bytes_served += count_wrong(blobs, seed, MISPLACED_KIB, first=j)
                elif blobs is not None and j not in misplaced:
                    result.committed_lost += 1
        counted = metrics.counter_value("kvdepot_tier_corrupt_chunks_total", {"tier": "disk"})
        result.peak("corrupt_counted", counted)
        if counted < len(misplaced):
            result.violate(f"{len(misplaced)} misplaced chunk files, {counted:.0f} counted corrupt")
        if any(disk_chunk_path(root, chunk_key(seed, j)).exists() for j in misplaced):
            result.violate("a misplaced chunk file was left in place after it was read")

    return run_trials(result, budget_s, trial)


def slow_reader(budget_s: float, workdir: Path) -> ScenarioResult:
    """Hole 2: a reader that holds its views past the lease TTL while another process fills
    the RAM tier still copies out exactly the bytes it was lent."""
    result = ScenarioResult("slow_reader")
    flags = ["--daemon-lease-ttl-s", str(LEASE_TTL_S)]
    with DaemonProcess(workdir, flags, result=result) as daemon, scripts() as procs:
        filler = spawn_script(FILLER, str(daemon.socket_path))
        procs.append(filler)
        if read_line(filler) != "READY":
            result.violate("the filler client did not start")
            return result
        reader = daemon.client()
        capacity_chunks = (32 << 20) // (READER_KIB << 10)

        def trial(i: int) -> None:
            seed = 20_000 + i
            if guarded(result, "put", lambda: reader.put(chain_items(seed, 8, READER_KIB))) != 8:
                result.note("the reader's put stored less than 8 chunks")
            try:
                with reader.read(chain(seed, 8)) as views:
                    start = time.monotonic()
                    time.sleep(LEASE_TTL_S + 0.75)  # past the TTL and a reaper round
                    _ask(filler, f"{seed + 500_000} {2 * capacity_chunks} {READER_KIB}")
                    time.sleep(max(0.0, start + HOLD_S - time.monotonic()))
                    copies = [bytes(view) for view in views]
            except Exception as exc:
                result.exceptions_into_caller += 1
                result.note(f"read raised {type(exc).__name__}: {exc}")
                return
            result.peak("views_held_s", round(time.monotonic() - start, 1))
            result.wrong_bytes_served += count_wrong(copies, seed, READER_KIB)
            if not daemon.is_alive:
                result.crashes_hangs += 1

        run_trials(result, budget_s, trial)
        reader.close()
    return result


def _ask(proc: subprocess.Popen[str], line: str) -> str:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return read_line(proc)


def pending_writer(budget_s: float, workdir: Path) -> ScenarioResult:
    """Hole 3: a key another client has reserved (and never commits: it is SIGKILLed or
    closes) is not reported stored; what a put reports stored is readable."""
    result = ScenarioResult("pending_writer")
    with DaemonProcess(workdir, result=result) as daemon, scripts() as procs:
        client = daemon.client()

        def trial(i: int) -> None:
            seed, kib = 30_000 + i, 64
            items, rng = chain_items(seed, 4, kib), random.Random(seed)
            taken = [items[j][0].to_bytes() for j in rng.sample(range(4), rng.randint(1, 4))]
            size = items[0][1].nbytes
            sock: socket.socket | None = None
            if i % 2 == 0:  # a real process, SIGKILLed
                proc = spawn_script(
                    RESERVING_WRITER, str(daemon.socket_path), str(size),
                    ",".join(k.hex() for k in taken),
                )  # fmt: skip
                procs.append(proc)
                granted = [int(o) >= 0 for o in read_line(proc).split()[1:]]
            else:  # a connection of this process that closes
                sock = raw_connection(daemon.socket_path)
                p.send(sock, p.Reserve(taken, [size] * len(taken)))
                reply = p.recv_response(sock)
                granted = [o >= 0 for o in getattr(reply, "offsets", [])]
            if not all(granted) or not granted:
                result.note("the writer did not get all of its reservations")
            stored = guarded(result, "put", lambda: client.put(items)) or 0
            if sock is not None:
                sock.close()
            else:
                kill_group(procs[-1])
            if not wait_for(lambda: num_clients(client) == 1, 10):
                result.violate("the daemon did not notice a dead writer within 10 s")
            check_visible(result, client, seed, kib, stored)

        run_trials(result, budget_s, trial, min_trials=2)
        client.close()
    return result


def shm_cleanup(budget_s: float, workdir: Path) -> ScenarioResult:
    """Hole 4: a daemon starting beside a live one whose PID it cannot see (another PID
    namespace) leaves that daemon's RAM-tier file alone; a dead owner's file goes."""
    result = ScenarioResult("shm_cleanup")

    def trial(i: int) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        shm = Path(tempfile.mkdtemp(prefix="kvdepot-chaos-", dir=base))
        try:
            _shm_trial(result, workdir / f"trial{i}", shm, seed=40_000 + 10 * i)
        finally:
            shutil.rmtree(shm, ignore_errors=True)

    return run_trials(result, budget_s, trial)


def _shm_trial(result: ScenarioResult, root: Path, shm: Path, seed: int) -> None:
    with DaemonProcess(root / "d1", shm_dir=shm, result=result) as first:
        old = first.client()
        _round_trip(result, old, seed, "daemon 1 before the other start")
        files = list(shm.glob(f"kvdepot-{first.pid}-*.shm"))
        if len(files) != 1:
            result.violate(f"daemon 1 has {len(files)} RAM-tier files named after its PID")
            old.close()
            return
        fake_pid = next(pid for pid in range(FAKE_PID, FAKE_PID + 1000) if not _is_pid_alive(pid))
        hidden = shm / files[0].name.replace(f"-{first.pid}-", f"-{fake_pid}-", 1)
        os.rename(files[0], hidden)
        stale = shm / f"kvdepot-{fake_pid + 1}-0dead0ff.shm"
        stale.write_bytes(bytes(4096))
        with DaemonProcess(root / "d2", shm_dir=shm, result=result) as second:
            if hidden.exists():
                os.rename(hidden, files[0])
            else:
                result.violate("a starting daemon deleted a live daemon's RAM-tier file")
            if stale.exists():
                result.violate("a starting daemon left a dead owner's RAM-tier file")
            fresh, other = first.client(), second.client()
            _round_trip(result, fresh, seed + 1, "daemon 1, new client, after the other start")
            _round_trip(result, other, seed + 2, "daemon 2")
            blobs = guarded(result, "read", lambda: read_copies(old, chain(seed, 4))) or []
            result.wrong_bytes_served += count_wrong(blobs, seed, 64)
            for client in (old, fresh, other):
                client.close()


def _round_trip(result: ScenarioResult, client: DaemonClient, seed: int, who: str) -> None:
    stored = guarded(result, "put", lambda: client.put(chain_items(seed, 4, 64))) or 0
    blobs = guarded(result, "read", lambda: read_copies(client, chain(seed, 4))) or []
    result.wrong_bytes_served += count_wrong(blobs, seed, 64)
    if stored != 4 or len(blobs) != 4:
        result.violate(f"{who}: stored {stored} of 4 chunks, read {len(blobs)} back")


def _is_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
