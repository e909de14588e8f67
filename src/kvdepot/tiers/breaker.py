"""A circuit breaker for remote tiers: a server that is down or slow costs one timeout, not one
per request.

Runs in the process that owns the `TieredStore`, shared by every thread that calls the tier.
States: *closed* (calls go through) → *open* after `failure_threshold` consecutive failures, or
at once after a timeout (every further call would wait as long) → while open, `allow()` is
False and the tier answers misses / drops puts without touching the network → after
`cooldown_s`, one caller is let through as a *half-open* probe: success closes the breaker, a
failure opens it for another cool-down.

Invariants: state changes only under `self._lock`; at most one probe is in flight (a probe
whose caller never reports is replaced after another cool-down); each transition is counted as
`kvdepot_tier_ops_total{op="breaker", outcome="opened"|"probing"|"closed"}`, the breakers not
closed are the gauge `kvdepot_tier_breakers_open`, and each is logged once, rate-limited.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from kvdepot.logutil import RateLimitedLog
from kvdepot.metrics import TierMetrics

logger = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed → open → half-open → closed, thread-safe."""

    def __init__(
        self,
        name: str,
        metrics: TierMetrics,
        *,
        failure_threshold: int = 3,
        cooldown_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Wire a closed breaker.

        Args:
            name: what it guards, for log lines (e.g. "valkey 10.0.0.5:6379"); never a key.
            metrics: where transitions are counted.
            failure_threshold: consecutive failures that open it.
            cooldown_s: how long it stays open before a probe.
            clock: monotonic seconds (tests pass a fake).
        """
        self.name = name
        self._metrics = metrics
        self._failure_threshold = max(1, failure_threshold)
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._log = RateLimitedLog(logger)
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._num_failures = 0
        self._since_s = 0.0  # when it opened, or when the probe started
        metrics.breaker(is_open=None)

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """Whether a call may go to the server now (False: answer a miss at once)."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._clock() - self._since_s < self._cooldown_s:
                return False
            # Cool-down over (or the last probe never reported): this caller probes.
            self._state = BreakerState.HALF_OPEN
            self._since_s = self._clock()
        self._metrics.op("breaker", "probing")
        return True

    def record_success(self) -> None:
        with self._lock:
            self._num_failures = 0
            if self._state is not BreakerState.HALF_OPEN:
                return  # closed already, or a call from before it opened: the probe decides
            self._state = BreakerState.CLOSED
        self._metrics.op("breaker", "closed")
        self._metrics.breaker(is_open=False)
        self._log.log(logging.INFO, f"{self.name}-closed", "%s: reachable again", self.name)

    def record_failure(self, error: BaseException, *, is_timeout: bool = False) -> None:
        """Count a failed call; `is_timeout` opens the breaker at once."""
        with self._lock:
            self._num_failures += 1
            if self._state is BreakerState.OPEN:
                return
            should_open = (
                self._state is BreakerState.HALF_OPEN
                or is_timeout
                or self._num_failures >= self._failure_threshold
            )
            if not should_open:
                return
            was_closed = self._state is BreakerState.CLOSED
            self._state = BreakerState.OPEN
            self._since_s = self._clock()
            num_failures = self._num_failures
        self._metrics.op("breaker", "opened")
        if was_closed:
            self._metrics.breaker(is_open=True)
        self._log.warning(
            f"{self.name}-opened",
            "%s: unavailable after %d failure(s) (last: %s); answering misses for %.1f s",
            self.name,
            num_failures,
            error,
            self._cooldown_s,
        )
