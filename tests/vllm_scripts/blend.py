"""CacheBlend in vLLM, run as its own process by tests/test_vllm.py (one engine, in-process).

Usage: python blend.py blend SPEC_JSON OUT_JSON

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the script reaches the
model vLLM built (the plugin's record). Multi-document questions (`workloads.make_multidoc_qa`, the
`bench blend` prompts: a system prompt, documents in a shuffled order, the question), each
through one SmolLM2 engine (fp32, the kvdepot connector with `blend.enabled`, embedded or
through a daemon: `spec["mode"]`):
- `full`: the plain prompt, every cache bypassed (vLLM computes it all): the reference;
- `blend@1.0`, `blend@r` and `blend@0.0`: the same tokens as a segmented request (at 0 the
  context is the documents only, moved, and vLLM computes the question);
- `shared`: segments with a shared `cache_salt` (refused: served as a plain request);
- one batch of every question, blended and plain ones alternating.
Then the same prompts through kvdepot's transformers CacheBlend (`BlendGenerator`) at ratio
r: its greedy answers and first answer token's logprob, and the context it blends next to
the one vLLM's model blends (`WorkerBlend`): the recomputed positions and the KV. Last, the
objects the engine's store holds: only the blend path stores anything here (each
segment under its own key).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

MAX_TOKENS = 12


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvdepot.bench.qa import qa_segments
    from kvdepot.blend import blend_request, prompt_ids
    from kvdepot.workloads import make_multidoc_qa

    spec = json.loads(Path(sys.argv[2]).read_text())
    out_path = Path(sys.argv[3])
    ratio = float(spec["ratio"])
    extra = {"mode": spec["mode"], "daemon.socket_path": spec["socket"], "blend.enabled": True,
             "memory.capacity_bytes": "512MiB"}  # fmt: skip
    transfer = KVTransferConfig(
        kv_connector="KVDepotConnector", kv_connector_module_path="kvdepot.connectors.vllm",
        kv_role="kv_both", kv_connector_extra_config=extra, engine_id="blend",
    )  # fmt: skip
    llm = LLM(model=spec["model"], kv_transfer_config=transfer, dtype="float32",
              max_model_len=4096, enable_prefix_caching=True, enforce_eager=True,
              seed=0)  # fmt: skip
    tokenizer = llm.get_tokenizer()

    def tokenize(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    docs, questions = make_multidoc_qa(
        7, num_documents=4, docs_per_prompt=3, num_questions=spec["num_questions"],
        products_per_doc=3, filler_per_product=1,
    )  # fmt: skip
    _, prompts = qa_segments(tokenize, docs, questions)

    def run(token_ids: list[int], salt: str, params: dict[str, Any]) -> dict[str, Any]:
        sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1,
                                  extra_args={"kv_transfer_params": params})  # fmt: skip
        prompt = TokensPrompt(prompt_token_ids=token_ids, cache_salt=salt)
        (out,) = llm.generate([prompt], sampling, use_tqdm=False)
        tokens = list(out.outputs[0].token_ids)
        logprobs = [s[t].logprob for t, s in zip(tokens, out.outputs[0].logprobs, strict=True)]
        return {"tokens": tokens, "logprobs": logprobs, "num_cached": out.num_cached_tokens}

    results: list[dict[str, Any]] = []
    for n, segments in enumerate(prompts):
        ids = prompt_ids(segments)
        row: dict[str, Any] = {"num_prompt": len(ids), "num_question": len(segments[-1])}
        bypass = {"kvdepot.load": False, "kvdepot.store": False}
        row["full"] = run(ids, f"full-{n}", bypass)
        for r in (1.0, ratio, 0.0):
            request = blend_request(segments, recompute_ratio=r)
            row[f"blend@{r}"] = run(
                request.prompt_token_ids, request.cache_salt, request.kv_transfer_params
            )
        shared = blend_request(segments, recompute_ratio=ratio).kv_transfer_params
        row["shared"] = run(ids, f"tenant-{n}", {**shared, "kvdepot.store": False})
        results.append(row)
    # One batch: a blended request beside plain ones, in the same steps.
    batch, sampling = [], []
    for n, segments in enumerate(prompts):
        if n % 2 == 0:
            request = blend_request(segments, recompute_ratio=ratio)
            ids, salt, params = (request.prompt_token_ids, request.cache_salt,
                                 request.kv_transfer_params)  # fmt: skip
        else:
            ids, salt, params = prompt_ids(segments), f"full-{n}", bypass
        batch.append(TokensPrompt(prompt_token_ids=ids, cache_salt=salt))
        sampling.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                       extra_args={"kv_transfer_params": params}))  # fmt: skip
    outputs = llm.generate(batch, sampling, use_tqdm=False)
    batched = [list(out.outputs[0].token_ids) for out in outputs]
    # Only the blend path stores (each segment under its own key: its whole chunks and tail).
    from kvdepot import load_config
    from kvdepot.connectors.vllm.settings import embedded_socket_path
    from kvdepot.daemon.client import DaemonClient

    config = load_config(env={}, overrides={"daemon.socket_path": spec["socket"]})
    embedded = spec["mode"] == "embedded"
    socket = embedded_socket_path(config, "blend") if embedded else Path(spec["socket"])
    client = DaemonClient(socket_path=socket)
    held = client.stats()["tiers"]["memory"]["num_objects"]
    client.close()
    used = {s for segments in prompts for s in segments if s.reuse}
    expected = sum(-(-len(s) // 128) for s in used)

    # The same prompts through the transformers path, and both engines' blended contexts.
    from transformers import AutoModelForCausalLM

    from kvdepot import Metrics, TieredStore
    from kvdepot.config import BlendConfig
    from kvdepot.connectors.blend_transformers import BlendGenerator
    from kvdepot.connectors.transformers import KVDepotGenerator
    from kvdepot.connectors.vllm.blend import WorkerBlend
    from kvdepot.connectors.vllm.plugin import built_models
    from kvdepot.engine import CacheEngine
    from kvdepot.tiers.arena import HostBuffer
    from kvdepot.tiers.memory import MemoryTier

    hf: Any = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    hf.train(False)
    config = BlendConfig(recompute_ratio=ratio)
    stores = [
        TieredStore(MemoryTier(HostBuffer.allocate(256 << 20, prefault=False)), metrics=Metrics())
        for _ in range(2)
    ]
    generator = BlendGenerator.for_generator(
        KVDepotGenerator.for_model(hf, stores[0], fingerprint="hf"), config
    )
    plain = generator.engine
    vllm_engine = CacheEngine(stores[1], plain.layout, "vllm", chunk_size_tokens=128)
    worker = WorkerBlend(vllm_engine, config, built_models()[0])
    for row, segments in zip(results, prompts, strict=True):
        answer = generator.generate(segments, max_new_tokens=MAX_TOKENS, recompute_ratio=ratio)
        naive = generator.generate(segments, max_new_tokens=MAX_TOKENS, recompute_ratio=0.0)
        row["transformers"] = {"tokens": answer.token_ids, "fallback": answer.fallback_reason,
                               "naive": naive.token_ids}  # fmt: skip
        theirs = generator.blending.blend_context(generator._adapter_or_raise(), segments, ratio)
        ours = worker.context(segments, ratio, b"")
        assert theirs.selected is not None and ours.selected is not None
        row["selected"] = {"transformers": theirs.selected.tolist(),
                           "vllm": ours.selected.tolist()}  # fmt: skip
        diff = (theirs.kv.float() - ours.kv.float()).abs()
        row["kv_max_diff"] = float(diff.max())
        row["kv_max"] = float(theirs.kv.abs().max())
        # The first answer token's logprob on the transformers blend (vLLM's is in its row).
        cache = generator.blended_cache(segments, ratio)
        tail = prompt_ids(segments)[cache.num_context_tokens :]
        with torch.inference_mode():
            logits = hf(torch.tensor([tail]), past_key_values=cache.cache).logits[0, -1]
        first = row[f"blend@{ratio}"]["tokens"][0]
        row["transformers"]["first_logprob"] = float(logits.log_softmax(-1)[first])
    out_path.write_text(json.dumps({"results": results, "segment_chunks": held, "batch": batched,
                                    "expected_segment_chunks": expected}))  # fmt: skip


if __name__ == "__main__":
    main()
