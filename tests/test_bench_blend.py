"""bench blend's report: paired TTFT ratios and goal lines from synthetic results."""

from __future__ import annotations

from pathlib import Path

from kvdepot.bench.blend import BlendBench, ModeResult, goal_lines, plot, report


def mode(name: str, ttft: list[float], identical: list[bool], kl: float) -> ModeResult:
    n = len(ttft)
    return ModeResult(
        name, ttft_s=ttft, correct=identical[:], identical=identical, kl=[kl] * n,
        recomputed_tokens=[0] * n, answers=[""] * n,
    )  # fmt: skip


def bench(blend_identical: list[bool], blend_kl: float, blend_ttft: list[float]) -> BlendBench:
    return BlendBench(
        [
            mode("full", [4.0, 8.0, 4.0], [True] * 3, 0.0),
            mode("naive", [0.3, 0.6, 0.3], [True, False, False], 0.12),
            mode("blend@0.15", blend_ttft, blend_identical, blend_kl),
        ],
        num_questions=3, context_tokens=2400.0, doc_tokens=(600, 610), goal_ratio=0.15,
    )  # fmt: skip


def test_goals_met_and_missed(tmp_path: Path) -> None:
    good = bench([True, True, True], 0.01, [1.0, 2.0, 1.0])  # 4x faster on every question
    assert [met for _, met in goal_lines(good)] == [True, True, True]
    text = report(good)
    assert "goal met: blend@0.15 TTFT <= full / 2.5: 4.00x faster" in text
    plot(good, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000

    # Slower than full / 2.5 on the median question; 67 % identical; no better than naive.
    bad = bench([True, True, False], 0.2, [2.0, 2.0, 2.0])
    assert [met for _, met in goal_lines(bad)] == [False, False, False]
    assert "MISSED" in report(bad)


def test_selection_specs_name_their_modes_and_configs() -> None:
    from kvdepot.bench.blend import blend_config, mode_name

    assert mode_name("deviation", 0.15) == "blend@0.15"
    assert mode_name("query:2", 0.3) == "query:2@0.3"
    config = blend_config("query:3")
    assert (config.selection, config.check_layer) == ("query", 3)
    assert blend_config("deviation").selection == "deviation"
    # The goals judge the first selection's mode at the goal ratio.
    judged = BlendBench(
        [mode("full", [4.0], [True], 0.0), mode("naive", [0.3], [False], 0.1),
         mode("query:2@0.15", [1.0], [True], 0.01)],
        num_questions=1, context_tokens=2400.0, doc_tokens=(600,), goal_ratio=0.15,
        goal_selection="query:2",
    )  # fmt: skip
    assert goal_lines(judged)[0][0].startswith("query:2@0.15 TTFT")
