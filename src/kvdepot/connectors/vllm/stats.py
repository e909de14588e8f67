"""What the connector did, counted for vLLM's own metrics (`vllm serve`'s /metrics, its log).

Runs in both of vLLM's connector processes: the scheduler side counts lookups, hits and
requests vLLM alone serves; the worker side counts loads and saves and times them. vLLM
collects each side's `take()` every step (`get_kv_connector_stats`), sums the workers' (all
TP ranks) and the scheduler's with `merge`, and hands the sum to the connector's Prometheus
metrics (`KVDepotPromMetrics` in `connector.py`) in its logging process.

The payload is a plain dict (vLLM ships it between processes): `counts` (name -> int, the
names in `COUNTS`), `uncached` (reason -> requests), `tiers` (tier -> tokens loaded from it),
`blend` (segmented requests by outcome: `planned`, `blended`, `fallback:<reason>`),
`load_s`, `save_s` (one observation per request and step, seconds) and `hit_ratio` (one per
finished request: its prompt tokens loaded from kvdepot / its prompt tokens). With tensor
parallelism every rank times its own loads and saves, but tokens are counted by rank 0 only,
so a token is counted once.

`requests` (request id -> `REQUEST_FIELDS`) carries the worker's part of each request's
record (`kvdepot.records`) to the scheduler side, which takes it out of the payload in
`update_connector_output` and writes the record when the request is done. Across ranks an
entry's operations and seconds are the slowest rank's (`MAX_FIELDS`, the ranks work in
parallel), its bytes the sum, its tokens rank 0's.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

COUNTS = {
    "requests": "requests kvdepot looked up",
    "lookup_tokens": "prompt tokens looked up",
    "hit_tokens": "prompt tokens kvdepot held when looked up (vLLM's own hits included)",
    "loaded_tokens": "tokens loaded from kvdepot instead of computed",
    "failed_load_tokens": "tokens whose load failed (vLLM recomputed them)",
    "failed_loads": "loads that failed, in part or whole",
    "stored_tokens": "tokens stored",
    "failed_saves": "saves that failed (a future miss, nothing else)",
    "prefill_seconds_saved": "estimated prefill seconds the loaded tokens saved (loaded "
    "tokens x this engine's measured seconds per computed token)",
    "blend_reused_tokens": "context tokens of blended requests whose KV came from kvdepot",
    "blend_computed_tokens": "context tokens of blended requests in segments computed on "
    "their own (not cached yet; stored for next time)",
    "blend_recomputed_tokens": "context tokens blended requests recomputed (CacheBlend's "
    "selection)",
}


REQUEST_FIELDS = (
    "ops", "load_s", "save_s", "loaded_tokens", "partial_tokens", "stored_tokens",
    "loaded_bytes", "stored_bytes", "saved_s",
)  # fmt: skip
"""A request's worker entry: transfers done (loads and saves, skipped ones included), their
seconds, tokens and bytes; and `tiers` (tier -> tokens loaded from it)."""
MAX_FIELDS = frozenset({"ops", "load_s", "save_s"})
_TALLIES = ("counts", "uncached", "tiers", "blend")
_LISTS = ("load_s", "save_s", "hit_ratio")


def empty() -> dict[str, Any]:
    return {"counts": {}, "uncached": {}, "tiers": {}, "blend": {}, "load_s": [],
            "save_s": [], "hit_ratio": [], "requests": {}}  # fmt: skip


def merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Add `other`'s counts and observations to `into` (returned); the entries of a
    request both have are combined as across TP ranks (see the module docstring)."""
    for field in _TALLIES:
        totals = Counter(into.get(field) or {})
        totals.update(other.get(field) or {})
        into[field] = dict(totals)
    for field in _LISTS:
        into[field] = [*(into.get(field) or []), *(other.get(field) or [])]
    requests = dict(into.get("requests") or {})
    for req_id, entry in (other.get("requests") or {}).items():
        requests[req_id] = _combine(requests[req_id], entry) if req_id in requests else entry
    into["requests"] = requests
    return into


def _combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in REQUEST_FIELDS:
        x, y = a.get(name, 0), b.get(name, 0)
        out[name] = max(x, y) if name in MAX_FIELDS else x + y
    tiers = Counter(a.get("tiers") or {})
    tiers.update(b.get("tiers") or {})
    out["tiers"] = dict(tiers)
    return out


def is_empty(data: dict[str, Any]) -> bool:
    return not any(data.get(field) for field in (*_TALLIES, *_LISTS, "requests"))


def summary(data: dict[str, Any]) -> dict[str, int | float]:
    """One line's worth for vLLM's periodic log: rates, sums and mean times."""
    counts = Counter(data.get("counts") or {})
    loads, saves = data.get("load_s") or [], data.get("save_s") or []
    looked = counts["lookup_tokens"]
    return {
        "kvdepot_hit_rate": round(counts["hit_tokens"] / looked, 3) if looked else 0.0,
        "kvdepot_loaded_tokens": counts["loaded_tokens"],
        "kvdepot_stored_tokens": counts["stored_tokens"],
        "kvdepot_failed_loads": counts["failed_loads"],
        "kvdepot_mean_load_ms": round(1e3 * sum(loads) / len(loads), 2) if loads else 0.0,
        "kvdepot_mean_save_ms": round(1e3 * sum(saves) / len(saves), 2) if saves else 0.0,
        "kvdepot_uncached_requests": sum((data.get("uncached") or {}).values()),
    }


class StepStats:
    """A side's counts since vLLM last took them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = empty()

    def count(self, name: str, n: float = 1) -> None:
        assert name in COUNTS, name
        with self._lock:
            counts = self._data["counts"]
            counts[name] = counts.get(name, 0) + n

    def uncached(self, reason: str) -> None:
        with self._lock:
            self._data["uncached"][reason] = self._data["uncached"].get(reason, 0) + 1

    def blend(self, outcome: str) -> None:
        """Count a segmented request: `planned` (scheduler), `blended` (worker), or
        `fallback:<reason>` (either side; served as a normal prefill)."""
        with self._lock:
            self._data["blend"][outcome] = self._data["blend"].get(outcome, 0) + 1

    def observe(self, field: str, value: float) -> None:
        assert field in _LISTS, field
        with self._lock:
            self._data[field].append(value)

    def tiers(self, by_tier: dict[str, int]) -> None:
        """Tokens loaded, by the tier they came from."""
        with self._lock:
            tally = self._data["tiers"]
            for tier, n in by_tier.items():
                tally[tier] = tally.get(tier, 0) + n

    def request(self, req_id: str, tiers: dict[str, int] | None = None, **fields: float) -> None:
        """Add to this side's entry for one request (`REQUEST_FIELDS`, summed)."""
        with self._lock:
            entry = self._data["requests"].setdefault(req_id, {"tiers": {}})
            for name, value in fields.items():
                assert name in REQUEST_FIELDS, name
                entry[name] = entry.get(name, 0) + value
            for tier, n in (tiers or {}).items():
                entry["tiers"][tier] = entry["tiers"].get(tier, 0) + n

    def take(self) -> dict[str, Any] | None:
        """What was counted since the last call (None if nothing), and start afresh."""
        with self._lock:
            data, self._data = self._data, empty()
        return None if is_empty(data) else data
