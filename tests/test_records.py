"""Per-request records reach their logger whatever the host did to the root logger's level."""

from __future__ import annotations

import json
import logging

from kvdepot import Metrics
from kvdepot.records import RequestLog, RequestRecord, logger


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_records_are_logged_when_the_host_raised_the_root_level() -> None:
    """vLLM 0.30's OpenAI server sets the root logger to ERROR in each of its processes:
    records asked for at `warning` must still be written."""
    root_level, own_level = logging.root.level, logger.level
    handler = Collect()
    logger.addHandler(handler)
    logging.root.setLevel(logging.ERROR)
    try:
        log = RequestLog(Metrics(), "warning")
        log.report(RequestRecord("vllm", "r1", 100, 60, 40, 40, 0.001, 0.002, 0.003, 1, 2, 0.0))
        assert [json.loads(line)["request_id"] for line in handler.lines] == ["r1"]
        RequestLog(Metrics(), "off")  # another connector with records off changes nothing
        log.report(RequestRecord("vllm", "r2", 100, 0, 100, 100, 0.0, 0.0, 0.0, 0, 0, 0.0))
        assert len(handler.lines) == 2
    finally:
        logger.removeHandler(handler)
        logging.root.setLevel(root_level)
        logger.setLevel(own_level)


def test_a_level_the_user_set_on_the_records_logger_is_kept() -> None:
    own_level = logger.level
    logger.setLevel(logging.ERROR)  # the user wants no records
    try:
        RequestLog(Metrics(), "info")
        assert logger.level == logging.ERROR
    finally:
        logger.setLevel(own_level)
