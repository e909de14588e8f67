"""kvdepot as SGLang HiCache's storage tier, tested against SGLang's own code: its host pools
(`MHATokenToKVPoolHost`, `MLATokenToKVPoolHost`, on CPU) and its backend factory (`dynamic`,
`interface_v1`), exactly as SGLang's cache controller loads and calls a storage backend.

What is not tested here: a live SGLang engine (it cannot start on this CPU: its CPU kernels
are not on PyPI) and the device<->host copies (CUDA only); `benchmarks/sglang-gpu-check.sh`
runs the engine on a GPU machine. SGLang lives in its own environment (`--no-deps` and a
hand-picked dependency set); these tests skip without it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

with warnings.catch_warnings():  # SGLang warns about every GPU-only kernel on import
    warnings.simplefilter("ignore")
    pytest.importorskip("sglang.srt.mem_cache.pool_host.mha")
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from tests.helpers import Daemon

REPO = Path(__file__).resolve().parents[1]
P, H, D, L = 4, 2, 8, 3  # page size, KV heads, head dim, layers
LATENT, ROPE = 16, 8  # MLA: kv_lora_rank, qk_rope_head_dim
NUM_PAGES = 4


def mha_pool(layout: str) -> Any:
    device = MHATokenToKVPool(256, P, torch.float16, H, D, L, "cpu", False, start_layer=0,
                              end_layer=L)  # fmt: skip
    capacity = device.size if device.host_capacity_tokens is None else device.host_capacity_tokens
    return MHATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info, 2, 0, P, layout, pin_memory=False,
        device_capacity_tokens=capacity, start_layer=device.start_layer,
        end_layer=device.end_layer, write_back_staging=device.hicache_write_back_staging,
    )  # fmt: skip


def mla_pool(layout: str) -> Any:
    device = MLATokenToKVPool(256, P, torch.bfloat16, LATENT, ROPE, L, "cpu", False,
                              start_layer=0, end_layer=L)  # fmt: skip
    capacity = getattr(device, "host_capacity_tokens", None) or device.size
    return MLATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info, 2, 0, P, layout, pin_memory=False,
        device_capacity_tokens=capacity, start_layer=0, end_layer=L, target_layer_num=L,
    )  # fmt: skip


def backend(pool: Any, socket: Path, *, mla: bool = False, tp: tuple[int, int] = (0, 1)) -> Any:
    """kvdepot's backend, built by SGLang's factory as SGLang builds it."""
    extra = {"backend_name": "kvdepot", "module_path": "kvdepot.connectors.sglang",
             "class_name": "KVDepotHiCacheStorage", "interface_v1": 1,
             "kvdepot.mode": "daemon", "kvdepot.daemon.socket_path": str(socket),
             "kvdepot.daemon.reconnect_interval_s": 0.05}  # fmt: skip
    config = HiCacheStorageConfig(
        tp_rank=tp[0], tp_size=tp[1], pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False,
        is_page_first_layout=pool.layout != "layer_first", model_name="org/smol",
        extra_config=extra,
    )  # fmt: skip
    made = StorageBackendFactory.create_backend("dynamic", config, pool)
    made.register_mem_pool_host(pool)
    return made


def pages(first_token: int) -> torch.Tensor:
    """Host indices of NUM_PAGES pages from token `first_token` on."""
    return torch.arange(first_token, first_token + NUM_PAGES * P)


def fill(pool: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    buffer = pool.kv_buffer
    buffer.copy_(torch.randn(buffer.shape, generator=g).to(buffer.dtype))


def page_content(made: Any, index: int) -> torch.Tensor:
    return made.pages.canonical(index).clone()


KEYS = [f"{i:064x}" for i in range(1, NUM_PAGES + 1)]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, extra=["--memory-capacity-bytes", "64MiB"])
    d.start()
    yield d
    d.stop()


@pytest.mark.parametrize(
    ("writer", "reader"),
    [("layer_first", "page_first"), ("page_first", "layer_first"),
     ("layer_first", "page_first_direct")],
)  # fmt: skip
def test_pages_move_byte_for_byte_between_host_layouts(
    daemon: Daemon, writer: str, reader: str
) -> None:
    a_pool, b_pool = mha_pool(writer), mha_pool(reader)
    fill(a_pool, 1)
    fill(b_pool, 2)
    a, b = backend(a_pool, daemon.socket_path), backend(b_pool, daemon.socket_path)
    assert b.batch_exists(KEYS) == 0
    assert a.batch_set_v1(KEYS, pages(8)) == [True] * NUM_PAGES
    assert b.batch_exists(KEYS) == NUM_PAGES
    assert b.batch_get_v1(KEYS, pages(64)) == [True] * NUM_PAGES
    for i in range(NUM_PAGES):
        assert torch.equal(page_content(b, 64 + i * P), page_content(a, 8 + i * P))
    # Untouched pages of the reader's pool stay as they were.
    assert not torch.equal(page_content(b, 8), page_content(a, 8))


def test_exists_counts_the_leading_run_and_a_get_never_has_a_hole(daemon: Daemon) -> None:
    pool = mha_pool("layer_first")
    fill(pool, 3)
    made = backend(pool, daemon.socket_path)
    stored = [KEYS[0], KEYS[1], KEYS[3]]  # page 2 never stored
    idx = torch.cat([pages(8)[: 2 * P], pages(8)[3 * P :]])
    assert made.batch_set_v1(stored, idx) == [True] * 3
    assert made.batch_exists(KEYS) == 2
    assert made.batch_get_v1(KEYS, pages(64)) == [True, True, False, False]
    assert made.exists(KEYS[3]) and not made.exists(KEYS[2])


def test_mha_ranks_keep_their_own_shards_mla_is_stored_once(daemon: Daemon) -> None:
    rank0, rank1 = mha_pool("layer_first"), mha_pool("layer_first")
    fill(rank0, 4)
    a = backend(rank0, daemon.socket_path, tp=(0, 2))
    b = backend(rank1, daemon.socket_path, tp=(1, 2))
    a.batch_set_v1(KEYS, pages(8))
    assert b.batch_exists(KEYS) == 0  # another rank's heads: never served to this one
    m0, m1 = mla_pool("layer_first"), mla_pool("page_first")
    fill(m0, 5)
    fill(m1, 6)
    w = backend(m0, daemon.socket_path, mla=True, tp=(0, 2))
    r = backend(m1, daemon.socket_path, mla=True, tp=(1, 2))
    assert r.batch_set_v1(KEYS, pages(8)) == [False] * NUM_PAGES  # not the storage writer
    assert w.batch_set_v1(KEYS, pages(8)) == [True] * NUM_PAGES
    assert r.batch_exists(KEYS) == NUM_PAGES  # the same latents for every rank
    assert r.batch_get_v1(KEYS, pages(64)) == [True] * NUM_PAGES
    for i in range(NUM_PAGES):
        assert torch.equal(page_content(r, 64 + i * P), page_content(w, 8 + i * P))
    stats = json.loads(json.dumps(w.get_stats()))
    assert set(stats) == {"lookup_chunks", "hit_chunks"}


def test_pages_outlive_a_daemon_restart_and_a_dead_daemon_is_a_miss(
    daemon: Daemon,
) -> None:
    pool = mha_pool("page_first")
    fill(pool, 7)
    made = backend(pool, daemon.socket_path)
    assert made.batch_set_v1(KEYS, pages(8)) == [True] * NUM_PAGES
    assert made.store.flush()
    daemon.stop()
    assert made.batch_exists(KEYS) == 0  # no daemon: a miss, no exception
    assert made.batch_get_v1(KEYS, pages(64)) == [False] * NUM_PAGES
    assert made.batch_set_v1(KEYS, pages(8)) == [False] * NUM_PAGES
    daemon.start()  # its disk tier kept the pages
    deadline = time.monotonic() + 10
    while made.batch_exists(KEYS) != NUM_PAGES:
        assert time.monotonic() < deadline, "no reconnection"
    assert made.batch_get_v1(KEYS, pages(64)) == [True] * NUM_PAGES
    assert torch.equal(page_content(made, 64), page_content(made, 8))


READER = """
import json, sys, warnings, hashlib
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from tests.test_sglang import KEYS, backend, mha_pool, page_content, pages, P
made = backend(mha_pool("page_first"), Path(sys.argv[1]))
got = made.batch_get_v1(KEYS, pages(64))
digest = [hashlib.sha256(page_content(made, 64 + i * P).numpy().tobytes()).hexdigest()
          for i in range(len(KEYS))]
print(json.dumps({"got": got, "digest": digest}))
"""


def test_another_process_reads_the_pages_through_the_daemon(daemon: Daemon) -> None:
    import hashlib

    pool = mha_pool("layer_first")
    fill(pool, 8)
    made = backend(pool, daemon.socket_path)
    made.batch_set_v1(KEYS, pages(8))
    argv = [sys.executable, "-c", READER, str(daemon.socket_path), str(REPO)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO,
                          check=True)  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["got"] == [True] * NUM_PAGES
    want = [hashlib.sha256(page_content(made, 8 + i * P).numpy().tobytes()).hexdigest()
            for i in range(NUM_PAGES)]  # fmt: skip
    assert result["digest"] == want
