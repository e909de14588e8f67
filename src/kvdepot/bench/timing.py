"""Timing helpers shared by the benchmarks: medians of repeated runs, GB/s, tables."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from kvdepot.tables import format_table

__all__ = ["format_table", "gbps", "median_seconds", "paired_seconds"]


def median_seconds(
    run: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None
) -> float:
    """Median wall time of `run` over `repeats` runs, `setup` (untimed) before each."""
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def paired_seconds(
    limit: Callable[[], object],
    ours: Callable[[], object],
    repeats: int,
    *,
    limit_setup: Callable[[], object] | None = None,
    ours_setup: Callable[[], object] | None = None,
) -> tuple[float, float, float]:
    """Median seconds of `limit` and `ours`, and the median of their per-pair ratios.

    The two alternate (limit, ours, limit, ours, ...), so slow drifts of a shared machine
    (other tenants, the host's disk cache) hit both sides alike.
    """
    limit_s, ours_s, ratios = [], [], []
    for _ in range(repeats):
        limit_s.append(median_seconds(limit, 1, limit_setup))
        ours_s.append(median_seconds(ours, 1, ours_setup))
        ratios.append(limit_s[-1] / ours_s[-1])
    return statistics.median(limit_s), statistics.median(ours_s), statistics.median(ratios)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")
