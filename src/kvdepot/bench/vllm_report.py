"""The vLLM head-to-head's samples, and the tables and goal lines made from them.

Pure code (torch only for the copy limit); runs in the benchmark's parent process, and its
`Sample` in each child. Every figure is a median or p90 over the samples of one run; every
ratio compares setups measured in that same run, on the same prompts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from kvdepot.tables import format_table

WORKLOADS = ("qa", "chat")
KVDEPOT_SETUPS = ("kvdepot", "kvdepot-daemon")
GOAL_VS_LMCACHE = 0.5
GOAL_VS_VLLM = 1.5
GOAL_COLD_SLOWDOWN = 0.05


@dataclass(frozen=True, slots=True)
class Sample:
    """One request, measured. `kind`: "cold", "warm", or, for the paired cold requests,
    "paired-store" (kvdepot stores it) and "paired-skip" (kvdepot skipped)."""

    workload: str
    group: int
    kind: str
    num_prompt: int
    num_cached: int
    ttft_s: float
    e2e_s: float
    output_ids: list[int]


@dataclass(frozen=True, slots=True)
class ChildResult:
    """All samples of one setup (one engine process); `error` if it failed part-way;
    `chunk_size_tokens`: its connector's chunk size (0: none, or not recorded)."""

    setup: str
    startup_s: float
    samples: list[Sample]
    error: str | None = None
    chunk_size_tokens: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChildResult:
        samples = [Sample(**s) for s in data["samples"]]
        chunk_tokens = int(data.get("chunk_size_tokens", 0))
        return cls(str(data["setup"]), float(data["startup_s"]), samples, data.get("error"),
                   chunk_tokens)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "setup": self.setup,
            "startup_s": self.startup_s,
            "error": self.error,
            "chunk_size_tokens": self.chunk_size_tokens,
            "samples": [asdict(s) for s in self.samples],
        }

    def select(self, workload: str, kind: str | None = None) -> list[Sample]:
        return [
            s for s in self.samples if s.workload == workload and (kind is None or s.kind == kind)
        ]


def merge_runs(runs: Sequence[Sequence[ChildResult]]) -> list[ChildResult]:
    """Several runs' results as one, setup by setup (in the first run's order); run k's
    groups are renumbered so that its cold pairs stay pairs."""
    merged: dict[str, ChildResult] = {}
    for k, run in enumerate(runs):
        for result in run:
            samples = [replace(s, group=s.group + 1000 * k) for s in result.samples]
            if result.setup not in merged:
                merged[result.setup] = replace(result, samples=samples)
                continue
            before = merged[result.setup]
            error = before.error or result.error
            startup_s = min(before.startup_s, result.startup_s)
            # Runs with different chunk sizes merge into "?": their figures don't compare.
            same = before.chunk_size_tokens == result.chunk_size_tokens
            chunk = before.chunk_size_tokens if same else 0
            merged[result.setup] = ChildResult(result.setup, startup_s, before.samples + samples,
                                               error, chunk)  # fmt: skip
    return list(merged.values())


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return p50(values)
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def hit_rate(samples: Sequence[Sample]) -> float:
    num_prompt = sum(s.num_prompt for s in samples)
    return sum(s.num_cached for s in samples) / num_prompt if num_prompt else float("nan")


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    """One setup on one workload: TTFTs by kind, and the workload's throughput."""

    ttft_s: dict[str, list[float]]
    warm_computed_tokens: float
    warm_hit_rate: float
    requests_per_s: float
    tokens_per_s: float

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> WorkloadStats:
        wall_s = sum(s.e2e_s for s in samples)
        warm = [s for s in samples if s.kind == "warm"]
        return cls(
            {k: [s.ttft_s for s in samples if s.kind == k] for k in ("cold", "warm", "repeat")},
            p50([s.num_prompt - s.num_cached for s in warm]),
            hit_rate(warm),
            len(samples) / wall_s if wall_s else float("nan"),
            sum(len(s.output_ids) for s in samples) / wall_s if wall_s else float("nan"),
        )

    def p50(self, kind: str) -> float:
        return p50(self.ttft_s[kind])


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def workload_table(results: Sequence[ChildResult], workload: str) -> str:
    """TTFT p50/p90 per kind of request, hit rate, throughput, and kvdepot's ratios."""
    by_setup = {r.setup: r for r in results}
    stats = {r.setup: WorkloadStats.of(r.select(workload)) for r in results}
    kinds = [k for k in ("cold", "warm", "repeat") if any(s.ttft_s[k] for s in stats.values())]
    ours = stats.get("kvdepot") or stats.get("kvdepot-daemon")
    header = ["setup"]
    for kind in kinds:
        header += [f"{kind} p50 s", f"{kind} p90 s"]
    header += ["warm computed tok", "warm hit", "req/s", "gen tok/s", "same output"]
    header += [f"kvdepot {k} ÷" for k in kinds] + ["kvdepot req/s ÷"]
    rows = []
    for setup, s in stats.items():
        row: list[object] = [setup]
        for kind in kinds:
            row += [s.p50(kind), p90(s.ttft_s[kind])]
        same = same_outputs(by_setup[setup], by_setup["vllm"], workload)
        row += [s.warm_computed_tokens, f"{s.warm_hit_rate:.1%}", s.requests_per_s,
                s.tokens_per_s, same]  # fmt: skip
        if ours is None:
            row += ["-"] * (len(kinds) + 1)
        else:
            row += [_ratio(ours.p50(k), s.p50(k)) for k in kinds]
            row += [_ratio(ours.requests_per_s, s.requests_per_s)]
        rows.append(row)
    samples = results[0].select(workload)
    sizes = sorted(s.num_prompt for s in samples)
    counts = ", ".join(f"{sum(s.kind == k for s in samples)} {k}" for k in kinds)
    title = f"{workload}: {len(samples)} requests ({counts})"
    if sizes:
        title += f", prompts of {sizes[0]}-{sizes[-1]} tokens"
    return f"{title}\n{format_table(header, rows)}"


def same_outputs(result: ChildResult, base: ChildResult, workload: str) -> str:
    """How many of the workload's greedy outputs equal plain vLLM's, as "k/n"."""
    pairs = list(zip(result.select(workload), base.select(workload), strict=False))
    return f"{sum(a.output_ids == b.output_ids for a, b in pairs)}/{len(pairs)}"


def cold_ratio(ours: ChildResult, base: ChildResult) -> float:
    """Median over cold prompts (QA and chat) of our TTFT / the baseline's, prompt by prompt."""
    pairs = zip(_cold(ours), _cold(base), strict=False)
    return p50([a.ttft_s / b.ttft_s for a, b in pairs if a.num_prompt == b.num_prompt])


def _cold(result: ChildResult) -> list[Sample]:
    return [s for w in WORKLOADS for s in result.select(w, "cold")]


def paired_ratio(result: ChildResult) -> tuple[float, float, float, int]:
    """(median TTFT storing, median skipping, median per-pair ratio, pairs) of the cold pairs."""
    store = {s.group: s.ttft_s for s in result.select("paired", "paired-store")}
    skip = {s.group: s.ttft_s for s in result.select("paired", "paired-skip")}
    ratios = [store[g] / skip[g] for g in store if g in skip]
    return p50(list(store.values())), p50(list(skip.values())), p50(ratios), len(ratios)


def _goal(name: str, value: float, limit: float, detail: str) -> str:
    verdict = "met" if value <= limit else "MISSED"
    return f"goal {name}: {value:.2f} (limit {limit:.2f}) -> {verdict}; {detail}"


def goal_lines(results: Sequence[ChildResult]) -> list[str]:
    by_setup = {r.setup: r for r in results}
    lines = []
    for ours in (by_setup[s] for s in KVDEPOT_SETUPS if s in by_setup):
        lines += _warm_goals(ours, by_setup)
        if _cold(ours):  # QA or chat ran (the users workload's cold requests queue)
            cross = cold_ratio(ours, by_setup["vllm"])
            detail = "median per-prompt TTFT ratio - 1 (engine-to-engine noise included)"
            lines.append(_goal(f"{ours.setup} cold slowdown <= 5 % vs vllm, separate engines",
                               cross - 1, GOAL_COLD_SLOWDOWN, detail))  # fmt: skip
        store_s, skip_s, ratio, num_pairs = paired_ratio(ours)
        if num_pairs:
            detail = (f"{num_pairs} pairs, stored {store_s:.3f} s vs skipped {skip_s:.3f} s "
                      "(median per-pair ratio - 1)")  # fmt: skip
            lines.append(_goal(f"{ours.setup} cold slowdown <= 5 %, paired in one engine",
                               ratio - 1, GOAL_COLD_SLOWDOWN, detail))  # fmt: skip
    return lines


def _warm_goals(ours: ChildResult, by_setup: dict[str, ChildResult]) -> list[str]:
    peers = [("vllm", GOAL_VS_VLLM, "vLLM prefix-cache hit")]
    if "lmcache" in by_setup:
        peers.insert(0, ("lmcache", GOAL_VS_LMCACHE, "LMCache"))
    lines = []
    for workload in WORKLOADS:
        mine = WorkloadStats.of(ours.select(workload))
        for kind in ("warm", "repeat"):
            if not mine.ttft_s[kind]:
                continue
            for peer, limit, label in peers:
                theirs = WorkloadStats.of(by_setup[peer].select(workload)).p50(kind)
                name = f"{ours.setup} {kind} TTFT <= {limit} x {label} ({workload})"
                detail = f"{mine.p50(kind):.3f} s vs {theirs:.3f} s"
                lines.append(_goal(name, _ratio(mine.p50(kind), theirs), limit, detail))
    return lines


def copy_limit_s(num_tokens: int, repeats: int = 5) -> float:
    """Median time to copy SmolLM2's fp32 KV of `num_tokens` into a touched buffer."""
    import torch

    from kvdepot.layout import DType, KVLayout

    nbytes = KVLayout(30, 3, 64, DType.FLOAT32).bytes_per_token * num_tokens
    src, dst = torch.ones(nbytes // 4), torch.zeros(nbytes // 4)
    return _median_time(lambda: dst.copy_(src), repeats)


def _median_time(run: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def chunk_line(results: Sequence[ChildResult]) -> str:
    """The connectors' chunk sizes, e.g. "chunk size (tokens): kvdepot 128, lmcache 128"."""
    sizes = [f"{r.setup} {r.chunk_size_tokens or '?'}" for r in results
             if r.setup in (*KVDEPOT_SETUPS, "lmcache")]  # fmt: skip
    return "chunk size (tokens): " + (", ".join(sizes) or "-")


def report(results: Sequence[ChildResult]) -> str:
    present = [w for w in (*WORKLOADS, "users") if any(r.select(w) for r in results)]
    tables = [workload_table(results, w) for w in present] or ["(no requests ran)"]
    parts = [chunk_line(results) + "\n\n" + tables[0], *tables[1:]]
    head = len(parts)
    ours = next((r for r in results if r.setup == "kvdepot"), results[0])
    for workload in WORKLOADS:
        warm = [s.num_cached for s in ours.select(workload, "warm")]
        if warm:
            num = int(p50(warm))
            parts.append(
                f"KV copy limit, {workload} (median warm hit, {num} tokens): "
                f"{copy_limit_s(num):.3f} s"
            )
    parts.append("startup s: " + ", ".join(f"{r.setup} {r.startup_s:.0f}" for r in results))
    parts += [f"{r.setup} FAILED (its table rows cover what it ran before): {r.error}"
              for r in results if r.error is not None]  # fmt: skip
    parts += goal_lines(results)
    return "\n\n".join(parts[:head]) + "\n\n" + "\n".join(parts[head:])
