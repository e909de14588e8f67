"""CacheBlend: segment keys, RoPE moves, the recompute pass, the generator and its fallbacks.

Tiny random-weight Llamas for the mechanics; the real SmolLM2 model for quality (ratio 1 is
a full prefill, and recomputing the most deviating tokens beats reusing them as they are).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaForCausalLM,
)

from kvdepot import Metrics, TieredStore
from kvdepot.blend import (
    BlendUnsupported,
    Segment,
    adapter_for,
    blend,
    from_texts,
    prompt_ids,
    segment_offsets,
    select_tokens,
    split_text,
)
from kvdepot.config import BlendConfig
from kvdepot.connectors.blend_transformers import BlendGenerator
from kvdepot.connectors.model import default_model_dir, prepare_model
from kvdepot.connectors.transformers import KVDepotGenerator
from kvdepot.engine import CacheEngine
from kvdepot.errors import ConfigError, StorageError
from kvdepot.layout import DType, KVLayout
from kvdepot.tiers.arena import HostBuffer
from kvdepot.tiers.memory import MemoryTier
from kvdepot.workloads import make_multidoc_qa
from tests import helpers
from tests.helpers import plain_generate


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Four layers, so that layers past the check layer (1) are left to blend."""
    return helpers.tiny_llama(seed, num_layers=4)


def full_kv(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """`[L, 2, H, T, D]`: a plain prefill's KV."""
    cache = DynamicCache(config=model.config)  # type: ignore[attr-defined]
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return torch.stack([torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers])


def three_docs() -> list[Segment]:
    return [
        Segment(tuple(range(5, 25))),  # "system prompt", at offset 0
        Segment(tuple(range(100, 140))),
        Segment(tuple(range(150, 175))),
        Segment(tuple(range(200, 230))),
        Segment((7, 8, 9, 10), reuse=False),  # the question
    ]


# ---- segments and keys ----------------------------------------------------------------


def test_segments_from_text_and_from_parts() -> None:
    def tokenize(text: str) -> list[int]:
        return [ord(c) for c in text]

    segments = split_text(tokenize, "sys|A doc|Another|Q?", separator="|")
    assert [s.reuse for s in segments] == [True, True, True, False]
    assert prompt_ids(segments) == tokenize("sysA docAnotherQ?")
    assert segment_offsets(segments) == [0, 3, 8, 15]
    assert from_texts(tokenize, ["d1", ""], "q", prefix="p") == [
        Segment((ord("p"),)),
        Segment((ord("d"), ord("1"))),
        Segment((ord("q"),), reuse=False),
    ]
    assert [s.reuse for s in split_text(tokenize, "just a question")] == [False]
    with pytest.raises(ConfigError):
        split_text(tokenize, "a|b", separator="")
    with pytest.raises(ConfigError):
        Segment(())


def test_segment_keys_ignore_position_and_never_match_prefix_keys(store: TieredStore) -> None:
    layout = KVLayout(2, 2, 4, DType.FLOAT32)
    engine = CacheEngine(store, layout, "model-a", chunk_size_tokens=8)
    doc = list(range(100, 120))
    as_segment = engine.chunk_keys(doc, include_partial=True, segment=True)
    assert len(as_segment) == 3
    assert as_segment != engine.chunk_keys(doc, include_partial=True)  # prefix keys differ
    kv = torch.randn(layout.chunk_shape(len(doc)))
    assert engine.store(doc, kv, segment=True) == 20
    assert engine.lookup(doc, segment=True) == 20
    assert engine.lookup(doc) == 0  # not a prefix hit
    assert torch.equal(engine.retrieve(doc, segment=True), kv)
    for other in (
        CacheEngine(store, layout, "model-b", chunk_size_tokens=8),  # another model
        CacheEngine(store, KVLayout(2, 2, 4, DType.FLOAT16), "model-a", chunk_size_tokens=8),
    ):
        assert other.lookup(doc, segment=True) == 0
    assert engine.lookup(doc, segment=True, tenant_salt=b"tenant-2") == 0


# ---- RoPE moves and the recompute pass ------------------------------------------------


def test_rerotate_moves_keys_to_a_later_position() -> None:
    model = tiny_llama()
    adapter = adapter_for(model)
    ids = list(range(30, 70))
    delta = 977
    at_zero = full_kv(model, ids)[0, 0]  # layer 0: keys depend on the token and position only
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(
            input_ids=torch.tensor([ids]),
            position_ids=torch.arange(delta, delta + len(ids)).unsqueeze(0),
            past_key_values=cache,
        )
        moved = adapter.rerotate(at_zero.clone(), delta)
    assert not torch.allclose(at_zero, cache.layers[0].keys[0], atol=1e-3)
    torch.testing.assert_close(moved, cache.layers[0].keys[0], atol=2e-5, rtol=1e-4)
    assert torch.equal(adapter.rerotate(at_zero.clone(), 0), at_zero)


def test_select_tokens_takes_the_highest_deviation_and_the_forced() -> None:
    deviation = torch.tensor([9.0, 1.0, 5.0, 7.0, 3.0, 8.0])
    candidates = torch.tensor([False, True, True, True, True, True])
    forced = torch.tensor([False, False, False, False, True, False])
    chosen = select_tokens(deviation, candidates, forced, ratio=0.4)  # 2 of 5 candidates
    assert chosen.tolist() == [3, 4, 5]
    assert select_tokens(deviation, candidates, forced, ratio=0.0).tolist() == [4]


def test_query_attention_equals_the_models_own_attention() -> None:
    model = tiny_llama()
    model.set_attn_implementation("eager")  # the one that returns its weights
    adapter = adapter_for(model)
    ids = list(range(40, 90))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(
            input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
            output_attentions=True, output_hidden_states=True,
        )  # fmt: skip
        positions = torch.arange(len(ids)).unsqueeze(0)
        for index in (0, 2):
            got = adapter.query_attention(
                index, out.hidden_states[index][:, -7:], positions[:, -7:],
                cache.layers[index].keys[0],
            )  # fmt: skip
            want = out.attentions[index][0, :, -7:].mean(dim=(0, 1))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            assert float(got.sum()) == pytest.approx(1.0, abs=1e-5)


def blended_kv(model: LlamaForCausalLM, segments: list[Segment], ratio: float) -> torch.Tensor:
    """The context's KV after moving each segment's own KV and blending at `ratio`."""
    adapter = adapter_for(model)
    context = [s for s in segments if s.reuse]
    ids = prompt_ids(context)
    parts = []
    for segment, offset in zip(context, segment_offsets(context), strict=True):
        own = full_kv(model, list(segment.token_ids))
        adapter.rerotate(own[:, 0], offset)
        parts.append(own)
    kv = torch.cat(parts, dim=3)
    candidates = torch.ones(len(ids), dtype=torch.bool)
    candidates[: len(context[0])] = False
    with torch.inference_mode():
        stats = blend(
            adapter,
            torch.tensor(ids),
            kv,
            candidates=candidates,
            forced=torch.zeros(len(ids), dtype=torch.bool),
            ratio=ratio,
        )
    assert stats.num_selected == round(ratio * int(candidates.sum()))
    return kv


def test_full_recompute_equals_prefill_and_partial_recompute_beats_none() -> None:
    model = tiny_llama()
    segments = three_docs()
    truth = full_kv(model, prompt_ids([s for s in segments if s.reuse]))
    errors = {}
    for ratio in (0.0, 0.3, 1.0):
        kv = blended_kv(model, segments, ratio)
        errors[ratio] = float((kv - truth).square().mean())
    assert errors[1.0] < 1e-9
    assert errors[0.3] < errors[0.0]
    # The first segment sits at its own position 0: its KV is exact even unblended.
    naive = blended_kv(model, segments, 0.0)
    torch.testing.assert_close(naive[:, :, :, :20], truth[:, :, :, :20], atol=1e-5, rtol=1e-4)


def test_blend_rejects_bad_arguments() -> None:
    model = tiny_llama()
    adapter = adapter_for(model)
    kv = torch.zeros(4, 2, 2, 10, 16)
    mask = torch.zeros(10, dtype=torch.bool)
    ids = torch.arange(10)
    for kwargs in ({"ratio": 1.5}, {"ratio": 0.1, "check_layer": 4}):
        with pytest.raises(ConfigError):
            blend(adapter, ids, kv, candidates=mask, forced=mask, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        blend(adapter, ids[:5], kv, candidates=mask, forced=mask, ratio=0.1)


# ---- BlendGenerator ---------------------------------------------------------------------


def test_generator_stores_missing_segments_then_reuses_them_in_any_order(
    store: TieredStore,
) -> None:
    model = tiny_llama()
    generator = BlendGenerator.for_generator(
        KVDepotGenerator.for_model(model, store, chunk_size_tokens=16),
        BlendConfig(recompute_ratio=1.0),
    )
    segments = three_docs()
    first = generator.generate(segments, max_new_tokens=6)
    assert first.fallback_reason is None
    assert (first.num_reused_tokens, first.num_computed_tokens) == (0, 115)
    assert first.token_ids == plain_generate(model, prompt_ids(segments), 6)  # ratio 1: a prefill

    shuffled = [segments[0], segments[3], segments[1], segments[2], segments[4]]
    second = generator.generate(shuffled, max_new_tokens=6)
    assert (second.num_reused_tokens, second.num_computed_tokens) == (115, 0)
    assert second.reused_by_tier == {"memory": 115} and first.reused_by_tier == {}
    assert second.num_recomputed_tokens == 95  # every moved token, at ratio 1
    assert second.token_ids == plain_generate(model, prompt_ids(shuffled), 6)

    naive = generator.generate(shuffled, max_new_tokens=6, recompute_ratio=0.0)
    assert naive.num_recomputed_tokens == 0
    metrics = generator.engine.metrics
    assert metrics.counter_value("kvdepot_blend_requests_total", {"outcome": "blended"}) == 3
    assert metrics.counter_value("kvdepot_blend_tokens_total", {"kind": "reused"}) == 230
    # One record per blended request: the reused tokens the blend kept count as cached.
    blend = {"connector": "blend"}
    assert metrics.counter_value("kvdepot_request_hit_ratio_count", blend) == 3
    kept = (115 - 95) + 115  # the second request kept 20 of 115, the naive one all 115
    assert metrics.counter_value("kvdepot_prefill_tokens_saved_total", blend) == kept


def test_query_aware_selection_runs_the_question_in_the_pass(store: TieredStore) -> None:
    model = tiny_llama()
    plain = KVDepotGenerator.for_model(model, store, chunk_size_tokens=16)
    generator = BlendGenerator.for_generator(plain, BlendConfig(selection="query"))
    segments = three_docs()
    generator.index(segments)
    shuffled = [segments[0], segments[3], segments[1], segments[2], segments[4]]
    ids = prompt_ids(shuffled)
    full = generator.generate(shuffled, max_new_tokens=6, recompute_ratio=1.0)
    assert full.fallback_reason is None
    assert full.token_ids == plain_generate(model, ids, 6)  # ratio 1: a prefill
    blended = generator.blended_cache(shuffled, 0.3)
    assert blended.num_context_tokens == len(ids) - 1  # the question but its last token
    assert blended.num_recomputed == round(0.3 * 95)  # the question rows are not counted
    # Closer to the truth than naive reuse, like deviation ranking.
    truth = full_kv(model, ids[:-1])
    naive = generator.blended_cache(shuffled, 0.0)
    kv = torch.stack(
        [torch.stack((layer.keys[0], layer.values[0])) for layer in blended.cache.layers]
    )
    kv0 = torch.stack(
        [torch.stack((layer.keys[0], layer.values[0])) for layer in naive.cache.layers]
    )
    n = naive.num_context_tokens
    assert float((kv[..., :n, :] - truth[..., :n, :]).square().mean()) < float(
        (kv0 - truth[..., :n, :]).square().mean()
    )
    with pytest.raises(ConfigError):
        BlendGenerator.for_generator(plain, BlendConfig(selection="random"))


def test_a_question_segment_inside_the_context_is_always_computed(store: TieredStore) -> None:
    model = tiny_llama()
    generator = BlendGenerator(model, CacheEngine(store, KVLayout(4, 2, 16, DType.FLOAT32), "m"))
    segments = three_docs()
    segments.insert(2, Segment((11, 12, 13), reuse=False))  # e.g. a per-request instruction
    result = generator.generate(segments, max_new_tokens=4, recompute_ratio=0.0)
    assert result.fallback_reason is None
    assert result.num_recomputed_tokens == 3
    with pytest.raises(ConfigError, match="question"):
        generator.generate(segments[:-1], max_new_tokens=4)
    only_question = [Segment((7, 8, 9, 10), reuse=False)]
    plain = generator.generate(only_question, max_new_tokens=4)
    assert plain.fallback_reason == "no reusable segment"
    assert plain.token_ids == plain_generate(model, [7, 8, 9, 10], 4)


def test_unsupported_models_and_tier_failures_fall_back_to_a_full_prefill(
    store: TieredStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_llama()
    segments = three_docs()
    expected = plain_generate(model, prompt_ids(segments), 5)
    generator = BlendGenerator.for_generator(KVDepotGenerator.for_model(model, store))

    monkeypatch.setattr(model.config, "model_type", "no-such-family")
    with caplog.at_level(logging.WARNING):
        result = generator.generate(segments, max_new_tokens=5)
    assert result.fallback_reason is not None and "no-such-family" in result.fallback_reason
    assert result.token_ids == expected
    assert "full prefill" in caplog.text
    monkeypatch.undo()

    def broken(*args: object, **kwargs: object) -> int:
        raise StorageError("tier down")

    generator = BlendGenerator.for_generator(KVDepotGenerator.for_model(model, store))
    monkeypatch.setattr(generator.engine, "retrieve", broken)
    result = generator.generate(segments, max_new_tokens=5)
    assert result.fallback_reason == "StorageError: tier down"
    assert result.token_ids == expected
    count = generator.engine.metrics.counter_value
    assert count("kvdepot_blend_requests_total", {"outcome": "fallback"}) == 2


def test_rope_variants_that_do_not_compose_are_refused() -> None:
    model = tiny_llama()
    model.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(BlendUnsupported, match="dynamic"):
        adapter_for(model)


# ---- the real model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, object]:
    model_dir: Path = prepare_model(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train(False)
    return model, AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def test_real_model_blend_quality(smollm2: tuple[torch.nn.Module, object]) -> None:
    """Ratio 1 answers as a full prefill does; 15 % recompute is closer to it than none."""
    model, tokenizer = smollm2

    def tokenize(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]

    docs, questions = make_multidoc_qa(
        5, num_documents=3, docs_per_prompt=3, num_questions=2, products_per_doc=1
    )
    store = TieredStore(
        MemoryTier(HostBuffer.allocate(512 << 20, prefault=False)), metrics=Metrics()
    )
    generator = BlendGenerator.for_generator(KVDepotGenerator.for_model(model, store))  # type: ignore[arg-type]
    kl = {0.0: 0.0, 0.15: 0.0}
    for question in questions:
        segments = from_texts(
            tokenize,
            [f"Document:\n{docs[i].text}\n\n" for i in question.order],
            f"Question: {question.question}<|im_end|>\n<|im_start|>assistant\n",
            prefix="<|im_start|>system\nAnswer from the documents.<|im_end|>\n<|im_start|>user\n",
        )
        ids = prompt_ids(segments)
        full = generator.generate(segments, max_new_tokens=8, recompute_ratio=1.0)
        assert full.token_ids == plain_generate(model, ids, 8)
        with torch.inference_mode():
            reference = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            for ratio in kl:
                blended = generator.blended_cache(segments, ratio)
                assert blended.num_reused == len(ids) - len(segments[-1])  # every document
                logits = model(
                    torch.tensor([ids[blended.num_context_tokens :]]),
                    past_key_values=blended.cache,
                ).logits[0, -1]
                kl[ratio] += float((reference.exp() * (reference - logits.log_softmax(-1))).sum())
    assert kl[0.15] < kl[0.0]
    store.close()


def test_a_blend_in_inference_mode_then_a_generate_outside_it(store: TieredStore) -> None:
    """`blended_cache` inside `torch.inference_mode` (the blend benchmark scores its KL
    there) fetches segments into the reused scratch tensor first; a `generate` outside it
    then fetches into the same scratch: blended, no fallback, a prefill's tokens at ratio 1."""
    from kvdepot.connectors.transformers import FirstTokenClock, generate_from_cache

    model = tiny_llama()
    generator = BlendGenerator.for_generator(
        KVDepotGenerator.for_model(model, store, chunk_size_tokens=16),
        BlendConfig(recompute_ratio=1.0),
    )
    segments = three_docs()
    shuffled = [segments[0], segments[3], segments[1], segments[2], segments[4]]
    assert generator.index(segments) == 115
    with torch.inference_mode():
        assert generator.blended_cache(segments, 1.0).num_reused == 115
    result = generator.generate(shuffled, max_new_tokens=6)
    assert result.fallback_reason is None and result.num_reused_tokens == 115
    ids = prompt_ids(shuffled)
    full, _ = generate_from_cache(model, torch.tensor([ids]), None, FirstTokenClock(), 6)
    assert result.token_ids == full[len(ids) :].tolist()


# ---- vLLM requests (the connector's side is in tests/test_vllm.py) --------------------------


def test_blend_requests_round_trip_and_bad_ones_say_why() -> None:
    from kvdepot.blend import blend_request
    from kvdepot.blend.segments import BLEND_SALT_MARK, segments_of

    segments = [Segment((1, 2, 3)), Segment((4, 5)), Segment((6, 7), reuse=False)]
    asked = blend_request(segments, tenant="acme", recompute_ratio=0.3)
    assert asked.prompt_token_ids == [1, 2, 3, 4, 5, 6, 7]
    assert asked.cache_salt.startswith(f"acme{BLEND_SALT_MARK}")
    # Every blended request has a cache_salt of its own: vLLM's prefix cache never shares it.
    assert blend_request(segments, tenant="acme").cache_salt != asked.cache_salt
    found = segments_of(asked.prompt_token_ids, asked.kv_transfer_params, asked.cache_salt)
    assert found == (segments, "acme", 0.3)
    ids, params, salt = asked.prompt_token_ids, asked.kv_transfer_params, asked.cache_salt
    assert segments_of(ids, {}, salt) is None  # no segments: a plain request
    assert segments_of(ids, params, "acme") == "shared-cache-salt"
    assert segments_of(ids, params, None) == "shared-cache-salt"
    bad: list[dict[str, object]] = [
        {**params, "kvdepot.segments": [3, 2, 1]},  # do not cover the prompt
        {**params, "kvdepot.segments": [3, "2", 2]},
        {**params, "kvdepot.reuse": [True, True, True]},  # the question must be computed
        {**params, "kvdepot.reuse": [True, False]},
        {**params, "kvdepot.recompute_ratio": 1.5},
    ]
    for wrong in bad:
        assert segments_of(ids, wrong, salt) == "bad-segments", wrong
    default = {"kvdepot.segments": [3, 2, 2]}  # reuse: all but the last
    assert segments_of(ids, default, salt) == (segments, "acme", None)
    with pytest.raises(ConfigError):
        blend_request(segments[:-1])
    with pytest.raises(ConfigError):
        blend_request(segments, tenant=f"x{BLEND_SALT_MARK}y")
    with pytest.raises(ConfigError):
        blend_request(segments, recompute_ratio=-0.1)
