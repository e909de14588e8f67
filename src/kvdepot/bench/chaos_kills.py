"""Chaos scenarios with processes that die or crowd: clients and daemons SIGKILLed at random
moments, many connections at once, concurrent clients under eviction pressure.

Runs in the benchmark or test process; spawns `kvdepot serve` daemons and client scripts.
These held before the holes were found and must keep holding. Every hit is compared with
the bytes written under its key; chunks count as lost only where nothing may remove them
(a RAM budget above the data, or flushed to the daemon's disk tier before any kill).
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from kvdepot.bench.chaos_kit import (
    ScenarioResult,
    chain,
    chain_items,
    check_visible,
    count_wrong,
    guarded,
    read_copies,
    run_trials,
    wait_for,
)
from kvdepot.bench.chaos_procs import (
    DaemonProcess,
    finish_script,
    read_line,
    sampling,
    scripts,
    spawn_script,
)
from kvdepot.daemon.client import DaemonClient

VICTIMS = """
    import os, random, signal, sys, time
    from pathlib import Path
    from kvdepot.bench.chaos_kit import chain, chain_items, client_for, count_wrong, read_copies
    socket_path, (base, pool, kib, num) = Path(sys.argv[1]), map(int, sys.argv[2:6])
    end = time.monotonic() + float(sys.argv[6])
    items = {seed: chain_items(seed, 4, kib) for seed in range(base, base + pool)}

    def victim(rng):
        client = client_for(socket_path)
        while True:
            seed = rng.randrange(base, base + pool)
            try:
                client.put(items[seed])
                wrong = count_wrong(read_copies(client, chain(seed, 4)), seed, kib)
            except Exception as exc:
                print("E", type(exc).__name__, exc, flush=True)
                continue
            if wrong:
                print("W", wrong, flush=True)

    def spawn(i):
        pid = os.fork()
        if pid == 0:
            try:
                victim(random.Random(i))
            finally:
                os._exit(0)
        return pid

    rng, kills = random.Random(0), 0
    pids = [spawn(i) for i in range(num)]
    print("READY", flush=True)
    while time.monotonic() < end:
        time.sleep(rng.uniform(0.02, 0.3))
        k = rng.randrange(num)
        os.kill(pids[k], signal.SIGKILL)
        os.waitpid(pids[k], 0)
        kills += 1
        pids[k] = spawn(num + kills)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    print("KILLS", kills, flush=True)
"""
"""Forks client processes that put and read (checked) chains of a shared pool, and
SIGKILLs one at a random moment every few hundred ms (a fork costs far less than a new
interpreter), for some seconds; prints `W n` (wrong bytes), `E ...` and `KILLS n`."""

PRESSURE = """
    import os, random, sys, time
    from pathlib import Path
    from kvdepot.bench.chaos_kit import chain, chain_items, client_for, count_wrong, read_copies
    socket_path, (base, pool, kib, num) = Path(sys.argv[1]), map(int, sys.argv[2:6])
    seconds = float(sys.argv[6])

    def work(rng):
        client = client_for(socket_path)
        end = time.monotonic() + seconds
        wrong = errors = ops = hits = 0
        while time.monotonic() < end:
            seed = rng.randrange(base, base + pool)
            try:
                if rng.random() < 0.5:
                    client.put(chain_items(seed, 4, kib))
                blobs = read_copies(client, chain(seed, 4))
                wrong += count_wrong(blobs, seed, kib)
                hits += len(blobs)
            except Exception as exc:
                errors += 1
                print("E", type(exc).__name__, exc, file=sys.stderr, flush=True)
            ops += 1
        # One write of one line: atomic on a pipe, never mixed with another child's.
        os.write(1, f"{wrong} {errors} {ops} {hits}\\n".encode())

    pids = []
    for i in range(num):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                work(random.Random(i))
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    for i, pid in enumerate(pids):
        _, status = os.waitpid(pid, 0)
        if status:
            print(f"client {i} ended with wait status {status:#x}", file=sys.stderr, flush=True)
"""
"""Forks client processes that put and read (checked) chains of a pool larger than the RAM
tier for some seconds; each prints `wrong errors ops hits`."""

KILL_POOL = 8
KILL_KIB = 64
NUM_VICTIMS = 2
MIN_KILLS = 2
DURABLE_KIB = 16
NUM_MANY = 48
PRESSURE_CLIENTS = 4
PRESSURE_POOL = 24
PRESSURE_KIB = 128
"""24 chains x 4 chunks x 128 KiB = 12 MiB through an 8 MiB RAM tier."""


def client_kills(budget_s: float, workdir: Path) -> ScenarioResult:
    """Clients SIGKILLed mid-put and mid-read: the daemon stays up, another client's reads
    stay exact and what it stored stays readable."""
    result = ScenarioResult("client_kills")
    with DaemonProcess(workdir, result=result) as daemon, scripts() as procs:
        witness = daemon.client()
        args = ("90000", str(KILL_POOL), str(KILL_KIB), str(NUM_VICTIMS), str(max(budget_s, 3)))
        killer = spawn_script(VICTIMS, str(daemon.socket_path), *args)
        procs.append(killer)
        if read_line(killer) != "READY":
            result.violate("the client processes did not start")
        rng = random.Random(1)

        def trial(i: int) -> None:
            seed = 91_000 + i  # the witness's own: no victim writes it
            stored = guarded(result, "put", partial(witness.put, chain_items(seed, 4, 32)))
            check_visible(result, witness, seed, 32, stored or 0)
            other = 90_000 + rng.randrange(KILL_POOL)
            blobs = guarded(result, "read", partial(read_copies, witness, chain(other, 4)))
            result.wrong_bytes_served += count_wrong(blobs or [], other, KILL_KIB)

        with sampling(result, daemon):
            run_trials(result, budget_s, trial, min_trials=20)
            while killer.poll() is None:
                trial(result.trials)
                result.trials += 1
        out, err = finish_script(killer)
        witness.close()
        _count_victims(result, out, err)
        if not daemon.is_alive:
            result.crashes_hangs += 1
            result.violate("the daemon died while clients were being killed")
    return result


def _count_victims(result: ScenarioResult, out: str, err: str) -> None:
    """Count what the victims printed: wrong bytes (`W n`), exceptions (`E ...`), kills."""
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "W":
            result.wrong_bytes_served += int(rest)
        elif kind == "E":
            result.exceptions_into_caller += 1
            result.note(f"a client got {rest}")
        elif kind == "KILLS":
            result.peak("clients_killed", int(rest))
    if "KILLS" not in out:
        result.violate(f"the client processes failed: {err.strip()[-300:]}")


def _recorded(result: ScenarioResult, target: Callable[[], None]) -> Callable[[], None]:
    """`target`, with its exception recorded instead of escaping its thread."""

    def run() -> None:
        try:
            target()
        except Exception as exc:
            result.violate(f"a chaos harness thread failed: {exc!r}")

    return run


def daemon_kills(budget_s: float, workdir: Path) -> ScenarioResult:
    """The daemon SIGKILLed at random moments: clients get misses, never exceptions, they
    reconnect when it is back, and what was flushed to its disk tier reads back exact."""
    result = ScenarioResult("daemon_kills")
    with DaemonProcess(workdir, disk=True, result=result) as daemon:
        client = daemon.client(request_timeout_s=5.0)
        generation, lock, stop = [0], threading.Lock(), threading.Event()

        def killer() -> None:
            rng = random.Random(2)
            while not stop.wait(rng.uniform(0.3, 1.0)):
                with lock:  # a put that saw this generation cannot have met this kill
                    generation[0] += 1
                    daemon.kill()
                stop.wait(rng.uniform(0.05, 0.4))
                daemon.start()

        durable: list[int] = []
        rng = random.Random(3)

        def trial(i: int) -> None:
            seed = 100_000 + i
            with lock:
                before = generation[0]
            stored = guarded(result, "put", partial(client.put, chain_items(seed, 4, DURABLE_KIB)))
            is_flushed = guarded(result, "flush", partial(client.flush, 10.0))
            with lock:
                if stored == 4 and is_flushed and generation[0] == before:
                    durable.append(seed)
            if durable:
                old = rng.choice(durable)
                blobs = guarded(result, "read", partial(read_copies, client, chain(old, 4)))
                result.wrong_bytes_served += count_wrong(blobs or [], old, DURABLE_KIB)
            time.sleep(0.01)

        thread = threading.Thread(target=_recorded(result, killer), name="chaos-killer")
        thread.start()
        try:
            run_trials(result, budget_s, trial, min_trials=20)
            deadline = time.monotonic() + 60
            while generation[0] < MIN_KILLS and time.monotonic() < deadline:
                trial(result.trials)
                result.trials += 1
        finally:
            stop.set()
            thread.join()
        if not daemon.is_alive:
            daemon.start()
        result.peak("daemon_kills", generation[0])
        result.peak("chains_flushed", len(durable))
        if not wait_for(lambda: bool(client.stats()), 15):
            result.violate("the client did not reconnect to the restarted daemon")
        for seed in durable:
            check_visible(result, client, seed, DURABLE_KIB, 4)
        client.close()
    return result


def many_clients(budget_s: float, workdir: Path) -> ScenarioResult:
    """Many connections at once: each stores and reads exactly, also what the others
    stored; once they leave, the daemon's threads are back to where they were."""
    result = ScenarioResult("many_clients")
    with DaemonProcess(workdir, result=result) as daemon, sampling(result, daemon):

        def trial(i: int) -> None:
            time.sleep(0.3)
            idle = daemon.threads()
            clients = [daemon.client() for _ in range(NUM_MANY)]
            seeds = [110_000 + 100 * i + j for j in range(NUM_MANY)]
            parts = [ScenarioResult(result.name) for _ in clients]  # one per worker thread
            try:
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(_store_own, parts, clients, seeds))
                    list(pool.map(_read_other, parts, clients, seeds[1:] + seeds[:1]))
            finally:
                for client in clients:
                    client.close()
            for part in parts:
                result.merge(part)
            if not wait_for(lambda: daemon.threads() <= idle, 5):
                result.violate(f"daemon threads stayed at {daemon.threads()} (idle {idle})")

        run_trials(result, budget_s, trial)
    return result


def _store_own(result: ScenarioResult, client: DaemonClient, seed: int) -> None:
    stored = guarded(result, "put", partial(client.put, chain_items(seed, 4, 32)))
    check_visible(result, client, seed, 32, stored or 0)


def _read_other(result: ScenarioResult, client: DaemonClient, seed: int) -> None:
    blobs = guarded(result, "read", partial(read_copies, client, chain(seed, 4))) or []
    result.wrong_bytes_served += count_wrong(blobs, seed, 32)
    result.committed_lost += 4 - len(blobs)


def eviction_pressure(budget_s: float, workdir: Path) -> ScenarioResult:
    """Concurrent client processes store and read overlapping chains through a RAM tier
    smaller than their data: every hit is exact, no client sees an exception."""
    result = ScenarioResult("eviction_pressure")
    seconds = max(budget_s, 3.0)
    with DaemonProcess(workdir, memory="8MiB", result=result) as daemon, scripts() as procs:
        args = ("120000", str(PRESSURE_POOL), str(PRESSURE_KIB), str(PRESSURE_CLIENTS))
        clients = spawn_script(PRESSURE, str(daemon.socket_path), *args, str(seconds))
        procs.append(clients)
        with sampling(result, daemon):
            try:
                out, err = clients.communicate(timeout=seconds + 120)
            except subprocess.TimeoutExpired:
                out, err = "", "the client processes hung"
                result.crashes_hangs += 1
        lines = out.splitlines()
        for line in lines:
            _count_pressure(result, line, err)
        if len(lines) != PRESSURE_CLIENTS:
            result.violate(f"{len(lines)} of {PRESSURE_CLIENTS} client processes finished")
        result.trials = 1
        if not daemon.is_alive:
            result.crashes_hangs += 1
    return result


def _count_pressure(result: ScenarioResult, out: str, err: str) -> None:
    fields = out.split()
    if len(fields) != 4:
        result.exceptions_into_caller += 1
        result.note(f"a client process failed (its line: {out!r}): {err.strip()[-300:]}")
        return
    wrong, errors, ops, hits = map(int, fields)
    result.wrong_bytes_served += wrong
    result.exceptions_into_caller += errors
    result.peak("client_ops", ops)
    result.peak("client_hits", hits)
    if errors:
        result.note(f"a client got: {err.strip().splitlines()[-1]}")
