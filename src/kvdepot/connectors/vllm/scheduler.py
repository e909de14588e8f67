"""The connector's scheduler side: lookups, and each step's plan of loads and saves.

Runs in vLLM's scheduler process (EngineCore). It asks the store (daemon mode: `kvdepot
serve`; embedded: the worker's private socket) how much of a prompt is cached, and turns each
scheduler step into a `KVDepotMetadata` for the worker: per request, the prompt, the block
table, the token range to load and the whole chunks (and the prompt's partial tail) newly
computed, to save. Every lookup failure is a miss.

Several KV cache groups (a hybrid model, vLLM's hybrid allocator): a hit is granted as an
asynchronous load, planned in `update_state_after_alloc` with the block tables vLLM allocated,
and each step takes vLLM's current tables (a sliding-window group's drops the blocks that
leave its window, which tables appended step by step would not show).

Tensor parallelism: every rank stores its own shard of a chunk, so a prompt's hit is the
shortest of its ranks' hits: a chunk is loaded only when all ranks hold their shard of it.
Daemon mode asks the daemon once per rank; embedded mode asks each rank's worker, each of
which serves its own store.

Generated tokens (`store_generated`): when a request finishes, its blocks are held (vLLM's
delayed free) and the next step's plan saves the KV of the prompt's last chunk onwards,
generated tokens included; the worker reports the save done and vLLM frees the blocks. A
chat's next turn contains the answer, so it reuses that KV. A lookup for a prompt that
continues a finished request whose save is still pending waits for it (vLLM asks again next
step), at most `SAVE_WAIT_S`: the answer's KV is worth one engine step.

Per-request records (`kvdepot.records`): this side knows a request's prompt, vLLM's own hit
and the lookup time; the worker reports its loads and saves (seconds, tokens by tier, bytes)
in the stats vLLM hands back each step (`update_connector_output`). A request's record is
written once it finished and the worker has reported every transfer planned for it (its
final save included): one JSON line if `request_log` asks, the per-request metrics, and its
hit ratio for vLLM's own metrics.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from kvdepot.blend.context import context_length
from kvdepot.blend.segments import segments_of
from kvdepot.connectors.vllm.lora import AdapterFingerprints
from kvdepot.connectors.vllm.metadata import (
    BlendLoad,
    KVDepotMetadata,
    RequestState,
    RequestTransfer,
    cacheable_prompt,
    opts_in,
    tenant_salt,
    uncacheable_reason,
)
from kvdepot.connectors.vllm.settings import ConnectorSettings
from kvdepot.connectors.vllm.stats import REQUEST_FIELDS, StepStats
from kvdepot.deployment import open_cache
from kvdepot.engine import CacheEngine, floor_to_chunk, recipe_of
from kvdepot.logutil import RateLimitedLog
from kvdepot.metrics import Metrics
from kvdepot.records import RequestLog, RequestRecord
from kvdepot.store import ChunkStore

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

SAVE_WAIT_S = 1.0
"""The longest a follow-up prompt's lookup waits for its predecessor's final save."""


def _first_time(seen: dict[str, None], req_id: str) -> bool:
    """Whether `req_id` is new to `seen` (then remembered; only the 4096 most recent are:
    vLLM asks about a request again only while it waits)."""
    if req_id in seen:
        return False
    seen[req_id] = None
    if len(seen) > 4096:
        del seen[next(iter(seen))]
    return True


class PendingSave:
    """A finished request's final save, from `request_finished` until the worker reports it."""

    __slots__ = ("deadline", "prefix")

    def __init__(self, prefix: list[int]) -> None:
        self.prefix = prefix  # the prompt and the first generated token
        self.deadline = time.monotonic() + SAVE_WAIT_S


MAX_OPEN_RECORDS = 4096
"""Requests whose records are in the making; past it the oldest is written as it stands."""


class OpenRecord:
    """A request's record in the making (see the module docstring)."""

    __slots__ = ("done", "engine_cached", "is_finished", "lookup_s", "planned", "prompt_tokens")

    def __init__(self, prompt_tokens: int, engine_cached: int, lookup_s: float) -> None:
        self.prompt_tokens = prompt_tokens
        self.engine_cached = engine_cached  # vLLM's own prefix-cache hit
        self.lookup_s = lookup_s
        self.planned = 0  # transfers (loads, saves) planned for the worker
        self.done: dict[str, Any] = {"tiers": {}}  # the worker's entries, summed
        self.is_finished = False

    def add(self, entry: dict[str, Any]) -> None:
        for name in REQUEST_FIELDS:
            self.done[name] = self.done.get(name, 0) + entry.get(name, 0)
        for tier, n in (entry.get("tiers") or {}).items():
            self.done["tiers"][tier] = self.done["tiers"].get(tier, 0) + n

    @property
    def is_complete(self) -> bool:
        return self.is_finished and self.done.get("ops", 0) >= self.planned

    def record(self, req_id: str) -> RequestRecord:
        d = self.done
        loaded = int(d.get("loaded_tokens", 0))
        return RequestRecord(
            "vllm", req_id, self.prompt_tokens, loaded,
            max(self.prompt_tokens - self.engine_cached - loaded, 0),
            int(d.get("stored_tokens", 0)), self.lookup_s, float(d.get("load_s", 0.0)),
            float(d.get("save_s", 0.0)), int(d.get("loaded_bytes", 0)),
            int(d.get("stored_bytes", 0)), 0.0, None, float(d.get("saved_s", 0.0)),
            dict(d["tiers"]),
            int(d.get("partial_tokens", 0)), self.engine_cached,
        )  # fmt: skip


class SchedulerSide:
    """The scheduler half of `KVDepotConnector` (vLLM calls it through the connector)."""

    def __init__(self, settings: ConnectorSettings, *, is_loading: bool, is_saving: bool) -> None:
        self.settings = settings
        self.is_loading = is_loading
        self.is_saving = is_saving
        self._caches: list[CacheEngine] = []  # one per TP rank
        self._log = RateLimitedLog(logger)
        self._requests: dict[str, RequestState] = {}
        self._num_hit_tokens: dict[str, int] = {}
        self._finishing: list[RequestTransfer] = []  # final saves for the next step
        self._pending: dict[str, PendingSave] = {}
        self._adapters = AdapterFingerprints()
        self._num_local_tokens: dict[str, int] = {}  # vLLM's own hit, at lookup
        self._loading: list[RequestTransfer] = []  # asynchronous loads for the next step
        # Several KV cache groups: loads are asynchronous, since vLLM can take back only
        # whole requests then (a failed load is recomputed from the start), not blocks.
        self.is_async = settings.num_groups > 1
        self.uncached_requests: Counter[str] = Counter()  # requests vLLM alone served, by why
        self.stats = StepStats()  # for vLLM's metrics (`get_kv_connector_stats`)
        self._uncached_ids: dict[str, None] = {}
        self._records: dict[str, OpenRecord] = {}
        self._blends: dict[str, tuple[BlendLoad, bytes]] = {}  # looked up, not allocated
        self._blend_refused: dict[str, None] = {}  # recent requests counted as not blended
        self._lookup_s: dict[str, float] = {}
        self._request_log: RequestLog | None = None

    def _engines(self) -> list[CacheEngine]:
        """One `CacheEngine` per TP rank (its shard's keys); daemon mode: over one client."""
        if not self._caches:
            config = self.settings.config
            name, ranks = f"vllm-scheduler:{os.getpid()}", range(self.settings.tp_size)
            if config.mode == "daemon":  # one client: every rank's shards are in the daemon
                store = open_cache(config, client_name=name, lookups_only=True)
                if self.settings.is_mla:
                    ranks = range(1)  # one copy of the latents, for every rank
                self._caches = [self.settings.make_engine(store, rank) for rank in ranks]
            else:  # each rank's worker serves its own store
                self._caches = [
                    self.settings.make_engine(
                        open_cache(
                            config,
                            embedded_socket=self.settings.rank_socket_path(rank),
                            client_name=name,
                            lookups_only=True,
                        ),
                        rank,
                    )
                    for rank in ranks
                ]
            self._announce()
        return self._caches

    def _announce(self) -> None:
        """Tell each store how this model's chunks are keyed (`kvdepot.namespaces`): the
        daemon gets every rank's shards (a hit needs them all); an embedded rank's store,
        its own."""
        names = self.settings.served_names
        try:
            if self.settings.config.mode == "daemon":
                self._caches[0].backend.announce(recipe_of(self._caches, names))
            else:
                for cache in self._caches:
                    cache.announce(names)
        except Exception as exc:  # for routers only: never a reason to fail
            self._log.warning("announce", "kvdepot: announcing the model failed: %s", exc)

    def _salt(self, request: Request) -> bytes | None:
        """The request's salt (`tenant_salt`); None when its KV cannot be keyed exactly
        (served by vLLM alone, counted in `uncached_requests`)."""
        reason = uncacheable_reason(request)
        adapter = None
        if reason is None and request.lora_request is not None:
            adapter = self._adapters.of(request.lora_request)
            reason = "lora-files-unreadable" if adapter is None else None
        if reason is not None:
            self._count_uncached(request, reason)
            return None
        return tenant_salt(request, adapter)

    def _count_uncached(self, request: Request, reason: str) -> None:
        """Count (once per request) and log a request that vLLM alone serves."""
        if _first_time(self._uncached_ids, request.request_id):
            self.uncached_requests[reason] += 1
            self.stats.uncached(reason)
            self._log.warning(
                f"uncached-{reason}",
                "kvdepot: a request vLLM alone serves (%s): its KV cannot be keyed exactly",
                reason,
            )

    def _lookup(self, tokens: list[int], salt: bytes) -> int:
        """Cached tokens of `tokens` that every TP rank can load."""
        num_hit = len(tokens)
        for cache in self._engines():
            num_hit = min(num_hit, cache.lookup(tokens, tenant_salt=salt))
            if num_hit == 0:
                break
        return num_hit

    def _blend_of(self, request: Request) -> tuple[BlendLoad, bytes, int] | None:
        """A segmented request's blend (what to build, the tenant's salt, the context's
        length); None for a request without segments or one that cannot be blended (served
        as any other, its reason counted)."""
        tokens = request.prompt_token_ids
        params = getattr(request, "kv_transfer_params", None)
        if tokens is None or not params:
            return None
        found = segments_of(tokens, params, request.cache_salt)
        if found is None:
            return None
        config = self.settings.config.blend
        reason = found if isinstance(found, str) else self._blend_refusal(request)
        if isinstance(found, str) or reason is not None:
            if _first_time(self._blend_refused, request.request_id):
                self.stats.blend(f"fallback:{reason}")
                self._log.warning(
                    f"blend-{reason}", "kvdepot: a segmented request is not blended (%s)", reason
                )
            return None
        segments, tenant, ratio = found
        ratio = config.recompute_ratio if ratio is None else ratio
        load = BlendLoad([len(s) for s in segments], [s.reuse for s in segments], ratio)
        return load, tenant.encode(), context_length(segments, config, ratio)

    def _blend_refusal(self, request: Request) -> str | None:
        """Why this engine cannot blend a segmented request, or None."""
        settings = self.settings
        if not settings.config.blend.enabled:
            return "disabled"
        if settings.tp_size > 1:
            return "tensor-parallel"
        if settings.num_groups > 1 or settings.is_mla:
            return "model-shape"
        if settings.blend_blocker:
            return settings.blend_blocker
        if request.lora_request is not None or uncacheable_reason(request) or request.mm_features:
            return "request-kind"
        return None

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Cached prompt tokens beyond vLLM's own hit, leaving the last token to compute;
        for a blended request, its context (built before the forward pass)."""
        if (blended := self._blend_of(request)) is not None:
            load, tenant, num_context = blended
            self._blends[request.request_id] = (load, tenant)
            self._num_local_tokens[request.request_id] = num_computed_tokens
            return max(num_context - num_computed_tokens, 0), False
        tokens, salt = cacheable_prompt(request), self._salt(request)
        if tokens is None or salt is None:
            return 0, False
        if not self.is_loading or not opts_in(request, "load", self._log):
            return 0, False
        if self._waits_for_save(tokens):
            return None, False
        t0 = time.perf_counter()
        try:
            num_hit = self._lookup(tokens, salt)
        except Exception as exc:  # fail open: a miss
            self._log.warning("lookup", "kvdepot: lookup failed, a miss: %s", exc)
            num_hit = 0
        lookup_s = time.perf_counter() - t0
        self._lookup_s[request.request_id] = self._lookup_s.get(request.request_id, 0) + lookup_s
        self._num_hit_tokens[request.request_id] = num_hit
        self._num_local_tokens[request.request_id] = num_computed_tokens
        num_loadable = min(num_hit, request.num_tokens - 1)
        num_external = max(num_loadable - num_computed_tokens, 0)
        return num_external, self.is_async and num_external > 0

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        num_hit = self._num_hit_tokens.pop(request.request_id, 0)
        num_local = self._num_local_tokens.pop(request.request_id, 0)
        tokens = cacheable_prompt(request)
        if tokens is None:
            return
        state = self._requests.get(request.request_id)
        if (blended := self._blends.pop(request.request_id, None)) is not None:
            if state is None:  # never stored: its KV is approximate, and the question's
                state = RequestState(tokens, blended[1], len(tokens), is_storing=False)
                self._requests[request.request_id] = state
                self._open_record(request.request_id, len(tokens), num_local)
                self.stats.blend("planned")  # the worker reports how each went
            state.blend = blended[0]
            state.num_load_tokens = num_external_tokens
            return
        if state is None:
            if (salt := self._salt(request)) is None:
                return
            is_storing = opts_in(request, "store", self._log)
            if self.is_loading and opts_in(request, "load", self._log):  # looked up: counted
                self.stats.count("requests")
                self.stats.count("lookup_tokens", len(tokens))
                self.stats.count("hit_tokens", min(num_hit, len(tokens)))
            if num_hit < len(tokens):  # a partial match is another prompt's chunk: not ours
                num_hit = floor_to_chunk(num_hit, self.settings.config.chunk_size_tokens)
            state = RequestState(tokens, salt, num_hit, is_storing)
            self._requests[request.request_id] = state
            self._open_record(request.request_id, len(tokens), num_local)
        if self.is_async and num_external_tokens:
            # The request waits outside the batch; the worker loads it in the next step and
            # reports it received (or failed: vLLM then recomputes it all).
            transfer = RequestTransfer(request.request_id, state.token_ids, state.tenant_salt,
                                       [list(group) for group in blocks.get_block_ids()],
                                       load_start=num_local,
                                       load_end=num_local + num_external_tokens,
                                       is_async=True)  # fmt: skip
            self._loading.append(transfer)
            self._planned(request.request_id, 1)
            return
        state.num_load_tokens = num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVDepotMetadata:
        """This step's loads (granted external tokens) and saves (newly computed chunks)."""
        meta = KVDepotMetadata(requests=self._loading)
        self._loading = []
        num_scheduled = scheduler_output.num_scheduled_tokens
        meta.num_step_tokens = getattr(scheduler_output, "total_num_scheduled_tokens", None) or sum(
            num_scheduled.values()
        )
        # vLLM's current block tables (0.32): a sliding-window group's table drops blocks
        # that leave the window, which the tables appended step by step below cannot show.
        current = getattr(scheduler_output, "kv_connector_block_state", None)
        for req_id in scheduler_output.preempted_req_ids or ():
            if (state := self._requests.get(req_id)) is not None:
                state.block_ids = []  # freed; a resumed request brings its new table
        for new in scheduler_output.scheduled_new_reqs:
            if (state := self._requests.get(new.req_id)) is not None:
                state.block_ids = [list(group) for group in new.block_ids]
                num_computed = new.num_computed_tokens
                self._refresh(state, new.req_id, current)
                self._plan(meta, new.req_id, state, num_computed, num_scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if (state := self._requests.get(req_id)) is None:
                continue
            new_block_ids = cached.new_block_ids[i]
            is_resumed = req_id in cached.resumed_req_ids
            if is_resumed:
                state.block_ids = [list(group) for group in new_block_ids or ()]
            elif new_block_ids:
                if not state.block_ids:
                    state.block_ids = [[] for _ in new_block_ids]
                for table, added in zip(state.block_ids, new_block_ids, strict=True):
                    table.extend(added)
            self._refresh(state, req_id, current)
            num_computed = cached.num_computed_tokens[i]
            if not is_resumed and num_computed < state.num_expected_tokens:
                # vLLM rolled the request back after a failed load: that step saved nothing.
                c = self.settings.config.chunk_size_tokens
                state.num_saved_tokens = min(
                    state.num_saved_tokens, floor_to_chunk(num_computed, c)
                )
            self._plan(meta, req_id, state, num_computed, num_scheduled[req_id])
        meta.requests.extend(self._finishing)
        self._finishing = []
        return meta

    def _refresh(self, state: RequestState, req_id: str, current: Any) -> None:
        """Take vLLM's current block tables where it offers them (several groups need them:
        an appended sliding-window table would keep blocks vLLM has freed)."""
        tables = current.get_block_ids(req_id) if current is not None else None
        if tables is not None:
            state.block_ids = [list(table) for table in tables]
        elif self.settings.num_groups > 1 and state.is_storing:
            self._log.warning("no-tables", "kvdepot: vLLM gave no block tables; not storing")
            state.is_storing = False  # an appended table may name blocks vLLM freed

    def _waits_for_save(self, tokens: list[int]) -> bool:
        """Whether `tokens` continue a finished request whose final save is still pending."""
        now = time.monotonic()
        for req_id, pending in list(self._pending.items()):
            if now > pending.deadline:
                self._log.warning(
                    "save-wait", "kvdepot: a finished request's save took over %.1f s", SAVE_WAIT_S
                )
                del self._pending[req_id]
            elif len(tokens) > (n := len(pending.prefix)) and tokens[:n] == pending.prefix:
                return True
        return False

    def update_connector_output(
        self, finished_sending: set[str], stats: dict[str, Any] | None = None
    ) -> None:
        """The worker finished these requests' final saves: vLLM frees their blocks. `stats`:
        the workers' payload of this step, whose per-request entries are taken out of it
        (`kvdepot.connectors.vllm.stats`)."""
        for req_id in finished_sending:
            self._pending.pop(req_id, None)
        entries = stats.pop("requests", None) if stats is not None else None
        for req_id, entry in (entries or {}).items():
            if (open_record := self._records.get(req_id)) is not None:
                open_record.add(entry)
                self._write_if_complete(req_id)

    # ---- per-request records --------------------------------------------------------------

    def _open_record(self, req_id: str, num_prompt: int, num_local: int) -> None:
        lookup_s = self._lookup_s.pop(req_id, 0.0)
        self._records[req_id] = OpenRecord(num_prompt, num_local, lookup_s)
        if len(self._records) > MAX_OPEN_RECORDS:  # a report went missing: write it as is
            self._write(next(iter(self._records)))
        if len(self._lookup_s) > MAX_OPEN_RECORDS:
            del self._lookup_s[next(iter(self._lookup_s))]

    def _planned(self, req_id: str, num_transfers: int) -> None:
        if (open_record := self._records.get(req_id)) is not None:
            open_record.planned += num_transfers

    def _write_if_complete(self, req_id: str) -> None:
        open_record = self._records.get(req_id)
        if open_record is not None and open_record.is_complete:
            self._write(req_id)

    def _write(self, req_id: str) -> None:
        """Write a request's record (and forget it); never raises."""
        open_record = self._records.pop(req_id, None)
        if open_record is None or not open_record.is_finished:
            return
        record = open_record.record(req_id)
        if record.saved_s and self._caches:
            self._caches[0].count_saved(record.saved_s)  # the store's per-model view
        if self._request_log is None:
            metrics = self._caches[0].metrics if self._caches else Metrics()
            self._request_log = RequestLog(metrics, self.settings.config.request_log)
        self._request_log.report(record)
        self.stats.observe("hit_ratio", record.hit_ratio)

    def _plan(
        self,
        meta: KVDepotMetadata,
        req_id: str,
        state: RequestState,
        num_computed: int,
        num_scheduled: int,
    ) -> None:
        transfer = RequestTransfer(req_id, state.token_ids, state.tenant_salt, [])
        if state.num_load_tokens:
            transfer.load_start = num_computed - state.num_load_tokens
            transfer.load_end = num_computed
            transfer.blend = state.blend
            state.num_load_tokens = 0
        state.num_expected_tokens = num_computed + num_scheduled
        num_prompt = len(state.token_ids)
        end = min(state.num_expected_tokens, num_prompt)
        if end < num_prompt or not self.settings.is_token_exact:
            end = floor_to_chunk(end, self.settings.config.chunk_size_tokens)
        if self.is_saving and state.is_storing and end > state.num_saved_tokens:
            transfer.save_start, transfer.save_end = state.num_saved_tokens, end
            state.num_saved_tokens = end
        num_loads = int(transfer.load_end > transfer.load_start)
        num_saves = int(transfer.save_end > transfer.save_start)
        if num_loads or num_saves:
            transfer.block_ids = [list(table) for table in state.block_ids]
            meta.requests.append(transfer)
            self._planned(req_id, num_loads + num_saves)

    def request_finished(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; hold its blocks (True) when its generated KV is to be saved.
        `block_ids`: its block table per KV cache group."""
        req_id = request.request_id
        state = self._requests.pop(req_id, None)
        self._num_hit_tokens.pop(req_id, None)
        self._num_local_tokens.pop(req_id, None)
        self._lookup_s.pop(req_id, None)
        self._blends.pop(req_id, None)
        if (open_record := self._records.get(req_id)) is not None:
            open_record.is_finished = True
        if state is None or (transfer := self._final_save(request, state, block_ids)) is None:
            self._write_if_complete(req_id)
            return False, None
        self._finishing.append(transfer)
        self._planned(req_id, 1)
        prefix = transfer.token_ids[: len(state.token_ids) + 1]  # prompt + first answer token
        self._pending[request.request_id] = PendingSave(prefix)
        return True, None

    def _final_save(
        self, request: Request, state: RequestState, block_ids: tuple[list[int], ...]
    ) -> RequestTransfer | None:
        """The save of a finished request's KV past its last stored chunk: generated tokens
        included; None when there is nothing new to store."""
        if not (self.is_saving and state.is_storing and self.settings.config.store_generated):
            return None
        num_kv = min(
            request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0),
            request.num_tokens - 1,  # the last sampled token was never fed back
        )
        c = self.settings.config.chunk_size_tokens
        end = num_kv if self.settings.is_token_exact else floor_to_chunk(num_kv, c)
        end = min(end, min(map(len, block_ids)) * self.settings.block_size)
        if end <= max(state.num_saved_tokens, len(state.token_ids)):
            return None  # no generated token's KV to add
        return RequestTransfer(
            request.request_id,
            list(request.all_token_ids[:end]),
            state.tenant_salt,
            [list(table) for table in block_ids],
            save_start=floor_to_chunk(state.num_saved_tokens, c),
            save_end=end,
            is_finished=True,
        )

    def reset_cache(self) -> bool | None:
        """Empty the cache (`llm.reset_prefix_cache(reset_connector=True)`)."""
        try:
            for store in self._stores():
                store.clear()
        except Exception as exc:
            self._log.warning("clear", "kvdepot: clearing the cache failed: %s", exc)
            return False
        return True

    def _stores(self) -> list[ChunkStore]:
        """The distinct stores behind the ranks' engines."""
        stores: list[ChunkStore] = []
        for cache in self._engines():
            if all(cache.backend is not store for store in stores):
                stores.append(cache.backend)
        return stores

    def shutdown(self) -> None:
        for req_id in list(self._records):
            self._write(req_id)  # the finished ones, with what the worker reported
        if self._caches:
            for store in self._stores():
                store.close()
