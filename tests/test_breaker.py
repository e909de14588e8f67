"""CircuitBreaker: closed → open → half-open probe → closed, with a fake clock."""

from __future__ import annotations

from kvdepot.metrics import Metrics
from kvdepot.tiers.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def transitions(metrics: Metrics, outcome: str) -> float:
    labels = {"tier": "t", "op": "breaker", "outcome": outcome}
    return metrics.registry.get_sample_value("kvdepot_tier_ops_total", labels) or 0.0


def make(clock: FakeClock, metrics: Metrics) -> CircuitBreaker:
    return CircuitBreaker(
        "test", metrics.tier("t"), failure_threshold=3, cooldown_s=5.0, clock=clock
    )


def test_opens_after_consecutive_failures_only() -> None:
    metrics, clock = Metrics(), FakeClock()
    breaker = make(clock, metrics)
    for _ in range(2):
        breaker.record_failure(OSError("refused"))
    breaker.record_success()  # resets the count
    for _ in range(2):
        breaker.record_failure(OSError("refused"))
    assert breaker.allow() and breaker.state is BreakerState.CLOSED
    breaker.record_failure(OSError("refused"))
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    assert transitions(metrics, "opened") == 1


def test_a_timeout_opens_at_once() -> None:
    metrics, clock = Metrics(), FakeClock()
    breaker = make(clock, metrics)
    breaker.record_failure(TimeoutError("read"), is_timeout=True)
    assert breaker.state is BreakerState.OPEN


def test_one_probe_after_cooldown_then_close_or_reopen() -> None:
    metrics, clock = Metrics(), FakeClock()
    breaker = make(clock, metrics)
    breaker.record_failure(TimeoutError(), is_timeout=True)
    clock.now_s += 4.9
    assert not breaker.allow()
    clock.now_s += 0.2
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one probe in flight
    breaker.record_failure(OSError("still down"))
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now_s += 5.1
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    assert (transitions(metrics, "opened"), transitions(metrics, "closed")) == (2, 1)
    assert transitions(metrics, "probing") == 2


def test_a_lost_probe_is_replaced_after_another_cooldown() -> None:
    clock = FakeClock()
    breaker = make(clock, Metrics())
    breaker.record_failure(TimeoutError(), is_timeout=True)
    clock.now_s += 5.0
    assert breaker.allow()  # this probe never reports
    clock.now_s += 5.0
    assert breaker.allow()


def test_a_success_from_before_opening_does_not_close_it() -> None:
    clock = FakeClock()
    breaker = make(clock, Metrics())
    breaker.record_failure(TimeoutError(), is_timeout=True)
    breaker.record_success()
    assert breaker.state is BreakerState.OPEN


def test_the_open_breakers_gauge_follows_the_state() -> None:
    metrics, clock = Metrics(), FakeClock()

    def open_now() -> float:
        return metrics.counter_value("kvdepot_tier_breakers_open", {"tier": "t"})

    breaker = make(clock, metrics)
    breaker.record_failure(TimeoutError(), is_timeout=True)
    assert open_now() == 1
    clock.now_s += 6
    assert breaker.allow()  # half-open: still not closed
    breaker.record_failure(OSError("still down"))
    assert open_now() == 1  # reopened, counted once
    clock.now_s += 6
    assert breaker.allow()
    breaker.record_success()
    assert open_now() == 0
