"""The daemon's HTTP endpoint: /healthz, /metrics, /stats, POST /lookup and POST /clear.

Runs in the daemon process, in its own threads, on 127.0.0.1 unless configured otherwise.
POST /clear needs `Authorization: Bearer <token>`; POST /lookup needs it from any address
but loopback; everything else is read-only. Connections are kept alive (HTTP/1.1), so a
router on its hot path pays no connection setup per lookup.

POST /lookup (a router's question: how much of this prompt is cached here, and where):
    request:  {"model": "<served name or path>", "tokens": [ids...], "tenant": "<cache_salt>"}
    answer:   {"model", "cached_tokens", "prompt_tokens", "chunk_size_tokens",
               "by_tier": {"memory": n, "disk": n, ...}}
Only whole chunks count, and only when every shard (TP rank) holds them; nothing is read,
promoted or counted as a hit (`kvdepot.namespaces`). 404 names the models engines announced.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from http.server import BaseHTTPRequestHandler

import msgspec

from kvdepot.daemon.auth import bearer_token, tokens_match
from kvdepot.daemon.server import DaemonServer
from kvdepot.metrics_http import QuietHandler, QuietHTTPServer
from kvdepot.namespaces import MAX_LOOKUP_TOKENS

MAX_LOOKUP_BODY_BYTES = 16 * MAX_LOOKUP_TOKENS
"""Largest /lookup request body (a token id takes at most ~11 bytes of JSON)."""


class LookupRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    tokens: list[int]
    tenant: str = ""


_lookup_decoder = msgspec.json.Decoder(LookupRequest)


class AdminServer:
    """Serves the admin endpoints of one `DaemonServer`."""

    def __init__(self, daemon: DaemonServer, host: str, port: int) -> None:
        self.daemon = daemon
        handler = _handler_for(daemon)
        self._http = QuietHTTPServer((host, port), handler)
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
        protocol_version = "HTTP/1.1"  # keep-alive: a router's lookups reuse one connection

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
            body = self._body()
            if body is None:
                return
            if self.path == "/lookup":
                if self._is_loopback() or self._authorized():
                    self._lookup(body)
            elif self.path == "/clear":
                if self._authorized():
                    daemon.store.clear()
                    self.reply(200, b"cleared\n", "text/plain")
            else:
                self.reply(404, b"not found\n", "text/plain")

        def _body(self) -> bytes | None:
            """The request's body (read whole, so the connection stays usable), or None
            after answering 400/413."""
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_LOOKUP_BODY_BYTES:
                self.close_connection = True
                self.reply(413 if length > 0 else 400, b"bad Content-Length\n", "text/plain")
                return None
            return self.rfile.read(length)

        def _is_loopback(self) -> bool:
            try:
                return ipaddress.ip_address(self.client_address[0]).is_loopback
            except ValueError:
                return False

        def _authorized(self) -> bool:
            given = bearer_token(self.headers.get("Authorization"))
            # Header values arrive decoded as latin-1: encoding back gives the bytes sent.
            if given is None or not tokens_match(given.encode("latin-1", "replace"), daemon.token):
                self.reply(401, b"a valid token is required\n", "text/plain")
                return False
            return True

        def _lookup(self, body: bytes) -> None:
            try:
                request = _lookup_decoder.decode(body)
                found = daemon.store.lookup_prompt(
                    request.model, request.tokens, request.tenant.encode()
                )
            except KeyError:
                known = daemon.store.recipes.models()
                text = json.dumps({"error": f"no engine announced model {request.model!r}",
                                   "models": known})  # fmt: skip
                self.reply(404, text.encode(), "application/json")
                return
            except (msgspec.DecodeError, ValueError) as exc:
                text = json.dumps({"error": f"bad lookup: {exc}"})
                self.reply(400, text.encode(), "application/json")
                return
            answer = {
                "model": request.model,
                "cached_tokens": found.cached_tokens,
                "prompt_tokens": found.prompt_tokens,
                "chunk_size_tokens": found.chunk_size_tokens,
                "by_tier": found.by_tier,
            }
            self.reply(200, json.dumps(answer).encode(), "application/json")

    return Handler
