"""Pick the deployment a config asks for: the embedded store, or a client of a server.

Runs in the engine process. Every answer implements `ChunkStore`, so connectors never care
which one they got. The one decision, made here only:
- `mode: daemon`: a client of `kvdepot serve`;
- `mode: embedded`, store in this process: the tiered store itself;
- `mode: embedded`, store in another process of the same engine (vLLM's scheduler asks its
  worker, which holds the store and serves it on a private socket): a client of that socket.
"""

from __future__ import annotations

from pathlib import Path

from kvdepot.config import KVDepotConfig
from kvdepot.metrics import Metrics
from kvdepot.store import ChunkStore, open_store


def open_cache(
    config: KVDepotConfig,
    metrics: Metrics | None = None,
    *,
    embedded_socket: Path | None = None,
    client_name: str = "",
) -> ChunkStore:
    """The store this process uses: a `DaemonClient` in daemon mode, or (embedded) of the
    engine process serving the store on `embedded_socket`; else the embedded `TieredStore`."""
    if config.mode == "daemon" or embedded_socket is not None:
        from kvdepot.daemon.client import DaemonClient

        socket = None if config.mode == "daemon" else embedded_socket
        return DaemonClient.from_config(
            config, metrics, socket_path=socket, client_name=client_name
        )
    return open_store(config, metrics)
