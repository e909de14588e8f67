"""Benchmarks, runnable as `kvdepot bench <name>`; each reports ratios to a limit it measures.

Benchmarks run in the caller's process and are never imported by the library itself.

This module owns the registry the CLI loops over: `BENCHMARKS`, one `Benchmark` record per
`kvdepot bench <name>`, in the order `kvdepot bench --help` lists them. Each record names the
module that declares the benchmark's flags (`add_arguments`) and runs it (`cli_main`). That
module is imported only when its benchmark is chosen, so `kvdepot serve` (which the tests and
the chaos suite start again and again) and the other commands never load benchmark code.
A benchmark module imports without its extras (vLLM, transformers, the servers) and loads
them when it runs, so `kvdepot bench <name> --help` works anywhere. Adding a benchmark is one
record here and those two functions in its module.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Protocol, cast


class BenchmarkModule(Protocol):
    """What the CLI needs of a benchmark's module."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the benchmark's flags, with their defaults, on `parser`."""

    def cli_main(self, args: argparse.Namespace) -> int:
        """Run the benchmark with the parsed flags, print its report; the exit status."""


@dataclass(frozen=True, slots=True)
class Benchmark:
    """One `kvdepot bench <name>`."""

    name: str
    """The subcommand."""
    help: str
    """Its line in `kvdepot bench --help` (kept here: listing it imports nothing)."""
    module: str
    """Import path of its `BenchmarkModule`."""
    parses_own_flags: bool = False
    """The module parses the command line after the name itself (`args.rest`; `-h` included),
    instead of declaring flags in `add_arguments`."""

    def load(self) -> BenchmarkModule:
        """Import the benchmark's module."""
        return cast(BenchmarkModule, importlib.import_module(self.module))


BENCHMARKS = (
    Benchmark(
        "tiers", "RAM/disk tier GB/s and lookup latency vs plain copies and files",
        "kvdepot.bench.tiers",
    ),
    Benchmark(
        "daemon", "store/retrieve GB/s through the daemon vs /dev/shm; lookup latency",
        "kvdepot.bench.daemon",
    ),
    Benchmark(
        "remote", "Valkey and S3 tier GB/s vs raw client GET/SET and get/put_object",
        "kvdepot.bench.remote",
    ),
    Benchmark(
        "ttft", "TTFT on the real model: cold, warm RAM, warm disk, vs copy+decode limit",
        "kvdepot.bench.ttft",
    ),
    Benchmark(
        "codecs", "codec ratio, GB/s and model quality (perplexity, greedy) on real KV",
        "kvdepot.bench.codecs",
    ),
    Benchmark(
        "blend", "CacheBlend: quality and TTFT on multi-document QA vs full prefill",
        "kvdepot.bench.blend",
    ),
    Benchmark(
        "pages", "vLLM connector page copies vs a plain copy (needs the vllm extra)",
        "kvdepot.bench.pages",
    ),
    Benchmark(
        "all", "every benchmark (small with --quick), then a table of goals met/missed",
        "kvdepot.bench.summary",
    ),
    Benchmark(
        "chaos", "fault injection on real daemons and servers: wrong bytes, lost chunks",
        "kvdepot.bench.chaos",
    ),
    Benchmark(
        "vllm", "vLLM head-to-head: TTFT with kvdepot vs peers (flags: kvdepot bench vllm -h)",
        "kvdepot.bench.vllm", parses_own_flags=True,
    ),
)  # fmt: skip
