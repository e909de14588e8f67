"""The Grafana dashboard and the alert rules, tested with a real Prometheus.

A real Prometheus server (Debian's `prometheus`, started here on loopback) scrapes a daemon
(RAM, disk and a real Valkey) and an engine (transformers connector in daemon mode, its own
registry served on a port) under a small workload: prompts stored, asked again, RAM pushed
over its budget, one chunk file corrupted on disk. Then every panel of
`deploy/grafana/kvdepot-dashboard.json` is evaluated and must return data, the values the
workload produced where the daemon says what they are; every alert of
`deploy/prometheus/kvdepot-alerts.yml` is evaluated (and those the workload causes must fire:
corrupt chunks, then the daemon down). `promtool test rules` checks each alert's firing and
quiet cases on synthetic series. The vLLM panels read `vllm serve`'s series: their names are
checked against a real scrape in tests/test_vllm_server.py.

Without a `prometheus` binary these tests skip, unless REQUIRE_PROMETHEUS=1 (CI sets it).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvdepot.bench.servers import LocalServer
from kvdepot.metrics_http import serve_metrics
from tests.helpers import Daemon, free_port, tiny_llama
from tests.promserver import ALERTS, ROOT, Prometheus, alert_rules, is_installed, panel_queries

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.servers"]

if not is_installed():
    if os.environ.get("REQUIRE_PROMETHEUS") == "1":
        raise RuntimeError("REQUIRE_PROMETHEUS=1 but prometheus/promtool are not installed")
    pytest.skip("prometheus is not installed (apt-get install prometheus)", allow_module_level=True)


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        ["promtool", "test", "rules", "alerts-test.yml"],
        cwd=ROOT / "tests" / "prometheus", capture_output=True, text=True,
    )  # fmt: skip
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


@pytest.fixture
def node(tmp_path: Path, valkey: LocalServer) -> Iterator[tuple[Daemon, Prometheus, Any]]:
    """A daemon (1 MiB of RAM, a disk, Valkey) and an engine using it, both scraped."""
    from kvdepot.connectors.transformers import KVDepotGenerator

    (tmp_path / "daemon").mkdir()
    daemon = Daemon(
        tmp_path / "daemon",
        http_port=free_port(),
        extra=["--memory-capacity-bytes", "1MiB", "--valkey-address",
               f"127.0.0.1:{valkey.port}", "--valkey-key-prefix", f"prom-{os.getpid()}"],
    ).start()  # fmt: skip
    client = daemon.client(client_name="engine")
    generator = KVDepotGenerator.for_model(tiny_llama(), client, chunk_size_tokens=16)
    engine_port = free_port()
    server = serve_metrics(client.metrics, "127.0.0.1", engine_port)
    assert server is not None
    # Every series the panels read exists before the first scrape (a counter that appears
    # with its first increment would show no increase to PromQL).
    warm = tokens(0, 100)
    generator.generate(warm, max_new_tokens=2)
    generator.generate(warm, max_new_tokens=2)
    client.flush()
    (tmp_path / "prom").mkdir()
    prometheus = Prometheus(tmp_path / "prom", {"kvdepot": daemon.http_port,
                                                "kvdepot-engine": engine_port})  # fmt: skip
    try:
        yield daemon, prometheus, generator
    finally:
        prometheus.stop()
        server.stop()
        client.close()
        daemon.stop()


def tokens(seed: int, count: int) -> list[int]:
    """A prompt of the tiny model's vocabulary (300 ids), different for every seed."""
    rng = random.Random(seed)
    return [rng.randrange(300) for _ in range(count)]


def daemon_tokens(daemon: Daemon) -> dict[str, float]:
    models = json.loads(daemon.http("/stats")[1])["models"]
    return {k: sum(float(m.get(k, 0)) for m in models.values())
            for k in ("looked_up", "hit", "prefill_seconds_saved")}  # fmt: skip


def test_every_panel_and_alert_returns_what_the_workload_produced(
    node: tuple[Daemon, Prometheus, Any],
) -> None:
    from kvdepot.tiers.disk import _SUFFIX

    daemon, prometheus, generator = node
    prometheus.wait_for('up{job="kvdepot"} == 1')
    prometheus.wait_for('up{job="kvdepot-engine"} == 1')
    prometheus.wait_scrapes()
    before = daemon_tokens(daemon)  # what the first scrapes saw: the warm-up
    prompts = [tokens(1 + i, 80) for i in range(4)]
    for prompt in prompts * 2:  # stored, then found
        generator.generate(prompt, max_new_tokens=2)
    for i in range(40):  # more than 1 MiB of RAM holds: the first prompts leave RAM
        generator.generate(tokens(100 + i, 64), max_new_tokens=1)
    generator.engine.backend.flush()
    key = generator.engine.chunk_keys(prompts[0])[1]
    path = daemon.root / "disk" / key.namespace.hex() / key.chunk_hash.hex()[:2]
    path = path / f"{key.chunk_hash.hex()}{_SUFFIX}"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a payload byte: only the checksum can tell
    path.write_bytes(bytes(data))
    generator.generate(prompts[0] + [7, 7, 7], max_new_tokens=1)  # reads it from the disk
    generator.engine.backend.flush()
    prometheus.wait_scrapes()
    after = daemon_tokens(daemon)
    stats = json.loads(daemon.http("/stats")[1])

    results = {}
    for title, expr in panel_queries():
        if "vllm:" in expr:
            continue  # vllm serve's series: tests/test_vllm_server.py
        found = prometheus.query(expr)
        assert found, f"panel {title!r} returns no data: {expr}"
        results.setdefault(title, []).extend(found)

    def one(title: str) -> float:
        (value,) = [v for _, v in results[title]]
        return value

    assert one("Token hit rate since start") == pytest.approx(after["hit"] / after["looked_up"])
    # A rate over the window: the workload's tokens (PromQL extrapolates both series alike,
    # to within a scrape interval of a ~40 s window).
    produced = (after["hit"] - before["hit"]) / (after["looked_up"] - before["looked_up"])
    assert one("Token hit rate (node)") == pytest.approx(produced, abs=0.03)
    assert one("Token hit rate by model") == pytest.approx(produced, abs=0.03)
    shares = {m["tier"]: v for m, v in results["Chunk hits by tier (share)"]}
    assert shares["memory"] > 0 and sum(shares.values()) == pytest.approx(1.0)
    misses = results["Missed tokens by reason"]
    reasons = {(m["reason"], m.get("tier", "")) for m, v in misses if v > 0}
    assert ("never_stored", "") in reasons
    assert one("Per-request hit ratio (median)") == 0  # 45 of the 49 requests were new
    assert all(v > 0 for _, v in results["Load seconds per request"])
    assert all(v > 0 for _, v in results["Save seconds per request"])
    bytes_by = {(m["tier"], m["op"]): v for m, v in results["Bytes per second by tier"]}
    assert bytes_by[("memory", "write")] > 0 and bytes_by[("disk", "write")] > 0
    evictions = {m["tier"]: v for m, v in results["Evictions per second"]}
    assert evictions["memory"] > 0 and evictions["disk"] == 0
    fill = {m["tier"]: v for m, v in results["Tier fill"] if m["job"] == "kvdepot"}
    memory = stats["tiers"]["memory"]
    assert fill["memory"] == pytest.approx(memory["used_bytes"] / memory["capacity_bytes"])
    queue = {m["job"]: v for m, v in results["Write-back queue and dropped writes"] if "job" in m}
    assert queue["kvdepot"] == 0  # flushed
    assert one("Prefill seconds saved since start") == pytest.approx(
        after["prefill_seconds_saved"], abs=2e-3
    )
    assert one("Prefill seconds saved since start") > 0
    assert {m["job"]: v for m, v in results["Targets up"]} == {"kvdepot": 1, "kvdepot-engine": 1}
    clients = {m["job"]: v for m, v in results["Connected clients"]}
    assert clients["kvdepot"] == 1
    degraded = {(m["tier"], v) for m, v in results["Degraded tiers"]}
    assert degraded == {("memory", 0), ("disk", 0), ("valkey", 0)}
    corrupt = {m.get("tier"): v for m, v in results["Corrupt chunks (deleted)"]}
    assert corrupt["disk"] == pytest.approx(1, abs=0.2)  # 1, extrapolated over the window
    assert corrupt["memory"] == 0 and corrupt["valkey"] == 0

    rules = alert_rules()
    assert prometheus.query(rules["KVDepotDaemonDown"]) == []
    assert prometheus.query(rules["KVDepotHitRateCollapse"]) == []
    assert prometheus.query(rules["KVDepotTierDegraded"]) == []
    dropped = stats["write_back"]["dropped"]
    found = {m["reason"] for m, _ in prometheus.query(rules["KVDepotDroppedWrites"])}
    assert found == set(dropped)  # the daemon's own count of dropped writes
    fired = prometheus.query(rules["KVDepotCorruptChunks"])
    assert [m["tier"] for m, _ in fired] == ["disk"]
    deadline = time.monotonic() + 30
    while prometheus.alerts().get("KVDepotCorruptChunks") != "firing":
        assert time.monotonic() < deadline, prometheus.alerts()
        time.sleep(0.5)

    daemon.stop()  # the daemon goes away: its target is down, the alert pending (for 1m)
    prometheus.wait_for('up{job="kvdepot"} == 0')
    assert [m["job"] for m, _ in prometheus.query(rules["KVDepotDaemonDown"])] == ["kvdepot"]
    deadline = time.monotonic() + 30
    while prometheus.alerts().get("KVDepotDaemonDown") not in ("pending", "firing"):
        assert time.monotonic() < deadline, prometheus.alerts()
        time.sleep(0.5)
    # The engine's own view still answers: its misses, by reason, from its port.
    engine_misses = prometheus.query('kvdepot_engine_miss_tokens_total{job="kvdepot-engine"}')
    assert {m["reason"] for m, _ in engine_misses} >= {"never_stored"}
