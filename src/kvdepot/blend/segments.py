"""Prompt segments: the units CacheBlend reuses wherever they appear in a prompt.

Pure code (no model), used in the engine's process. A prompt is a sequence of segments whose
token ids, concatenated in order, are the prompt. A reusable segment (a system prompt, a
document) has its KV computed on its own, at positions 0..n-1, and stored under a key of its
own tokens only (`CacheEngine(..., segment=True)`); a non-reusable one (the question, anything
request-specific) is always computed. Each segment is tokenized on its own, so the same text
gives the same tokens, and hence the same key, wherever it appears.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvdepot.config import BlendConfig
from kvdepot.errors import ConfigError

DEFAULT_SEPARATOR = BlendConfig().separator
"""Separator string of `split_text`; removed from the text, never tokenized."""

Tokenize = Callable[[str], Sequence[int]]
"""Text to token ids, without special tokens added (e.g. `tokenizer.encode(text,
add_special_tokens=False)`)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One piece of a prompt.

    Attributes:
        token_ids: its tokens.
        reuse: True: its KV may come from the cache (computed on its own, then moved to its
            position); False: always computed in place (the question).
    """

    token_ids: tuple[int, ...]
    reuse: bool = True

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ConfigError("a segment needs at least one token")

    def __len__(self) -> int:
        return len(self.token_ids)


def prompt_ids(segments: Sequence[Segment]) -> list[int]:
    """The prompt's token ids: every segment's, in order."""
    return [t for segment in segments for t in segment.token_ids]


def segment_offsets(segments: Sequence[Segment]) -> list[int]:
    """Position of each segment's first token in the prompt."""
    offsets, position = [], 0
    for segment in segments:
        offsets.append(position)
        position += len(segment)
    return offsets


def from_texts(
    tokenize: Tokenize, reusable: Sequence[str], question: str, *, prefix: str = ""
) -> list[Segment]:
    """Segments of a prompt `prefix + reusable[0] + ... + question`.

    `prefix` (e.g. the chat template's system turn) and each reusable text become reusable
    segments; the question is always computed. Empty texts are skipped.
    """
    segments = [Segment(tuple(tokenize(t))) for t in (prefix, *reusable) if t]
    if not question:
        raise ConfigError("the question (the last segment) must not be empty")
    return [*segments, Segment(tuple(tokenize(question)), reuse=False)]


def split_text(tokenize: Tokenize, text: str, separator: str = DEFAULT_SEPARATOR) -> list[Segment]:
    """Segments of `text` cut at every `separator` (which is dropped).

    Every part but the last is reusable (a system prompt, documents); the last part is the
    question, always computed. A text without the separator is one question segment.
    """
    if not separator:
        raise ConfigError("the segment separator must not be empty")
    *reusable, question = text.split(separator)
    return from_texts(tokenize, reusable, question)


SEGMENTS_PARAM = "kvdepot.segments"
"""`kv_transfer_params` key of a vLLM request's segments: their lengths, in prompt order."""
REUSE_PARAM = "kvdepot.reuse"
"""`kv_transfer_params` key: which segments are reusable (default: all but the last)."""
RATIO_PARAM = "kvdepot.recompute_ratio"
"""`kv_transfer_params` key: this request's recompute ratio (default: `blend.recompute_ratio`)."""
BLEND_SALT_MARK = "#kvdepot-blend:"
"""Splits a blended vLLM request's `cache_salt` into its tenant (before) and a nonce (after).

A blended context's KV is approximate and depends on the question: vLLM's own prefix cache
must never hand it to another request, so every blended request carries a `cache_salt` of its
own (vLLM keys its blocks by it); kvdepot keys the segments by the tenant part alone, so they
are shared by the tenant's requests."""


@dataclass(frozen=True, slots=True)
class BlendRequest:
    """The fields of a vLLM request that asks the kvdepot connector to blend its prompt.

    With `LLM.generate`: `TokensPrompt(prompt_token_ids=r.prompt_token_ids,
    cache_salt=r.cache_salt)` and `SamplingParams(extra_args={"kv_transfer_params":
    r.kv_transfer_params})`; with the OpenAI server's completions API: `"prompt":
    r.prompt_token_ids, "cache_salt": r.cache_salt, "kv_transfer_params":
    r.kv_transfer_params`.
    """

    prompt_token_ids: list[int]
    cache_salt: str
    kv_transfer_params: dict[str, Any]


def blend_request(
    segments: Sequence[Segment], *, tenant: str = "", recompute_ratio: float | None = None
) -> BlendRequest:
    """A vLLM request for `segments` (the last one the question), blended by the connector
    (`blend.enabled`); `tenant` keeps the segments' KV apart from other tenants' (a plain
    request's `cache_salt`)."""
    if not segments or segments[-1].reuse:
        raise ConfigError("the last segment must be the question (Segment(..., reuse=False))")
    if BLEND_SALT_MARK in tenant:
        raise ConfigError(f"a tenant name must not contain {BLEND_SALT_MARK!r}")
    params: dict[str, Any] = {
        SEGMENTS_PARAM: [len(s) for s in segments],
        REUSE_PARAM: [s.reuse for s in segments],
    }
    if recompute_ratio is not None:
        if not 0.0 <= recompute_ratio <= 1.0:
            raise ConfigError(f"recompute ratio must be within 0..1, got {recompute_ratio}")
        params[RATIO_PARAM] = recompute_ratio
    salt = f"{tenant}{BLEND_SALT_MARK}{secrets.token_hex(8)}"
    return BlendRequest(prompt_ids(segments), salt, params)


def segments_of(
    token_ids: Sequence[int], params: dict[str, Any] | None, cache_salt: str | None
) -> tuple[list[Segment], str, float | None] | str | None:
    """A vLLM request's segments, tenant and recompute ratio (see `blend_request`); None
    when it carries no segments; else why it cannot be blended (a metric label): its
    segments do not cover its prompt, or its `cache_salt` is not one of its own."""
    lengths = (params or {}).get(SEGMENTS_PARAM)
    if lengths is None:
        return None
    reuse = (params or {}).get(REUSE_PARAM)
    ratio = (params or {}).get(RATIO_PARAM)
    if not isinstance(lengths, list) or not all(isinstance(n, int) and n > 0 for n in lengths):
        return "bad-segments"
    if reuse is None:
        reuse = [True] * (len(lengths) - 1) + [False]
    if not isinstance(reuse, list) or len(reuse) != len(lengths) or not lengths or reuse[-1]:
        return "bad-segments"
    if sum(lengths) != len(token_ids):
        return "bad-segments"
    if ratio is not None and (not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0):
        return "bad-segments"
    if not cache_salt or BLEND_SALT_MARK not in cache_salt:
        return "shared-cache-salt"
    segments, start = [], 0
    for n, is_reused in zip(lengths, reuse, strict=True):
        segments.append(Segment(tuple(token_ids[start : start + n]), bool(is_reused)))
        start += n
    tenant = cache_salt.split(BLEND_SALT_MARK, 1)[0]
    return segments, tenant, None if ratio is None else float(ratio)
