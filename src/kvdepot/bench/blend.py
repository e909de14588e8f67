"""`kvdepot bench blend`: CacheBlend's quality and TTFT on multi-document QA, offline.

Runs in the caller's process, on CPU, with SmolLM2-135M-Instruct in fp32 (this CPU has no bf16
instructions) and an embedded RAM-tier store. The workload comes from
`workloads.make_multidoc_qa`: a pool of product handbooks with planted facts; each question
gets a system prompt, `docs_per_prompt` documents in a shuffled order and the question (one
planted fact, or a comparison across two documents). Every document is indexed (its own KV
stored) before the timed runs, as a RAG corpus would be. Per question, modes:
- `full`: a plain prefill of the whole prompt (the reference);
- `prefix`: kvdepot prefix caching only (what earlier questions left in the cache);
- `naive`: each document's own KV moved to its position (RoPE), nothing recomputed;
- `blend@r`: the same plus CacheBlend's selective recompute of a fraction r (tokens ranked
  by KV deviation);
- `query@r`: the same ranked by deviation x the question's attention (`blend.selection:
  query`), when `selections` includes "query".
A selection may name its check layer, `query:2` or `deviation:1`; without one it gets
`blend.check_layer`'s default.
Measured per mode: TTFT (call to first-token logits, fetch and blend included), accuracy
(the answer contains the planted fact), agreement (greedy output token-identical to `full`'s)
and the mean KL divergence from `full` of the next-token distributions over the first
`kl_tokens` answer tokens (teacher-forced on `full`'s answer). Goals (issue: 4 documents of
~512-1024 tokens): blend TTFT <= full / 2.5; >= 90 % identical answers; better than naive on
accuracy, agreement and KL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvdepot.bench.qa import ModeResult, qa_segments
from kvdepot.bench.timing import format_table


@dataclass(frozen=True, slots=True)
class BlendBench:
    """Everything `report` and `plot` need."""

    results: list[ModeResult]
    num_questions: int
    context_tokens: float
    doc_tokens: tuple[int, ...]
    goal_ratio: float
    goal_selection: str = "deviation"


def mode_name(selection: str, ratio: float) -> str:
    """`blend@r` (deviation, CacheBlend's ranking) or `query@r` (query-aware); a selection
    that names its check layer keeps it: `query:2@r`."""
    name, colon, layer = selection.partition(":")
    return f"{'blend' if name == 'deviation' else name}{colon}{layer}@{ratio:g}"


def blend_config(selection: str) -> Any:
    """The `BlendConfig` of a selection spec, `name[:check_layer]`."""
    from kvdepot.config import BlendConfig

    name, _, layer = selection.partition(":")
    config = BlendConfig(selection=name)
    if layer:
        config.check_layer = int(layer)
    return config


def _blend_modes(
    selections: tuple[str, ...], ratios: tuple[float, ...]
) -> list[tuple[str, str, float]]:
    """(mode, selection, ratio) of every reuse mode: naive first."""
    return [("naive", "deviation", 0.0)] + [
        (mode_name(sel, r), sel, r) for sel in selections for r in ratios
    ]


def run(
    model_dir: Path,
    *,
    seed: int = 7,
    num_documents: int = 6,
    docs_per_prompt: int = 4,
    num_questions: int = 24,
    products_per_doc: int = 2,
    filler_per_product: int = 14,
    ratios: tuple[float, ...] = (0.05, 0.15, 0.3),
    max_new_tokens: int = 12,
    kl_tokens: int = 4,
    goal_ratio: float = 0.15,
    selections: tuple[str, ...] = ("query", "deviation:1"),
    progress: Callable[[str], None] = lambda line: None,
) -> BlendBench:
    """Every mode on every question (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvdepot.blend import prompt_ids
    from kvdepot.config import KVDepotConfig
    from kvdepot.connectors.blend_transformers import BlendGenerator
    from kvdepot.connectors.transformers import (
        FirstTokenClock,
        KVDepotGenerator,
        generate_from_cache,
    )
    from kvdepot.metrics import Metrics
    from kvdepot.store import open_store
    from kvdepot.workloads import make_multidoc_qa

    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train(False)
    docs, questions = make_multidoc_qa(
        seed, num_documents=num_documents, docs_per_prompt=docs_per_prompt,
        num_questions=num_questions, products_per_doc=products_per_doc,
        filler_per_product=filler_per_product,
    )  # fmt: skip

    def tokenize(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    config = KVDepotConfig()
    config.memory.capacity_bytes = 3 << 30
    modes = _blend_modes(selections, ratios)
    results = {mode: ModeResult(mode) for mode in ["full", "prefix", *[m for m, _, _ in modes]]}
    context_sizes = []
    with open_store(config, Metrics()) as store:
        plain = KVDepotGenerator.for_model(model, store, fingerprint="bench-blend")
        blenders = {
            sel: BlendGenerator.for_generator(plain, blend_config(sel))
            for sel in {"deviation", *selections}
        }
        doc_segments, prompts = qa_segments(tokenize, docs, questions)
        blenders["deviation"].index(doc_segments)
        for n, (question, segments) in enumerate(zip(questions, prompts, strict=True)):
            ids = prompt_ids(segments)
            num_context = len(ids) - len(segments[-1])
            context_sizes.append(num_context)
            prompt = torch.tensor([ids])

            clock = FirstTokenClock()
            start = time.perf_counter()
            output, _ = generate_from_cache(model, prompt, None, clock, max_new_tokens)
            reference = output[len(ids) :].tolist()
            answers: dict[str, tuple[list[int], float, int]] = {
                "full": (reference, (clock.first_s or time.perf_counter()) - start, 0)
            }
            prefix = plain.generate(ids, max_new_tokens=max_new_tokens)
            answers["prefix"] = (prefix.token_ids, prefix.ttft_s, 0)
            for mode, sel, ratio in modes:
                got = blenders[sel].generate(
                    segments, max_new_tokens=max_new_tokens, recompute_ratio=ratio
                )
                if got.fallback_reason is not None:
                    raise RuntimeError(f"{mode} fell back: {got.fallback_reason}")
                answers[mode] = (got.token_ids, got.ttft_s, got.num_recomputed_tokens)

            forced = reference[: max(1, kl_tokens) - 1]
            with torch.inference_mode():
                full_logits = model(torch.tensor([ids + forced])).logits[0, -len(forced) - 1 :]
                caches: dict[str, tuple[Any, int]] = {"full": (None, 0)}
                num_cached, cache = plain.load_prefix(torch.tensor(ids), b"")
                caches["prefix"] = (cache, num_cached)
                for mode, sel, ratio in modes:
                    blended = blenders[sel].blended_cache(segments, ratio)
                    caches[mode] = (blended.cache, blended.num_context_tokens)
                for mode, (token_ids, ttft_s, recomputed) in answers.items():
                    cache, start_token = caches[mode]
                    if cache is None:
                        logits = full_logits
                    else:
                        tail = torch.tensor([(ids + forced)[start_token:]])
                        out = model(tail, past_key_values=cache).logits[0]
                        logits = out[-len(forced) - 1 :]
                    result = results[mode]
                    result.ttft_s.append(ttft_s)
                    text = tokenizer.decode(token_ids, skip_special_tokens=True)
                    result.answers.append(text)
                    result.correct.append(question.answer.lower() in text.lower())
                    result.identical.append(token_ids == reference)
                    result.kl.append(_kl(full_logits, logits))
                    result.recomputed_tokens.append(recomputed)
            progress(
                f"question {n + 1}/{len(questions)} ({num_context} context tokens): "
                + ", ".join(f"{m} {a[1]:.2f}s" for m, a in answers.items())
            )
    doc_tokens = tuple(len(segment) for segment in doc_segments)
    return BlendBench(
        list(results.values()), len(questions), statistics.fmean(context_sizes), doc_tokens,
        goal_ratio, selections[0],
    )  # fmt: skip


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(reference || logits), from raw logits `[n, vocab]`."""
    p = reference.float().log_softmax(-1)
    q = logits.float().log_softmax(-1)
    return max(0.0, float((p.exp() * (p - q)).sum(-1).mean()))  # >= 0 but for rounding


def goal_lines(bench: BlendBench) -> list[tuple[str, bool]]:
    """(description with numbers, met) for the issue's goals."""
    by_mode = {r.mode: r for r in bench.results}
    full, naive = by_mode["full"], by_mode["naive"]
    blend = by_mode.get(mode_name(bench.goal_selection, bench.goal_ratio))
    if blend is None:
        return []
    speedup = 1 / statistics.median(_paired_ratios(blend, full))
    return [
        (f"{blend.mode} TTFT <= full / 2.5: {speedup:.2f}x faster", speedup >= 2.5),
        (f"{blend.mode} identical to full on >= 90 %: {blend.agreement:.0%}",
         blend.agreement >= 0.9),
        (f"{blend.mode} better than naive: accuracy {blend.accuracy:.0%} vs {naive.accuracy:.0%}, "
         f"identical {blend.agreement:.0%} vs {naive.agreement:.0%}, "
         f"KL {blend.mean_kl:.3f} vs {naive.mean_kl:.3f}",
         blend.accuracy > naive.accuracy and blend.agreement > naive.agreement
         and blend.mean_kl < naive.mean_kl),
    ]  # fmt: skip


def _paired_ratios(mode: ModeResult, full: ModeResult) -> list[float]:
    """Per question, this mode's TTFT over full prefill's (timed back to back: drift-robust)."""
    return [a / b for a, b in zip(mode.ttft_s, full.ttft_s, strict=True)]


def report(bench: BlendBench) -> str:
    full = next(r for r in bench.results if r.mode == "full")
    header = ["mode", "TTFT med s", "TTFT p90 s", "vs full (paired med)", "accuracy", "identical",
              "mean KL", "recomputed tok"]  # fmt: skip
    rows = [
        [r.mode, r.ttft_median, r.ttft_p90, statistics.median(_paired_ratios(r, full)),
         f"{r.accuracy:.0%}", f"{r.agreement:.0%}", f"{r.mean_kl:.4f}",
         round(statistics.fmean(r.recomputed_tokens))]
        for r in bench.results
    ]  # fmt: skip
    lines = [
        f"{bench.num_questions} questions, {bench.context_tokens:.0f} context tokens on average "
        f"(documents of {min(bench.doc_tokens)}-{max(bench.doc_tokens)} tokens)",
        format_table(header, rows),
    ]
    lines += [f"goal {'met' if met else 'MISSED'}: {text}" for text, met in goal_lines(bench)]
    return "\n".join(lines)


def plot(bench: BlendBench, path: Path) -> None:
    """Quality (identical answers, and 1/(1+KL)) against TTFT, one point per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(bench.results):
        ax.scatter(r.ttft_median, 100 * r.agreement, s=60)
        ax.annotate(f"{r.mode}\nKL {r.mean_kl:.3f}", (r.ttft_median, 100 * r.agreement),
                    textcoords="offset points", xytext=(6, 4 if i % 2 else -24),
                    fontsize=8)  # fmt: skip
    ax.set_xlabel("TTFT, median (s)")
    ax.set_ylabel("answers identical to full prefill (%)")
    ax.set_title(f"CacheBlend on SmolLM2-135M, {bench.num_questions} multi-document questions")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--engine", choices=("transformers", "vllm"), default="transformers",
        help="transformers (in this process), or vLLM serving the blend through the kvdepot "
        "connector (needs the vllm extra; kvdepot.bench.blend_vllm)",
    )  # fmt: skip
    add("--documents", type=int, default=6, help="documents in the pool")
    add("--docs-per-prompt", type=int, default=4, help="documents per prompt")
    add("--questions", type=int, default=None, help="questions (24; vLLM: 8)")
    add("--no-transformers", action="store_true",
        help="vLLM: skip the transformers path's agreement (the goal's bar)")  # fmt: skip
    add("--products-per-doc", type=int, default=2, help="~300 tok each")
    add("--filler", type=int, default=14, help="filler sentences per product")
    add("--ratios", default=None, help="recompute ratios (0.05,0.15,0.3; vLLM: 0.15,0.3)")
    add("--goal-ratio", type=float, default=0.15, help="ratio of the goals")
    add(
        "--selections", default="query,deviation:1",
        help="token rankings, comma-separated: deviation (blend@r), query (query@r); the "
        "first is the one the goals judge",
    )  # fmt: skip
    add("--max-new-tokens", type=int, default=12, help="tokens per answer")
    add("--kl-tokens", type=int, default=4, help="answer tokens in the KL")
    add("--seed", type=int, default=7, help="workload seed")
    add("--model-dir", type=Path, default=None, help="prepared model folder")
    add("--plot", type=Path, default=None, help="write the chart (PNG)")
    add("--json", type=Path, default=None, help="also write JSON")
    add("--strict", action="store_true", help="exit 1 if a goal is missed")


def cli_main(args: argparse.Namespace) -> int:
    from kvdepot.connectors.model import prepare_model

    if args.engine == "vllm":
        from kvdepot.bench import blend_vllm

        args.questions = args.questions or 8
        args.ratios = args.ratios or "0.15,0.3"
        return blend_vllm.cli_main(args)
    args.questions = args.questions or 24
    ratios = tuple(float(r) for r in (args.ratios or "0.05,0.15,0.3").split(","))
    bench = run(
        prepare_model(args.model_dir), seed=args.seed, num_documents=args.documents,
        docs_per_prompt=args.docs_per_prompt, num_questions=args.questions,
        products_per_doc=args.products_per_doc, filler_per_product=args.filler,
        ratios=ratios, max_new_tokens=args.max_new_tokens, kl_tokens=args.kl_tokens,
        goal_ratio=args.goal_ratio, selections=tuple(args.selections.split(",")),
        progress=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    print(report(bench))
    if args.plot:
        plot(bench, args.plot)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in bench.results], indent=2))
    return 0 if all(met for _, met in goal_lines(bench)) or not args.strict else 1
