"""The daemon's HTTP admin endpoint: /healthz, /metrics, /stats and POST /clear.

Runs in the daemon process, in its own thread, on 127.0.0.1 unless configured otherwise.
POST /clear needs `Authorization: Bearer <token>`; everything else is read-only.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvdepot.daemon.auth import bearer_token, tokens_match
from kvdepot.daemon.server import DaemonServer
from kvdepot.metrics_http import QuietHandler


class AdminServer:
    """Serves the admin endpoints of one `DaemonServer`."""

    def __init__(self, daemon: DaemonServer, host: str, port: int) -> None:
        self.daemon = daemon
        handler = _handler_for(daemon)
        self._http = ThreadingHTTPServer((host, port), handler)
        self._http.daemon_threads = True
        self.address: tuple[str, int] = self._http.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def start(self) -> AdminServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def _handler_for(daemon: DaemonServer) -> type[BaseHTTPRequestHandler]:
    class Handler(QuietHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                disabled = daemon.store.disabled_tiers
                problems = "; ".join(f"{t} DISABLED ({why})" for t, why in disabled.items())
                body = f"degraded: {problems}\n" if problems else "ok\n"
                self.reply(200, body.encode(), "text/plain")
            elif self.path == "/metrics":
                self.reply(200, daemon.metrics.render(), "text/plain; version=0.0.4")
            elif self.path == "/stats":
                self.reply(200, json.dumps(daemon.stats()).encode(), "application/json")
            else:
                self.reply(404, b"not found\n", "text/plain")

        def do_POST(self) -> None:
            if self.path != "/clear":
                self.reply(404, b"not found\n", "text/plain")
                return
            given = bearer_token(self.headers.get("Authorization"))
            # Header values arrive decoded as latin-1: encoding back gives the bytes sent.
            if given is None or not tokens_match(given.encode("latin-1", "replace"), daemon.token):
                self.reply(401, b"a valid token is required\n", "text/plain")
                return
            daemon.store.clear()
            self.reply(200, b"cleared\n", "text/plain")

    return Handler
