"""Why a lookup missed: the reasons kvdepot counts, and the memory of chunks that left.

Runs wherever the chunks live (the embedded store, or the daemon); the engine that looked up
turns the store's answer into token counts (`kvdepot_engine_miss_tokens_total`) and reports
them with its model (`kvdepot_model_miss_tokens_total`, `kvdepot stats`).

A lookup's chain of chunk keys ends at its first missing chunk; every looked-up token after
the hit gets the reason of that chunk (the chain cannot go on past it), except at the head
of a prompt, where the tokens another namespace holds are counted apart:
- `tier_unavailable` (tier): a tier failed or had its breaker open during the lookup (the
  daemon itself, for a client that cannot reach it), so the chunk may be stored there.
- `evicted` (tier): the chunk was stored and the named tier dropped it last, for room.
- `corrupt` (tier): the chunk was stored, failed validation and was deleted.
- `other_namespace`: another namespace (model fingerprint, chunk size, dtype, layout, rank
  or tenant) holds these leading tokens: the classic "two engines that should share but
  do not". Known from the store's continuation index, so only with partial matching on, and
  only for the head of a prompt (where two namespaces' keys part: every key differs).
- `below_min_reuse`: found, but the connector did not load it (less than its
  `min_reuse_fraction` of the prompt). These tokens were counted as hit too.
- `never_stored`: none of the above; the cache never held it (or forgot why: the memory
  of chunks that left, `GoneLedger`, is bounded).

Invariants: reasons and tiers are a bounded set (`reason_label`, `tier_label` clamp what a
client sends); the ledger is bounded by entries and never holds token ids, only keys.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from kvdepot.keys import ChunkKey

NEVER_STORED = "never_stored"
EVICTED = "evicted"
CORRUPT = "corrupt"
TIER_UNAVAILABLE = "tier_unavailable"
OTHER_NAMESPACE = "other_namespace"
BELOW_MIN_REUSE = "below_min_reuse"
REASONS = (NEVER_STORED, EVICTED, CORRUPT, TIER_UNAVAILABLE, OTHER_NAMESPACE, BELOW_MIN_REUSE)
TIERS = ("memory", "disk", "valkey", "s3", "daemon")
"""Tier labels a miss may name; any other (a plug-in tier) is counted as "other"."""
LEDGER_ENTRIES = 1 << 17
"""Keys the ledger remembers (~20 MB at most; the oldest are forgotten first)."""


def miss(reason: str, tier: str = "") -> str:
    """A miss as the store answers it: "reason" or "reason:tier"."""
    return f"{reason}:{tier}" if tier else reason


def parse_miss(text: str) -> tuple[str, str]:
    """(reason, tier) of a `miss` string, clamped to the bounded label sets."""
    reason, _, tier = text.partition(":")
    return reason_label(reason), tier_label(tier)


def reason_label(reason: str) -> str:
    return reason if reason in REASONS else NEVER_STORED


def tier_label(tier: str) -> str:
    return tier if not tier or tier in TIERS else "other"


def split_missed(
    num_tokens: int, num_hit: int, miss_text: str, held_elsewhere: int
) -> dict[str, int]:
    """The looked-up tokens after the hit, by `miss` string: the leading ones another
    namespace holds (only when nothing hit) as `other_namespace`, the rest by `miss_text`
    (`never_stored` when empty)."""
    missed = num_tokens - num_hit
    if missed <= 0:
        return {}
    elsewhere = min(held_elsewhere, missed) if num_hit == 0 else 0
    out = {OTHER_NAMESPACE: elsewhere} if elsewhere else {}
    if missed > elsewhere:
        out[miss_text or NEVER_STORED] = missed - elsewhere
    return out


def clamp_missed(missed: Mapping[str, int], max_items: int = 16) -> dict[str, int]:
    """A client's miss counts with bounded keys and non-negative values."""
    out: dict[str, int] = {}
    for text, n in list(missed.items())[:max_items]:
        key = miss(*parse_miss(str(text)))
        out[key] = out.get(key, 0) + max(0, int(n))
    return out


class GoneLedger:
    """Bounded memory of chunks that left a tier: key -> (reason, tier), newest last."""

    def __init__(self, max_entries: int = LEDGER_ENTRIES) -> None:
        self.max_entries = max(1, max_entries)
        self._gone: OrderedDict[ChunkKey, str] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, keys: Sequence[ChunkKey], reason: str, tier: str) -> None:
        """`keys` left `tier` for `reason` (a later event for a key replaces an earlier one)."""
        if not keys:
            return
        text = miss(reason, tier)
        with self._lock:
            for key in keys:
                self._gone[key] = text
                self._gone.move_to_end(key)
            while len(self._gone) > self.max_entries:
                self._gone.popitem(last=False)

    def why(self, key: ChunkKey) -> str | None:
        """The last reason `key` left a tier, as a `miss` string; None if not remembered."""
        with self._lock:
            return self._gone.get(key)

    def __len__(self) -> int:
        return len(self._gone)

    def clear(self) -> None:
        with self._lock:
            self._gone.clear()
