"""CacheEngine: token-level lookup / store / retrieve of KV tensors, engine-agnostic.

Runs in the inference engine's process; talks to a store (the embedded `TieredStore`, or a
daemon client with the same interface). It owns chunking and prefix semantics:
- chunks of `chunk_size_tokens` are the unit of storage (a prompt's partial tail too);
- `lookup` and `retrieve` answer a cached prefix: the leading run of cached chunks, then
  (partial matching, on by default) the leading tokens of a stored chunk that follows the
  same prefix, found through the store's continuation index (`kvdepot.continuations`); KV
  of token j depends only on tokens 0..j, so those tokens' KV is exactly this prompt's;
- `store` writes only the chunks the cache does not already hold, and tells the index which
  chunk follows which prefix.

KV tensors use the layout `[num_layers, 2 (K, V), num_tokens, num_kv_heads, head_dim]`, any
float dtype; they are copied once between the tensor and the store's memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvdepot.codec import Codec, CodecRegistry, RawCodec, default_registry
from kvdepot.codec.base import encode_chunk
from kvdepot.codec.format import open_blob
from kvdepot.codec.raw import raw_view
from kvdepot.continuations import Continuation, TailQuery
from kvdepot.errors import CorruptChunk, LayoutMismatch
from kvdepot.keys import (
    CacheNamespace,
    ChunkKey,
    HashAlgorithm,
    TokenIds,
    chain_hashes,
    token_bytes,
)
from kvdepot.layout import KVLayout
from kvdepot.logutil import RateLimitedLog
from kvdepot.metrics import Metrics
from kvdepot.misses import BELOW_MIN_REUSE, parse_miss, split_missed, tier_label
from kvdepot.namespaces import Recipe, Shard
from kvdepot.store import ChunkStore
from kvdepot.tensors import as_numpy_bits, dtype_from_torch, torch_dtype, torch_from_bits

logger = logging.getLogger(__name__)
Tokens = TokenIds | torch.Tensor
"""Token ids: a list, a 1-D integer numpy array or a 1-D integer tensor."""


def floor_to_chunk(num_tokens: int, chunk_size: int) -> int:
    """The tokens of `num_tokens` that fill whole chunks (a chunk boundary at or before it)."""
    return num_tokens - num_tokens % chunk_size


def ceil_to_chunk(num_tokens: int, chunk_size: int) -> int:
    """The first chunk boundary at or after `num_tokens`."""
    return -(-num_tokens // chunk_size) * chunk_size


@dataclass(slots=True)
class LoadInfo:
    """What one `retrieve` loaded, in order, for the caller's per-request record: runs of
    (tier it came from: "memory" or the lower tier that had it, tokens, by partial match)."""

    pieces: list[tuple[str, int, bool]] = field(default_factory=list)

    def by_tier(self, start: int = 0, end: int | None = None) -> dict[str, int]:
        """Tokens per tier, of the loaded tokens `start`..`end` (all by default)."""
        out: dict[str, int] = {}
        for tier, n, _ in self._span(start, end):
            out[tier] = out.get(tier, 0) + n
        return out

    def partial_tokens(self, start: int = 0, end: int | None = None) -> int:
        """Of the loaded tokens `start`..`end`, those found by partial matching."""
        return sum(n for _, n, partial in self._span(start, end) if partial)

    def _span(self, start: int, end: int | None) -> Iterator[tuple[str, int, bool]]:
        """The pieces cut to tokens `start`..`end`."""
        at = 0
        for tier, n, partial in self.pieces:
            lo, hi = max(at, start), n + at if end is None else min(n + at, end)
            if hi > lo:
                yield tier, hi - lo, partial
            at += n


def _token_ids(tokens: Tokens) -> TokenIds:
    """`tokens` as a list or numpy array (a tensor is copied to the host)."""
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().numpy()
    return tokens


def recipe_of(engines: Sequence[CacheEngine], models: Sequence[str] = ()) -> Recipe:
    """The recipe of a model whose hits need every one of `engines`' shards (tensor-parallel
    ranks, in rank order), looked up by `models` and by the first engine's fingerprint."""
    first = engines[0]
    names = tuple(dict.fromkeys(name for name in [*models, first.model_fingerprint] if name))
    shards = tuple(Shard(e.model_fingerprint, e.layout.layout_id, e.shard_rank) for e in engines)
    return Recipe(names, first.chunk_size_tokens, first.hash_algorithm.value, shards)


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
        partial_match: bool = True,
        min_partial_tokens: int = 16,
        names: Sequence[str] = (),
    ) -> None:
        """A cache engine over `backend` for chunks of `layout` keyed by `model_fingerprint`.

        Args:
            partial_match: also reuse the leading tokens of a stored chunk that follows the
                same prefix; off for engines whose pages cannot be filled in part.
            min_partial_tokens: a partial match shorter than this is ignored (reading a
                whole chunk to save a few tokens of prefill is no gain).
            names: what routers call the model (`announce`, KV events' topics); the
                fingerprint when empty.
        """
        self.backend = backend
        self.layout = layout
        self.model_fingerprint = model_fingerprint
        self.chunk_size_tokens = chunk_size_tokens
        self.hash_algorithm = hash_algorithm
        self.shard_rank = shard_rank
        self.codec = codec if codec is not None else RawCodec()
        self.registry = registry if registry is not None else default_registry()
        self.metrics = metrics if metrics is not None else backend.metrics
        self.partial_match = partial_match
        self.min_partial_tokens = max(min_partial_tokens, 1)
        self._namespaces: dict[bytes, CacheNamespace] = {}
        self._names = tuple(names)  # what routers call the model
        self._roots: dict[bytes, ChunkKey] = {}
        self._lock = threading.Lock()
        self._log = RateLimitedLog(logger)
        # What keys this engine's chunks besides the model (reported with its token counts).
        self._setup = f"{layout.layout_id} chunk={chunk_size_tokens} {hash_algorithm.value}"

    def announce(self, models: Sequence[str] = ()) -> None:
        """Tell the store how this engine keys its chunks, so that a router can look a
        prompt up by one of `models` (`kvdepot.namespaces`); never raises."""
        recipe = recipe_of([self], models)
        self._names = recipe.models
        try:
            self.backend.announce(recipe)
        except Exception as exc:  # a convenience for routers, never a reason to fail
            self._log.warning("announce", "kvdepot: announcing the model failed: %s", exc)

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
        raw = token_bytes(_token_ids(tokens))
        return self._keys_of(raw, tenant_salt, include_partial=include_partial, segment=segment)

    def _keys_of(
        self, raw: bytes, tenant_salt: bytes, *, include_partial: bool, segment: bool
    ) -> list[ChunkKey]:
        """`chunk_keys` of tokens as int32 bytes."""
        ns = self.namespace(tenant_salt)
        parent = ns.segment_root() if segment else None
        hashes = chain_hashes(
            raw, self.chunk_size_tokens, ns, parent=parent, include_partial=include_partial
        )
        return [ChunkKey(ns.digest, h) for h in hashes]

    def _prompt_keys(
        self, tokens: Tokens, tenant_salt: bytes, segment: bool
    ) -> tuple[list[ChunkKey], TailQuery | None]:
        """The keys of a prompt (its partial tail included) and, when partial matching
        applies (not for segments: they match exactly), the store's tail query."""
        raw = token_bytes(_token_ids(tokens))
        keys = self._keys_of(raw, tenant_salt, include_partial=True, segment=segment)
        if not self.partial_match or segment:
            return keys, None
        root = self._root_key(tenant_salt)
        return keys, TailQuery(root, raw, self.chunk_size_tokens, self.min_partial_tokens)

    def lookup(self, tokens: Tokens, *, tenant_salt: bytes = b"", segment: bool = False) -> int:
        """Number of leading tokens of `tokens` whose KV is cached.

        Whole chunks, plus the partial tail when exactly this tail was stored before (the
        same prompt again), else (partial matching) the leading tokens that the next stored
        chunk of this prefix shares with `tokens`. `segment=True` looks `tokens` up as a
        segment (see `chunk_keys`): whole chunks and the exact tail only.
        """
        keys, tail = self._prompt_keys(tokens, tenant_salt, segment)
        hit = self.backend.match(keys, tail)
        num_hit = min(hit.num_chunks * self.chunk_size_tokens, len(tokens))
        num_partial = hit.num_partial_tokens
        if num_partial:
            num_hit += num_partial
            self.metrics.partial_hit_tokens.inc(num_partial)
        self.metrics.lookup_tokens.inc(len(tokens))
        self.metrics.hit_tokens.inc(num_hit)
        missed = split_missed(len(tokens), num_hit, hit.miss, hit.held_elsewhere)
        self._count_missed(missed)
        self._report(looked_up=len(tokens), hit=num_hit, partial=num_partial, missed=missed)
        return num_hit

    def count_unused(self, num_tokens: int, reason: str = BELOW_MIN_REUSE) -> None:
        """`num_tokens` that `lookup` found were not loaded (the connector's choice, e.g.
        below its `min_reuse_fraction`): counted as a miss for `reason` too."""
        if num_tokens > 0:
            missed = {reason: num_tokens}
            self._count_missed(missed)
            self._report(missed=missed)

    def count_saved(self, saved_s: float) -> None:
        """Prefill seconds the connector estimates this engine's hits saved (to the store's
        per-model view; `kvdepot.records` counts them for this process)."""
        if saved_s > 0:
            self._report(saved_s=saved_s)

    def _count_missed(self, missed: dict[str, int]) -> None:
        for text, n in missed.items():
            self.metrics.miss_tokens.labels(*parse_miss(text)).inc(n)

    def _report(
        self,
        looked_up: int = 0,
        hit: int = 0,
        partial: int = 0,
        stored: int = 0,
        missed: dict[str, int] | None = None,
        saved_s: float = 0.0,
    ) -> None:
        """Token counts to the store (the daemon's per-model view); never raises."""
        if self.shard_rank:
            return  # tensor parallelism: rank 0 speaks for the request
        try:
            self.backend.report_tokens(
                self.model_fingerprint, looked_up, hit, partial, stored, self._setup, missed,
                saved_s,
            )  # fmt: skip
        except Exception as exc:
            self._log.warning("report", "kvdepot: token report failed: %s", exc)

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
        all_keys, keys = keys, keys[first:]
        present = self.backend.contains(keys)
        bits = as_numpy_bits(kv.detach().cpu())
        items = []
        for i, (key, is_present) in enumerate(zip(keys, present, strict=True)):
            if not is_present:
                chunk = bits[:, :, i * c : min((i + 1) * c, num_tokens - kv_start_token)]
                items.append((key, encode_chunk(chunk, self.layout.dtype, self.codec)))
        if not segment:  # lineage first: the store's KV events for the put need it
            kept = list(range(first, first + len(keys)))
            self._remember(tokens[:num_tokens], all_keys, kept, tenant_salt)
        num_stored = self.backend.put(items)
        if num_stored < len(items):  # the store refused some: count only what it holds
            held = self.backend.contains([key for key, _ in items])
            items = [item for item, is_held in zip(items, held, strict=True) if is_held]
        num_written = sum(chunk.header.shape[2] for _, chunk in items)
        self.metrics.stored_tokens.inc(num_written)
        self._report(stored=num_written)
        return num_written

    def retrieve(
        self,
        tokens: Tokens,
        *,
        tenant_salt: bytes = b"",
        out: torch.Tensor | None = None,
        segment: bool = False,
        info: LoadInfo | None = None,
    ) -> torch.Tensor:
        """KV of the leading cached tokens of `tokens` (as `lookup` counts them).

        Returns `[L, 2, num_hit_tokens, H, D]`.

        Args:
            out: optional CPU tensor with room for all of `tokens` (reused memory is much
                faster to fill than fresh memory); the result is a view of it. Rows past
                the result may be overwritten.
            segment: retrieve `tokens` as a segment (see `chunk_keys`).
            info: filled with where the loaded tokens came from.
        """
        views = self.retrieve_views(
            tokens, tenant_salt=tenant_salt, out=out, segment=segment, info=info
        )
        with views as kv:
            num_hit = sum(int(piece.shape[2]) for piece in kv)
            if out is None:
                out = torch.empty(
                    self.layout.chunk_shape(num_hit), dtype=torch_dtype(self.layout.dtype)
                )
            start = 0
            for piece in kv:
                span = out[:, :, start : start + piece.shape[2]]
                if piece.data_ptr() != span.data_ptr():  # not decoded in place
                    span.copy_(piece)
                start += piece.shape[2]
        return out[:, :, :num_hit]

    @contextlib.contextmanager
    def retrieve_views(
        self,
        tokens: Tokens,
        *,
        tenant_salt: bytes = b"",
        out: torch.Tensor | None = None,
        segment: bool = False,
        info: LoadInfo | None = None,
    ) -> Iterator[list[torch.Tensor]]:
        """KV of the leading cached tokens of `tokens` (as `lookup` counts them), chunk by
        chunk, without copying what the store holds raw in memory.

        Yields CPU tensors `[L, 2, n_i, H, D]` that cover the hit tokens in order. A chunk
        held raw in the store's (shared) memory is a view of that memory: valid only inside
        the block, read-only by contract. Other chunks are decoded into `out` at their
        token offset (it then needs room for every hit token) or else into new memory.
        A corrupt chunk ends the hit there and is deleted after the block. `info`, if
        given, is filled with where the yielded tokens came from (`LoadInfo`).
        """
        keys, tail = self._prompt_keys(tokens, tenant_salt, segment)
        c = self.chunk_size_tokens
        bad_keys: list[ChunkKey] = []
        try:
            with contextlib.ExitStack() as stack:
                prefix = stack.enter_context(self.backend.read_prefix(keys, tail))
                blobs, hit = prefix.blobs[: prefix.hit.num_chunks], prefix.hit
                num_hit = min(len(blobs) * c, len(tokens))
                num_partial = hit.num_partial_tokens
                if out is not None:
                    self._check_kv(out, min_tokens=num_hit + num_partial)
                    if out.device.type != "cpu":
                        raise LayoutMismatch("out must be a CPU tensor; copy to the device after")
                kv: list[torch.Tensor] = []
                for i, blob in enumerate(blobs):
                    try:
                        n = min(c, num_hit - i * c)
                        kv.append(self._chunk_kv(blob, keys[i], n, out, i * c))
                    except CorruptChunk as exc:
                        self._log.warning("decode", "chunk %d unusable, deleted: %s", i, exc)
                        bad_keys.append(keys[i])
                        num_partial = 0
                        break
                partial_key = hit.partial_key
                if partial_key is not None and partial_key.namespace != keys[0].namespace:
                    num_partial = 0  # a stranger's chunk: never this prompt's KV
                if num_partial and hit.partial_key is not None:
                    key = hit.partial_key
                    try:
                        blob = prefix.blobs[-1]
                        kv.append(self._chunk_kv(blob, key, num_partial, out, num_hit, exact=False))
                    except CorruptChunk as exc:
                        self._log.warning("decode", "partial chunk unusable, deleted: %s", exc)
                        bad_keys.append(key)
                self.metrics.retrieved_tokens.inc(sum(int(piece.shape[2]) for piece in kv))
                self._count_sources(kv, prefix.sources, num_hit, info)
                yield kv
        finally:
            if bad_keys:  # found in the store's RAM (here or the daemon's): counted there
                self.metrics.corrupt_chunks.labels("memory").inc(len(bad_keys))
                self.backend.delete(bad_keys)  # a miss from now on, so it can be stored again

    def _count_sources(
        self,
        kv: list[torch.Tensor],
        sources: tuple[str, ...],
        num_whole: int,
        info: LoadInfo | None,
    ) -> None:
        """Loaded tokens by the tier they came from (`kvdepot_engine_loaded_tokens_total`)."""
        by_tier: dict[str, int] = {}
        start = 0
        for i, piece in enumerate(kv):
            n = int(piece.shape[2])
            tier = tier_label(sources[i]) if i < len(sources) else "unknown"
            by_tier[tier] = by_tier.get(tier, 0) + n
            if info is not None:
                info.pieces.append((tier, n, start >= num_whole))
            start += n
        for tier, n in by_tier.items():  # one counter update per tier, not per chunk
            self.metrics.loaded_tokens.labels(tier).inc(n)

    def _chunk_kv(
        self,
        blob: memoryview | bytes,
        key: ChunkKey,
        num_tokens: int,
        out: torch.Tensor | None,
        start: int,
        *,
        exact: bool = True,
    ) -> torch.Tensor:
        """The first `num_tokens` of a stored chunk as `[L, 2, num_tokens, H, D]`: a view of
        the blob if it is raw (no copy), else decoded into `out` at `start` if it has room, or
        into new memory. The chunk must hold exactly `num_tokens` (or at least, not `exact`)
        and be bound to `key`."""
        header, payload = open_blob(blob, key=key, verify=False)
        n = header.shape[2] if len(header.shape) == 5 else -1
        if (
            header.dtype is not self.layout.dtype
            or header.shape != self.layout.chunk_shape(n)
            or (n != num_tokens if exact else n < num_tokens)
        ):
            raise CorruptChunk(
                f"chunk holds {header.dtype.name}{list(header.shape)}, expected "
                f"{self.layout.dtype.name}{list(self.layout.chunk_shape(num_tokens))}"
            )
        view = raw_view(header, payload)
        if view is not None:
            kv = torch_from_bits(view, header.dtype)
        else:
            if out is not None and start + n <= out.shape[2]:
                kv = out[:, :, start : start + n]
            else:
                kv = torch.empty(header.shape, dtype=torch_dtype(header.dtype))
            self.registry.by_id(header.codec_id).decode_into(header, payload, as_numpy_bits(kv))
        return kv[:, :, :num_tokens]

    def _root_key(self, tenant_salt: bytes) -> ChunkKey:
        """The parent of every chain's first chunk: the namespace's root hash."""
        with self._lock:
            root = self._roots.get(tenant_salt)
        if root is None:
            ns = self.namespace(tenant_salt)
            root = ChunkKey(ns.digest, ns.root_hash())
            with self._lock:
                self._roots[tenant_salt] = root
        return root

    def _remember(
        self, tokens: Tokens, keys: list[ChunkKey], held: list[int], tenant_salt: bytes
    ) -> None:
        """Tell the store's continuation index that chunk `keys[i]` follows `keys[i - 1]`
        (the namespace root for i = 0), for each i in `held`."""
        if not held:
            return
        ids, root, c = _token_ids(tokens), self._root_key(tenant_salt), self.chunk_size_tokens
        entries: list[Continuation] = [
            (keys[i - 1] if i else root, keys[i], token_bytes(ids[i * c : (i + 1) * c]))
            for i in held
        ]
        # Events announce a namespace without a tenant salt only (a salted one's tokens are
        # that tenant's), under the model's first announced name.
        model = "" if tenant_salt else (self._names or (self.model_fingerprint,))[0]
        try:
            self.backend.remember(entries, [(root, model, c)])
        except Exception as exc:  # a hint only
            self._log.warning("remember", "continuation index update failed: %s", exc)

    def _check_kv(self, kv: torch.Tensor, min_tokens: int = 0) -> None:
        expected = self.layout.chunk_shape(kv.shape[2] if kv.dim() == 5 else -1)
        if tuple(kv.shape) != expected or dtype_from_torch(kv.dtype) is not self.layout.dtype:
            raise LayoutMismatch(
                f"KV tensor {kv.dtype}{list(kv.shape)} does not match the engine's layout "
                f"{self.layout.layout_id} ([num_layers, 2, tokens, kv_heads, head_dim])"
            )
        if kv.shape[2] < min_tokens:
            raise LayoutMismatch(f"out has room for {kv.shape[2]} tokens, {min_tokens} needed")
