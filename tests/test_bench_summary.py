"""`kvdepot bench all`: goals collected from every benchmark; skips and failures shown."""

from __future__ import annotations

import pytest

from kvdepot.bench import summary
from kvdepot.bench.tiers import Result


def test_ratio_rows_become_goals_and_info_rows_do_not() -> None:
    results = [
        Result("small", "RAM store", 9.0, 10.0, "GB/s", 0.9, ">= 0.8"),
        Result("small", "RAM retrieve", 5.0, 10.0, "GB/s", 0.5, ">= 0.8"),
        Result("any", "lookup p99", 80.0, 200.0, "us", 0.4, "info"),
    ]
    goals = summary.from_results("tiers", results)
    assert [(g.goal.split(":")[0], g.is_met) for g in goals] == [
        ("small RAM store", True),
        ("small RAM retrieve", False),
    ]


def test_a_failing_or_missing_benchmark_never_hides_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(quick: bool) -> list[summary.Goal]:
        raise RuntimeError("the daemon did not start")

    def fine(quick: bool) -> list[summary.Goal]:
        return [summary.Goal("fine", f"quick={quick}", True)]

    benches = (
        summary._Bench("broken", broken),
        summary._Bench("absent", fine, needs="kvdepot_no_such_module"),
        summary._Bench("fine", fine),
    )
    monkeypatch.setattr(summary, "BENCHES", benches)
    goals = summary.run_all(quick=True)
    assert [(g.bench, g.is_met) for g in goals] == [
        ("broken", False),
        ("absent", None),
        ("fine", True),
    ]
    assert "the daemon did not start" in goals[0].goal
    text = summary.report(goals, quick=True)
    assert "goals met: 1 of 2; MISSED: broken" in text
    assert "skipped" in text
    assert [g.bench for g in summary.run_all(quick=False, names=["fine"])] == ["fine"]
