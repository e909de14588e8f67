"""The demo's chart: warm bars readable beside 20-second cold ones, speed-ups labelled."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvdepot.demo import DemoResult, Record, machine, plot, speedups


def result() -> DemoResult:
    cold = [Record("q1", 2300, 0, 20.0, "a"), Record("q2", 4100, 0, 40.0, "b")]
    warm_ram = [Record("q1", 2300, 2299, 0.25, "a"), Record("q2", 4100, 4099, 0.5, "b")]
    warm_disk = [Record("q1", 2300, 2299, 0.4, "a"), Record("q2", 4100, 4099, 0.4, "b")]
    return DemoResult(records={"cold": cold, "warm RAM": warm_ram, "warm disk": warm_disk})


def test_each_request_gets_its_speed_up_over_its_fastest_warm_pass() -> None:
    assert speedups(result()) == [pytest.approx(80.0), pytest.approx(100.0)]


def test_the_chart_is_drawn_on_a_log_scale_with_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    shown: list[object] = []
    original = plt.Figure.savefig

    def capture(fig: object, *args: object, **kwargs: object) -> None:
        shown.append(fig)
        original(fig, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(plt.Figure, "savefig", capture)
    plot(result(), tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 10_000
    (ax,) = shown[0].axes  # type: ignore[attr-defined]
    assert ax.get_yscale() == "log"
    texts = [t.get_text() for t in ax.texts]
    assert "80x faster" in texts and "100x faster" in texts
    assert "0.25 s" in texts and "20 s" in texts
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q1\n2,300 tokens", "q2\n4,100 tokens"]
    assert machine() in ax.get_title()
