"""The lookup API: "how many leading tokens of this prompt are cached here, and in which tier",
by model name and tenant, answered by the store (`TieredStore.lookup_prompt`) and over the
daemon's HTTP (`POST /lookup`) from the recipes engines announce (`kvdepot.namespaces`)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvdepot import CacheEngine, load_config
from kvdepot.engine import recipe_of
from kvdepot.namespaces import Recipe, Recipes, Shard
from kvdepot.store import TieredStore, open_store
from tests.helpers import CHUNK, LAYOUTS, Daemon, free_port, kv_for, make_engine

CHUNK_ROOM = 3 * 2 * CHUNK * 2 * 8 * 4 + 256  # a float32 chunk of the helpers' layout, stored


def prompt(seed: int, num_tokens: int = 4 * CHUNK) -> list[int]:
    return [seed * 1000 + i for i in range(num_tokens)]


@pytest.fixture
def small(tmp_path: Path) -> Iterator[TieredStore]:
    """RAM for ~6 chunks over a disk: older chunks move to disk within a few prompts."""
    overrides = {"memory.capacity_bytes": 6 * CHUNK_ROOM, "memory.prefault": False,
                 "disk.path": str(tmp_path / "disk"), "disk.fsync": False}  # fmt: skip
    store = open_store(load_config(env={}, overrides=overrides))
    yield store
    store.close()


@pytest.fixture
def roomy() -> Iterator[TieredStore]:
    overrides = {"memory.capacity_bytes": 64 << 20, "memory.prefault": False}
    store = open_store(load_config(env={}, overrides=overrides))
    yield store
    store.close()


def test_a_lookup_by_model_name_counts_whole_chunks_by_tier(small: TieredStore) -> None:
    engine = make_engine(small, partial_match=False)
    engine.announce(["smol", "org/smol-135m"])
    engine.store(prompt(0), kv_for(engine, 4 * CHUNK))
    assert small.flush()
    answer = small.lookup_prompt("smol", [*prompt(0), 7, 8, 9], b"")
    assert (answer.cached_tokens, answer.prompt_tokens) == (4 * CHUNK, 4 * CHUNK + 3)
    assert answer.by_tier == {"memory": 4 * CHUNK}
    # The other name and the fingerprint find the same; a prompt that differs in chunk 2
    # counts chunks 0-1 only.
    assert small.lookup_prompt("org/smol-135m", prompt(0), b"").cached_tokens == 4 * CHUNK
    assert small.lookup_prompt("test-model", prompt(0), b"").cached_tokens == 4 * CHUNK
    changed = prompt(0)
    changed[2 * CHUNK + 5] = 1
    assert small.lookup_prompt("smol", changed, b"").cached_tokens == 2 * CHUNK
    # Two more prompts push prompt 0's chunks out of RAM (room for ~6): found on disk.
    for seed in (1, 2):
        engine.store(prompt(seed), kv_for(engine, 4 * CHUNK, seed))
        assert small.flush()
    answer = small.lookup_prompt("smol", prompt(0), b"")
    assert answer.cached_tokens == 4 * CHUNK
    assert answer.by_tier == {"disk": 4 * CHUNK}
    assert small.lookup_prompt("smol", prompt(2), b"").by_tier == {"memory": 4 * CHUNK}


def test_a_lookup_reads_nothing_and_counts_no_hit(small: TieredStore) -> None:
    engine = make_engine(small, partial_match=False)
    engine.announce(["smol"])
    engine.store(prompt(0), kv_for(engine, 4 * CHUNK))
    small.flush()
    small.memory.delete(engine.chunk_keys(prompt(0)))  # on disk only
    sample = small.metrics.registry.get_sample_value
    before = (sample("kvdepot_store_lookup_chunks_total"), sample("kvdepot_store_hit_chunks_total"))
    assert small.lookup_prompt("smol", prompt(0), b"").by_tier == {"disk": 4 * CHUNK}
    after = (sample("kvdepot_store_lookup_chunks_total"), sample("kvdepot_store_hit_chunks_total"))
    assert before == after
    assert small.memory.contains(engine.chunk_keys(prompt(0))) == [False] * 4  # not promoted


def test_tenants_and_unknown_models(small: TieredStore) -> None:
    engine = make_engine(small, partial_match=False)
    engine.announce(["smol"])
    engine.store(prompt(0), kv_for(engine, 4 * CHUNK), tenant_salt=b"alice")
    assert small.lookup_prompt("smol", prompt(0), b"alice").cached_tokens == 4 * CHUNK
    assert small.lookup_prompt("smol", prompt(0), b"bob").cached_tokens == 0
    assert small.lookup_prompt("smol", prompt(0), b"").cached_tokens == 0
    with pytest.raises(KeyError):
        small.lookup_prompt("other-model", prompt(0), b"alice")


def test_a_hit_needs_every_shard_and_the_best_setup_answers(roomy: TieredStore) -> None:
    """Two TP ranks' shards (fingerprints as vLLM's connector names them): a chunk counts
    only when both hold it; a second setup of the same model (fp16) answers when it holds
    more."""
    small = roomy
    ranks = [
        CacheEngine(
            small,
            LAYOUTS[torch.float32],
            f"m:tp{r}of2",
            chunk_size_tokens=CHUNK,
            partial_match=False,
        )
        for r in range(2)
    ]
    small.announce(recipe_of(ranks, ["smol"]))
    for r, engine in enumerate(ranks):
        engine.store(prompt(0), kv_for(engine, 4 * CHUNK, r))
    assert small.lookup_prompt("smol", prompt(0), b"").cached_tokens == 4 * CHUNK
    small.delete(ranks[1].chunk_keys(prompt(0))[2:3])  # rank 1 lost its shard of chunk 2
    assert small.lookup_prompt("smol", prompt(0), b"").cached_tokens == 2 * CHUNK
    half = make_engine(small, torch.float16, partial_match=False)
    half.announce(["smol"])
    half.store(prompt(0), kv_for(half, 3 * CHUNK))
    assert small.lookup_prompt("smol", prompt(0), b"").cached_tokens == 3 * CHUNK


def test_recipes_are_bounded_and_checked() -> None:
    recipes = Recipes(max_recipes=2)
    made = [Recipe((f"m{i}",), 16, "blake2b-128", (Shard("fp", "L"),)) for i in range(3)]
    for recipe in made:
        recipes.add(recipe)
    assert recipes.models() == ["m1", "m2"]
    assert recipes.of("m2") == [made[2]]
    with pytest.raises(ValueError):
        Recipe((), 16, "blake2b-128", (Shard("fp", "L"),)).check()
    with pytest.raises(ValueError):
        Recipe(("m",), 0, "blake2b-128", (Shard("fp", "L"),)).check()
    with pytest.raises(ValueError):
        Recipe(("m",), 16, "md5", (Shard("fp", "L"),)).check()


# ---- over the daemon's HTTP ---------------------------------------------------------------


def post(port: int, body: object, *, host: str = "127.0.0.1", token: str = "") -> tuple[int, dict]:  # type: ignore[type-arg]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/lookup", body=raw, headers=headers)
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data) if data.startswith(b"{") else {"text": data.decode()}


def test_the_daemon_answers_lookups_over_http_and_relearns_after_a_restart(tmp_path: Path) -> None:
    d = Daemon(tmp_path, http_port=free_port())
    d.start()
    client = d.client()
    try:
        engine = make_engine(client, partial_match=False)
        engine.announce(["smol"])
        engine.store(prompt(0), kv_for(engine, 4 * CHUNK), tenant_salt=b"t1")
        client.flush()
        status, answer = post(d.http_port, {"model": "smol", "tokens": prompt(0), "tenant": "t1"})
        assert status == 200
        assert answer == {"model": "smol", "cached_tokens": 4 * CHUNK,
                          "prompt_tokens": 4 * CHUNK, "chunk_size_tokens": CHUNK,
                          "by_tier": {"memory": 4 * CHUNK}}  # fmt: skip
        assert post(d.http_port, {"model": "smol", "tokens": prompt(0)})[1]["cached_tokens"] == 0
        status, answer = post(d.http_port, {"model": "nope", "tokens": [1]})
        assert status == 404 and answer["models"] == ["smol", "test-model"]
        assert post(d.http_port, {"model": "smol", "tokens": ["x"]})[0] == 400
        assert post(d.http_port, {"model": "smol", "tokens": [2**40]})[0] == 400
        assert post(d.http_port, b"{not json")[0] == 400
        assert post(d.http_port, {"model": "smol"})[0] == 400
        # A restarted daemon has lost the recipes (and RAM); the engine's client sends its
        # recipe again on reconnecting, and the chunks are still on disk.
        d.stop()
        d.start()
        deadline = time.monotonic() + 10  # the first call after the restart finds it gone
        while engine.lookup(prompt(0), tenant_salt=b"t1") != 4 * CHUNK:
            assert time.monotonic() < deadline, "the client did not reconnect"
            time.sleep(0.1)
        status, answer = post(d.http_port, {"model": "smol", "tokens": prompt(0), "tenant": "t1"})
        assert status == 200 and answer["by_tier"] == {"disk": 4 * CHUNK}
    finally:
        client.close()
        d.stop()


def test_keep_alive_serves_many_lookups_on_one_connection(tmp_path: Path) -> None:
    d = Daemon(tmp_path, http_port=free_port())
    d.start()
    client = d.client()
    try:
        engine = make_engine(client, partial_match=False)
        engine.announce(["smol"])
        engine.store(prompt(0), kv_for(engine, 4 * CHUNK))
        conn = http.client.HTTPConnection("127.0.0.1", d.http_port, timeout=10)
        body = json.dumps({"model": "smol", "tokens": prompt(0)}).encode()
        conn.request("POST", "/lookup", body=body)
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        for _ in range(20):
            conn.request("POST", "/lookup", body=body)
            response = conn.getresponse()
            assert json.loads(response.read())["cached_tokens"] == 4 * CHUNK
        assert conn.sock is sock  # the same connection throughout
        conn.close()
    finally:
        client.close()
        d.stop()


def outward_address() -> str | None:
    """This machine's address on its default route (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_off_loopback_a_lookup_needs_the_token(tmp_path: Path) -> None:
    address = outward_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    extra = ["--daemon-http-host", "0.0.0.0", "--daemon-token-file", str(token_file)]
    d = Daemon(tmp_path, http_port=free_port(), extra=extra)
    d.start()
    client = d.client()
    try:
        engine = make_engine(client, partial_match=False)
        engine.announce(["smol"])
        engine.store(prompt(0), kv_for(engine, 4 * CHUNK))
        body = {"model": "smol", "tokens": prompt(0)}
        assert post(d.http_port, body, host=address)[0] == 401
        assert post(d.http_port, body, host=address, token="wrong")[0] == 401
        status, answer = post(d.http_port, body, host=address, token="s3cret-token")
        assert status == 200 and answer["cached_tokens"] == 4 * CHUNK
        assert post(d.http_port, body)[0] == 200  # loopback: no token needed
    finally:
        client.close()
        d.stop()
