"""CacheEngine: token-level lookup / store / retrieve of KV tensors, engine-agnostic.

Runs in the inference engine's process; talks to a store (the embedded `TieredStore`, or a
daemon client with the same interface). It owns chunking and prefix semantics:
- only whole chunks of `chunk_size_tokens` are stored and served;
- `lookup` and `retrieve` answer the leading run of cached chunks (a prefix);
- `store` writes only the chunks the cache does not already hold.

KV tensors use the layout `[num_layers, 2 (K, V), num_tokens, num_kv_heads, head_dim]`, any
float dtype; they are copied once between the tensor and the store's memory.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from kvdepot.codec import Codec, CodecRegistry, RawCodec, decode_chunk_into, default_registry
from kvdepot.codec.base import encode_chunk
from kvdepot.errors import CorruptChunk, LayoutMismatch
from kvdepot.keys import CacheNamespace, ChunkKey, HashAlgorithm, TokenIds, chunk_hashes
from kvdepot.layout import DType, KVLayout
from kvdepot.logutil import RateLimitedLog
from kvdepot.metrics import Metrics
from kvdepot.store import ChunkStore

logger = logging.getLogger(__name__)
Tokens = TokenIds | torch.Tensor
"""Token ids: a list, a 1-D integer numpy array or a 1-D integer tensor."""
_TORCH_DTYPES = {
    torch.float32: DType.FLOAT32,
    torch.float16: DType.FLOAT16,
    torch.bfloat16: DType.BFLOAT16,
    torch.float8_e4m3fn: DType.FLOAT8_E4M3,
    torch.float8_e5m2: DType.FLOAT8_E5M2,
}
_TORCH_STORAGE = {1: torch.uint8, 2: torch.int16, 4: torch.float32}


def dtype_from_torch(dtype: torch.dtype) -> DType:
    """The kvdepot DType of a torch float dtype."""
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise LayoutMismatch(f"KV dtype {dtype} is not supported; use a float dtype") from None


def torch_dtype(dtype: DType) -> torch.dtype:
    """The torch dtype of a kvdepot DType."""
    return next(t for t, d in _TORCH_DTYPES.items() if d is dtype)


def as_numpy_bits(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy) of a CPU tensor's bits, in the DType's storage dtype."""
    dtype = dtype_from_torch(tensor.dtype)
    if dtype is DType.FLOAT32:
        return tensor.numpy()
    bits = tensor.view(_TORCH_STORAGE[dtype.itemsize]).numpy()
    return bits.view(dtype.storage_dtype)


class CacheEngine:
    """Token-level KV cache for one model shard (fingerprint + layout)."""

    def __init__(
        self,
        backend: ChunkStore,
        layout: KVLayout,
        model_fingerprint: str,
        *,
        chunk_size_tokens: int = 256,
        hash_algorithm: HashAlgorithm = HashAlgorithm.BLAKE2B_128,
        shard_rank: int = 0,
        codec: Codec | None = None,
        registry: CodecRegistry | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.backend = backend
        self.layout = layout
        self.model_fingerprint = model_fingerprint
        self.chunk_size_tokens = chunk_size_tokens
        self.hash_algorithm = hash_algorithm
        self.shard_rank = shard_rank
        self.codec = codec if codec is not None else RawCodec()
        self.registry = registry if registry is not None else default_registry()
        self.metrics = metrics if metrics is not None else backend.metrics
        self._namespaces: dict[bytes, CacheNamespace] = {}
        self._lock = threading.Lock()
        self._log = RateLimitedLog(logger)

    def namespace(self, tenant_salt: bytes = b"") -> CacheNamespace:
        """The key namespace of this model shard for one tenant."""
        with self._lock:
            ns = self._namespaces.get(tenant_salt)
            if ns is None:
                ns = CacheNamespace(
                    self.model_fingerprint,
                    self.layout.layout_id,
                    self.shard_rank,
                    tenant_salt,
                    self.hash_algorithm,
                )
                self._namespaces[tenant_salt] = ns
            return ns

    def chunk_keys(
        self,
        tokens: Tokens,
        tenant_salt: bytes = b"",
        *,
        include_partial: bool = False,
        segment: bool = False,
    ) -> list[ChunkKey]:
        """Keys of every full chunk of `tokens` (and of its partial tail, if asked), head first.

        `segment=True` keys `tokens` as a segment: chained from the namespace's segment root,
        so the key depends on these tokens only, wherever they appear in a prompt.
        """
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        ns = self.namespace(tenant_salt)
        parent = ns.segment_root() if segment else None
        hashes = chunk_hashes(
            tokens, self.chunk_size_tokens, ns, parent=parent, include_partial=include_partial
        )
        return [ChunkKey(ns.digest, h) for h in hashes]

    def lookup(self, tokens: Tokens, *, tenant_salt: bytes = b"", segment: bool = False) -> int:
        """Number of leading tokens of `tokens` whose KV is cached.

        Whole chunks, plus the partial tail when exactly this tail was stored before (the
        same prompt again); so the answer is a multiple of the chunk size or `len(tokens)`.
        `segment=True` looks `tokens` up as a segment (see `chunk_keys`).
        """
        keys = self.chunk_keys(tokens, tenant_salt, include_partial=True, segment=segment)
        num_hit = min(self.backend.lookup(keys) * self.chunk_size_tokens, len(tokens))
        self.metrics.lookup_tokens.inc(len(tokens))
        self.metrics.hit_tokens.inc(num_hit)
        return num_hit

    def store(
        self,
        tokens: Tokens,
        kv: torch.Tensor,
        *,
        tenant_salt: bytes = b"",
        kv_start_token: int = 0,
        store_partial: bool = True,
        segment: bool = False,
    ) -> int:
        """Store the KV of every chunk of `tokens` not yet cached; returns tokens written.

        Args:
            tokens: the prompt (or prompt + output) token ids, from the start.
            kv: `[num_layers, 2, num_kv_tokens, num_kv_heads, head_dim]`, the KV of
                `tokens[kv_start_token : kv_start_token + num_kv_tokens]`; chunks not wholly
                inside that range are not stored.
            kv_start_token: first token `kv` covers; a multiple of the chunk size, so a caller
                that loaded a cached prefix can pass only the KV it computed.
            store_partial: also store the trailing partial chunk of `tokens` (reused only by
                a request with exactly these tokens, e.g. the same prompt again).
            segment: store `tokens` as a segment (see `chunk_keys`); `kv` then holds the KV
                the segment has when computed on its own, at positions 0..n-1.
        """
        self._check_kv(kv)
        c = self.chunk_size_tokens
        if kv_start_token % c or kv_start_token < 0:
            raise ValueError(f"kv_start_token {kv_start_token} is not a multiple of {c}")
        num_tokens = min(len(tokens), kv_start_token + kv.shape[2])
        keys = self.chunk_keys(
            tokens[:num_tokens], tenant_salt, include_partial=store_partial, segment=segment
        )
        first = kv_start_token // c
        keys = keys[first:]
        present = self.backend.contains(keys)
        bits = as_numpy_bits(kv.detach().cpu())
        items = []
        for i, (key, is_present) in enumerate(zip(keys, present, strict=True)):
            if not is_present:
                chunk = bits[:, :, i * c : min((i + 1) * c, num_tokens - kv_start_token)]
                items.append((key, encode_chunk(chunk, self.layout.dtype, self.codec)))
        num_stored = self.backend.put(items)
        if num_stored < len(items):  # the store refused some: count only what it holds
            held = self.backend.contains([key for key, _ in items])
            items = [item for item, is_held in zip(items, held, strict=True) if is_held]
        num_written = sum(chunk.header.shape[2] for _, chunk in items)
        self.metrics.stored_tokens.inc(num_written)
        return num_written

    def retrieve(
        self,
        tokens: Tokens,
        *,
        tenant_salt: bytes = b"",
        out: torch.Tensor | None = None,
        segment: bool = False,
    ) -> torch.Tensor:
        """KV of the leading cached tokens of `tokens` (as `lookup` counts them).

        Returns `[L, 2, num_hit_tokens, H, D]`.

        Args:
            out: optional CPU tensor with room for all of `tokens` (reused memory is much
                faster to fill than fresh memory); the result is a view of it.
            segment: retrieve `tokens` as a segment (see `chunk_keys`).
        """
        keys = self.chunk_keys(tokens, tenant_salt, include_partial=True, segment=segment)
        c = self.chunk_size_tokens
        bad_key: ChunkKey | None = None
        with self.backend.read(keys) as blobs:
            num_hit = min(len(blobs) * c, len(tokens))
            if out is None:
                out = torch.empty(
                    self.layout.chunk_shape(num_hit), dtype=torch_dtype(self.layout.dtype)
                )
            else:
                self._check_kv(out, min_tokens=num_hit)
                if out.device.type != "cpu":
                    raise LayoutMismatch("out must be a CPU tensor; copy to the device after")
            bits = as_numpy_bits(out)
            for i, blob in enumerate(blobs):
                span = bits[:, :, i * c : min((i + 1) * c, num_hit)]
                try:
                    decode_chunk_into(blob, span, self.registry, verify=False)
                except CorruptChunk as exc:
                    self._log.warning("decode", "chunk %d unusable, deleted: %s", i, exc)
                    bad_key = keys[i]
                    num_hit = i * c
                    break
        if bad_key is not None:
            self.backend.delete([bad_key])  # a miss from now on, so it can be stored again
        self.metrics.retrieved_tokens.inc(num_hit)
        return out[:, :, :num_hit]

    def _check_kv(self, kv: torch.Tensor, min_tokens: int = 0) -> None:
        expected = self.layout.chunk_shape(kv.shape[2] if kv.dim() == 5 else -1)
        if tuple(kv.shape) != expected or dtype_from_torch(kv.dtype) is not self.layout.dtype:
            raise LayoutMismatch(
                f"KV tensor {kv.dtype}{list(kv.shape)} does not match the engine's layout "
                f"{self.layout.layout_id} ([num_layers, 2, tokens, kv_heads, head_dim])"
            )
        if kv.shape[2] < min_tokens:
            raise LayoutMismatch(f"out has room for {kv.shape[2]} tokens, {min_tokens} needed")
