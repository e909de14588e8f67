"""llama.cpp (`llama-cpp-python`) with kvdepot, on the real SmolLM2 GGUF: greedy outputs equal
to llama.cpp alone for full, partial and no hits, in this process and in a fresh process
through the daemon; corrupt or foreign state is a miss; the state parser agrees with real
blobs byte for byte.

llama-cpp-python builds from source (~10-22 minutes on 2 cores), so it lives in its own
environment and these tests skip without it: `benchmarks/llama-cpp-check.sh` sets it up and
runs them (docs/benchmarks.md has the results)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_cpp")

from kvdepot import load_config
from kvdepot.connectors.llama_cpp import (
    KVDepotLlama,
    _no_extra_buffer_types,
    load_llama,
)
from kvdepot.connectors.llama_state import build, parse
from kvdepot.connectors.model import gguf_path
from kvdepot.store import TieredStore, open_store
from kvdepot.tiers.disk import DiskTier
from tests.helpers import Daemon

REPO = Path(__file__).resolve().parents[1]
CHUNK = 128
MAX_TOKENS = 12
TEXT = ("The harbour town keeps a ledger of every ship that docks: its name, its cargo, the "
        "day it came and the day it left. ") * 30  # fmt: skip


def llama() -> Any:
    return load_llama(gguf_path(), n_ctx=2048, n_threads=2, seed=0)


def store(disk: Path | None = None) -> TieredStore:
    overrides: dict[str, object] = {"memory.capacity_bytes": 256 << 20, "memory.prefault": False}
    if disk is not None:
        overrides |= {"disk.path": str(disk), "disk.fsync": False}
    return open_store(load_config(env={}, overrides=overrides))


def plain(tokens: list[int]) -> list[int]:
    """llama.cpp alone, in a fresh context: the reference."""
    model = llama()
    out = []
    for token in model.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if token == model.token_eos():
            break
        out.append(int(token))
        if len(out) >= MAX_TOKENS:
            break
    return out


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    model = llama()
    base = list(model.tokenize(TEXT.encode(), add_bos=True, special=True))
    question = list(model.tokenize(b" Question: what does the ledger keep? Answer:",
                                   add_bos=False, special=True))  # fmt: skip
    other = list(model.tokenize(b" Question: who reads the ledger each night? Answer:",
                                add_bos=False, special=True))  # fmt: skip
    return {
        "full": base + question,
        "partial": base[:300] + other,  # 2 whole chunks and 44 tokens of the third
        "miss": list(reversed(base))[:200] + question,
    }


@pytest.fixture(scope="module")
def reference(prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    return {name: plain(tokens) for name, tokens in prompts.items()}


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[TieredStore]:
    s = store(tmp_path / "disk")
    yield s
    s.close()


def test_the_parser_agrees_with_real_blobs_byte_for_byte(prompts: dict[str, list[int]]) -> None:
    model = KVDepotLlama(llama(), store(), chunk_size_tokens=CHUNK)
    assert model.format is not None and model.format.n_layer == 30
    model.llama.eval(prompts["full"][:257])
    blob = model._state()
    fmt, kv = parse(blob)
    assert fmt == model.format and kv.shape == (30, 2, 257, fmt.row_bytes)
    assert build(fmt, kv).tobytes() == bytes(blob)
    # The first 100 tokens rebuilt are what llama.cpp writes for a 100-token context.
    model._forget(100)
    assert build(fmt, kv[:, :, :100]).tobytes() == bytes(model._state())


def test_outputs_equal_llama_cpp_alone_for_full_partial_and_no_hits(
    cache: TieredStore, prompts: dict[str, list[int]], reference: dict[str, list[int]]
) -> None:
    first = KVDepotLlama(llama(), cache, chunk_size_tokens=CHUNK)
    assert first.generate(prompts["full"], MAX_TOKENS) == reference["full"]  # cold: stores
    for name, restored in (("full", len(prompts["full"])), ("partial", 300), ("miss", 0)):
        fresh = KVDepotLlama(llama(), cache, chunk_size_tokens=CHUNK)  # a new context
        tokens = prompts[name]
        assert fresh.engine is not None
        assert fresh.engine.lookup(tokens) == restored, name
        assert fresh.generate(tokens, MAX_TOKENS) == reference[name], name
    # In one context: a second question after the first reuses llama.cpp's own context.
    assert first.generate(prompts["partial"], MAX_TOKENS) == reference["partial"]


def test_a_corrupt_chunk_or_another_llama_cpp_version_is_a_miss(
    cache: TieredStore,
    prompts: dict[str, list[int]],
    reference: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import llama_cpp

    first = KVDepotLlama(llama(), cache, chunk_size_tokens=CHUNK)
    first.generate(prompts["full"], MAX_TOKENS)
    assert first.engine is not None
    keys = first.engine.chunk_keys(prompts["full"])
    assert cache.flush()
    cache.memory.delete(keys)  # read from disk from now on (checksummed there)
    disk = cache.lower[0]
    assert isinstance(disk, DiskTier)
    path = disk._path(keys[1])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # a flipped payload byte: its checksum fails
    path.write_bytes(bytes(raw))
    fresh = KVDepotLlama(llama(), cache, chunk_size_tokens=CHUNK)
    assert fresh.prepare(prompts["full"]) == CHUNK  # chunk 0 only; chunk 1 is a miss
    assert fresh.generate(prompts["full"], MAX_TOKENS) == reference["full"]
    monkeypatch.setattr(llama_cpp, "__version__", "0.3.99")  # another state format version
    newer = KVDepotLlama(llama(), cache, chunk_size_tokens=CHUNK)
    assert newer.engine is not None and newer.engine.lookup(prompts["full"]) == 0
    assert newer.generate(prompts["full"], MAX_TOKENS) == reference["full"]


SCRIPT = """
import json, sys
from kvdepot import load_config
from kvdepot.connectors.llama_cpp import KVDepotLlama
from kvdepot.connectors.model import gguf_path
spec = json.loads(sys.argv[1])
config = load_config(env={}, overrides={"mode": "daemon", "chunk_size_tokens": 128,
                                        "daemon.socket_path": spec["socket"]})
model = KVDepotLlama.open(gguf_path(), config, n_ctx=2048, n_threads=2, seed=0)
restored = model.engine.lookup(spec["tokens"])
tokens = model.generate(spec["tokens"], spec["max_tokens"])
model.engine.backend.flush()
print(json.dumps({"restored": restored, "tokens": tokens}))
"""


def test_a_fresh_process_hits_through_the_daemon(
    tmp_path: Path, prompts: dict[str, list[int]], reference: dict[str, list[int]]
) -> None:
    d = Daemon(tmp_path, extra=["--memory-capacity-bytes", "256MiB"])
    d.start()
    try:
        runs = []
        for _ in range(2):
            spec = {"socket": str(d.socket_path), "tokens": prompts["full"],
                    "max_tokens": MAX_TOKENS}  # fmt: skip
            argv = [sys.executable, "-c", SCRIPT, json.dumps(spec)]
            done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                                  check=True)  # fmt: skip
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        d.stop()
    assert runs[0]["restored"] == 0 and runs[1]["restored"] == len(prompts["full"])
    assert runs[0]["tokens"] == runs[1]["tokens"] == reference["full"]


def test_the_amx_workaround_turns_extra_buffer_types_off_while_loading() -> None:
    """llama.cpp's AMX matmul (an extra buffer type) crashes the first decode on some Intel
    CPUs: `load_llama` loads with extra buffer types off, and leaves the default alone."""
    import llama_cpp.llama_cpp as low

    assert low.llama_model_default_params().use_extra_bufts  # llama.cpp's default
    with _no_extra_buffer_types():
        assert not low.llama_model_default_params().use_extra_bufts
    assert low.llama_model_default_params().use_extra_bufts
    model = llama()  # and the model so loaded decodes on this CPU
    model.eval(model.tokenize(b"The capital of France is", add_bos=True))
    assert model.n_tokens > 0
