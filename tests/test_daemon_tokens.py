"""The daemon sees tokens: engines report token counts per model, and the daemon shows the
token hit rate for the node, per model (a bounded label) and per client."""

from __future__ import annotations

import json
from pathlib import Path

from kvdepot import CacheEngine, Metrics
from kvdepot.metrics import MAX_MODEL_LABELS
from tests.helpers import LAYOUTS, Daemon, free_port, kv_for, kvdepot_stats

CHUNK = 16


def test_model_labels_are_bounded() -> None:
    metrics = Metrics()
    labels = [metrics.model_label(f"model-{i}") for i in range(MAX_MODEL_LABELS + 3)]
    assert len(set(labels)) == MAX_MODEL_LABELS + 1 and labels[-1] == "other"
    assert metrics.model_label("model-0") == "model-0"  # known ones keep their label
    assert Metrics().model_label("x" * 500) == "x" * 48


def test_the_daemon_shows_token_hit_rates_per_model_and_client(tmp_path: Path) -> None:
    import torch

    daemon = Daemon(tmp_path, http_port=free_port()).start()
    try:
        a_client, b_client = daemon.client(client_name="engine-a"), daemon.client(client_name="b")
        layout = LAYOUTS[torch.float32]
        a = CacheEngine(a_client, layout, "org/model-a@main", chunk_size_tokens=CHUNK)
        b = CacheEngine(b_client, layout, "org/model-b@main", chunk_size_tokens=CHUNK)
        tokens = list(range(64))
        assert a.lookup(tokens) == 0
        assert a.store(tokens, kv_for(a, 64)) == 64
        assert a.lookup(tokens) == 64
        assert b.lookup(tokens) == 0  # another model: nothing shared
        a_client.flush()  # a call that waits: the posted reports are in
        b_client.flush()
        stats = json.loads(daemon.http("/stats")[1])
        model_a, model_b = stats["models"]["org/model-a@main"], stats["models"]["org/model-b@main"]
        assert (model_a["looked_up"], model_a["hit"], model_a["stored"]) == (128, 64, 64)
        assert model_a["hit_rate"] == 0.5
        assert (model_b["looked_up"], model_b.get("hit", 0), model_b["hit_rate"]) == (64, 0, 0.0)
        memory = stats["tiers"]["memory"]
        assert memory["written_bytes"] > 0 and memory["evictions"] == 0
        assert stats["tiers"]["disk"]["get_hits"] == 0  # everything came from RAM
        assert stats["write_back"]["dropped"] == {}
        clients = {c["name"]: c for c in stats["clients"]}
        assert clients["engine-a"]["hit_rate"] == 0.5
        assert clients["engine-a"]["models"] == ["org/model-a@main"]
        assert clients["b"]["hit_rate"] == 0.0
        metrics = daemon.http("/metrics")[1].decode()
        line = 'kvdepot_model_tokens_total{kind="hit",model="org/model-a@main"} 64.0'
        assert line in metrics
        shown = kvdepot_stats(daemon.socket_path)
        assert "tokens  looked up 192, hit 64 (33.3%) over 2 model(s)" in shown
        assert "org/model-a@main: looked up 128, hit 64 (50.0%)" in shown
        assert "engine-a" in shown and "token hit rate 50.0% of 128" in shown
        assert "write-back queue" in shown and "dropped none" in shown
        # Another engine of model a, with another chunk size: a's chunks are whole-chunk
        # misses for it (partial matching still finds the first 16 tokens).
        a32 = CacheEngine(b_client, layout, "org/model-a@main", chunk_size_tokens=2 * CHUNK)
        assert a32.lookup(tokens) < 64
        b_client.flush()
        setups = json.loads(daemon.http("/stats")[1])["models"]["org/model-a@main"]["setups"]
        assert len(setups) == 2 and any("chunk=32" in s for s in setups)
        shown = kvdepot_stats(daemon.socket_path)
        assert "! org/model-a@main: used in 2 setups whose chunks miss each other" in shown
        # b missed tokens that a holds: shown, as a hint that the two cannot share.
        assert "! org/model-b@main: 64 missed tokens are stored under another namespace" in shown
        assert "! org/model-b@main: used in" not in shown
        model_b = json.loads(daemon.http("/stats")[1])["models"]["org/model-b@main"]
        assert model_b["missed"] == {"other_namespace": 64}
        a_client.close()
        b_client.close()
    finally:
        daemon.stop()
