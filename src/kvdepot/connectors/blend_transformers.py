"""BlendGenerator: CacheBlend with Hugging Face transformers.

Runs in the process that holds the model. For each request `generate` blends the context
(`kvdepot.blend.context`: each reusable segment's own KV, fetched or computed and stored,
moved to its position, the selected tokens recomputed), then lets `model.generate` compute
the question on the blended cache and decode.

Invariants: a segment's key holds its tokens, model fingerprint, layout and tenant salt, so
KV of another model, layout or tenant is never blended in. Anything that stops a blend
(model family without an adapter, a tier error, a failure in the pass) is logged with its
reason and the request runs as a plain prefill through `KVDepotGenerator` (which still uses
prefix caching): a request never fails because of kvdepot. Batch size 1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, GenerationConfig

from kvdepot.blend.adapters import BlendAdapter, BlendUnsupported, adapter_for
from kvdepot.blend.context import Blending
from kvdepot.blend.segments import Segment, prompt_ids
from kvdepot.config import BlendConfig
from kvdepot.connectors.transformers import (
    FirstTokenClock,
    KVDepotGenerator,
    generate_from_cache,
    layer_kv,
)
from kvdepot.engine import CacheEngine
from kvdepot.errors import ConfigError
from kvdepot.logutil import RateLimitedLog
from kvdepot.records import RequestRecord

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlendResult:
    """One segmented request's outcome.

    Attributes:
        token_ids: the generated tokens (prompt excluded).
        num_prompt_tokens: prompt length.
        num_reused_tokens: context tokens whose KV came from the cache.
        num_computed_tokens: context tokens of segments computed on their own (not cached).
        num_recomputed_tokens: tokens the blend recomputed past the check layer.
        ttft_s: from the call to the first token's logits (fetch, blend and prefill included).
        total_s: the whole call.
        fallback_reason: why the request ran as a plain prefill; None if it was blended.
        reused_by_tier: the reused tokens by the tier they were loaded from.
    """

    token_ids: list[int]
    num_prompt_tokens: int
    num_reused_tokens: int
    num_computed_tokens: int
    num_recomputed_tokens: int
    ttft_s: float
    total_s: float
    fallback_reason: str | None = None
    reused_by_tier: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BlendedCache:
    """A blended context, ready for `model.generate` (or a teacher-forced forward).

    Attributes:
        cache: the KV of the first `num_context_tokens` prompt tokens.
        num_reused: context tokens whose KV came from the cache.
        num_computed: context tokens of segments computed on their own just now.
        num_recomputed: tokens the blend recomputed past the check layer.
        reused_by_tier: the reused tokens by the tier they were loaded from.
    """

    cache: DynamicCache
    num_context_tokens: int
    num_reused: int
    num_computed: int
    num_recomputed: int
    reused_by_tier: dict[str, int] = field(default_factory=dict)


class BlendGenerator:
    """Wraps a causal LM so that `generate(segments)` blends cached segments' KV."""

    def __init__(
        self,
        model: PreTrainedModel,
        engine: CacheEngine,
        config: BlendConfig | None = None,
    ) -> None:
        self.model = model
        self.engine = engine
        self.config = (config if config is not None else BlendConfig()).validate()
        self.plain = KVDepotGenerator(model, engine, store_generated=False)
        self._log = RateLimitedLog(logger)
        self._adapter: BlendAdapter | BlendUnsupported | None = None
        self.blending = Blending(
            engine, self.config, self._compute_own_kv, dtype=model.dtype, device=model.device
        )
        self._num_requests = 0

    @classmethod
    def for_generator(
        cls, generator: KVDepotGenerator, config: BlendConfig | None = None
    ) -> BlendGenerator:
        """A blend generator sharing `generator`'s model and cache engine."""
        return cls(generator.model, generator.engine, config)

    def generate(
        self,
        segments: Sequence[Segment],
        *,
        max_new_tokens: int = 32,
        generation_config: GenerationConfig | None = None,
        tenant_salt: bytes = b"",
        recompute_ratio: float | None = None,
    ) -> BlendResult:
        """Generate from a segmented prompt (see the module docstring).

        Args:
            segments: the prompt, in order; the last must be non-reusable (the question).
            recompute_ratio: overrides the configured ratio for this request; 0 reuses the
                moved KV as is (no recompute pass).
        """
        if not segments or segments[-1].reuse:
            raise ConfigError("the last segment must be the question (Segment(..., reuse=False))")
        ratio = self.config.recompute_ratio if recompute_ratio is None else recompute_ratio
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"recompute ratio must be within 0..1, got {ratio}")
        start = time.perf_counter()
        ids = prompt_ids(segments)
        if not any(segment.reuse for segment in segments):  # nothing to blend: not a failure
            return self._fallback(ids, None, start, max_new_tokens, generation_config, tenant_salt)
        clock = FirstTokenClock()
        try:
            blend_start = time.perf_counter()
            blended = self.blended_cache(segments, ratio, tenant_salt)
            blend_s = time.perf_counter() - blend_start
            prompt = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
            output, _ = generate_from_cache(
                self.model, prompt, blended.cache, clock, max_new_tokens, generation_config
            )
        except Exception as exc:  # a blend problem must never cost the user the answer
            reason = f"{type(exc).__name__}: {exc}"
            return self._fallback(
                ids, reason, start, max_new_tokens, generation_config, tenant_salt
            )
        metrics = self.engine.metrics
        metrics.blend_requests.labels("blended").inc()
        metrics.blend_tokens.labels("reused").inc(blended.num_reused)
        metrics.blend_tokens.labels("computed").inc(blended.num_computed)
        metrics.blend_tokens.labels("recomputed").inc(blended.num_recomputed)
        result = BlendResult(
            token_ids=output[len(ids) :].tolist(),
            num_prompt_tokens=len(ids),
            num_reused_tokens=blended.num_reused,
            num_computed_tokens=blended.num_computed,
            num_recomputed_tokens=blended.num_recomputed,
            reused_by_tier=blended.reused_by_tier,
            ttft_s=(clock.first_s or time.perf_counter()) - start,
            total_s=time.perf_counter() - start,
        )
        self._report(result, blend_s)
        return result

    def _report(self, result: BlendResult, blend_s: float) -> None:
        """The request's record (`kvdepot.records`): its cached tokens are the reused ones
        the blend kept; `load_s` covers fetching, moving and the selective recompute (the
        segments computed on the way are stored inside it, so `save_s` is 0); its tokens by
        tier are the reused ones, before the recompute. A fallback is recorded by the plain
        generator that serves it."""
        self._num_requests += 1
        kept = result.num_reused_tokens - result.num_recomputed_tokens
        per_token = self.engine.layout.bytes_per_token
        plain = self.plain
        record = RequestRecord(
            "blend", f"blend-{self._num_requests}", result.num_prompt_tokens, kept,
            result.num_prompt_tokens - kept, 0, 0.0, blend_s, 0.0,
            result.num_reused_tokens * per_token, 0, result.ttft_s, None,
            plain.prefill_cost.saved_s(kept), result.reused_by_tier,
        )  # fmt: skip
        plain.request_log.report(record)
        self.engine.count_saved(record.saved_s)

    def index(self, segments: Sequence[Segment], tenant_salt: bytes = b"") -> int:
        """Compute and store every reusable segment not cached yet (e.g. a RAG corpus, ahead
        of its questions); returns the tokens computed."""
        return self.blending.index(segments, tenant_salt)

    def blended_cache(
        self, segments: Sequence[Segment], ratio: float, tenant_salt: bytes = b""
    ) -> BlendedCache:
        """The context's blended KV as a `DynamicCache` (steps 1-4 of the module docstring).

        Raises on any failure (`generate` turns that into a fallback); the cache covers every
        token before the trailing non-reusable segments (query-aware selection: every prompt
        token but the last).
        """
        blended = self.blending.blend_context(
            self._adapter_or_raise(), segments, ratio, tenant_salt
        )
        cache = DynamicCache(
            ddp_cache_data=[(layer[0][None], layer[1][None]) for layer in blended.kv],
            config=self.model.config,
        )
        return BlendedCache(
            cache,
            blended.num_context_tokens,
            blended.num_reused,
            blended.num_computed,
            blended.num_recomputed,
            blended.reused_by_tier,
        )

    def _adapter_or_raise(self) -> BlendAdapter:
        if self._adapter is None:
            try:
                self._adapter = adapter_for(self.model)
            except BlendUnsupported as exc:
                self._adapter = exc
        if isinstance(self._adapter, BlendUnsupported):
            raise self._adapter
        return self._adapter

    def _compute_own_kv(self, tokens: list[int]) -> torch.Tensor:
        """The segment's KV computed on its own, at positions 0..n-1: `[L, 2, n, H, D]`."""
        cache = DynamicCache(config=self.model.config)
        device = self.model.device
        with torch.inference_mode():
            self.model(
                input_ids=torch.as_tensor([tokens], device=device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            layers = [torch.stack(layer_kv(layer, len(tokens))) for layer in cache.layers]
            return torch.stack(layers).permute(0, 1, 3, 2, 4).cpu()

    def _fallback(
        self,
        ids: list[int],
        reason: str | None,
        start: float,
        max_new_tokens: int,
        generation_config: GenerationConfig | None,
        tenant_salt: bytes,
    ) -> BlendResult:
        if reason is None:
            reason = "no reusable segment"
        else:
            self._log.warning("fallback", "kvdepot: blend not possible (%s); full prefill", reason)
        self.engine.metrics.blend_requests.labels("fallback").inc()
        result = self.plain.generate(
            ids,
            max_new_tokens=max_new_tokens,
            generation_config=generation_config,
            tenant_salt=tenant_salt,
        )
        return BlendResult(
            token_ids=result.token_ids,
            num_prompt_tokens=len(ids),
            num_reused_tokens=0,
            num_computed_tokens=0,
            num_recomputed_tokens=0,
            ttft_s=result.ttft_s + (time.perf_counter() - start - result.total_s),
            total_s=time.perf_counter() - start,
            fallback_reason=reason,
        )
