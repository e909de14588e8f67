"""kvdepot: a durable, tiered, content-addressed KV-cache layer for LLM inference engines.

The public API, for embedding in an engine process:

    from kvdepot import CacheEngine, KVLayout, DType, load_config, open_cache

    store = open_cache(load_config())  # KVDEPOT_MODE=daemon: a client of `kvdepot serve`
    engine = CacheEngine(store, KVLayout(30, 3, 64, DType.FLOAT32), "my-model@rev")
    num_cached = engine.lookup(tokens)
"""

from typing import TYPE_CHECKING

from kvdepot.config import KVDepotConfig, load_config
from kvdepot.deployment import open_cache
from kvdepot.errors import (
    ConfigError,
    CorruptChunk,
    KVDepotError,
    LayoutMismatch,
    StorageError,
    TierUnavailable,
    UnknownCodec,
)
from kvdepot.keys import CacheNamespace, ChunkKey, HashAlgorithm, chunk_hashes, chunk_keys
from kvdepot.layout import DType, KVLayout
from kvdepot.metrics import Metrics
from kvdepot.store import ChunkStore, TieredStore, open_store

if TYPE_CHECKING:
    from kvdepot.engine import CacheEngine

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # CacheEngine pulls in torch; the daemon and the CLI's light commands need not.
    if name == "CacheEngine":
        from kvdepot.engine import CacheEngine

        return CacheEngine
    raise AttributeError(f"module 'kvdepot' has no attribute {name!r}")


__all__ = [
    "CacheEngine",
    "CacheNamespace",
    "ChunkKey",
    "ChunkStore",
    "ConfigError",
    "CorruptChunk",
    "DType",
    "HashAlgorithm",
    "KVDepotConfig",
    "KVDepotError",
    "KVLayout",
    "LayoutMismatch",
    "Metrics",
    "StorageError",
    "TierUnavailable",
    "TieredStore",
    "UnknownCodec",
    "__version__",
    "chunk_hashes",
    "chunk_keys",
    "load_config",
    "open_cache",
    "open_store",
]
