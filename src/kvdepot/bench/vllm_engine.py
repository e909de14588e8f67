"""One setup of the vLLM head-to-head: its engine, the workloads run through it, raw samples.

Runs in a benchmark child process (`python -m kvdepot.bench.vllm --child SETUP ...`), one per
setup, never two at once: vLLM spawns its own engine process from here (so this code is
reached under `__main__`). Imports vLLM, and, for the `lmcache` setup only, LMCache (through
`kv_connector_module_path`, inside vLLM's engine process).

Per request it records the prompt length, the tokens vLLM did not compute
(`num_cached_tokens`: its own prefix cache plus a connector's), TTFT (vLLM's
`first_token_latency`, arrival to first token), the wall time of the whole `generate`, and
the greedy output (compared with plain vLLM's: a cache must not change it).
vLLM's own prefix cache: the `vllm` setup keeps it within a group (the warm requests hit it,
the reference the goals name) and empties it before each group's first request; every
connector setup empties it before every request, so warm hits must come from the connector.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kvdepot.bench.vllm_report import Sample
from kvdepot.bench.vllm_workloads import BenchRequest, ChatScript, paired_prompts

CONNECTOR_SETUPS = ("kvdepot", "kvdepot-daemon", "lmcache", "example")
SKIP_KVDEPOT: dict[str, object] = {"kvdepot.load": False, "kvdepot.store": False}
"""Per-request `kv_transfer_params`: kvdepot neither looks the request up nor stores it."""


def transfer_config(setup: str, work_dir: Path, socket_path: Path | None, chunk_tokens: int) -> Any:
    """vLLM's `KVTransferConfig` for `setup`; None for plain vLLM. `chunk_tokens`: kvdepot's
    chunk size (LMCache's comes from LMCACHE_CHUNK_SIZE, see `kvdepot.bench.vllm`)."""
    from vllm.config import KVTransferConfig

    if setup == "vllm":
        return None
    if setup in ("kvdepot", "kvdepot-daemon"):
        extra: dict[str, object] = {
            "mode": "embedded",
            "memory.capacity_bytes": "2GiB",
            "daemon.socket_path": str(work_dir / "run" / "d.sock"),
        }
        if setup == "kvdepot-daemon":
            extra = {"mode": "daemon", "daemon.socket_path": str(socket_path)}
        extra["chunk_size_tokens"] = chunk_tokens
        return KVTransferConfig(
            kv_connector="KVDepotConnector",
            kv_connector_module_path="kvdepot.connectors.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    if setup == "lmcache":  # configured through LMCACHE_* variables (see kvdepot.bench.vllm)
        return KVTransferConfig(
            kv_connector="LMCacheCPUConnector",
            kv_connector_module_path="kvdepot.bench.lmcache_cpu",
            kv_role="kv_both",
        )
    if setup == "example":
        return KVTransferConfig(
            kv_connector="ExampleConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": str(work_dir / "example")},
        )
    raise ValueError(f"unknown setup {setup!r}")


class BenchEngine:
    """One vLLM engine of one setup, and the requests run through it."""

    def __init__(
        self,
        setup: str,
        model_dir: str,
        work_dir: Path,
        socket_path: Path | None,
        chunk_tokens: int,
        num_blocks: int | None = None,
    ):
        """`num_blocks`: vLLM's KV blocks (its own KV space, prefix cache included); by
        default what `VLLM_CPU_KVCACHE_SPACE` holds."""
        from vllm import LLM

        self.setup = setup
        start = time.perf_counter()
        self.llm = LLM(
            model=model_dir,
            dtype="float32",
            # vLLM keeps one block back (its null block).
            max_model_len=8192 if num_blocks is None else min(8192, (num_blocks - 1) * 128),
            # One prefill step per prompt: ExampleConnector saves only the first step of a
            # chunked prefill, then fails to load it (a shape mismatch that kills the engine).
            max_num_batched_tokens=8192,
            enable_prefix_caching=True,
            enforce_eager=True,
            kv_transfer_config=transfer_config(setup, work_dir, socket_path, chunk_tokens),
            disable_log_stats=False,  # per-request metrics: first_token_latency
            seed=0,
            num_gpu_blocks_override=num_blocks,
        )
        self.startup_s = time.perf_counter() - start

    @property
    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def generate(
        self,
        token_ids: list[int],
        max_tokens: int,
        kv_params: dict[str, object] | None = None,
        *,
        ignore_eos: bool = True,
    ) -> tuple[int, float, float, list[int]]:
        """(cached tokens, TTFT s, wall s, generated tokens) of one greedy request."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=ignore_eos,
            extra_args={"kv_transfer_params": kv_params} if kv_params else None,
        )
        start = time.perf_counter()
        (out,) = self.llm.generate(
            [TokensPrompt(prompt_token_ids=token_ids)], params, use_tqdm=False
        )
        wall_s = time.perf_counter() - start
        ttft_s = out.metrics.first_token_latency if out.metrics is not None else wall_s
        return int(out.num_cached_tokens), float(ttft_s), wall_s, list(out.outputs[0].token_ids)

    def run(self, requests: list[BenchRequest], max_tokens: int) -> list[Sample]:
        """The requests in order, vLLM's prefix cache emptied as the module docstring says."""
        samples = []
        for request in requests:
            if request.kind == "cold" or self.setup in CONNECTOR_SETUPS:
                self.reset_prefix_cache()
            cached, ttft_s, wall_s, output = self.generate(request.token_ids, max_tokens)
            samples.append(
                Sample(
                    request.workload,
                    request.group,
                    request.kind,
                    len(request.token_ids),
                    cached,
                    ttft_s,
                    wall_s,
                    output,
                )
            )
        return samples

    def chat(
        self, scripts: list[ChatScript], max_answer_tokens: int, *, scripted: bool = False
    ) -> list[Sample]:
        """Each conversation turn by turn; a turn's prompt holds the earlier answers: the
        model's own (greedy, up to EOS or `max_answer_tokens`), or the scripted ones."""
        samples = []
        tokenizer = self.tokenizer
        for script in scripts:
            answers: list[str] = []
            for turn in range(len(script.questions) + 1):
                ids = script.prompt(tokenizer, answers)
                if turn == 0 or self.setup in CONNECTOR_SETUPS:
                    self.reset_prefix_cache()
                cached, ttft_s, wall_s, output = self.generate(
                    ids, max_answer_tokens, ignore_eos=False
                )
                kind = "warm" if turn else "cold"
                samples.append(
                    Sample("chat", script.group, kind, len(ids), cached, ttft_s, wall_s, output)
                )
                answers.append(
                    script.scripted_answers[turn]
                    if scripted
                    else tokenizer.decode(output, skip_special_tokens=True)
                )
        return samples

    def users(self, scripts: list[ChatScript], max_answer_tokens: int) -> list[Sample]:
        """Round by round, every user's next turn at once (one batch; vLLM schedules them
        together as far as its KV space allows). No prefix-cache resets: vLLM keeps what its
        blocks hold, and evicts the rest when users outnumber them. A round's wall time is
        split evenly over its requests (`e2e_s`), so that their sum is the workload's time;
        TTFT is each request's arrival to first token, its wait for the batch included."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        tokenizer = self.tokenizer
        answers: list[list[str]] = [[] for _ in scripts]
        params = SamplingParams(max_tokens=max_answer_tokens, temperature=0.0)
        samples = []
        for turn in range(len(scripts[0].questions) + 1):
            prompts = [s.prompt(tokenizer, a) for s, a in zip(scripts, answers, strict=True)]
            start = time.perf_counter()
            outs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False
            )
            share_s = (time.perf_counter() - start) / len(outs)
            for script, ids, out, said in zip(scripts, prompts, outs, answers, strict=True):
                output = list(out.outputs[0].token_ids)
                ttft_s = out.metrics.first_token_latency if out.metrics is not None else share_s
                kind = "warm" if turn else "cold"
                samples.append(Sample("users", script.group, kind, len(ids),
                                      int(out.num_cached_tokens), float(ttft_s), share_s,
                                      output))  # fmt: skip
                said.append(tokenizer.decode(output, skip_special_tokens=True))
        return samples

    def paired_cold(self, num_pairs: int, num_tokens: int, max_tokens: int) -> list[Sample]:
        """kvdepot setups: cold requests with and without kvdepot, in one engine.

        Each pair is one never-seen prompt run twice, once as usual (looked up: a miss; then
        stored) and once with `SKIP_KVDEPOT`, alternating which goes first, vLLM's prefix cache
        emptied before each: the difference is what kvdepot adds to a cold request, free of
        the few-% differences between two engine processes.
        """
        samples = []
        for i, ids in enumerate(paired_prompts(self.tokenizer, num_pairs, num_tokens)):
            order = [("paired-store", None), ("paired-skip", SKIP_KVDEPOT)]
            for kind, params in order if i % 2 == 0 else order[::-1]:
                self.reset_prefix_cache()
                cached, ttft_s, wall_s, output = self.generate(ids, max_tokens, params)
                samples.append(Sample("paired", i, kind, len(ids), cached, ttft_s, wall_s, output))
        return samples

    def warm_up(self) -> None:
        """One short request first: the first request pays one-off costs in every setup."""
        ids = list(self.tokenizer("Warm-up: the engine's first request.")["input_ids"])
        self.generate(ids * 8, 2)
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Empty vLLM's own prefix cache (not the connector's); it must work, or warm hits
        would be vLLM's."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache")
