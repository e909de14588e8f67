"""`kvdepot bench`: every registered benchmark is a subcommand with its own flags and help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvdepot.bench import BENCHMARKS, Benchmark
from kvdepot.cli import build_parser, main


def test_bench_help_lists_every_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for benchmark in BENCHMARKS:
        assert f"{benchmark.name} {benchmark.help}" in out


@pytest.mark.parametrize("benchmark", BENCHMARKS, ids=lambda b: b.name)
def test_each_benchmark_has_its_help_without_its_extras(
    benchmark: Benchmark, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", benchmark.name, "--help"])  # `pages` too, where vLLM is not installed
    assert exit_info.value.code == 0
    assert f"usage: kvdepot bench {benchmark.name} [-h]" in capsys.readouterr().out


def test_flags_and_defaults_come_from_the_benchmark_module() -> None:
    args = build_parser().parse_args(["bench", "tiers", "--total-mib", "8"])
    assert (args.layouts, args.total_mib, args.repeats, args.strict) == ("small,7b", 8, 7, False)
    args = build_parser().parse_args(["bench", "all", "--quick"])
    assert (args.quick, args.only, args.json, args.strict) == (True, "", None, False)


def test_other_commands_load_no_benchmark_module() -> None:
    code = (
        "import sys; from kvdepot.cli import build_parser; build_parser().parse_args(['config']);"
        "print(sorted(m for m in sys.modules if m.startswith('kvdepot.bench.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_flags_are_refused_except_where_the_benchmark_parses_its_own() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "tiers", "--no-such-flag"])
    assert exit_info.value.code == 2
    args, rest = build_parser().parse_known_args(["bench", "vllm", "--setups", "vllm", "-h"])
    assert args.benchmark.parses_own_flags
    assert rest == ["--setups", "vllm", "-h"]


def test_a_benchmark_error_is_a_message_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "tiers", "--layouts", "small,no-such-layout"]) == 2
    assert "unknown layouts ['no-such-layout']" in capsys.readouterr().err
