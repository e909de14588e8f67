"""Helpers shared by the test modules: chunks and keys, tier metrics, a small engine, a real
`kvdepot serve` process, tiny random Llamas.

Test modules import from here (`from tests.helpers import ...`), never from each other; so do
the scripts some tests run in child processes (from the repository root). Fixtures live in
conftest.py, the server fixtures in tests/servers.py. conftest.py registers this module for
pytest's assert rewriting. transformers is imported only by the helpers that need it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvdepot.codec import HEADER_NBYTES, EncodedChunk, RawCodec, encode_chunk
from kvdepot.daemon.client import DaemonClient
from kvdepot.engine import CacheEngine
from kvdepot.keys import CacheNamespace, ChunkHash, ChunkKey, chunk_keys
from kvdepot.layout import DType, KVLayout
from kvdepot.metrics import Metrics
from kvdepot.store import ChunkStore, TieredStore

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

# ---- chunks and keys --------------------------------------------------------------------


def random_key(namespace: bytes = bytes(16)) -> ChunkKey:
    return ChunkKey(namespace, ChunkHash(os.urandom(16)))


def make_keys(count: int, namespace: bytes = bytes(16)) -> list[ChunkKey]:
    return [random_key(namespace) for _ in range(count)]


def fp16_array(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal fp16 values determined by `seed`."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float16)


def raw_chunk(array: np.ndarray) -> EncodedChunk:
    """`array` (fp16) as a raw-codec chunk."""
    return encode_chunk(array, DType.FLOAT16, RawCodec())


def make_chunk(seed: int, shape: tuple[int, ...] = (2, 2, 8, 2, 4)) -> EncodedChunk:
    """A raw fp16 chunk whose content is determined by `seed`."""
    return raw_chunk(fp16_array(seed, shape))


def chunk_bytes(chunk: EncodedChunk, key: ChunkKey | None = None) -> bytes:
    """The blob of `chunk` as the RAM tier keeps it (bound to `key` when given, unsealed)."""
    buf = bytearray(chunk.nbytes)
    (chunk if key is None else chunk.bound(key)).write_into(memoryview(buf))
    return bytes(buf)


def blob_of(chunk: EncodedChunk, key: ChunkKey) -> bytes:
    """The blob of `chunk` as the disk and remote tiers store it: bound to `key`, sealed."""
    sealed = chunk.bound(key).sealed()
    return sealed.header.pack() + bytes(sealed.contiguous_payload())


# ---- metrics ----------------------------------------------------------------------------


def tier_ops(metrics: Metrics, tier: str, op: str, outcome: str) -> float:
    """`kvdepot_tier_ops_total` of one tier, op and outcome (0 if never counted)."""
    labels = {"tier": tier, "op": op, "outcome": outcome}
    return metrics.registry.get_sample_value("kvdepot_tier_ops_total", labels) or 0.0


# ---- a small engine ---------------------------------------------------------------------

CHUNK = 16
LAYOUTS = {
    torch.float32: KVLayout(3, 2, 8, DType.FLOAT32),
    torch.float16: KVLayout(3, 2, 8, DType.FLOAT16),
    torch.bfloat16: KVLayout(3, 2, 8, DType.BFLOAT16),
}
_TORCH_DTYPES = {
    DType.FLOAT32: torch.float32,
    DType.FLOAT16: torch.float16,
    DType.BFLOAT16: torch.bfloat16,
}


def make_engine(store: ChunkStore, dtype: torch.dtype = torch.float32, **kw: object) -> CacheEngine:
    """An engine of 3 layers, 2 KV heads, head size 8 and `CHUNK`-token chunks."""
    return CacheEngine(store, LAYOUTS[dtype], "test-model", chunk_size_tokens=CHUNK, **kw)  # type: ignore[arg-type]


def kv_for(engine: CacheEngine, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """Random KV of `num_tokens` in `engine`'s layout and dtype."""
    g = torch.Generator().manual_seed(seed)
    shape = engine.layout.chunk_shape(num_tokens)
    return torch.randn(shape, generator=g).to(_TORCH_DTYPES[engine.layout.dtype])


def corrupt_header(store: TieredStore, key: ChunkKey) -> None:
    """Overwrite a stored chunk's magic in RAM, as a stray write would: it no longer parses."""
    with store.memory.read([key], record=False) as (view,):
        assert view is not None
        view[:4] = b"XXXX"


# ---- a real daemon ----------------------------------------------------------------------


def kvdepot_stats(socket_path: Path) -> str:
    """What `kvdepot stats` prints for the daemon on `socket_path`."""
    return subprocess.run(
        [sys.executable, "-m", "kvdepot.cli", "stats", "--daemon-socket-path", str(socket_path)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_DAEMON_NS = CacheNamespace("daemon-test-model", "L2-2-H2-D8-float16")
_DAEMON_SHAPE = (2, 2, 16, 2, 8)
_DAEMON_BIG_SHAPE = (8, 2, 16, 8, 512)  # 2 MiB of fp16


def chain(seed: int, num_chunks: int = 4) -> list[ChunkKey]:
    """The keys of a `num_chunks`-chunk prompt of 16-token chunks, one prompt per `seed`."""
    return chunk_keys([seed * 100_000 + i for i in range(num_chunks * 16)], 16, _DAEMON_NS)


def payload(seed: int, index: int, *, big: bool = False) -> np.ndarray:
    """The KV of chunk `index` of `chain(seed)` (2 MiB when `big`)."""
    rng = np.random.default_rng(seed * 1000 + index)
    return rng.standard_normal(_DAEMON_BIG_SHAPE if big else _DAEMON_SHAPE).astype(np.float16)


def items_for(
    seed: int, num_chunks: int = 4, *, big: bool = False
) -> list[tuple[ChunkKey, object]]:
    """`chain(seed)` with its `payload`s, ready for `put`."""
    return [
        (key, raw_chunk(payload(seed, i, big=big))) for i, key in enumerate(chain(seed, num_chunks))
    ]


def blob_payload(blob: bytes | memoryview) -> bytes:
    return bytes(blob[HEADER_NBYTES:])


@dataclass
class Daemon:
    """A `kvdepot serve` process; `kill` (SIGKILL) and `start` again at will."""

    root: Path
    extra: list[str] = field(default_factory=list)
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "daemon.sock"

    def start(self) -> Daemon:
        args = [
            sys.executable, "-m", "kvdepot.cli", "serve",
            "--daemon-socket-path", str(self.socket_path),
            "--memory-capacity-bytes", "32MiB", "--memory-prefault", "false",
            "--disk-path", str(self.root / "disk"), "--disk-fsync", "false",
            "--daemon-http-port", str(self.http_port), "--daemon-lease-ttl-s", "1",
            *self.extra,
        ]  # fmt: skip
        log = self.root / "daemon.log"
        with open(log, "ab") as sink:
            self.proc = subprocess.Popen(args, stdout=sink, stderr=sink)
        deadline = time.monotonic() + 60  # ~1 s alone; far more beside busy engines
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {log.read_text()}")
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(self.socket_path))
                    return self
                except OSError:
                    time.sleep(0.05)
        raise RuntimeError(f"daemon did not start in 60 s: {log.read_text()[-2000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)

    def client(self, **kw: object) -> DaemonClient:
        return DaemonClient(
            socket_path=self.socket_path,
            reconnect_interval_s=0.05,
            request_timeout_s=5.0,
            **kw,  # type: ignore[arg-type]
        )

    def http(self, path: str, method: str = "GET", token: str = "") -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


# ---- tiny models ------------------------------------------------------------------------


def plain_generate(model: torch.nn.Module, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of transformers' own `generate`, no cache of ours: the reference."""
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return list(out[0, len(ids) :].tolist())


def tiny_llama(
    seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 2
) -> LlamaForCausalLM:
    """A random-weight Llama: vocabulary 300, hidden size 64, 4 heads, 2 KV heads of 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype)
    model.train(False)
    return model
