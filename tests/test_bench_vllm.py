"""The vLLM head-to-head's workloads and report, without vLLM (its engines run in CI's vLLM
step and in `kvdepot bench vllm`)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from kvdepot.bench.vllm_report import ChildResult, Sample, merge_runs, report
from kvdepot.bench.vllm_workloads import chat_scripts, doc_sizes, qa_requests, user_scripts


@pytest.fixture(scope="module")
def tokenizer() -> object:
    from transformers import AutoTokenizer

    from kvdepot.connectors.model import default_model_dir, prepare_model

    model_dir: Path = prepare_model(default_model_dir())
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def test_qa_questions_share_their_document_and_repeat_the_first(tokenizer: object) -> None:
    requests = qa_requests(tokenizer, doc_sizes(2, 1000, 2000), num_questions=3)
    assert [(r.group, r.kind) for r in requests] == [
        (g, k) for g in (0, 1) for k in ("cold", "warm", "warm", "repeat")
    ]
    first, second, third, repeat = requests[:4]
    assert repeat.token_ids == first.token_ids
    assert 900 < common_prefix(first.token_ids, second.token_ids) < len(second.token_ids) - 5
    assert common_prefix(first.token_ids, requests[4].token_ids) < 50  # another document
    assert len(requests[4].token_ids) > len(third.token_ids) + 500


def test_each_chat_turn_extends_the_previous_prompt(tokenizer: object) -> None:
    (script,) = chat_scripts([1500], num_turns=4)
    assert len(script.questions) == 3 and len(script.scripted_answers) == 4
    answers = script.scripted_answers
    turns = [script.prompt(tokenizer, answers[:t]) for t in range(4)]
    for before, after in itertools.pairwise(turns):
        assert after[: len(before)] == before
        assert 10 < len(after) - len(before) < 80


def test_a_model_answer_keeps_its_tokens_in_the_next_turn(tokenizer: object) -> None:
    """The next turn holds the answer's own tokens right after the previous prompt, so the KV
    the engine computed while generating it can be reused."""
    (script,) = chat_scripts([1500], num_turns=2)
    first = script.prompt(tokenizer, [])
    answer = "The Aurora X2 weighs 3.2 kg, according to the handbook's table."
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    second = script.prompt(tokenizer, [answer])
    assert second[: len(first) + len(answer_ids)] == first + answer_ids


def sample(kind: str, ttft_s: float, workload: str = "qa", group: int = 0) -> Sample:
    num_cached = 0 if kind.startswith(("cold", "paired")) else 900
    return Sample(workload, group, kind, 1000, num_cached, ttft_s, ttft_s + 0.5, [1, 2])


def test_report_states_each_goal_with_its_numbers() -> None:
    def result(setup: str, cold_s: float, warm_s: float) -> ChildResult:
        samples = [sample("cold", cold_s), sample("warm", warm_s), sample("warm", warm_s),
                   sample("cold", cold_s, "chat"), sample("warm", warm_s, "chat")]  # fmt: skip
        if setup == "kvdepot":
            samples += [
                sample("paired-store", 4.12, "paired"),
                sample("paired-skip", 4.0, "paired"),
            ]
        return ChildResult(setup, 20.0, samples, chunk_size_tokens=0 if setup == "vllm" else 128)

    results = [result("vllm", 4.0, 0.4), result("kvdepot", 4.4, 0.5), result("lmcache", 4.0, 1.2)]
    text = report(results)
    assert text.startswith("chunk size (tokens): kvdepot 128, lmcache 128\n")
    assert "goal kvdepot warm TTFT <= 0.5 x LMCache (qa): 0.42 (limit 0.50) -> met" in text
    assert "goal kvdepot warm TTFT <= 1.5 x vLLM prefix-cache hit (chat): 1.25" in text
    assert "cold slowdown <= 5 % vs vllm, separate engines: 0.10 (limit 0.05) -> MISSED" in text
    assert "paired in one engine: 0.03 (limit 0.05) -> met; 1 pairs" in text
    assert "3/3" in text  # every greedy output equals plain vLLM's


def test_merged_runs_keep_their_chunk_size_unless_it_differs() -> None:
    def run(chunk_tokens: int) -> list[ChildResult]:
        cold = [sample("cold", 4.0)]
        return [
            ChildResult("vllm", 20.0, cold),
            ChildResult("lmcache", 20.0, cold, None, chunk_tokens),
        ]

    same = merge_runs([run(128), run(128)])
    assert [(r.setup, r.chunk_size_tokens, len(r.samples)) for r in same] == [
        ("vllm", 0, 2),
        ("lmcache", 128, 2),
    ]
    assert merge_runs([run(128), run(256)])[1].chunk_size_tokens == 0  # reported as "?"


def test_users_share_the_system_prompt_and_each_round_extends_their_own(tokenizer: object) -> None:
    """The users workload: one long shared prefix (the system prompt), then each user's own
    notes; a user's next round holds the previous round's prompt and answer."""
    scripts = user_scripts(num_users=3, num_rounds=3, shared_tokens=1000, user_tokens=300)
    assert [len(s.questions) for s in scripts] == [2, 2, 2]
    firsts = [s.prompt(tokenizer, []) for s in scripts]
    shared = common_prefix(firsts[0], firsts[1])
    assert 1000 < shared == common_prefix(firsts[1], firsts[2]) < len(firsts[0]) - 250
    rounds = [scripts[0].prompt(tokenizer, scripts[0].scripted_answers[:t]) for t in range(3)]
    for before, after in itertools.pairwise(rounds):
        assert after[: len(before)] == before


def test_report_has_a_users_table_with_throughput() -> None:
    def result(setup: str, share_s: float) -> ChildResult:
        samples = [Sample("users", u, kind, 2000, 0 if kind == "cold" else 1800, 1.0, share_s,
                          [1, 2, 3]) for u in range(4) for kind in ("cold", "warm")]  # fmt: skip
        return ChildResult(setup, 20.0, samples)

    text = report([result("vllm", 2.0), result("kvdepot", 0.5)])
    lines = text.splitlines()
    assert lines[2].startswith("users: 8 requests (4 cold, 4 warm)")
    header = lines[3].split("  ")
    rows = {line.split()[0]: line.split() for line in lines[5:7]}
    assert [c.strip() for c in header if c.strip()][7] == "req/s"
    assert rows["kvdepot"][7] == "2" and rows["vllm"][7] == "0.5"  # 8 requests in 4 and 16 s
    assert rows["vllm"][-1] == "4"  # kvdepot's req/s over vLLM's
    assert "goal" not in text  # no QA or chat: no cold-request goals
