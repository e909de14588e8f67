"""BlendGenerator: generation from a segmented prompt, reusing each segment's KV anywhere.

Runs in the process that holds the model (transformers). For each request `generate`:
1. finds the context: every segment before the trailing non-reusable ones (the question);
   with `blend.selection: query`, the question too but its last token (forced in the pass,
   its attention ranks the tokens to recompute);
2. fetches each reusable segment's own KV by its segment key (`CacheEngine(segment=True)`);
   a segment not cached yet is computed on its own (positions 0..n-1) and stored;
3. moves each segment's keys to its position in the prompt (`BlendAdapter.rerotate`);
4. recomputes the KV of the selected tokens (`blender.blend`: highest KV deviation at the
   check layer, `recompute_ratio` of the reused tokens; non-reusable segments inside the
   context always);
5. lets `model.generate` compute the question on the blended cache and decode.

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
from kvdepot.blend.blender import BlendStats, blend
from kvdepot.blend.segments import Segment, prompt_ids, segment_offsets
from kvdepot.config import BlendConfig
from kvdepot.connectors.transformers import (
    FirstTokenClock,
    KVDepotGenerator,
    generate_from_cache,
    layer_kv,
)
from kvdepot.engine import CacheEngine, LoadInfo
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


@dataclass(slots=True)
class _Context:
    """The assembled context: its KV `[L, 2, H, T, D]` and which tokens are what."""

    kv: torch.Tensor
    candidates: torch.Tensor
    forced: torch.Tensor
    num_reused: int = 0
    num_computed: int = 0
    loaded: LoadInfo = field(default_factory=LoadInfo)


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
        self._scratch_kv: torch.Tensor | None = None
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
        num_computed = 0
        for segment in segments:
            tokens = list(segment.token_ids)
            if segment.reuse and self.engine.lookup(
                tokens, tenant_salt=tenant_salt, segment=True
            ) < len(tokens):
                self._compute_and_store(tokens, tenant_salt)
                num_computed += len(tokens)
        return num_computed

    def blended_cache(
        self, segments: Sequence[Segment], ratio: float, tenant_salt: bytes = b""
    ) -> BlendedCache:
        """The context's blended KV as a `DynamicCache` (steps 1-4 of the module docstring).

        Raises on any failure (`generate` turns that into a fallback); the cache covers every
        token before the trailing non-reusable segments (query-aware selection: every prompt
        token but the last).
        """
        ids = prompt_ids(segments)
        num_question = sum(len(s) for s in _trailing_questions(segments))
        # Query-aware selection runs the question (but its last token) in the pass, forced.
        num_query = num_question - 1 if self.config.selection == "query" and ratio > 0 else 0
        num_context = len(ids) - num_question + num_query
        adapter = self._adapter_or_raise()
        context = self._assemble(adapter, segments, num_context, tenant_salt)
        stats: BlendStats | None = None
        if ratio > 0 or bool(context.forced.any()):
            with torch.inference_mode():
                stats = blend(
                    adapter,
                    torch.as_tensor(ids[:num_context]),
                    context.kv,
                    candidates=context.candidates,
                    forced=context.forced,
                    ratio=ratio,
                    check_layer=min(self.config.check_layer, context.kv.shape[0] - 1),
                    num_query=num_query,
                )
        cache = DynamicCache(
            ddp_cache_data=[(layer[0][None], layer[1][None]) for layer in context.kv],
            config=self.model.config,
        )
        return BlendedCache(
            cache,
            num_context,
            context.num_reused,
            context.num_computed,
            stats.num_selected - num_query if stats is not None else 0,  # the question: computed
            context.loaded.by_tier(),
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

    def _assemble(
        self,
        adapter: BlendAdapter,
        segments: Sequence[Segment],
        num_context: int,
        tenant_salt: bytes,
    ) -> _Context:
        """Each context segment's own KV, moved to its position, in one `[L, 2, H, T, D]`."""
        layout = self.engine.layout
        # Every position is written below: a moved segment's KV, or a forced token's in the pass.
        kv = torch.empty(
            (layout.num_layers, 2, layout.num_kv_heads, num_context, layout.head_dim),
            dtype=self.model.dtype,
        )
        context = _Context(
            kv,
            candidates=torch.zeros(num_context, dtype=torch.bool),
            forced=torch.zeros(num_context, dtype=torch.bool),
        )
        for segment, offset in zip(segments, segment_offsets(segments), strict=False):
            if offset >= num_context:
                break
            span = slice(offset, min(offset + len(segment), num_context))
            if not segment.reuse:
                context.forced[span] = True
                continue
            own = self._segment_kv(segment, tenant_salt, context)  # [L, 2, n, H, D]
            target = kv[:, :, :, span]
            target.copy_(own.permute(0, 1, 3, 2, 4))
            adapter.rerotate(target[:, 0], offset)
            # At offset 0 a segment's own KV is its true KV: nothing to fix there.
            context.candidates[span] = offset > 0
        return context

    def _segment_kv(self, segment: Segment, salt: bytes, context: _Context) -> torch.Tensor:
        """`[L, 2, n, H, D]`: the segment's own KV, from the cache or computed (and stored)."""
        tokens = list(segment.token_ids)
        # retrieve answers the leading cached tokens: one read, no separate lookup.
        loaded = LoadInfo()
        kv = self.engine.retrieve(
            tokens, tenant_salt=salt, out=self._scratch(len(tokens)), segment=True, info=loaded
        )
        if kv.shape[2] == len(tokens):
            context.num_reused += len(tokens)
            context.loaded.pieces += loaded.pieces
            return kv
        context.num_computed += len(tokens)
        return self._compute_and_store(tokens, salt)

    def _compute_and_store(self, tokens: list[int], salt: bytes) -> torch.Tensor:
        kv = self._compute_own_kv(tokens)
        try:
            self.engine.store(tokens, kv, tenant_salt=salt, segment=True)
        except Exception as exc:  # not cached this time; the request goes on
            self._log.warning("store", "kvdepot: storing a segment failed: %s", exc)
        return kv

    def _scratch(self, num_tokens: int) -> torch.Tensor:
        """A reused CPU tensor with room for one segment of `num_tokens` (fresh memory is slow).

        Always a normal tensor, even when `blended_cache` first runs inside
        `torch.inference_mode`: an inference tensor cannot be filled again outside it.
        """
        if self._scratch_kv is None or self._scratch_kv.shape[2] < num_tokens:
            shape = self.engine.layout.chunk_shape(num_tokens)
            with torch.inference_mode(False):
                self._scratch_kv = torch.empty(shape, dtype=self.model.dtype)
        return self._scratch_kv

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


def _trailing_questions(segments: Sequence[Segment]) -> list[Segment]:
    """The non-reusable segments at the end of the prompt (computed by `model.generate`)."""
    out: list[Segment] = []
    for segment in reversed(segments):
        if segment.reuse:
            break
        out.append(segment)
    return out
