#!/usr/bin/env python3
"""SGLang HiCache pages through kvdepot's daemon: GB/s of `batch_set_v1` / `batch_get_v1`
against copying the same pages in memory, measured in the same run.

Run in the SGLang environment (`benchmarks/sglang-check.sh` builds it):

    .venv-sglang/bin/python benchmarks/sglang_pages.py

A SmolLM2-shaped page (30 layers, 3 KV heads of 64, fp16, 64 tokens: 1.5 MB) in each host
layout; 64 pages per batch, as SGLang's controller batches them (`STORAGE_BATCH_SIZE` 128).
The limit: copying each page between the pool and a buffer of kvdepot's layout as large as
the pages (`torch.Tensor.copy_` of the strided page view: the one copy a store or a load
needs, with the same memory traffic).
Goal: set and get >= 0.5 of the limit (one copy into or out of the daemon's shared memory,
plus the control round trips).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.simplefilter("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import Daemon  # noqa: E402
from tests.test_sglang import backend  # noqa: E402

L, H, D, P, PAGES = 30, 3, 64, 64, 64


def pool(layout: str) -> object:
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    device = MHATokenToKVPool(PAGES * P * 2, P, torch.float16, H, D, L, "cpu", False,
                              start_layer=0, end_layer=L)  # fmt: skip
    capacity = device.size if device.host_capacity_tokens is None else device.host_capacity_tokens
    return MHATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info, 2, 0, P, layout, pin_memory=False,
        device_capacity_tokens=capacity, start_layer=0, end_layer=L,
        write_back_staging=device.hicache_write_back_staging,
    )  # fmt: skip


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="kvdepot-sglang-pages-"))
    d = Daemon(
        root,
        extra=["--memory-capacity-bytes", "2GiB", "--disk-path", "", "--memory-prefault", "true"],
    )
    d.start()
    rows = []
    try:
        for layout in ("layer_first", "page_first"):
            host = pool(layout)
            host.kv_buffer.copy_(torch.randn(host.kv_buffer.shape).to(torch.float16))  # type: ignore[attr-defined]
            made = backend(host, d.socket_path)
            page_bytes = 2 * L * P * H * D * 2
            total = PAGES * page_bytes
            idx = torch.arange(0, PAGES * P)
            # The limit's destination is as large as the pages (not one page reused, which
            # would stay in the CPU's cache): the same memory traffic as the real copies.
            scratch = torch.empty((PAGES, L, 2, P, H, D), dtype=torch.float16)
            scratch.fill_(0)
            sets, gets, limits = [], [], []
            for run in range(5):
                keys = [f"{layout}-{run}-{i:060x}" for i in range(PAGES)]
                start = time.perf_counter()
                assert all(made.batch_set_v1(keys, idx))
                sets.append(time.perf_counter() - start)
                start = time.perf_counter()
                assert all(made.batch_get_v1(keys, idx + PAGES * P))
                gets.append(time.perf_counter() - start)
                start = time.perf_counter()
                for i in range(PAGES):
                    scratch[i].copy_(made.pages.canonical(i * P))
                limits.append(time.perf_counter() - start)
            s, g, lim = (statistics.median(x) for x in (sets, gets, limits))
            rows.append((layout, total / s / 1e9, total / g / 1e9, total / lim / 1e9))
    finally:
        d.stop()
    print(
        f"SGLang pages through the kvdepot daemon | {PAGES} pages of "
        f"{2 * L * P * H * D * 2 / 1e6:.1f} MB"
    )
    print(
        f"{'layout':>12} {'set GB/s':>9} {'get GB/s':>9} {'limit GB/s':>11} {'set':>6} {'get':>6}"
    )
    ok = True
    for layout, s, g, lim in rows:
        print(f"{layout:>12} {s:9.2f} {g:9.2f} {lim:11.2f} {s / lim:6.2f} {g / lim:6.2f}")
        ok = ok and s / lim >= 0.5 and g / lim >= 0.5
    print(f"goal: set and get >= 0.5 x the limit: {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
