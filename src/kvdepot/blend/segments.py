"""Prompt segments: the units CacheBlend reuses wherever they appear in a prompt.

Pure code (no model), used in the engine's process. A prompt is a sequence of segments whose
token ids, concatenated in order, are the prompt. A reusable segment (a system prompt, a
document) has its KV computed on its own, at positions 0..n-1, and stored under a key of its
own tokens only (`CacheEngine(..., segment=True)`); a non-reusable one (the question, anything
request-specific) is always computed. Each segment is tokenized on its own, so the same text
gives the same tokens, and hence the same key, wherever it appears.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
