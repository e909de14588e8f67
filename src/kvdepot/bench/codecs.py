"""`kvdepot bench codecs`: size, speed and model quality of every codec on real KV.

Runs in the caller's process, on CPU, with SmolLM2-135M-Instruct in fp32. The KV is the
model's own, over a synthetic handbook (`workloads.make_document`) of several thousand
tokens, cut into 256-token chunks as the engine stores them. For every codec:
- ratio: logical bytes / stored bytes (64-byte headers included), on the fp32 KV as the model
  produced it and on the same KV cast to bf16 (the 16-bit baseline the goals are against);
- encode and decode GB/s of logical bytes: decode writes into one reused, already touched
  buffer through the chunk views, like `CacheEngine.retrieve`, and is timed alternately with
  a plain copy of the same bytes (medians; the copy is the limit no decoder can beat);
- rel. error: RMS error / RMS value of the decoded KV;
- perplexity of held-out text (the document's continuation) when the context's KV comes back
  through the codec (fp32 KV), versus the exact KV;
- greedy agreement: per question about the document, the share of greedy tokens that match
  the exact-KV output up to the first difference (mean over the prompt set).
Lossless codecs are checked bit for bit, so their quality equals the exact KV's by
construction and the model is not run for them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvdepot.bench.timing import format_table, gbps, median_seconds, paired_seconds
from kvdepot.codec import Codec, CodecRegistry, decode_chunk_into, encode_chunk
from kvdepot.errors import KVDepotError
from kvdepot.layout import DType
from kvdepot.tensors import as_numpy_bits
from kvdepot.workloads import make_document

CHUNK_TOKENS = 256
# (codec, metric, comparison, threshold), from issue 8; ratio and speed against bf16 KV.
GOALS = [
    ("lossless", "ratio_bf16", ">=", 1.3),
    ("int8", "ratio_bf16", ">=", 1.9),
    ("int8", "ppl_increase_pct", "<=", 1.0),
    ("fp8", "ratio_bf16", ">=", 1.9),
    ("fp8", "ppl_increase_pct", "<=", 1.0),
    ("cachegen", "ratio_bf16", ">=", 3.5),
    ("cachegen", "ppl_increase_pct", "<=", 2.0),
    ("cachegen", "decode_gbps_bf16", ">=", 0.5),
]


@dataclass(frozen=True, slots=True)
class CodecResult:
    codec: str
    is_lossless: bool
    ratio_fp32: float
    ratio_bf16: float
    encode_gbps_fp32: float
    decode_gbps_fp32: float
    encode_gbps_bf16: float
    decode_gbps_bf16: float
    copy_gbps: float
    rel_error: float
    ppl: float
    ppl_increase_pct: float
    greedy_agreement: float
    num_identical_outputs: int
    num_prompts: int


@dataclass(frozen=True, slots=True)
class _Speed:
    ratio: float
    encode_gbps: float
    decode_gbps: float
    copy_gbps: float
    decoded: np.ndarray


def _speed(codec: Codec, bits: np.ndarray, dtype: DType, repeats: int) -> _Speed:
    """Ratio and encode/decode GB/s of `codec` over `bits` `[L, 2, T, H, D]`, chunk by chunk."""
    spans = [slice(t, t + CHUNK_TOKENS) for t in range(0, bits.shape[2], CHUNK_TOKENS)]
    chunks = [np.ascontiguousarray(bits[:, :, s]) for s in spans]
    blobs: list[bytes] = []

    def encode() -> None:
        blobs.clear()
        for chunk in chunks:
            encoded = encode_chunk(chunk, dtype, codec)
            blob = bytearray(encoded.nbytes)
            encoded.write_into(memoryview(blob))
            blobs.append(bytes(blob))

    encode_s = median_seconds(encode, repeats)
    registry = CodecRegistry([codec])
    out = np.ones_like(bits)  # touched once, reused: fresh pages would dominate the timing
    source = bits.copy()

    def decode() -> None:
        for span, blob in zip(spans, blobs, strict=True):
            decode_chunk_into(blob, out[:, :, span], registry, verify=False)

    copy_s, decode_s, _ = paired_seconds(lambda: np.copyto(out, source), decode, repeats)
    decode()
    stored = sum(len(b) for b in blobs)
    return _Speed(
        bits.nbytes / stored,
        gbps(bits.nbytes, encode_s),
        gbps(bits.nbytes, decode_s),
        gbps(bits.nbytes, copy_s),
        out,
    )


class _Model:
    """The model, its context KV and the evaluation prompts (all built once)."""

    def __init__(self, model_dir: Path, context_tokens: int, heldout_tokens: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model: Any = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, local_files_only=True
        )
        self.model.train(False)
        total = context_tokens + heldout_tokens
        document = make_document(seed=3, num_products=max(4, total // 270 + 2))
        ids = list(self.tokenizer(document.text)["input_ids"])
        if len(ids) < total:
            raise ValueError(f"document too short: {len(ids)} < {total} tokens")
        self.context, self.heldout = ids[:context_tokens], ids[context_tokens:total]
        context_text = self.tokenizer.decode(self.context)
        self.questions = [f.question for f in document.facts if f.product in context_text]
        with torch.inference_mode():
            cache = self.model(torch.tensor([self.context]), use_cache=True).past_key_values
        per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
        self.kv = torch.stack(per_layer).permute(0, 1, 3, 2, 4).contiguous()  # [L, 2, T, H, D]

    def _cache(self, kv: torch.Tensor) -> Any:
        from transformers import DynamicCache

        per_head = kv.transpose(2, 3).contiguous()  # [L, 2, H, T, D]
        layers = [(per_head[i, 0][None], per_head[i, 1][None]) for i in range(kv.shape[0])]
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def perplexity(self, kv: torch.Tensor) -> float:
        """Perplexity of the held-out tokens after the context whose KV is `kv`."""
        with torch.inference_mode():
            logits = self.model(
                torch.tensor([self.heldout]), past_key_values=self._cache(kv), use_cache=True
            ).logits[0, :-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(self.heldout[1:])[:, None]
        return math.exp(-log_probs.gather(1, targets).mean().item())

    def greedy(self, kv: torch.Tensor, num_prompts: int, max_new_tokens: int) -> list[list[int]]:
        """Greedy answers to the first `num_prompts` questions, context KV from `kv`."""
        outputs = []
        for question in self.questions[:num_prompts]:
            suffix = self.tokenizer(f"\n\nQuestion: {question}\nAnswer:")["input_ids"]
            ids = torch.tensor([self.context + list(suffix)])
            with torch.inference_mode():
                generated = self.model.generate(
                    ids, past_key_values=self._cache(kv), max_new_tokens=max_new_tokens,
                    do_sample=False, pad_token_id=self.tokenizer.eos_token_id,
                )  # fmt: skip
            outputs.append(generated[0, ids.shape[1] :].tolist())
        return outputs


def _agreement(ours: list[list[int]], exact: list[list[int]]) -> tuple[float, int]:
    """(mean share of tokens equal up to the first difference, identical outputs)."""
    shares, identical = [], 0
    for a, b in zip(ours, exact, strict=True):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        shares.append((min(len(a), len(b)) if prefix is None else prefix) / max(len(b), 1))
        identical += a == b
    return (statistics.mean(shares) if shares else 1.0), identical


def run(
    model_dir: Path,
    registry: CodecRegistry,
    codec_names: Sequence[str],
    *,
    context_tokens: int = 3072,
    heldout_tokens: int = 512,
    num_prompts: int = 8,
    max_new_tokens: int = 12,
    repeats: int = 5,
    progress: Callable[[str], None] = lambda _: None,
) -> list[CodecResult]:
    """Measure every codec named in `codec_names`; returns the results (see `report`)."""
    started = time.perf_counter()
    model = _Model(model_dir, context_tokens, heldout_tokens)
    progress(f"context KV ready ({time.perf_counter() - started:.0f} s)")
    exact_ppl = model.perplexity(model.kv)
    exact_outputs = model.greedy(model.kv, num_prompts, max_new_tokens)
    fp32_bits = as_numpy_bits(model.kv)
    bf16_bits = as_numpy_bits(model.kv.to(torch.bfloat16))
    results = []
    for name in codec_names:
        codec = registry.by_name(name)
        fp32 = _speed(codec, fp32_bits, DType.FLOAT32, repeats)
        bf16 = _speed(codec, bf16_bits, DType.BFLOAT16, repeats)
        decoded = torch.from_numpy(fp32.decoded)
        rel_error = ((decoded - model.kv).norm() / model.kv.norm()).item()
        if codec.is_lossless:
            if fp32.decoded.tobytes() != fp32_bits.tobytes() or (
                bf16.decoded.tobytes() != bf16_bits.tobytes()
            ):
                raise KVDepotError(f"codec {name} claims to be lossless but is not")
            ppl, outputs = exact_ppl, exact_outputs
        else:
            ppl = model.perplexity(decoded)
            outputs = model.greedy(decoded, num_prompts, max_new_tokens)
        agreement, identical = _agreement(outputs, exact_outputs)
        results.append(
            CodecResult(
                name,
                codec.is_lossless,
                fp32.ratio,
                bf16.ratio,
                fp32.encode_gbps,
                fp32.decode_gbps,
                bf16.encode_gbps,
                bf16.decode_gbps,
                bf16.copy_gbps,
                rel_error,
                ppl,
                100 * (ppl / exact_ppl - 1),
                agreement,
                identical,
                len(exact_outputs),
            )
        )
        progress(f"{name} done ({time.perf_counter() - started:.0f} s)")
    return results


def goal_lines(results: Sequence[CodecResult]) -> list[tuple[str, bool]]:
    """One line per goal of issue 8 whose codec was measured, and whether it is met."""
    by_name = {r.codec: r for r in results}
    lines = []
    for codec, metric, op, threshold in GOALS:
        if codec not in by_name:
            continue
        value = float(getattr(by_name[codec], metric))
        is_met = value >= threshold if op == ">=" else value <= threshold
        line = f"{codec} {metric} {op} {threshold:g}: {value:.3g}"
        lines.append((f"{line} {'met' if is_met else 'MISSED'}", is_met))
    return lines


def report(results: Sequence[CodecResult], context_tokens: int, heldout_tokens: int) -> str:
    header = ["codec", "ratio fp32", "ratio bf16", "enc GB/s", "dec GB/s", "enc bf16",
              "dec bf16", "rel err", "ppl", "ppl +%", "greedy", "same"]  # fmt: skip
    rows = [
        [r.codec, r.ratio_fp32, r.ratio_bf16, r.encode_gbps_fp32, r.decode_gbps_fp32,
         r.encode_gbps_bf16, r.decode_gbps_bf16, r.rel_error, f"{r.ppl:.4f}",
         f"{r.ppl_increase_pct:+.2f}", f"{r.greedy_agreement:.2f}",
         f"{r.num_identical_outputs}/{r.num_prompts}"]
        for r in results
    ]  # fmt: skip
    copy = statistics.median(r.copy_gbps for r in results) if results else float("nan")
    lines = [
        f"kvdepot bench codecs | SmolLM2-135M fp32 KV, {context_tokens}-token context in "
        f"{CHUNK_TOKENS}-token chunks, {heldout_tokens} held-out tokens | CPU {os.cpu_count()} "
        f"cores | torch {torch.__version__} | {torch.get_num_threads()} threads",
        format_table(header, rows),
        f"GB/s of logical (decoded) bytes; plain copy of the bf16 KV: {copy:.2f} GB/s. ppl and "
        "greedy: fp32 KV through the codec vs exact KV ('same' = identical greedy answers).",
    ]
    lines += [line for line, _ in goal_lines(results)]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--codecs", default="", help="comma list (default: all registered)")
    parser.add_argument(
        "--plugin", action="append", default=[], help="codec import path 'pkg.module:Factory'"
    )
    parser.add_argument("--context-tokens", type=int, default=3072, help="KV context")
    parser.add_argument("--heldout-tokens", type=int, default=512, help="perplexity text")
    parser.add_argument("--prompts", type=int, default=8, help="greedy questions")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="tokens per answer")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    parser.add_argument("--model-dir", type=Path, default=None, help="prepared model folder")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a goal is missed")


def cli_main(args: argparse.Namespace) -> int:
    from kvdepot.codec import load_registry
    from kvdepot.connectors.model import prepare_model

    registry = load_registry(args.plugin)
    names = [n.strip() for n in args.codecs.split(",")] if args.codecs else registry.names()
    for name in names:
        registry.by_name(name)  # ConfigError listing the known names, before the model loads
    results = run(
        prepare_model(args.model_dir), registry, names, context_tokens=args.context_tokens,
        heldout_tokens=args.heldout_tokens, num_prompts=args.prompts,
        max_new_tokens=args.max_new_tokens, repeats=args.repeats,
        progress=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    print(report(results, args.context_tokens, args.heldout_tokens))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(met for _, met in goal_lines(results)) or not args.strict else 1
