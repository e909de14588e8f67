"""A blended context: each reusable segment's own KV, fetched or computed, moved, blended.

Engine-independent: the transformers entry point (`kvdepot.connectors.blend_transformers`)
and the vLLM connector (`kvdepot.connectors.vllm.blend`) both call it, in the process that
holds the model, so the same prompt gets the same context and the same recomputed tokens in
either engine. For a request `Blending.blend_context`:
1. finds the context: every segment before the trailing non-reusable ones (the question);
   with `blend.selection: query`, the question too but its last token (forced in the pass,
   its attention ranks the tokens to recompute);
2. fetches each reusable segment's own KV by its segment key (`CacheEngine(segment=True)`);
   a segment not cached yet is computed on its own (positions 0..n-1, by the engine's
   `OwnKV`) and stored;
3. moves each segment's keys to its position in the prompt (`BlendAdapter.rerotate`);
4. recomputes the KV of the selected tokens (`blender.blend`: highest KV deviation at the
   check layer, `recompute_ratio` of the reused tokens; non-reusable segments inside the
   context always).

Invariants: a segment's key holds its tokens, model fingerprint, layout and tenant salt, so KV
of another model, layout or tenant is never blended in; a segment at offset 0 is never a
candidate (its own KV is its true KV there). Raises on any failure: the caller falls back to
a plain prefill.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvdepot.blend.adapters import BlendAdapter
from kvdepot.blend.blender import blend
from kvdepot.blend.segments import Segment, prompt_ids, segment_offsets
from kvdepot.config import BlendConfig
from kvdepot.engine import CacheEngine, LoadInfo
from kvdepot.logutil import RateLimitedLog

logger = logging.getLogger(__name__)

OwnKV = Callable[[list[int]], torch.Tensor]
"""Token ids -> their KV computed on their own at positions 0..n-1, `[L, 2, n, H, D]`."""


@dataclass(frozen=True, slots=True)
class BlendedKV:
    """A blended context.

    Attributes:
        kv: `[L, 2, H, T, D]`, the KV of the prompt's first `T = num_context_tokens` tokens,
            on the model's device.
        num_reused: context tokens whose KV came from the cache.
        num_computed: context tokens of segments computed on their own just now.
        num_recomputed: context tokens the blend computed past the check layer (the selected
            reused ones and non-reusable segments inside the context), the question aside.
        selected: the context positions computed past the check layer (recomputed reused
            tokens and forced ones), sorted; None when no pass ran.
        reused_by_tier: the reused tokens by the tier they were loaded from.
    """

    kv: torch.Tensor
    num_context_tokens: int
    num_reused: int
    num_computed: int
    num_recomputed: int
    selected: torch.Tensor | None = None
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


def trailing_questions(segments: Sequence[Segment]) -> list[Segment]:
    """The non-reusable segments at the end of the prompt (computed by the engine)."""
    out: list[Segment] = []
    for segment in reversed(segments):
        if segment.reuse:
            break
        out.append(segment)
    return out


def context_length(segments: Sequence[Segment], config: BlendConfig, ratio: float) -> int:
    """Prompt tokens the blended context covers (step 1 of the module docstring)."""
    num_question = sum(len(s) for s in trailing_questions(segments))
    num_query = num_question - 1 if config.selection == "query" and ratio > 0 else 0
    return len(prompt_ids(segments)) - num_question + num_query


class Blending:
    """Blended contexts of one model over one cache engine (see the module docstring)."""

    def __init__(
        self,
        engine: CacheEngine,
        config: BlendConfig,
        own_kv: OwnKV,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.engine = engine
        self.config = config
        self.own_kv = own_kv
        self.dtype = dtype
        self.device = device
        self._log = RateLimitedLog(logger)
        self._scratch_kv: torch.Tensor | None = None

    def blend_context(
        self,
        adapter: BlendAdapter,
        segments: Sequence[Segment],
        ratio: float,
        tenant_salt: bytes = b"",
    ) -> BlendedKV:
        """The context's blended KV (steps 1-4 of the module docstring); raises on failure."""
        ids = prompt_ids(segments)
        num_context = context_length(segments, self.config, ratio)
        num_question = sum(len(s) for s in trailing_questions(segments))
        num_query = num_context - (len(ids) - num_question)
        context = self._assemble(adapter, segments, num_context, tenant_salt)
        if not (ratio > 0 or bool(context.forced.any())):
            return BlendedKV(context.kv, num_context, context.num_reused, context.num_computed,
                             0, None, context.loaded.by_tier())  # fmt: skip
        with torch.inference_mode():
            stats = blend(
                adapter,
                torch.as_tensor(ids[:num_context]),
                context.kv,
                candidates=context.candidates.to(self.device),
                forced=context.forced.to(self.device),
                ratio=ratio,
                check_layer=min(self.config.check_layer, context.kv.shape[0] - 1),
                num_query=num_query,
            )
        return BlendedKV(
            context.kv,
            num_context,
            context.num_reused,
            context.num_computed,
            stats.num_selected - num_query,  # the question: computed anyway
            stats.selected,
            context.loaded.by_tier(),
        )

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
            dtype=self.dtype,
            device=self.device,
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
        kv = self.own_kv(tokens)
        try:
            self.engine.store(tokens, kv, tenant_salt=salt, segment=True)
        except Exception as exc:  # not cached this time; the request goes on
            self._log.warning("store", "kvdepot: storing a segment failed: %s", exc)
        return kv

    def _scratch(self, num_tokens: int) -> torch.Tensor:
        """A reused CPU tensor with room for one segment of `num_tokens` (fresh memory is slow).

        Always a normal tensor, even when first used inside `torch.inference_mode`: an
        inference tensor cannot be filled again outside it.
        """
        if self._scratch_kv is None or self._scratch_kv.shape[2] < num_tokens:
            shape = self.engine.layout.chunk_shape(num_tokens)
            with torch.inference_mode(False):
                self._scratch_kv = torch.empty(shape, dtype=self.dtype)
        return self._scratch_kv
