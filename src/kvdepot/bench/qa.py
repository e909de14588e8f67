"""Multi-document QA prompts and per-mode results, shared by `bench blend`'s engines.

Pure helpers (no model, no engine): `qa_segments` builds each question's segmented prompt
(`kvdepot.blend.Segment`s) from `workloads.make_multidoc_qa`; `ModeResult` collects one
mode's measurements.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SYSTEM = (
    "<|im_start|>system\nYou answer questions about product handbooks. Answer briefly, "
    "using only the documents.<|im_end|>\n<|im_start|>user\n"
)


@dataclass(slots=True)
class ModeResult:
    """One mode over the whole question set."""

    mode: str
    ttft_s: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    identical: list[bool] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    recomputed_tokens: list[int] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    @property
    def ttft_median(self) -> float:
        return statistics.median(self.ttft_s)

    @property
    def ttft_p90(self) -> float:
        ordered = sorted(self.ttft_s)
        return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def agreement(self) -> float:
        return sum(self.identical) / len(self.identical)

    @property
    def mean_kl(self) -> float:
        return statistics.fmean(self.kl)


def qa_segments(
    tokenize: Callable[[str], Any], docs: list[Any], questions: list[Any]
) -> tuple[list[Any], list[list[Any]]]:
    """The documents' segments and each question's prompt (system, its documents in its
    order, the question). Tokenized once: a document's tokens (and key) are the same in every
    prompt."""
    from kvdepot.blend import Segment

    doc_segments = [Segment(tuple(tokenize(f"Document {d.title}:\n{d.text}\n\n"))) for d in docs]
    system = Segment(tuple(tokenize(SYSTEM)))
    prompts = [
        [system, *[doc_segments[i] for i in q.order],
         Segment(tuple(tokenize(f"Question: {q.question}<|im_end|>\n<|im_start|>assistant\n")),
                 reuse=False)]
        for q in questions
    ]  # fmt: skip
    return doc_segments, prompts
