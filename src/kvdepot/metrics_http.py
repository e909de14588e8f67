"""`/metrics` over HTTP for a store embedded in an engine process (no daemon to scrape).

Runs in the process that owns the store (the transformers user's process, vLLM's worker in
embedded mode), in one daemon thread, on 127.0.0.1 unless configured otherwise
(`metrics_host`, `metrics_port`). It serves the store's Prometheus registry read-only:
`GET /metrics` and `GET /healthz`. A port that cannot be bound is logged and skipped: the
cache runs on without it.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvdepot.metrics import Metrics

logger = logging.getLogger(__name__)


class MetricsServer:
    """Serves one `Metrics` registry until `stop`."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._http = QuietHTTPServer((host, port), _handler_for(metrics))
        self._http.daemon_threads = True
        self.address: tuple[str, int] = self._http.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="kvdepot-metrics-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def serve_metrics(metrics: Metrics, host: str, port: int) -> MetricsServer | None:
    """A started server on `host:port`, or None (port 0: off; a bind error is logged)."""
    if port <= 0:
        return None
    try:
        server = MetricsServer(metrics, host, port)
    except OSError as exc:
        logger.error("kvdepot: cannot serve /metrics on %s:%d (%s); running on", host, port, exc)
        return None
    logger.info("kvdepot: /metrics on http://%s:%d/metrics", *server.address)
    return server


class QuietHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server for which a client that hangs up (kept-alive connections are
    reset by clients all the time) is not an error worth a traceback."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        logger.exception("kvdepot: HTTP request from %s failed", client_address)


class QuietHandler(BaseHTTPRequestHandler):
    """A handler that answers with `reply` and keeps scrapes out of the log."""

    # Headers and body leave in two writes: with Nagle's algorithm the body would wait for
    # the client's delayed ACK of the headers (~40 ms) on a kept-alive connection.
    disable_nagle_algorithm = True

    def reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return  # the log is for the cache, not for scrapes


def _handler_for(metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(QuietHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self.reply(200, metrics.render(), "text/plain; version=0.0.4")
            elif self.path == "/healthz":
                self.reply(200, b"ok\n", "text/plain")
            else:
                self.reply(404, b"not found\n", "text/plain")

    return Handler
