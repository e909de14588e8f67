"""The connector's worker side: the paged KV tensors, loaded from and saved to the store.

Runs in vLLM's worker process (the one holding the KV tensors). `start_load_kv` retrieves
the chunks and scatters them, page by page, into the paged tensors before the forward pass:
CPU pages straight from the store's shared memory (no staging copy), device pages through a
pinned staging tensor. `wait_for_save` gathers the pages of the chunks to save into
`[L, 2, T, H, D]` and stores them. Both are synchronous. Embedded mode: the tiered store
lives here, in a shared-memory RAM tier, served on a private socket to the scheduler side
(and `kvdepot stats`).

Fail open: a load that fails reports its blocks (`get_block_ids_with_load_errors`) and vLLM
recomputes them; a step with a failed load saves nothing it computed, so KV computed over
unloaded blocks is never stored; a failed save only costs a future miss. A finished request's
final save (its KV was computed in earlier steps) always runs, and is always reported done
(`get_finished`), so vLLM frees its blocks whether it worked or not.

Tensor parallelism: each rank's worker stores and loads its own shard (its KV heads) under
its rank's keys; embedded, each rank serves its own store (`rank_socket_path`). A rank's
failed load also poisons what the other ranks compute in that step (every layer's input is
summed across ranks), so before saving, the ranks agree over vLLM's TP group whether any load
failed (one tiny all-reduce, only in steps that load and save, which the step's metadata,
identical on every rank, decides alike everywhere).

Several KV cache groups (`LayerGroup`): each group's layers move with that group's block
table. A sliding-window group's table holds vLLM's null block for blocks before its window:
loads skip them, and a save starts at the first chunk every group still holds. Its loads are
asynchronous (the request is outside the batch): done and failed ones are reported through
`get_finished` (vLLM recomputes a failed one whole), never as blocks.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvdepot.blend.adapters import BlendUnsupported
from kvdepot.blend.segments import Segment
from kvdepot.connectors.vllm.blend import WorkerBlend
from kvdepot.connectors.vllm.metadata import KVDepotMetadata, RequestTransfer, first_live_token
from kvdepot.connectors.vllm.pages import (
    LAYOUTS,
    KVParts,
    PagedLayout,
    detect_layout,
    gather_pages,
    page_ids,
    page_size,
    scatter_pages,
    scatter_views,
    stack_layers,
)
from kvdepot.connectors.vllm.plugin import built_models
from kvdepot.connectors.vllm.settings import ConnectorSettings, cdiv
from kvdepot.connectors.vllm.stats import StepStats
from kvdepot.daemon.host import SharedStoreHost
from kvdepot.deployment import embedded_metrics, open_cache
from kvdepot.engine import CacheEngine, LoadInfo, ceil_to_chunk, floor_to_chunk
from kvdepot.errors import ConfigError
from kvdepot.events import offset_endpoint
from kvdepot.logutil import RateLimitedLog
from kvdepot.records import PrefillCost
from kvdepot.store import ChunkStore
from kvdepot.tensors import torch_dtype

logger = logging.getLogger(__name__)


class WorkerSide:
    """The worker half of `KVDepotConnector` (vLLM calls it through the connector)."""

    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings
        self._cache: CacheEngine | None = None
        self._log = RateLimitedLog(logger)
        self._layers: list[KVParts] = []
        self._stacked: KVParts | None = None
        self._paged = LAYOUTS["cpu-vec"]
        self._page_size = settings.block_size
        self._device = torch.device("cpu")
        self._buffer: torch.Tensor | None = None
        self._invalid_block_ids: set[int] = set()
        self._is_load_failed = False
        self._finished_saves: set[str] = set()
        self._host: SharedStoreHost | None = None
        self._rank = 0  # TP rank, known once vLLM registers the KV caches
        self._groups: list[LayerGroup] = []
        self._received: set[str] = set()  # asynchronous loads done (or failed)
        self._failed: set[str] = set()  # asynchronous loads failed: vLLM recomputes all
        self.stats = StepStats()  # for vLLM's metrics (`get_kv_connector_stats`)
        self.prefill_cost = PrefillCost()  # seconds per computed token, for the ROI estimate
        self._step_t0 = 0.0
        self._step_load_s = 0.0
        self._blend: WorkerBlend | BlendRefused | None = None
        self._first_ptr = 0

    def step_started(self) -> None:
        """vLLM bound this step's metadata: its forward pass runs before `wait_for_save`."""
        self._step_t0 = time.perf_counter()
        self._step_load_s = 0.0

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Check the paged layout, open the store (embedded: and serve it to the scheduler)."""
        names = self.settings.layer_names
        missing = [name for name in names if name not in kv_caches]
        if missing:
            raise ConfigError(f"vLLM registered no KV cache for layers {missing[:3]}")
        head_dim = self.settings.layout.head_dim
        self._paged = detect_layout(
            kv_caches[names[0]], self.settings.layout.num_kv_heads, head_dim,
            self.settings.cpu_isa, self.settings.is_mla,
        )  # fmt: skip
        self._layers = [self._paged.split(kv_caches[name], head_dim) for name in names]
        self._first_ptr = kv_caches[names[0]].data_ptr()  # which model is ours (CacheBlend)
        self._stacked = stack_layers(self._layers)  # all layers in one copy, if allocated so
        rows = self.settings.group_layers or [list(range(len(names)))]
        windowed = self.settings.windowed_groups or [False] * len(rows)
        self._groups = [
            LayerGroup.of(g, r, self._layers, w)
            for g, (r, w) in enumerate(zip(rows, windowed, strict=True))
        ]
        self._page_size = page_size(self._layers[0], self._paged)
        self._device = kv_caches[names[0]].device
        self._rank = tp_rank() if self.settings.tp_size > 1 else 0
        if self.settings.block_size % self._page_size:
            raise ConfigError(
                f"block size {self.settings.block_size} is not a multiple of the page size"
            )
        self._cache = self.settings.make_engine(self._open_worker_store(), self._rank)
        logger.info(
            "kvdepot: %s mode, %s layout, %d layers (%s), block %d, chunk %d tokens, TP %d/%d",
            self.settings.config.mode, self._paged.name, len(names),
            "one allocation" if self._stacked is not None else "apart",
            self.settings.block_size, self.settings.config.chunk_size_tokens,
            self._rank, self.settings.tp_size,
        )  # fmt: skip

    def _open_worker_store(self) -> ChunkStore:
        if self.settings.config.mode == "daemon":
            return open_cache(self.settings.config)
        config = self.settings.config
        if config.events.enabled and self._rank:  # each rank's store publishes on its own port
            events = dataclasses.replace(
                config.events,
                endpoint=offset_endpoint(config.events.endpoint, self._rank),
                replay_endpoint=offset_endpoint(config.events.replay_endpoint, self._rank),
            )
            config = dataclasses.replace(config, events=events)
        self._host = SharedStoreHost.open(
            config, socket_path=self.settings.rank_socket_path(self._rank), tcp=False
        )
        embedded_metrics(self._host.store, self.settings.config, port_offset=self._rank)
        return self._host.store

    def _staging(self, num_tokens: int) -> torch.Tensor:
        """A reused CPU tensor `[L, 2, T, H, D]` with T >= num_tokens (fresh memory is slow)."""
        if self._buffer is None or self._buffer.shape[2] < num_tokens:
            step = 4 * max(self.settings.config.chunk_size_tokens, self._page_size)
            shape = self.settings.layout.chunk_shape(cdiv(num_tokens, step) * step)
            pin = self._device.type == "cuda"  # page-locked memory: fast copies to the device
            self._buffer = torch.empty(
                shape, dtype=torch_dtype(self.settings.layout.dtype), pin_memory=pin
            )
        return self._buffer

    def _page_ids(self, block_ids: list[int], start: int, end: int) -> list[int]:
        """The kernel pages of tokens `[start, end)` (from the page `start` falls in)."""
        return page_ids(
            block_ids, start // self._page_size, cdiv(end, self._page_size),
            self.settings.block_size // self._page_size,
        )  # fmt: skip

    def _valid_end(self, num_hit: int, start: int, end: int) -> int:
        """Where the load ends given `num_hit` cached tokens: `end`, or the last whole block
        before a shortfall (vLLM recomputes the blocks after it)."""
        if num_hit >= end:
            return end
        return max(num_hit - num_hit % self.settings.block_size, start)

    def start_load_kv(self, meta: KVDepotMetadata) -> None:
        """Load this step's granted tokens into their pages, before the forward pass (a
        blended request's: its context, built now)."""
        self._is_load_failed = False
        for transfer in meta.requests:
            if transfer.load_end > transfer.load_start:
                if transfer.blend is not None:
                    self._blend_load(transfer)
                else:
                    self._load(transfer)

    def _blender(self) -> WorkerBlend:
        """The blend path over vLLM's model; raises `BlendRefused` when there is none."""
        if isinstance(self._blend, BlendRefused):
            raise self._blend
        if self._blend is None:
            assert self._cache is not None
            model = self._own_model()
            try:
                if model is None:
                    raise BlendRefused(
                        "no-model",
                        "vLLM built no model that kvdepot's plugin recorded and that holds "
                        "this worker's KV caches (an architecture outside "
                        "kvdepot.connectors.vllm.plugin.ARCHITECTURES, or KVDEPOT_VLLM_PLUGIN=0)",
                    )
                try:
                    self._blend = WorkerBlend(self._cache, self.settings.config.blend, model)
                except BlendUnsupported as exc:
                    raise BlendRefused("unsupported-model", str(exc)) from exc
            except BlendRefused as exc:
                self._blend = exc
                raise
        return self._blend

    def _own_model(self) -> Any | None:
        """The recorded model whose attention layers hold this worker's KV caches (another
        engine's model in the same process, or a draft model, would blend wrong KV)."""
        first = self.settings.layer_names[0]
        for model in built_models():
            for layer in getattr(getattr(model, "model", None), "layers", None) or ():
                attn = getattr(getattr(layer, "self_attn", None), "attn", None)
                if getattr(attn, "layer_name", None) == first:
                    cache = getattr(attn, "kv_cache", None)
                    if isinstance(cache, torch.Tensor) and cache.data_ptr() == self._first_ptr:
                        return model
                    break
        return None

    def _blend_load(self, transfer: RequestTransfer) -> None:
        """Build a segmented request's blended context and write it into its pages; any
        failure reports its blocks and vLLM computes them (a normal prefill)."""
        assert transfer.blend is not None and self._cache is not None
        start, end, spec = transfer.load_start, transfer.load_end, transfer.blend
        t0 = time.perf_counter()
        blended = None
        try:
            segments, offset = [], 0
            for n, reuse in zip(spec.lengths, spec.reuse, strict=True):
                segments.append(Segment(tuple(transfer.token_ids[offset : offset + n]), reuse))
                offset += n
            blended = self._blender().context(segments, spec.ratio, transfer.tenant_salt)
            if blended.num_context_tokens != end:
                raise ConfigError(
                    f"blended {blended.num_context_tokens} tokens, the scheduler planned {end}"
                )
            self._write_context(transfer, blended.kv, start, end)
            outcome = "blended"
        except BlendRefused as exc:
            outcome = f"fallback:{exc.reason}"
            self._log.warning("blend-refused", "kvdepot: not blending (%s): %s", *exc.args)
        except Exception as exc:  # fail open: vLLM computes the request's context
            outcome = "fallback:failed"
            self._log.warning("blend", "kvdepot: blend failed, recomputing: %s", exc)
        load_s = time.perf_counter() - t0
        self._step_load_s += load_s
        self.stats.blend(outcome)
        self.stats.observe("load_s", load_s)
        metrics = self._cache.metrics  # kvdepot's own series, as the transformers path counts
        metrics.blend_requests.labels(outcome.partition(":")[0]).inc()
        if blended is not None and outcome == "blended":
            kept = blended.num_reused - blended.num_recomputed
            for kind, n in (("reused", blended.num_reused), ("computed", blended.num_computed),
                            ("recomputed", blended.num_recomputed)):  # fmt: skip
                self.stats.count(f"blend_{kind}_tokens", n)
                metrics.blend_tokens.labels(kind).inc(n)
            self.stats.tiers(blended.reused_by_tier)
            self.stats.request(
                transfer.req_id, blended.reused_by_tier, ops=1, load_s=load_s,
                loaded_tokens=max(kept, 0),
                saved_s=self.prefill_cost.saved_s(max(kept, 0)),
            )  # fmt: skip
            return
        self.stats.request(transfer.req_id, ops=1, load_s=load_s)
        self._is_load_failed = True
        bad = transfer.block_ids[0][
            start // self.settings.block_size : cdiv(end, self.settings.block_size)
        ]
        self._invalid_block_ids.update(bad)

    def _write_context(
        self, transfer: RequestTransfer, kv: torch.Tensor, start: int, end: int
    ) -> None:
        """Write tokens `[start, end)` of a context's KV `[L, 2, H, T, D]` into their pages."""
        n = self._page_size
        first = start - start % n
        num_tokens = cdiv(end, n) * n - first
        layout = self.settings.layout
        out = torch.zeros(
            (layout.num_layers, 2, num_tokens, layout.num_kv_heads, layout.head_dim),
            dtype=torch_dtype(layout.dtype),
            device=self._device,
        )
        out[:, :, : end - first].copy_(kv[:, :, :, first:end].transpose(2, 3))
        for group in self._groups:
            ids = self._page_ids(transfer.block_ids[group.index], first, end)
            scatter_pages(group.rows_of(out), group.layers, self._paged, ids, stacked=group.stacked)

    def _load(self, transfer: RequestTransfer) -> None:
        """Scatter the leading run of whole blocks that could be loaded; report the rest."""
        assert self._cache is not None, "register_kv_caches was not called"
        start, end, c = (
            transfer.load_start,
            transfer.load_end,
            self.settings.config.chunk_size_tokens,
        )
        tokens = transfer.token_ids
        if end <= floor_to_chunk(len(tokens), c):
            tokens = tokens[: ceil_to_chunk(end, c)]  # no need to read chunks past the load
        valid_end = start
        loaded = LoadInfo()
        t0 = time.perf_counter()
        try:
            load = self._load_views if self._device.type == "cpu" else self._load_staged
            valid_end = load(transfer, tokens, start, end, loaded)
            logger.debug(
                "kvdepot: loaded %d tokens in %.3f s", valid_end - start, time.perf_counter() - t0
            )
        except Exception as exc:  # fail open: vLLM recomputes the blocks reported below
            self._log.warning("load", "kvdepot: load failed, recomputing: %s", exc)
            valid_end = start
        load_s = time.perf_counter() - t0
        self._step_load_s += load_s
        self.stats.observe("load_s", load_s)
        nbytes = (valid_end - start) * self._bytes_per_token()
        if self._rank == 0:  # tokens once, whatever the TP size
            self.stats.count("loaded_tokens", valid_end - start)
            tiers = loaded.by_tier(start, valid_end)
            self.stats.tiers(tiers)
            saved_s = self.prefill_cost.saved_s(valid_end - start)
            self.stats.count("prefill_seconds_saved", saved_s)
            self.stats.request(
                transfer.req_id, tiers, ops=1, load_s=load_s, loaded_bytes=nbytes,
                loaded_tokens=valid_end - start, saved_s=saved_s,
                partial_tokens=loaded.partial_tokens(start, valid_end),
            )  # fmt: skip
            if valid_end < end:
                self.stats.count("failed_loads")
                self.stats.count("failed_load_tokens", end - valid_end)
        else:
            self.stats.request(transfer.req_id, ops=1, load_s=load_s, loaded_bytes=nbytes)
        if transfer.is_async:
            self._received.add(transfer.req_id)
            if valid_end < end:  # vLLM takes back whole requests here, not blocks
                self._failed.add(transfer.req_id)
        elif valid_end < end:
            self._is_load_failed = True
            bad = transfer.block_ids[0][
                valid_end // self.settings.block_size : cdiv(end, self.settings.block_size)
            ]
            self._invalid_block_ids.update(bad)

    def _load_views(
        self,
        transfer: RequestTransfer,
        tokens: list[int],
        start: int,
        end: int,
        loaded: LoadInfo,
    ) -> int:
        """CPU pages: scatter straight from the store's memory (no staging pass); returns
        where the loaded tokens end."""
        assert self._cache is not None
        buffer = self._staging(len(tokens))  # for chunks that need decoding
        views = self._cache.retrieve_views(
            tokens, tenant_salt=transfer.tenant_salt, out=buffer, info=loaded
        )
        with views as kv:
            valid_end = self._valid_end(sum(int(piece.shape[2]) for piece in kv), start, end)
            for group in self._groups:
                table = transfer.block_ids[group.index]
                live = max(start, group.first_live_token(table, self.settings.block_size))
                if valid_end > live:
                    ids = self._page_ids(table, live, valid_end)
                    first = live - live % self._page_size
                    pieces = [group.rows_of(piece) for piece in kv]
                    scatter_views(
                        pieces, first, valid_end, group.layers, self._paged, ids,
                        stacked=group.stacked,
                    )  # fmt: skip
        return valid_end

    def _load_staged(
        self,
        transfer: RequestTransfer,
        tokens: list[int],
        start: int,
        end: int,
        loaded: LoadInfo,
    ) -> int:
        """Device pages: retrieve into the (pinned) staging tensor, copy it over, scatter."""
        assert self._cache is not None
        buffer = self._staging(max(len(tokens), cdiv(end, self._page_size) * self._page_size))
        hit = self._cache.retrieve(tokens, tenant_salt=transfer.tenant_salt, out=buffer,
                                   info=loaded)  # fmt: skip
        valid_end = self._valid_end(hit.shape[2], start, end)
        for group in self._groups:
            table = transfer.block_ids[group.index]
            live = max(start, group.first_live_token(table, self.settings.block_size))
            if valid_end > live:
                first = live - live % self._page_size
                kv = buffer[:, :, first : cdiv(valid_end, self._page_size) * self._page_size]
                ids = self._page_ids(table, live, valid_end)
                # Blocking: the buffer is reused next.
                scatter_pages(
                    group.rows_of(kv).to(self._device), group.layers, self._paged, ids,
                    stacked=group.stacked,
                )  # fmt: skip
        return valid_end

    def wait_for_save(self, meta: KVDepotMetadata) -> None:
        """Store the chunks this step completed (none after a failed load), then the finished
        requests' final saves."""
        if self._step_t0 and self._rank == 0:  # the forward pass: this engine's prefill cost
            forward_s = time.perf_counter() - self._step_t0 - self._step_load_s
            self.prefill_cost.observe(forward_s, meta.num_step_tokens)
            self._step_t0 = 0.0
        saves = [t for t in meta.requests if t.save_end > t.save_start and not t.is_finished]
        if saves and self._any_load_failed(meta):  # a collective: every rank, same steps
            # Some KV this step computed may rest on blocks that did not load.
            self._log.warning("skip-save", "kvdepot: a load failed, this step stores nothing")
            for transfer in saves:
                self.stats.request(transfer.req_id, ops=1)  # done, with nothing stored
            saves = []
        if self._is_replica():
            saves = []  # MLA with TP, one daemon: rank 0 stores the latents every rank holds
        t0 = time.perf_counter()
        for transfer in saves:
            self._save(transfer)
        self.save_finished(meta)
        if saves:
            logger.debug(
                "kvdepot: saved %d tokens in %.4f s",
                sum(t.save_end - t.save_start for t in saves), time.perf_counter() - t0,
            )  # fmt: skip

    def save_finished(self, meta: KVDepotMetadata) -> None:
        """The finished requests' final saves in `meta`, each once: from `wait_for_save`, and
        from the transfer report of a step without a forward pass, where vLLM 0.30 calls no
        `wait_for_save` (later releases call it in every step)."""
        for transfer in meta.requests:
            if not transfer.is_finished or transfer.req_id in self._finished_saves:
                continue
            if not self._is_replica():  # else rank 0 stores it
                self._save(transfer)
            self._finished_saves.add(transfer.req_id)

    def _is_replica(self) -> bool:
        """A rank that leaves storing to rank 0: MLA latents, identical on every rank, in a
        daemon all ranks share (embedded, each rank has a store of its own to fill)."""
        return self.settings.is_mla and self._rank > 0 and self.settings.config.mode == "daemon"

    def _any_load_failed(self, meta: KVDepotMetadata) -> bool:
        """Whether a load of this step failed on any TP rank (call only in steps that save:
        with TP, every rank must make the same calls)."""
        if self.settings.tp_size == 1:
            return self._is_load_failed
        if not any(t.load_end > t.load_start for t in meta.requests):
            return False  # no rank loaded anything
        return any_rank(self._is_load_failed)

    def get_finished(self) -> tuple[set[str], set[str], set[str]]:
        """(finished requests whose final save is done: vLLM may free their blocks,
        asynchronous loads done, those of them that failed)."""
        done, self._finished_saves = self._finished_saves, set()
        received, self._received = self._received, set()
        failed, self._failed = self._failed, set()
        return done, received, failed

    def _save(self, transfer: RequestTransfer) -> None:
        """Store the transfer's save range; its request's entry counts the save, done or
        skipped (the scheduler waits for every transfer it planned before it writes the
        request's record)."""
        t0 = time.perf_counter()
        num_stored = self._store(transfer)
        save_s = time.perf_counter() - t0
        self.stats.observe("save_s", save_s)
        nbytes = num_stored * self._bytes_per_token()
        if self._rank == 0:
            self.stats.request(transfer.req_id, ops=1, save_s=save_s, stored_bytes=nbytes,
                               stored_tokens=num_stored)  # fmt: skip
        else:
            self.stats.request(transfer.req_id, ops=1, save_s=save_s, stored_bytes=nbytes)

    def _bytes_per_token(self) -> int:
        """KV bytes of one token in this rank's shard."""
        return self._cache.layout.bytes_per_token if self._cache is not None else 0

    def _store(self, transfer: RequestTransfer) -> int:
        """The save itself; returns the tokens of the range it covered (0 if none or failed)."""
        assert self._cache is not None, "register_kv_caches was not called"
        start, end, n = transfer.save_start, transfer.save_end, self._page_size
        # A chunk is stored only when every group still holds its KV (a sliding-window
        # group frees blocks that leave its window: those chunks are not stored).
        live = max(
            g.first_live_token(transfer.block_ids[g.index], self.settings.block_size)
            for g in self._groups
        )
        if live > start:
            start = ceil_to_chunk(live, self.settings.config.chunk_size_tokens)
            if start >= end:
                return 0
        first = start - start % n
        num_tokens = cdiv(end, n) * n - first
        try:
            buffer = self._staging(num_tokens)
            out = buffer[:, :, :num_tokens]
            on_device = self._device.type != "cpu"
            staged = torch.empty_like(out, device=self._device) if on_device else out
            for group in self._groups:
                ids = self._page_ids(transfer.block_ids[group.index], start, end)
                group.gather(staged, self._paged, ids)
            if on_device:
                out.copy_(staged)
            kv = buffer[:, :, start - first : end - first]
            self._cache.store(
                transfer.token_ids[:end],
                kv,
                tenant_salt=transfer.tenant_salt,
                kv_start_token=start,
                store_partial=self.settings.is_token_exact and end == len(transfer.token_ids),
            )
            if self._rank == 0:
                self.stats.count("stored_tokens", end - start)
            return end - start
        except Exception as exc:  # a cache problem must never cost the user the answer
            self._log.warning("save", "kvdepot: storing KV failed, request unaffected: %s", exc)
            self.stats.count("failed_saves")
            return 0

    def get_block_ids_with_load_errors(self) -> set[int]:
        invalid, self._invalid_block_ids = self._invalid_block_ids, set()
        return invalid

    def shutdown(self) -> None:
        if self._host is not None:
            self._host.close()  # the store too
        elif self._cache is not None:
            self._cache.backend.close()


class BlendRefused(BlendUnsupported):
    """This worker cannot blend: `reason` (a metric label) and why."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(reason, why)
        self.reason = reason


@dataclass(slots=True)
class LayerGroup:
    """One KV cache group's layers: their pages, and their rows in a chunk's layer dim."""

    index: int  # the group's block table in `RequestTransfer.block_ids`
    rows: slice | torch.Tensor  # a view's slice when evenly spaced, else indices
    layers: list[KVParts]
    stacked: KVParts | None
    is_windowed: bool  # sliding window: vLLM frees (nulls) the blocks before the window

    @classmethod
    def of(
        cls, index: int, rows: list[int], layers: list[KVParts], is_windowed: bool
    ) -> LayerGroup:
        mine = [layers[i] for i in rows]
        steps = {b - a for a, b in itertools.pairwise(rows)}
        if len(steps) <= 1 and (step := steps.pop() if steps else 1) > 0:
            view: slice | torch.Tensor = slice(rows[0], rows[-1] + 1, step)
        else:
            view = torch.tensor(rows)
        return cls(index, view, mine, stack_layers(mine), is_windowed)

    def first_live_token(self, table: list[int], block_size: int) -> int:
        """The first token whose KV this group still holds (0 but for sliding windows)."""
        return first_live_token(table, block_size) if self.is_windowed else 0

    def rows_of(self, kv: torch.Tensor) -> torch.Tensor:
        """The group's layers of `kv` `[L, ...]`: a view, or a copy if not evenly spaced."""
        if isinstance(self.rows, slice):
            return kv[self.rows]
        return kv.index_select(0, self.rows.to(kv.device))

    def gather(self, out: torch.Tensor, paged: PagedLayout, ids: list[int]) -> None:
        """Copy the group's pages `ids` into its rows of `out` `[L, 2, T, H, D]`."""
        if isinstance(self.rows, slice):
            gather_pages(self.layers, paged, ids, out[self.rows], stacked=self.stacked)
            return
        mine = torch.empty_like(out[: len(self.layers)])
        gather_pages(self.layers, paged, ids, mine, stacked=self.stacked)
        out.index_copy_(0, self.rows.to(out.device), mine)


def tp_rank() -> int:
    """This worker's tensor-parallel rank (vLLM's distributed state is set up by now)."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank of vLLM's tensor-parallel group (a collective:
    every rank must call it)."""
    from vllm.distributed.parallel_state import get_tp_group

    value = torch.tensor([int(flag)], dtype=torch.int32)
    torch.distributed.all_reduce(
        value, op=torch.distributed.ReduceOp.MAX, group=get_tp_group().cpu_group
    )
    return bool(value.item())
