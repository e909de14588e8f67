"""Per-request records: what one request cost and what the cache gave it back.

Runs in the engine process, wherever a connector serves requests: the transformers
generator, CacheBlend, and the vLLM connector's scheduler side (which also feeds vLLM's own
metrics). Each record goes to Prometheus (per-request hit ratio, load and save seconds,
labelled by connector only: a bounded label) and, when asked (`request_log` level; off by
default), to the `kvdepot.requests` logger as one JSON line. Nothing here raises into the request.

Return on investment (`PrefillCost`): the prefill compute a hit saved is estimated as the
tokens not recomputed x this engine's measured prefill seconds per token, where the latter is
the prefill time of the requests seen so far (TTFT minus lookup and load) over the tokens they
computed, counting requests that computed at least `MIN_MEASURED_TOKENS`. A per-token average
is linear in the prompt; attention makes long prefills cost more per token, so for hits
longer than the measured prefills the estimate is low (conservative).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

from kvdepot.errors import ConfigError
from kvdepot.logutil import RateLimitedLog
from kvdepot.metrics import Metrics

logger = logging.getLogger("kvdepot.requests")
LEVELS = {"off": None, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request, as its connector saw it.

    Attributes:
        connector: which connector served it ("transformers", ...).
        request_id: the connector's id of the request.
        prompt_tokens: tokens in the prompt.
        cached_tokens: prompt tokens loaded from kvdepot instead of computed (by tier and
            partial matching: `cached_by_tier`, `partial_tokens`).
        computed_tokens: prompt tokens the engine computed.
        stored_tokens: tokens newly stored (prompt and, if enabled, generated ones).
        lookup_s / load_s / save_s: seconds spent looking up, loading and storing.
        loaded_bytes / stored_bytes: KV bytes moved (uncompressed).
        ttft_s: request start to first token, lookup and load included; 0.0 where the
            connector does not see it (vLLM: its own time-to-first-token histogram has it).
        fallback: why the cache was not used although it could have been, if it was not.
    """

    connector: str
    request_id: str
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int
    stored_tokens: int
    lookup_s: float
    load_s: float
    save_s: float
    loaded_bytes: int
    stored_bytes: int
    ttft_s: float
    fallback: str | None = None
    saved_s: float = 0.0
    """Estimated prefill seconds the cached tokens saved (`PrefillCost`); 0 until measured."""
    cached_by_tier: dict[str, int] = field(default_factory=dict)
    """The cached tokens by the tier they were loaded from (memory, disk, valkey, s3)."""
    partial_tokens: int = 0
    """Of the cached tokens, those found by partial matching (part of a stored chunk)."""
    engine_cached_tokens: int = 0
    """Prompt tokens the engine's own prefix cache served (vLLM's), neither loaded nor
    computed."""

    @property
    def hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


MIN_MEASURED_TOKENS = 64


class PrefillCost:
    """This engine's measured prefill seconds per token (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.tokens = 0

    def observe(self, prefill_s: float, computed_tokens: int) -> None:
        if computed_tokens >= MIN_MEASURED_TOKENS and prefill_s > 0:
            self.seconds += prefill_s
            self.tokens += computed_tokens

    def saved_s(self, cached_tokens: int) -> float:
        """Estimated seconds `cached_tokens` would have cost to prefill (0 until measured)."""
        return cached_tokens * self.seconds / self.tokens if self.tokens else 0.0


_levels_set: set[int] = set()  # the levels RequestLogs gave the records logger


def _own_level(level: int | None) -> None:
    """Asked for records at `level`: the records logger takes it as its own (the lowest any
    RequestLog asked for), so a host that raises the root logger's level (vLLM 0.30's server
    sets ERROR in each of its processes) does not silence them. A level someone else set on
    that logger stays."""
    if level is None or (logger.level and logger.level not in _levels_set):
        return
    _levels_set.add(level)
    logger.setLevel(min(_levels_set))


class RequestLog:
    """Where a connector reports its records."""

    def __init__(self, metrics: Metrics, level: str = "off") -> None:
        if level not in LEVELS:
            raise ConfigError(f"request_log {level!r}: choose one of {list(LEVELS)}")
        self.metrics = metrics
        self.level = LEVELS[level]
        self._log = RateLimitedLog(logging.getLogger(__name__))
        _own_level(self.level)

    def report(self, record: RequestRecord) -> None:
        """Count `record` and log it if asked; a failure here is logged, never raised."""
        try:
            m, who = self.metrics, record.connector
            m.request_hit_ratio.labels(who).observe(record.hit_ratio)
            m.request_load_seconds.labels(who).observe(record.load_s)
            m.request_save_seconds.labels(who).observe(record.save_s)
            m.prefill_tokens_saved.labels(who).inc(record.cached_tokens)
            m.prefill_seconds_saved.labels(who).inc(record.saved_s)
            if self.level is not None and logger.isEnabledFor(self.level):
                fields = asdict(record)
                for name in ("lookup_s", "load_s", "save_s", "ttft_s"):
                    fields[name] = round(fields[name], 6)
                logger.log(self.level, "%s", json.dumps(fields, separators=(",", ":")))
        except Exception as exc:  # a record must never cost the user the answer
            self._log.warning("record", "kvdepot: request record failed: %s", exc)
