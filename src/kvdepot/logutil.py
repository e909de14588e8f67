"""Rate-limited logging for failure paths that can fire on every request.

A failing tier must not flood the log: each distinct message key logs at most once per
`interval_s`, with a count of the occurrences it stood for.
"""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """Logs each message key at most once per `interval_s` seconds."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last_s, suppressed = self._last.get(key, (-self._interval_s, 0))
            if now - last_s < self._interval_s:
                self._last[key] = (last_s, suppressed + 1)
                return
            self._last[key] = (now, 0)
        if suppressed:
            msg += f" ({suppressed} similar messages suppressed)"
        self._logger.log(level, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.ERROR, key, msg, *args)
