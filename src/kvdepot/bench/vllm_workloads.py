"""The head-to-head benchmark's workloads: long-document QA and a multi-turn chat, as tokens.

Pure code on top of `kvdepot.workloads` (synthetic product handbooks with planted facts) and a
tokenizer with a chat template; runs in each benchmark engine process, which all build the
same prompts from the same seeds. Every request belongs to a group (a document, a
conversation) whose requests run in order: the first is cold (nothing of it was seen), the
later ones are warm (they share a long prefix with an earlier request of their group).

- QA: per document (2K-4K tokens), several questions, each `system + user(document +
  question)`: later questions reuse the document prefix; then the first question again,
  verbatim (a retried or repeated request: the whole prompt is cached).
- chat: per conversation, the document and a question, then turns that each add the previous
  answer and a new question; turn t's prompt is turn t-1's messages + answer + question,
  through the chat template, as a chat server builds it. The answer is the model's own
  (decoded from its greedy output: the same in every setup whose outputs match vLLM's), or,
  with `scripted`, a fixed sentence with the planted fact that no cache has seen.
- users: many users at once, in rounds, in the spirit of LMCache's multi-round QA benchmark:
  every conversation opens with the same long system prompt (a shared handbook) and the
  user's own notes; each round, every user asks the next question at the same time (one
  batch), with the earlier answers in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvdepot.workloads import Document, make_document

TOKENS_PER_PRODUCT = 280
"""About how many tokens one product adds to a handbook (SmolLM2's tokenizer)."""


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One prompt of a workload.

    Attributes:
        workload: "qa" or "chat".
        group: the document or conversation it belongs to.
        kind: "cold" (the group's first request), "warm" (shares a prefix with an earlier
            one) or "repeat" (an earlier prompt again, verbatim).
        token_ids: the prompt, chat template applied.
    """

    workload: str
    group: int
    kind: str
    token_ids: list[int]


def doc_sizes(num_docs: int, min_tokens: int, max_tokens: int) -> list[int]:
    """`num_docs` target lengths spread evenly over [min_tokens, max_tokens]."""
    if num_docs == 1:
        return [min_tokens]
    step = (max_tokens - min_tokens) / (num_docs - 1)
    return [round(min_tokens + i * step) for i in range(num_docs)]


def _document(seed: int, num_tokens: int) -> Document:
    return make_document(seed=seed, num_products=max(1, round(num_tokens / TOKENS_PER_PRODUCT)))


def _encode(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def qa_requests(
    tokenizer: Any, sizes: list[int], num_questions: int, seed: int = 300
) -> list[BenchRequest]:
    """Per document (one per size), `num_questions` questions about it, then the first again."""
    out = []
    for group, size in enumerate(sizes):
        doc = _document(seed + group, size)
        facts = doc.facts[:: max(1, len(doc.facts) // num_questions)][:num_questions]
        for index, fact in enumerate(facts):
            content = f"{doc.text}\n\nQuestion: {fact.question} Answer in one sentence."
            ids = _encode(tokenizer, [{"role": "user", "content": content}])
            out.append(BenchRequest("qa", group, "warm" if index else "cold", ids))
        out.append(BenchRequest("qa", group, "repeat", out[-len(facts)].token_ids))
    return out


@dataclass(frozen=True, slots=True)
class ChatScript:
    """One conversation: its opening message, the question of every later turn, and the
    scripted answer to each turn (used instead of the model's with `scripted` answers)."""

    group: int
    opening: str
    questions: list[str]
    scripted_answers: list[str]
    system: str = ""  # a system prompt before the opening (the users workload: shared)

    def prompt(self, tokenizer: Any, answers: list[str]) -> list[int]:
        """Turn `len(answers)`'s prompt: the opening, then each answer and the next question."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [{"role": "user", "content": self.opening}]
        for answer, question in zip(answers, self.questions, strict=False):
            messages += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": question}]  # fmt: skip
        return _encode(tokenizer, messages)


def chat_scripts(sizes: list[int], num_turns: int, seed: int = 500) -> list[ChatScript]:
    """Per conversation (one per size), `num_turns` turns about one handbook."""
    out = []
    for group, size in enumerate(sizes):
        doc = _document(seed + group, size)
        facts = doc.facts[:: max(1, len(doc.facts) // num_turns)][:num_turns]
        opening = f"Here is a handbook.\n\n{doc.text}\n\n{facts[0].question}"
        scripted = [f"According to the handbook, the answer is {f.answer}." for f in facts]
        out.append(ChatScript(group, opening, [f.question for f in facts[1:]], scripted))
    return out


def user_scripts(
    num_users: int, num_rounds: int, shared_tokens: int, user_tokens: int, seed: int = 700
) -> list[ChatScript]:
    """The users workload: one conversation per user, `num_rounds` questions each, all
    opening with the same `shared_tokens`-token system prompt and `user_tokens` of the user's
    own notes."""
    shared = _document(seed, shared_tokens)
    system = f"You answer questions about this handbook.\n\n{shared.text}"
    out = []
    for user in range(num_users):
        notes = _document(seed + 1 + user, user_tokens)
        facts = [*notes.facts, *shared.facts]
        facts = facts[:: max(1, len(facts) // num_rounds)][:num_rounds]
        opening = f"My notes:\n\n{notes.text}\n\n{facts[0].question}"
        scripted = [f"The answer is {f.answer}." for f in facts]
        out.append(ChatScript(user, opening, [f.question for f in facts[1:]], scripted, system))
    return out


def paired_prompts(
    tokenizer: Any, num_prompts: int, num_tokens: int, seed: int = 900
) -> list[list[int]]:
    """`num_prompts` never-seen prompts of exactly `num_tokens` tokens (for cold pairs)."""
    out = []
    for i in range(num_prompts):
        ids = list(tokenizer(_document(seed + i, num_tokens * 3 // 2 + 300).text)["input_ids"])
        if len(ids) < num_tokens:
            raise ValueError(f"document too short: {len(ids)} < {num_tokens} tokens")
        out.append(ids[:num_tokens])
    return out
