"""Hugging Face transformers integration: generation that reuses cached prompt prefixes.

Runs in the process that holds the model. For each request `KVDepotGenerator.generate`:
1. looks up the longest cached prefix of the prompt (whole chunks, or the whole prompt when
   the same prompt was seen before), and always leaves the last prompt token to compute, so
   the model produces the first token's logits;
2. builds the model's cache object (`DynamicCache`) from the stored chunks;
3. lets `model.generate` prefill only the uncached suffix and decode as usual;
4. stores the chunks the request completed (prompt, and generated tokens by default) that
   the cache did not hold yet.

Invariants: greedy outputs equal plain `model.generate` (the KV is bit-exact and the model's
own code computes the suffix); a cache failure of any kind (lookup, retrieve, cache build,
store) is logged and the request runs as a full prefill, never fails because of kvdepot.
Supports decoder-only models whose layers all use full attention and one KV tensor pair per
layer (Llama, Mistral, Qwen2, SmolLM2, ...); batch size 1.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import xxhash

from kvdepot.engine import CacheEngine, LoadInfo
from kvdepot.errors import ConfigError, KVDepotError
from kvdepot.keys import HashAlgorithm
from kvdepot.layout import KVLayout
from kvdepot.logutil import RateLimitedLog
from kvdepot.records import PrefillCost, RequestLog, RequestRecord
from kvdepot.store import ChunkStore
from kvdepot.tensors import as_numpy_bits, dtype_from_torch

try:
    from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList
    from transformers.cache_utils import DynamicLayer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kvdepot.connectors.transformers needs transformers: pip install 'kvdepot[transformers]'"
    ) from exc

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "dtype")


def model_layout(model: PreTrainedModel) -> KVLayout:
    """The KV layout of `model`'s cache; ConfigError for architectures not supported."""
    config = model.config
    layer_kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers}
    if layer_kinds != {"DynamicLayer"}:
        # Sliding-window (and other) layers keep only recent tokens: their KV is not a prefix.
        raise ConfigError(
            f"{config.model_type}: only full-attention caches are supported, got {layer_kinds}"
        )
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return KVLayout(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        dtype=dtype_from_torch(model.dtype),
    )


def cache_holding(
    model: PreTrainedModel, layers: list[tuple[torch.Tensor, torch.Tensor]]
) -> DynamicCache:
    """A `DynamicCache` for `model` holding each layer's `[1, H, T, D]` keys and values as
    given, not copied (`DynamicCache(ddp_cache_data=...)` concatenates them onto empty
    tensors: a pass over every byte, into fresh memory). The model's first step
    concatenates its new tokens onto them into new tensors, so they are only read."""
    cache = DynamicCache(config=model.config)
    for layer, (keys, values) in zip(cache.layers, layers, strict=True):
        if type(layer) is not DynamicLayer:  # model_layout refuses such models
            raise ConfigError(f"only full-attention cache layers, got {type(layer).__name__}")
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache


def model_fingerprint(model: PreTrainedModel) -> str:
    """Identity of the weights: config (minus paths and versions) + every weight's bytes.

    Two loads of the same weights agree, wherever they were loaded from; a fine-tune, an
    edited tensor, another model or another dtype differs. Hashes all weights with xxh3
    (about 0.1 s per GB here); pass an explicit fingerprint to skip it.
    """
    config = model.config.to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    digest = xxhash.xxh3_128(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{list(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.numel():
            digest.update(as_numpy_bits(tensor.detach().cpu().contiguous().reshape(-1)).data)
    return f"{model.config.model_type}:{digest.hexdigest()}"


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """One request's outcome.

    Attributes:
        token_ids: the generated tokens (prompt excluded).
        num_prompt_tokens: prompt length.
        num_cached_tokens: prompt tokens whose KV came from kvdepot.
        num_stored_tokens: tokens whose KV this request added to the cache.
        ttft_s: from the call to the first token's logits (lookup and load included).
        total_s: the whole call, storing included.
        fallback_reason: why the cache was bypassed, None if it was used.
    """

    token_ids: list[int]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_stored_tokens: int
    ttft_s: float
    total_s: float
    fallback_reason: str | None = None


class FirstTokenClock(LogitsProcessor):
    """Records when the first token's logits exist (called once per generated token)."""

    def __init__(self) -> None:
        self.first_s: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first_s is None:
            self.first_s = time.perf_counter()
        return scores


class KVDepotGenerator:
    """Wraps a causal LM so that `generate` reuses and fills a kvdepot cache."""

    def __init__(
        self,
        model: PreTrainedModel,
        engine: CacheEngine,
        *,
        store_generated: bool = True,
        min_reuse_fraction: float = 0.2,
        request_log: RequestLog | None = None,
    ) -> None:
        """Args:
        store_generated: also store the KV of generated tokens (whole chunks), for the
            next turn of a chat.
        min_reuse_fraction: load a cached prefix only when it covers at least this share
            of the prompt. Prefilling the rest on top of a cache goes through a masked,
            non-causal attention kernel: on CPU, a 2,428-token prefill after 32 cached
            tokens took 1.2x as long as a plain prefill of all 2,460, and the two broke
            even near 20 %.
        request_log: where each request's record goes (`kvdepot.records`); by default the
            engine's metrics, no log line.
        """
        if not 0.0 <= min_reuse_fraction <= 1.0:
            raise ConfigError(f"min_reuse_fraction must be within 0..1, got {min_reuse_fraction}")
        self.model = model
        self.engine = engine
        self.store_generated = store_generated
        self.min_reuse_fraction = min_reuse_fraction
        self._log = RateLimitedLog(logger)
        self._kv_buffer: torch.Tensor | None = None
        self.request_log = request_log or RequestLog(engine.metrics)
        self.prefill_cost = PrefillCost()
        self._num_requests = 0

    @classmethod
    def for_model(
        cls,
        model: PreTrainedModel,
        store: ChunkStore,
        *,
        chunk_size_tokens: int = 256,
        hash_algorithm: HashAlgorithm = HashAlgorithm.BLAKE2B_128,
        store_generated: bool = True,
        fingerprint: str | None = None,
        min_reuse_fraction: float = 0.2,
        request_log: str = "off",
    ) -> KVDepotGenerator:
        """A generator with a cache engine keyed by `model`'s fingerprint and layout.

        Args:
            fingerprint: identity of the weights (e.g. "org/model@revision"); computed from
                the weights when None.
            request_log: one JSON line per request on the `kvdepot.requests` logger at this
                level (off, debug, info, warning); the config's `request_log`.
        """
        engine = CacheEngine(
            store,
            model_layout(model),
            fingerprint if fingerprint is not None else model_fingerprint(model),
            chunk_size_tokens=chunk_size_tokens,
            hash_algorithm=hash_algorithm,
        )
        engine.announce([str(getattr(model.config, "name_or_path", "") or "")])
        return cls(
            model, engine, store_generated=store_generated, min_reuse_fraction=min_reuse_fraction,
            request_log=RequestLog(engine.metrics, request_log),
        )  # fmt: skip

    def generate(
        self,
        input_ids: list[int] | torch.Tensor,
        *,
        max_new_tokens: int = 32,
        generation_config: GenerationConfig | None = None,
        tenant_salt: bytes = b"",
        use_cache: bool = True,
    ) -> GenerationResult:
        """Generate from one prompt, reusing and then extending the cache.

        Args:
            input_ids: the prompt's token ids (a list or a `[T]`/`[1, T]` tensor).
            max_new_tokens: tokens to generate at most.
            generation_config: passed to `model.generate` (greedy when None).
            tenant_salt: cache isolation between tenants.
            use_cache: False skips the lookup (a cold, full prefill) but still stores.
        """
        start = time.perf_counter()
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
        num_prompt = ids.shape[1]
        reason: str | None = None if use_cache else "lookup disabled"
        num_cached, cache = 0, None
        timing = [0.0, 0.0]  # lookup, load
        loaded = LoadInfo()
        if use_cache:
            try:
                num_cached, cache = self._load_prefix(ids[0], tenant_salt, timing, loaded)
            except Exception as exc:
                reason = f"cache load failed: {exc}"
                self._log.warning("load", "kvdepot: %s; running a full prefill", reason)
                num_cached, cache = 0, None
        clock = FirstTokenClock()
        try:
            output, cache = self._generate(ids, cache, clock, max_new_tokens, generation_config)
        except Exception as exc:
            if num_cached == 0:
                raise
            reason = f"generation on cached KV failed: {exc}"
            self._log.warning("generate", "kvdepot: %s; retrying with a full prefill", reason)
            num_cached, clock = 0, FirstTokenClock()
            output, cache = self._generate(ids, None, clock, max_new_tokens, generation_config)
        ttft_s = (clock.first_s or time.perf_counter()) - start
        save_start = time.perf_counter()
        num_stored = self._store(output, cache, num_prompt, num_cached, tenant_salt)
        self._report(num_prompt, num_cached, num_stored, timing, time.perf_counter() - save_start,
                     ttft_s, reason, loaded)  # fmt: skip
        return GenerationResult(
            token_ids=output[num_prompt:].tolist(),
            num_prompt_tokens=num_prompt,
            num_cached_tokens=num_cached,
            num_stored_tokens=num_stored,
            ttft_s=ttft_s,
            total_s=time.perf_counter() - start,
            fallback_reason=reason,
        )

    def _report(
        self,
        num_prompt: int,
        num_cached: int,
        num_stored: int,
        timing: list[float],
        save_s: float,
        ttft_s: float,
        reason: str | None,
        loaded: LoadInfo,
    ) -> None:
        """This request's record (`kvdepot.records`); never raises."""
        self._num_requests += 1
        per_token = self.engine.layout.bytes_per_token
        self.prefill_cost.observe(ttft_s - timing[0] - timing[1], num_prompt - num_cached)
        record = RequestRecord(
            "transformers", str(self._num_requests), num_prompt, num_cached,
            num_prompt - num_cached, num_stored, timing[0], timing[1], save_s,
            num_cached * per_token, num_stored * per_token, ttft_s, reason,
            self.prefill_cost.saved_s(num_cached), loaded.by_tier(end=num_cached),
            loaded.partial_tokens(end=num_cached),
        )  # fmt: skip
        self.request_log.report(record)
        self.engine.count_saved(record.saved_s)

    def load_prefix(self, ids: torch.Tensor, tenant_salt: bytes) -> tuple[int, DynamicCache | None]:
        """(tokens loaded, cache holding them); the last prompt token is always recomputed.

        A full hit (the same prompt again) loads every token but the last: KV of token i
        depends only on tokens up to i, so a cached chunk can be cut anywhere.
        A hit below `min_reuse_fraction` of the prompt is not loaded (a plain prefill is
        faster).
        """
        return self._load_prefix(ids, tenant_salt, [0.0, 0.0])

    def _load_prefix(
        self,
        ids: torch.Tensor,
        tenant_salt: bytes,
        timing: list[float],
        loaded: LoadInfo | None = None,
    ) -> tuple[int, DynamicCache | None]:
        """`load_prefix`, adding its lookup and load seconds to `timing` and what it loaded
        to `loaded`."""
        start = time.perf_counter()
        num_hit = self.engine.lookup(ids, tenant_salt=tenant_salt)  # counts the whole prompt
        timing[0] += time.perf_counter() - start
        num_usable = min(num_hit, ids.shape[0] - 1)
        if num_usable <= 0 or num_usable < self.min_reuse_fraction * ids.shape[0]:
            self.engine.count_unused(num_hit)  # found, but a plain prefill is faster
            return 0, None
        start = time.perf_counter()
        try:
            kv = self.engine.retrieve(
                ids, tenant_salt=tenant_salt, out=self._buffer(ids.shape[0]), info=loaded
            )
            num_cached = min(kv.shape[2], ids.shape[0] - 1)
            if num_cached <= 0:
                return 0, None
            kv = kv[:, :, :num_cached]
            layers = [
                (kv[i, 0].permute(1, 0, 2).unsqueeze(0), kv[i, 1].permute(1, 0, 2).unsqueeze(0))
                for i in range(kv.shape[0])
            ]
            return num_cached, cache_holding(self.model, layers)
        finally:
            timing[1] += time.perf_counter() - start

    def _buffer(self, num_tokens: int) -> torch.Tensor:
        """A reused CPU tensor with room for `num_tokens` (fresh memory is slow to fill).

        Always a normal tensor, even when the call that makes it runs inside
        `torch.inference_mode`: an inference tensor cannot be filled again outside it.
        """
        layout = self.engine.layout
        if self._kv_buffer is None or self._kv_buffer.shape[2] < num_tokens:
            with torch.inference_mode(False):
                self._kv_buffer = torch.empty(
                    layout.chunk_shape(num_tokens), dtype=self.model.dtype, device="cpu"
                )
        return self._kv_buffer

    def _generate(
        self,
        ids: torch.Tensor,
        cache: DynamicCache | None,
        clock: FirstTokenClock,
        max_new_tokens: int,
        generation_config: GenerationConfig | None,
    ) -> tuple[torch.Tensor, DynamicCache]:
        return generate_from_cache(self.model, ids, cache, clock, max_new_tokens, generation_config)

    def _store(
        self,
        output: torch.Tensor,
        cache: DynamicCache,
        num_prompt: int,
        num_cached: int,
        tenant_salt: bytes,
    ) -> int:
        """Store what this request computed; failures are logged, never raised.

        The prompt goes in with its partial tail (the same prompt again then recomputes one
        token); generated tokens go in as whole chunks only, for the next turn of a chat.
        """
        c = self.engine.chunk_size_tokens
        start = num_cached // c * c
        try:
            num_positions = cache.get_seq_length()  # the prompt, and all but the last output
            num_kv = num_positions if self.store_generated else min(num_prompt, num_positions)
            if num_kv <= start:
                return 0
            layers = [layer_kv(layer, num_positions) for layer in cache.layers]
            kv = torch.stack(
                [torch.stack((k[:, start:num_kv], v[:, start:num_kv])) for k, v in layers]
            )
            kv = kv.permute(0, 1, 3, 2, 4).cpu()
            num_stored = self.engine.store(
                output[:num_prompt], kv, tenant_salt=tenant_salt, kv_start_token=start
            )
            if num_kv > num_prompt:
                num_stored += self.engine.store(
                    output[:num_kv], kv, tenant_salt=tenant_salt, kv_start_token=start,
                    store_partial=False,
                )  # fmt: skip
            return num_stored
        except Exception as exc:  # a cache problem must never cost the user the answer
            self._log.warning("store", "kvdepot: storing KV failed, request unaffected: %s", exc)
            return 0


def generate_from_cache(
    model: PreTrainedModel,
    ids: torch.Tensor,
    cache: DynamicCache | None,
    clock: FirstTokenClock,
    max_new_tokens: int,
    generation_config: GenerationConfig | None = None,
) -> tuple[torch.Tensor, DynamicCache]:
    """`model.generate` on `[1, T]` prompt ids whose first tokens' KV is in `cache`.

    The model computes only the tokens `cache` lacks, then decodes (greedy when no config
    is given). Returns (prompt + generated ids `[T + n]` on the CPU, the filled cache).
    """
    cache = cache if cache is not None else DynamicCache(config=model.config)
    config = copy.deepcopy(generation_config) if generation_config else _greedy()
    config.max_new_tokens = max_new_tokens
    device = model.device
    with torch.inference_mode():
        generate = cast(Any, model).generate  # nn.Module typing hides it
        output = generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids, device=device),
            past_key_values=cache,
            generation_config=config,
            logits_processor=LogitsProcessorList([clock]),
        )
    return output[0].cpu(), cache


def layer_kv(layer: object, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of batch item 0 of one cache layer, each `[H, T, D]`; KVDepotError
    unless the layer holds exactly `num_tokens` positions (a window would shift them)."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise KVDepotError(f"cache layer {type(layer).__name__} holds no key/value tensors")
    if keys.shape[-2] != num_tokens or values.shape[-2] != num_tokens:
        raise KVDepotError(f"cache layer holds {keys.shape[-2]} positions, not {num_tokens}")
    return keys[0], values[0]


def _greedy() -> GenerationConfig:
    return GenerationConfig(do_sample=False)  # type: ignore[no-untyped-call]
