"""Pick the deployment a config asks for: the embedded store, or a client of the daemon.

Runs in the engine process. Both answers implement `ChunkStore`, so connectors never care
which one they got (`mode: embedded | daemon`).
"""

from __future__ import annotations

from kvdepot.config import KVDepotConfig
from kvdepot.metrics import Metrics
from kvdepot.store import ChunkStore, open_store


def open_cache(config: KVDepotConfig, metrics: Metrics | None = None) -> ChunkStore:
    """The embedded `TieredStore`, or a `DaemonClient` when `config.mode == "daemon"`."""
    if config.mode == "daemon":
        from kvdepot.daemon.client import DaemonClient

        return DaemonClient.from_config(config, metrics)
    return open_store(config, metrics)
