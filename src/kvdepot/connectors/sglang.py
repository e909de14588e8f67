"""kvdepot as SGLang HiCache's storage tier (L3): a `HiCacheStorage` backend.

Runs in each SGLang scheduler process (one per TP rank), loaded by SGLang's own factory:

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
    '{"backend_name": "kvdepot", "module_path": "kvdepot.connectors.sglang",
      "class_name": "KVDepotHiCacheStorage", "interface_v1": 1,
      "kvdepot.mode": "daemon", "kvdepot.daemon.socket_path": "/run/kvdepot/daemon.sock"}'

`kvdepot.*` keys of the extra config are kvdepot's config (`load_config` overrides; the
`KVDEPOT_*` environment applies too). SGLang builds the backend as `cls(storage_config,
kwargs)` and registers its host pool (`register_mem_pool_host`); the cache controller then
calls `batch_exists` (the leading run of pages present), `batch_get_v1` and `batch_set_v1`
with page keys and host-pool token indices.

Keys: an SGLang page key is already a chained hash of the prompt up to that page; kvdepot
keys it under a namespace of the model, the page geometry and dtype, the TP rank and size
(MHA: each rank its own heads) or the MLA flag (MLA: one latent per token, the same on every
rank: stored once, by SGLang's storage writer, read by all). SGLang's page keys already chain
the whole prefix (and what SGLang mixes into them, such as a LoRA adapter), so its
`prefix_keys` add nothing; a `cache_salt` or `lora_id` in `extra_info.extra_info`, where a
caller passes one, enters the namespace as the tenant. Pages are stored in one layout
whatever the host pool's (`layer_first`, `page_first`, `page_first_direct`), so instances
with different host layouts share them: MHA as `[layers, 2, page, heads, head_dim]`, MLA as
`[layers, 2, page, 1, latent / 2]` (the latent's two halves in the K and V places, as the
vLLM connector stores MLA).

Invariants:
- `batch_exists` counts the leading run of present pages only, and `batch_get_v1` stops at
  the first page it cannot deliver (all later ones fail too): a prefix is never a mix of two
  prompts' pages, and never has a hole.
- A page whose stored geometry or dtype differs from the pool's is a miss, never written
  into the pool.
- A dead daemon or tier makes every call a miss or a failed write, never an exception.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kvdepot.codec import RawCodec
from kvdepot.codec.base import encode_chunk
from kvdepot.codec.format import open_blob
from kvdepot.codec.raw import raw_view
from kvdepot.config import KVDepotConfig, load_config
from kvdepot.deployment import open_cache
from kvdepot.errors import CorruptChunk
from kvdepot.keys import CacheNamespace, ChunkHash, ChunkKey, HashAlgorithm
from kvdepot.logutil import RateLimitedLog
from kvdepot.store import ChunkStore, TieredStore
from kvdepot.tensors import as_numpy_bits, dtype_from_torch, torch_from_bits

try:  # the base class when SGLang is installed; a plain object otherwise (docs, tests)
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage as _Base
except ImportError:  # pragma: no cover - SGLang absent
    _Base = object

logger = logging.getLogger(__name__)
CONFIG_PREFIX = "kvdepot."


def kvdepot_config(extra_config: Mapping[str, Any] | None) -> KVDepotConfig:
    """kvdepot's config from SGLang's extra config (`kvdepot.<field>` keys)."""
    overrides = {
        name[len(CONFIG_PREFIX) :]: value
        for name, value in (extra_config or {}).items()
        if name.startswith(CONFIG_PREFIX)
    }
    return load_config(overrides=overrides)


class PageCodec:
    """Moves one page between an SGLang host pool and kvdepot's page layout."""

    def __init__(self, pool: Any, is_mla: bool) -> None:
        self.pool = pool
        self.is_mla = is_mla
        self.layout = str(pool.layout)
        self.page_size = int(pool.page_size)
        if self.layout not in ("layer_first", "page_first", "page_first_direct"):
            raise ValueError(f"kvdepot: SGLang host layout {self.layout!r} is not supported")
        sample = self.canonical(0)
        self.shape = tuple(sample.shape)
        self.dtype = sample.dtype

    def _view(self, index: int) -> torch.Tensor:
        """The page starting at token `index`, as a view of the pool, layers first:
        MHA `[2, layers, page, heads, dim]`, MLA `[layers, page, 1, latent]`."""
        page: torch.Tensor = self.pool.get_data_page(index, flat=False)
        if self.is_mla:
            if self.layout == "page_first":
                return page.permute(1, 0, 2, 3)
            if self.layout == "page_first_direct":
                return page[0]
            return page
        if self.layout == "page_first":
            return page.permute(0, 2, 1, 3, 4)
        if self.layout == "page_first_direct":
            return page[:, 0]
        return page

    def canonical(self, index: int) -> torch.Tensor:
        """The page as kvdepot stores it (a view where the layout allows)."""
        view = self._view(index)
        if self.is_mla:
            layers, page, heads, latent = view.shape
            return view.reshape(layers, page, heads, 2, latent // 2).permute(0, 3, 1, 2, 4)
        return view.permute(1, 0, 2, 3, 4)

    def write(self, index: int, page: torch.Tensor) -> None:
        """Copy a canonical page into the pool at token `index`."""
        self.canonical(index).copy_(page)


class KVDepotHiCacheStorage(_Base):  # type: ignore[misc]
    """SGLang HiCache L3 over a kvdepot store (embedded, or the daemon shared by instances)."""

    def __init__(self, storage_config: Any, kwargs: Any = None, *, store: ChunkStore | None = None):
        extra = storage_config.extra_config or {}
        config = kvdepot_config(extra)
        self.storage_config = storage_config
        self.store = store if store is not None else open_cache(config)
        self.algorithm = HashAlgorithm(config.hash_algorithm)
        self.mem_pool_host: Any = None
        self.pages: PageCodec | None = None
        self.is_mla = bool(storage_config.is_mla_model)
        self._namespaces: dict[bytes, CacheNamespace] = {}
        self._log = RateLimitedLog(logger)

    # ---- setup ---------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        self.mem_pool_host = mem_pool_host
        self.pages = PageCodec(mem_pool_host, self.is_mla)

    def _fingerprint(self) -> str:
        c = self.storage_config
        model = c.model_name or "unnamed"
        shard = "mla" if self.is_mla else f"tp{c.tp_rank}of{c.tp_size}"
        pp = f":pp{c.pp_rank}of{c.pp_size}" if getattr(c, "pp_size", 1) > 1 else ""
        return f"sglang:{model}:{shard}{pp}"

    def _namespace(self, salt: bytes) -> CacheNamespace:
        ns = self._namespaces.get(salt)
        if ns is None:
            assert self.pages is not None, "register_mem_pool_host was not called"
            shape = "x".join(str(n) for n in self.pages.shape[:2] + self.pages.shape[3:])
            layout = f"sglang-page{self.pages.page_size}-{shape}-{self.pages.dtype}"
            ns = CacheNamespace(self._fingerprint(), layout, 0, salt, self.algorithm)
            self._namespaces[salt] = ns
        return ns

    def _keys(self, keys: Sequence[str], extra_info: Any) -> list[ChunkKey]:
        ns = self._namespace(_salt(extra_info))
        return [
            ChunkKey(ns.digest, ChunkHash(hashlib.blake2b(k.encode(), digest_size=16).digest()))
            for k in keys
        ]

    # ---- the v1 interface ----------------------------------------------------------------

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """How many leading pages of `keys` are stored."""
        if not keys or self.pages is None:
            return 0
        try:
            found = self.store.contains(self._keys(keys, extra_info))
        except Exception as exc:  # a dead tier is a miss
            self._log.warning("exists", "kvdepot: exists failed, a miss: %s", exc)
            return 0
        return found.index(False) if False in found else len(found)

    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None
    ) -> list[bool]:
        """Store each page (`host_indices[i * page_size]` starts page i); per page, whether
        kvdepot holds it now."""
        pages = self.pages
        if pages is None or not keys:
            return [False] * len(keys)
        try:
            chunk_keys = self._keys(keys, extra_info)
            if self.is_mla and not self.storage_config.is_storage_writer:
                return self.store.contains(chunk_keys)  # the writer stores the same latents
            kv_dtype = dtype_from_torch(pages.dtype)
            items = []
            for i, key in enumerate(chunk_keys):
                index = int(host_indices[i * pages.page_size])
                # A strided view of the pool: the store copies it once, into its memory (the
                # daemon's shared memory), in kvdepot's layout; a page it holds already is
                # not copied at all (the daemon answers "stored" when asked for room).
                bits = as_numpy_bits(pages.canonical(index))
                items.append((key, encode_chunk(bits, kv_dtype, RawCodec())))
            if self.store.put(items) == len(items):
                return [True] * len(items)
            return self.store.contains(chunk_keys)  # which ones, when some were dropped
        except Exception as exc:  # the answer never depends on the cache
            self._log.warning("set", "kvdepot: storing pages failed: %s", exc)
            return [False] * len(keys)

    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None
    ) -> list[bool]:
        """Load the leading run of stored pages into the host pool; per page, whether it
        was loaded (every page after the first failure fails too)."""
        pages = self.pages
        done = [False] * len(keys)
        if pages is None or not keys:
            return done
        try:
            chunk_keys = self._keys(keys, extra_info)
            with self.store.read(chunk_keys) as blobs:
                for i, (key, blob) in enumerate(zip(chunk_keys, blobs, strict=False)):
                    if blob is None or not self._load(pages, key, blob, host_indices, i):
                        break
                    done[i] = True
        except Exception as exc:  # a dead tier is a miss
            self._log.warning("get", "kvdepot: loading pages failed, a miss: %s", exc)
            return [False] * len(keys)
        return done

    def _load(
        self, pages: PageCodec, key: ChunkKey, blob: Any, host_indices: torch.Tensor, i: int
    ) -> bool:
        try:
            header, payload = open_blob(blob, key=key, verify=isinstance(blob, bytes))
        except CorruptChunk as exc:
            self._log.warning("corrupt", "kvdepot: a stored page is unusable, a miss: %s", exc)
            self.store.delete([key])
            return False
        if header.shape != pages.shape or header.dtype is not dtype_from_torch(pages.dtype):
            return False  # another geometry: never written into this pool
        bits = raw_view(header, payload)  # the store's memory itself: one copy, into the pool
        if bits is None:
            if header.codec_id != RawCodec.codec_id:
                return False  # stores hand out raw chunks; anything else is a miss
            frozen = np.frombuffer(payload, dtype=header.dtype.storage_dtype)
            bits = frozen.reshape(header.shape).copy()  # read-only memory: torch wants writable
        pages.write(int(host_indices[i * pages.page_size]), torch_from_bits(bits, header.dtype))
        return True

    # ---- the rest of SGLang's storage interface ------------------------------------------

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        raise NotImplementedError("kvdepot's SGLang backend needs interface_v1: 1")

    def batch_get(self, keys: Any, target_locations: Any = None, target_sizes: Any = None) -> Any:
        raise NotImplementedError("kvdepot's SGLang backend needs interface_v1: 1")

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:  # fmt: skip
        raise NotImplementedError("kvdepot's SGLang backend needs interface_v1: 1")

    def batch_set(self, keys: Any, values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:  # fmt: skip
        raise NotImplementedError("kvdepot's SGLang backend needs interface_v1: 1")

    def clear(self) -> None:
        """Empty an embedded store; a daemon's store belongs to all its clients, so a
        daemon is left as it is (logged): clear it with `POST /clear` on the daemon."""
        if isinstance(self.store, TieredStore):
            self.store.clear()
        else:
            logger.warning(
                "kvdepot: SGLang asked to clear its storage; the daemon is shared and keeps "
                "its chunks (POST /clear on the daemon empties it)"
            )

    def get_stats(self) -> dict[str, Any]:
        m = self.store.metrics.registry.get_sample_value
        return {
            "lookup_chunks": m("kvdepot_store_lookup_chunks_total") or 0.0,
            "hit_chunks": m("kvdepot_store_hit_chunks_total") or 0.0,
        }

    def close(self) -> None:
        self.store.close()


def _salt(extra_info: Any) -> bytes:
    """The tenant of a request, where SGLang passes one (a LoRA, a cache salt)."""
    info = getattr(extra_info, "extra_info", None) or {}
    parts = [f"{name}:{info[name]}" for name in ("lora_id", "cache_salt") if info.get(name)]
    return "\xff".join(parts).encode()
