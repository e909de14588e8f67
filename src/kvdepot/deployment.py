"""Pick the deployment a config asks for: the embedded store, or a client of a server.

Runs in the engine process. Every answer implements `ChunkStore`, so connectors never care
which one they got. The one decision, made here only:
- `mode: daemon`: a client of `kvdepot serve`;
- `mode: embedded`, store in this process: the tiered store itself (serving its /metrics
  when `metrics_port` is set: `embedded_metrics`);
- `mode: embedded`, store in another process of the same engine (vLLM's scheduler asks its
  worker, which holds the store and serves it on a private socket): a client of that socket.
"""

from __future__ import annotations

from pathlib import Path

from kvdepot.config import KVDepotConfig
from kvdepot.metrics import Metrics
from kvdepot.metrics_http import serve_metrics
from kvdepot.store import ChunkStore, TieredStore, open_store


def open_cache(
    config: KVDepotConfig,
    metrics: Metrics | None = None,
    *,
    embedded_socket: Path | None = None,
    client_name: str = "",
    lookups_only: bool = False,
) -> ChunkStore:
    """The store this process uses: a `DaemonClient` in daemon mode, or (embedded) of the
    engine process serving the store on `embedded_socket`; else the embedded `TieredStore`.
    `lookups_only`: the caller looks up and moves no KV itself (vLLM's scheduler), so a client
    maps the daemon's shared memory only if it ever needs it."""
    if config.mode == "daemon" or embedded_socket is not None:
        from kvdepot.daemon.client import DaemonClient

        socket = None if config.mode == "daemon" else embedded_socket
        return DaemonClient.from_config(
            config, metrics, socket_path=socket, client_name=client_name,
            eager_map=not lookups_only,
        )  # fmt: skip
    store = open_store(config, metrics)
    embedded_metrics(store, config)
    return store


def embedded_metrics(store: TieredStore, config: KVDepotConfig, port_offset: int = 0) -> None:
    """Serve `store`'s /metrics on `config.metrics_port` (+ `port_offset`), if set, until the
    store closes."""
    if config.metrics_port > 0:
        port = config.metrics_port + port_offset
        server = serve_metrics(store.metrics, config.metrics_host, port)
        if server is not None:
            store.on_close(server.stop)
