"""CacheBlend: reuse a document's KV wherever it appears in a prompt.

Prefix caching helps only when the cached text starts the prompt. Here a prompt is a list of
segments (system prompt, documents, question); each reusable segment's KV is computed on its
own and stored under a key of its own tokens, through the same tiers and daemon as prefix
chunks. A request fetches its segments' KV, moves their keys to the new positions (RoPE),
recomputes the few tokens whose KV deviates most, and generates. Modules, in import order:
`segments` (pure), `adapters` (the model-specific part), `blender` (the recompute pass),
`context` (a request's blended context). The engines' entry points live with their
connectors: `kvdepot.connectors.blend_transformers.BlendGenerator` (transformers) and the
vLLM connector's blend path (`kvdepot.connectors.vllm.blend`).
"""

from kvdepot.blend.adapters import ADAPTERS, BlendAdapter, BlendUnsupported, adapter_for
from kvdepot.blend.blender import BlendStats, blend, select_tokens
from kvdepot.blend.context import BlendedKV, Blending
from kvdepot.blend.segments import (
    DEFAULT_SEPARATOR,
    BlendRequest,
    Segment,
    blend_request,
    from_texts,
    prompt_ids,
    segment_offsets,
    split_text,
)

__all__ = [
    "ADAPTERS",
    "DEFAULT_SEPARATOR",
    "BlendAdapter",
    "BlendRequest",
    "BlendStats",
    "BlendUnsupported",
    "BlendedKV",
    "Blending",
    "Segment",
    "adapter_for",
    "blend",
    "blend_request",
    "from_texts",
    "prompt_ids",
    "segment_offsets",
    "select_tokens",
    "split_text",
]
