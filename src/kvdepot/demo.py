"""`kvdepot demo`: the main job. A real model on CPU, an embedded cache, cold vs warm TTFT.

Runs in the CLI's process. Workload: one long product handbook (several thousand tokens),
a multi-turn conversation about it, and separate questions over the same handbook. Three
passes over the same requests:
1. cold: every request is a full prefill (no lookup); its KV is stored on the way;
2. warm (RAM): every request loads its cached prefix from the RAM tier;
3. warm (disk): the RAM tier is emptied before each request, so the prefix comes from disk.
Greedy decoding, so the warm answers must equal the cold ones; the demo checks it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

from kvdepot.config import KVDepotConfig
from kvdepot.keys import HashAlgorithm
from kvdepot.store import open_store
from kvdepot.tables import format_table
from kvdepot.workloads import Document, make_document

SYSTEM_PROMPT = "You are a precise assistant. Answer from the handbook, in one short sentence."
PASSES = ("cold", "warm RAM", "warm disk")


class ChatTokenizer(Protocol):
    """The two tokenizer methods the demo uses (a transformers tokenizer has both)."""

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        *,
        add_generation_prompt: bool,
        tokenize: bool,
        return_dict: bool,
    ) -> list[int]: ...

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool) -> str: ...


@dataclass(slots=True)
class Record:
    """One request of one pass."""

    name: str
    num_prompt_tokens: int
    num_cached_tokens: int
    ttft_s: float
    answer: str


@dataclass(slots=True)
class DemoResult:
    records: dict[str, list[Record]] = field(default_factory=dict)
    hit_rate: float = 0.0
    usage_lines: list[str] = field(default_factory=list)
    load_s: float = 0.0
    saved_s: float = 0.0
    """Estimated prefill seconds the cache saved (`kvdepot.records.PrefillCost`)."""
    saved_tokens: int = 0
    prefill_ms_per_token: float = 0.0


def _requests(doc: Document, num_turns: int, num_questions: int) -> tuple[list[str], list[str]]:
    facts = doc.facts
    chat = [facts[i * 7 % len(facts)].question for i in range(num_turns)]
    qa = [facts[(i * 11 + 3) % len(facts)].question for i in range(num_questions)]
    return chat, qa


def _user(doc: Document, question: str) -> dict[str, str]:
    return {"role": "user", "content": f"{doc.text}\n\nQuestion: {question}"}


def run_pass(
    name: str,
    generate: Callable[[list[int], bool], tuple[list[int], int, float]],
    tokenizer: ChatTokenizer,
    doc: Document,
    chat: list[str],
    qa: list[str],
    before_each: Callable[[], None],
    progress: Callable[[], object],
) -> list[Record]:
    """Run the conversation, then the questions; returns one record per request."""
    records = []
    system = {"role": "system", "content": SYSTEM_PROMPT}
    messages = [system]
    prompts = [(f"chat turn {i + 1}", q) for i, q in enumerate(chat)] + [
        (f"question {i + 1}", q) for i, q in enumerate(qa)
    ]
    for label, question in prompts:
        is_chat = label.startswith("chat")
        if is_chat:
            messages.append(_user(doc, question) if len(messages) == 1 else
                            {"role": "user", "content": question})  # fmt: skip
            convo = messages
        else:
            convo = [system, _user(doc, question)]
        ids = tokenizer.apply_chat_template(
            convo, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        before_each()
        tokens, num_cached, ttft_s = generate(ids, name != "cold")
        answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if is_chat:
            messages.append({"role": "assistant", "content": answer})
        records.append(Record(label, len(ids), num_cached, ttft_s, answer))
        progress()
    return records


def run_demo(
    config: KVDepotConfig,
    model_dir: Path,
    *,
    num_products: int = 12,
    num_turns: int = 3,
    num_questions: int = 3,
    max_new_tokens: int = 24,
    show_progress: bool = True,
) -> DemoResult:
    """Load the model, run the three passes, return every record (printing nothing)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvdepot.connectors.transformers import KVDepotGenerator

    result = DemoResult()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # fp32: this class of CPU has no bf16 instructions, and fp32 prefill is much faster.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    )
    model.train(False)
    result.load_s = time.perf_counter() - start
    doc = make_document(seed=7, num_products=num_products)
    chat, qa = _requests(doc, num_turns, num_questions)
    passes = PASSES if config.disk.path else PASSES[:2]
    with open_store(config) as store:
        generator = KVDepotGenerator.for_model(
            model,
            store,
            chunk_size_tokens=config.chunk_size_tokens,
            hash_algorithm=HashAlgorithm(config.hash_algorithm),
        )

        def generate(ids: list[int], use_cache: bool) -> tuple[list[int], int, float]:
            r = generator.generate(ids, max_new_tokens=max_new_tokens, use_cache=use_cache)
            return r.token_ids, r.num_cached_tokens, r.ttft_s

        total = len(passes) * (len(chat) + len(qa))
        with tqdm(total=total, desc="requests", unit="req", disable=not show_progress) as bar:
            for name in passes:
                bar.set_description(name)
                before = store.memory.clear if name == "warm disk" else _nothing
                store.flush()
                result.records[name] = run_pass(
                    name, generate, cast(ChatTokenizer, tokenizer), doc, chat, qa, before,
                    lambda: bar.update(),
                )  # fmt: skip
        result.hit_rate = store.metrics.hit_rate()
        labels = {"connector": "transformers"}
        result.saved_s = store.metrics.counter_value("kvdepot_prefill_seconds_saved_total", labels)
        result.saved_tokens = int(
            store.metrics.counter_value("kvdepot_prefill_tokens_saved_total", labels)
        )
        cost = generator.prefill_cost
        result.prefill_ms_per_token = 1e3 * cost.seconds / cost.tokens if cost.tokens else 0.0
        store.flush()
        for tier, usage in store.usage().items():
            result.usage_lines.append(
                f"{tier}: {usage.num_objects} chunks, {usage.used_bytes / 2**20:.1f} MiB "
                f"of {usage.capacity_bytes / 2**20:.0f} MiB"
            )
    return result


def _nothing() -> None:
    return None


def report(result: DemoResult) -> str:
    """The per-request table and the summary, as text."""
    cold = result.records["cold"]
    warm = result.records["warm RAM"]
    disk = result.records.get("warm disk")
    rows = []
    for i, c in enumerate(cold):
        w = warm[i]
        row: list[object] = [c.name, c.num_prompt_tokens, c.ttft_s, w.ttft_s, w.num_cached_tokens]
        if disk:
            row.append(disk[i].ttft_s)
        row.append(f"{c.ttft_s / w.ttft_s:.1f}x")
        rows.append(row)
    header = ["request", "prompt tok", "cold TTFT s", "warm RAM s", "cached tok"]
    header += ["warm disk s"] if disk else []
    header += ["speed-up"]
    same = sum(c.answer == w.answer for c, w in zip(cold, warm, strict=True))
    cold_s = [r.ttft_s for r in cold]
    warm_s = [r.ttft_s for r in warm]
    lines = [
        format_table(header, rows),
        "",
        "summary",
        f"  model load            {result.load_s:.1f} s",
        f"  median TTFT cold      {statistics.median(cold_s):.2f} s",
        f"  median TTFT warm RAM  {statistics.median(warm_s):.2f} s"
        f"  ({statistics.median(cold_s) / statistics.median(warm_s):.1f}x faster)",
    ]
    if disk:
        disk_s = statistics.median(r.ttft_s for r in disk)
        lines.append(f"  median TTFT warm disk {disk_s:.2f} s")
    lines += [
        f"  prefill time saved    {sum(cold_s) - sum(warm_s):.1f} s of {sum(cold_s):.1f} s "
        "(warm RAM pass, measured)",
        f"  compute saved (est.)  {result.saved_s:.1f} s of prefill over the warm passes: "
        f"{result.saved_tokens:,} tokens not recomputed x {result.prefill_ms_per_token:.2f} "
        "ms/token measured",
        f"  token hit rate        {result.hit_rate:.1%} of looked-up tokens (warm passes)",
        f"  warm answers = cold   {same}/{len(cold)} (greedy decoding)",
        *(f"  tier {line}" for line in result.usage_lines),
        f"  first answer          {cold[0].answer[:100]!r}",
    ]
    return "\n".join(lines)


def speedups(result: DemoResult) -> list[float]:
    """Per request: its cold TTFT over its fastest warm TTFT (the bar chart's labels)."""
    cold = result.records["cold"]
    warm = [records for name, records in result.records.items() if name != "cold"]
    return [
        c.ttft_s / min(records[i].ttft_s for records in warm) if warm else 1.0
        for i, c in enumerate(cold)
    ]


def machine() -> str:
    """The CPU's model name and core count, for the chart's title."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def plot(result: DemoResult, path: Path) -> None:
    """TTFT per request and pass on a log scale (cold prefills are 10-100x the warm ones),
    each bar labelled with its time and each request with its speed-up and prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cold = result.records["cold"]
    width = 0.8 / len(result.records)
    fig, ax = plt.subplots(figsize=(11, 5))
    for i, (name, records) in enumerate(result.records.items()):
        xs = [x + i * width for x in range(len(cold))]
        bars = ax.bar(xs, [r.ttft_s for r in records], width, label=name)
        ax.bar_label(bars, labels=[f"{r.ttft_s:.2g} s" for r in records], fontsize=7)
    ax.set_yscale("log")
    top = max(r.ttft_s for records in result.records.values() for r in records)
    for x, gain in enumerate(speedups(result)):
        center = x + width * (len(result.records) - 1) / 2
        ax.annotate(f"{gain:.0f}x faster", (center, top * 2.2), ha="center", fontsize=8,
                    fontweight="bold")  # fmt: skip
    ax.set_ylim(top=top * 4)
    ax.set_xticks([x + width * (len(result.records) - 1) / 2 for x in range(len(cold))])
    ax.set_xticklabels(
        [f"{r.name}\n{r.num_prompt_tokens:,} tokens" for r in cold], rotation=20, fontsize=8
    )
    ax.set_ylabel("time to first token (s, log scale)")
    ax.set_title(f"kvdepot demo: SmolLM2-135M fp32, cold vs warm\n{machine()}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
