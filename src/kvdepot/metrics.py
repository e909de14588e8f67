"""Prometheus metrics for one kvdepot deployment (an embedded engine or a daemon).

Every `Metrics` owns its own `CollectorRegistry`: no process-global state, so several engines
in one process (or tests) never collide. Label values are bounded (`tier`, `op`, `outcome`,
`reason`); never a key, a hash or a tenant. Hit rate = hit tokens / looked-up tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvdepot.keys import ChunkKey
from kvdepot.misses import CORRUPT, EVICTED, GoneLedger, parse_miss

_LATENCY_BUCKETS_S = (
    1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0,
)  # fmt: skip


MODEL_LABEL_CHARS = 48
MAX_MODEL_LABELS = 16
FAILED_OUTCOMES = frozenset({"error", "breaker_open", "unrouted"})
"""Tier op outcomes that mean the tier could not answer (`Metrics.tiers_failed_since`)."""


class Metrics:
    """All kvdepot metric families, registered in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.lookup_tokens = Counter(
            "kvdepot_engine_lookup_tokens", "Prompt tokens looked up in the cache", registry=r
        )
        self.hit_tokens = Counter(
            "kvdepot_engine_hit_tokens", "Looked-up tokens found in the cache", registry=r
        )
        self.partial_hit_tokens = Counter(
            "kvdepot_engine_partial_hit_tokens",
            "Hit tokens found by partial matching (part of a chunk that follows the prefix)",
            registry=r,
        )
        self.miss_tokens = Counter(
            "kvdepot_engine_miss_tokens",
            "Looked-up tokens not found, by reason (kvdepot.misses) and the tier it names",
            ["reason", "tier"],
            registry=r,
        )
        self.stored_tokens = Counter(
            "kvdepot_engine_stored_tokens", "Tokens whose KV was newly stored", registry=r
        )
        self.retrieved_tokens = Counter(
            "kvdepot_engine_retrieved_tokens", "Tokens whose KV was loaded", registry=r
        )
        self.loaded_tokens = Counter(
            "kvdepot_engine_loaded_tokens",
            "Tokens whose KV was loaded, by the tier it came from (memory, or the tier below "
            "it was promoted from)",
            ["tier"],
            registry=r,
        )
        seconds = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
        self.request_hit_ratio = Histogram(
            "kvdepot_request_hit_ratio",
            "Per request: prompt tokens loaded from kvdepot / prompt tokens",
            ["connector"],
            buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        self.request_load_seconds = Histogram(
            "kvdepot_request_load_seconds",
            "Per request: seconds looking up and loading cached KV",
            ["connector"],
            buckets=seconds,
            registry=r,
        )
        self.request_save_seconds = Histogram(
            "kvdepot_request_save_seconds",
            "Per request: seconds storing its KV",
            ["connector"],
            buckets=seconds,
            registry=r,
        )
        self.prefill_tokens_saved = Counter(
            "kvdepot_prefill_tokens_saved",
            "Prompt tokens loaded from kvdepot instead of prefilled",
            ["connector"],
            registry=r,
        )
        self.prefill_seconds_saved = Counter(
            "kvdepot_prefill_seconds_saved",
            "Estimated prefill seconds saved: tokens not recomputed x the engine's measured "
            "prefill seconds per token (kvdepot.records)",
            ["connector"],
            registry=r,
        )
        self.model_tokens = Counter(
            "kvdepot_model_tokens",
            "Tokens by model and kind: looked_up, hit (partial included), partial, stored. The "
            f"model label is the engine's model id (first {MODEL_LABEL_CHARS} characters), at "
            f"most {MAX_MODEL_LABELS} of them, then 'other'",
            ["model", "kind"],
            registry=r,
        )
        self.model_miss_tokens = Counter(
            "kvdepot_model_miss_tokens",
            "Looked-up tokens not found, by model, reason (kvdepot.misses) and tier",
            ["model", "reason", "tier"],
            registry=r,
        )
        self.model_seconds_saved = Counter(
            "kvdepot_model_prefill_seconds_saved",
            "Estimated prefill seconds the model's engines saved by loading instead of "
            "computing (as they measured it: kvdepot.records)",
            ["model"],
            registry=r,
        )
        self.events = Counter(
            "kvdepot_events",
            "KV events published (kvdepot.events), by type: BlockStored, BlockRemoved, "
            "AllBlocksCleared",
            ["type"],
            registry=r,
        )
        self.events_dropped = Counter(
            "kvdepot_events_dropped",
            "KV events not published, by reason: queue_full, send_failed, no_lineage (a "
            "chunk whose tokens this process never learned)",
            ["reason"],
            registry=r,
        )
        self.note_gone_listeners: list[Callable[[Sequence[ChunkKey], str, str], None]] = []
        """Called with (keys, reason, tier) when chunks leave a tier (`kvdepot.events`)."""
        self._model_labels: set[str] = set()
        self.ledger = GoneLedger()
        """Why chunks left a tier (kvdepot.misses): fed by the tiers' eviction and corruption
        counts, read by the store to explain a miss."""
        self.failed_at: dict[str, float] = {}
        """Tier name -> `time.monotonic()` of its last failed operation."""
        self.blend_requests = Counter(
            "kvdepot_blend_requests",
            "Segmented (CacheBlend) requests by outcome: blended or fallback",
            ["outcome"],
            registry=r,
        )
        self.blend_tokens = Counter(
            "kvdepot_blend_tokens",
            "Context tokens of blended requests: reused (from the cache), computed (segments "
            "not cached yet, on their own), recomputed (selected by the blend)",
            ["kind"],
            registry=r,
        )
        self.tier_ops = Counter(
            "kvdepot_tier_ops", "Tier operations by outcome", ["tier", "op", "outcome"], registry=r
        )
        self.tier_bytes = Counter(
            "kvdepot_tier_bytes",
            "Bytes read from or written to a tier",
            ["tier", "op"],
            registry=r,
        )
        self.tier_latency = Histogram(
            "kvdepot_tier_op_seconds",
            "Latency of batch tier operations",
            ["tier", "op"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tier_used_bytes = Gauge(
            "kvdepot_tier_used_bytes", "Bytes held by a tier", ["tier"], registry=r
        )
        self.tier_capacity_bytes = Gauge(
            "kvdepot_tier_capacity_bytes", "Byte budget of a tier", ["tier"], registry=r
        )
        self.tier_objects = Gauge(
            "kvdepot_tier_objects", "Chunks held by a tier", ["tier"], registry=r
        )
        self.tier_breakers_open = Gauge(
            "kvdepot_tier_breakers_open",
            "Circuit breakers of a remote tier that are not closed (its servers answer misses)",
            ["tier"],
            registry=r,
        )
        self.tier_disabled = Gauge(
            "kvdepot_tier_disabled",
            "1 for a tier the config asks for that could not be opened (running without it)",
            ["tier"],
            registry=r,
        )
        self.tier_evictions = Counter(
            "kvdepot_tier_evictions", "Chunks evicted to make room", ["tier"], registry=r
        )
        self.corrupt_chunks = Counter(
            "kvdepot_tier_corrupt_chunks",
            "Chunks that failed validation, deleted",
            ["tier"],
            registry=r,
        )
        self.dropped_writes = Counter(
            "kvdepot_store_dropped_writes",
            "Chunk writes dropped instead of blocking",
            ["reason"],
            registry=r,
        )

        self.write_back_queued = Gauge(
            "kvdepot_store_write_back_queued_chunks",
            "Chunks waiting for (or in) write-back to the tiers below RAM",
            registry=r,
        )
        self.continuation_evictions = Counter(
            "kvdepot_store_continuation_evictions",
            "Continuation-index entries dropped by its bounds (bytes, entries, children)",
            registry=r,
        )
        self.lookup_chunks = Counter(
            "kvdepot_store_lookup_chunks", "Chunks looked up in the store", registry=r
        )
        self.hit_chunks = Counter(
            "kvdepot_store_hit_chunks", "Looked-up chunks found in some tier", registry=r
        )
        self.daemon_clients = Gauge(
            "kvdepot_daemon_clients", "Client connections to the daemon", registry=r
        )
        self.daemon_overdue_leases = Counter(
            "kvdepot_daemon_overdue_leases",
            "Read leases held past lease_ttl_s (kept pinned until released or disconnect)",
            registry=r,
        )
        self.daemon_expired_reservations = Counter(
            "kvdepot_daemon_expired_reservations",
            "Reserved slots not committed within reservation_ttl_s (their keys given up)",
            registry=r,
        )
        self.daemon_limit_hits = Counter(
            "kvdepot_daemon_limit_hits",
            "Requests or connections refused by a bound: clients, handshake, client_bytes",
            ["limit"],
            registry=r,
        )
        self.daemon_held_bytes = Gauge(
            "kvdepot_daemon_held_bytes",
            "Arena bytes clients hold reserved or leased (expired reservations included)",
            registry=r,
        )
        self.daemon_protocol_errors = Counter(
            "kvdepot_daemon_protocol_errors",
            "Connections closed for bad frames or auth",
            registry=r,
        )
        self.client_degraded = Counter(
            "kvdepot_client_degraded_calls",
            "Calls answered as miss/drop: daemon unreachable",
            ["op"],
            registry=r,
        )
        self.client_reconnects = Counter(
            "kvdepot_client_reconnects", "Successful (re)connections to the daemon", registry=r
        )

    def model_label(self, model: str) -> str:
        """A bounded label for `model`: its first characters, or 'other' once
        `MAX_MODEL_LABELS` models have labels."""
        label = model[:MODEL_LABEL_CHARS] or "unnamed"
        if label not in self._model_labels:
            if len(self._model_labels) >= MAX_MODEL_LABELS:
                return "other"
            self._model_labels.add(label)
        return label

    def count_tokens(
        self,
        model: str,
        looked_up: int,
        hit: int,
        partial: int,
        stored: int,
        missed: Mapping[str, int] | None = None,
        saved_s: float = 0.0,
    ) -> str:
        """Add an engine's token counts under `model`'s label: looked up, hit, partial,
        stored, missed by `miss` string (kvdepot.misses), and the prefill seconds it
        estimates those hits saved; returns the label."""
        label = self.model_label(model)
        for kind, n in (("looked_up", looked_up), ("hit", hit), ("partial", partial),
                        ("stored", stored)):  # fmt: skip
            if n > 0:
                self.model_tokens.labels(label, kind).inc(n)
        for text, n in (missed or {}).items():
            if n > 0:
                self.model_miss_tokens.labels(label, *parse_miss(text)).inc(n)
        if saved_s > 0:
            self.model_seconds_saved.labels(label).inc(saved_s)
        return label

    def tiers_failed_since(self, since: float) -> list[str]:
        """Tiers with a failed operation at or after `since` (`time.monotonic()`)."""
        return [name for name, at in list(self.failed_at.items()) if at >= since]

    def counter_value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (e.g. "kvdepot_store_hit_chunks_total"), 0 if unset."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def tier(self, name: str) -> TierMetrics:
        """Metric children bound to one tier's label."""
        return TierMetrics(self, name)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    def note_gone(self, keys: Sequence[ChunkKey], reason: str, tier: str) -> None:
        """Chunks left `tier` for `reason`: remembered to explain a later miss, and told to
        the listeners (KV events)."""
        self.ledger.note(keys, reason, tier)
        for listener in self.note_gone_listeners:
            listener(keys, reason, tier)

    def hit_rate(self) -> float:
        """Hit tokens / looked-up tokens since start (0.0 before any lookup)."""
        sample = self.registry.get_sample_value
        looked = sample("kvdepot_engine_lookup_tokens_total") or 0.0
        hit = sample("kvdepot_engine_hit_tokens_total") or 0.0
        return hit / looked if looked else 0.0


@dataclass(slots=True)
class TierMetrics:
    """The metric families above, for one tier; tiers call these, nothing else."""

    metrics: Metrics
    name: str

    def op(self, op: str, outcome: str, count: int = 1) -> None:
        if count:
            self.metrics.tier_ops.labels(self.name, op, outcome).inc(count)
            if outcome in FAILED_OUTCOMES:
                self.metrics.failed_at[self.name] = time.monotonic()

    def bytes(self, op: str, nbytes: int) -> None:
        if nbytes:
            self.metrics.tier_bytes.labels(self.name, op).inc(nbytes)

    def latency(self, op: str, seconds: float) -> None:
        self.metrics.tier_latency.labels(self.name, op).observe(seconds)

    def usage(self, used_bytes: int, capacity_bytes: int, num_objects: int) -> None:
        self.metrics.tier_used_bytes.labels(self.name).set(used_bytes)
        self.metrics.tier_capacity_bytes.labels(self.name).set(capacity_bytes)
        self.metrics.tier_objects.labels(self.name).set(num_objects)

    def evicted(self, keys: Sequence[ChunkKey] | int = 1) -> None:
        """Chunks dropped for room: their keys (remembered to explain a later miss), or
        just how many (a plug-in tier's count)."""
        count = keys if isinstance(keys, int) else len(keys)
        self.metrics.tier_evictions.labels(self.name).inc(count)
        if not isinstance(keys, int):
            self.metrics.note_gone(keys, EVICTED, self.name)

    def breaker(self, is_open: bool | None) -> None:
        """One of this tier's circuit breakers left (True) or came back to closed (False);
        None: a closed one was made (the series exists, at 0, before anything fails)."""
        gauge = self.metrics.tier_breakers_open.labels(self.name)
        if is_open:
            gauge.inc()
        elif is_open is not None:
            gauge.dec()

    def corrupt(self, keys: Sequence[ChunkKey] | int = 1) -> None:
        """Chunks that failed validation and were deleted (keys, or how many)."""
        count = keys if isinstance(keys, int) else len(keys)
        self.metrics.corrupt_chunks.labels(self.name).inc(count)
        if not isinstance(keys, int):
            self.metrics.note_gone(keys, CORRUPT, self.name)
