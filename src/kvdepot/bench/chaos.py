"""`kvdepot bench chaos`: fault injection against real daemon and server processes.

Runs in the benchmark (or test) process, which spawns everything it breaks: `kvdepot serve`
daemons, client scripts it SIGKILLs or SIGSTOPs, Valkey and S3 servers on loopback. It owns
the scenario registry and the report; the scenarios live in `chaos_holes` (data-path holes),
`chaos_limits` (bounds and auth), `chaos_kills` (dying and crowding processes),
`chaos_inputs` (damaged files, fuzzed frames) and `chaos_remote` (remote-tier servers), on
the helpers of `chaos_kit`.

Invariants every scenario checks: every hit is compared with the bytes written under that
key (`chaos_kit.is_exact`); a chunk a put reported stored is read back wherever nothing may
have removed it; nothing raises into a caller of the cache API; no daemon dies unless it is
killed on purpose, no call overruns a generous deadline; and each scenario's own bounds hold
(threads, RSS, refusals). The goal is all of it, in every scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from kvdepot.bench.chaos_holes import misplaced_chunks, pending_writer, shm_cleanup, slow_reader
from kvdepot.bench.chaos_inputs import disk_corruption, frame_fuzz
from kvdepot.bench.chaos_kills import client_kills, daemon_kills, eviction_pressure, many_clients
from kvdepot.bench.chaos_kit import ScenarioResult
from kvdepot.bench.chaos_limits import (
    auth_tokens,
    connection_flood,
    continuation_flood,
    stalled_writer,
)
from kvdepot.bench.chaos_remote import s3_faults, valkey_faults
from kvdepot.errors import KVDepotError
from kvdepot.tables import format_table

Scenario = Callable[[float, Path], ScenarioResult]
"""`(budget_s, workdir) -> result`: trials until the budget is spent (at least one)."""

SCENARIOS: dict[str, Scenario] = {
    "misplaced_chunks": misplaced_chunks,
    "slow_reader": slow_reader,
    "pending_writer": pending_writer,
    "shm_cleanup": shm_cleanup,
    "stalled_writer": stalled_writer,
    "connection_flood": connection_flood,
    "continuation_flood": continuation_flood,
    "auth_tokens": auth_tokens,
    "client_kills": client_kills,
    "daemon_kills": daemon_kills,
    "disk_corruption": disk_corruption,
    "frame_fuzz": frame_fuzz,
    "many_clients": many_clients,
    "eviction_pressure": eviction_pressure,
    "valkey_faults": valkey_faults,
    "s3_faults": s3_faults,
}


def run_chaos(
    minutes: float, scenarios: Sequence[str] | None = None, workdir: Path | None = None
) -> list[ScenarioResult]:
    """Run `scenarios` (default: all), splitting `minutes` evenly between them.

    Args:
        workdir: where daemons, disks and logs go (one folder per scenario, kept); by
            default a temporary folder, removed afterwards.
    """
    names = list(scenarios) if scenarios else list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown chaos scenarios {unknown}; choose from {sorted(SCENARIOS)}")
    budget_s = max(minutes, 0.0) * 60 / len(names)
    root = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="kvdepot-chaos-"))
    try:
        return [_run_one(name, budget_s, root / name) for name in names]
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _run_one(name: str, budget_s: float, workdir: Path) -> ScenarioResult:
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        result = SCENARIOS[name](budget_s, workdir)
    except Exception as exc:  # the harness itself failed: a missed goal, not a crash here
        result = ScenarioResult(name, crashes_hangs=1)
        result.violate(f"the scenario failed: {type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - start
    return result


def goal_lines(results: Sequence[ScenarioResult]) -> list[tuple[str, bool]]:
    """The goals and whether each is met."""
    ran = [r for r in results if not r.skipped]
    data = not any(
        r.wrong_bytes_served or r.committed_lost or r.exceptions_into_caller for r in ran
    )
    bounds = not any(r.crashes_hangs or r.violations for r in ran)
    return [
        ("wrong bytes 0, committed chunks lost 0, exceptions into the caller 0", data),
        ("no daemon crash or hang, no scenario bound violated", bounds),
    ]


def is_met(results: Sequence[ScenarioResult]) -> bool:
    return all(met for _, met in goal_lines(results))


def report(results: Sequence[ScenarioResult]) -> str:
    """The table, what went wrong where, and the goal lines."""
    rows = [
        [r.name, "skipped" if r.skipped else r.trials, r.wrong_bytes_served, r.committed_lost,
         r.exceptions_into_caller, r.crashes_hangs, len(r.violations), _peaks(r),
         f"{r.seconds:.0f}"]
        for r in results
    ]  # fmt: skip
    header = ["scenario", "trials", "wrong bytes", "lost", "exceptions", "crash/hang",
              "violated", "high water", "s"]  # fmt: skip
    lines = [f"kvdepot bench chaos | {os.cpu_count()} cores", format_table(header, rows)]
    for r in results:
        lines += [f"{r.name}: {text}" for text in r.violations]
        lines += [f"{r.name} (note): {text}" for text in r.notes]
        if r.skipped:
            lines.append(f"{r.name} (skipped): {r.skipped}")
    for text, met in goal_lines(results):
        lines.append(f"goal: {text} across every scenario: {'MET' if met else 'MISSED'}")
    return "\n".join(lines)


def _peaks(result: ScenarioResult) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in result.high_water.items()) or "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=5.0, help="split over scenarios")
    parser.add_argument("--scenarios", default="", help="comma list (default: all)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep daemons' files")
    parser.add_argument("--json", type=Path, default=None, help="also write JSON")


def cli_main(args: argparse.Namespace) -> int:
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise KVDepotError(f"unknown scenarios {unknown}; choose from {sorted(SCENARIOS)}")
    results = run_chaos(args.minutes, names or None, args.workdir)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if is_met(results) else 1
