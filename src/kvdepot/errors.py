"""The one exception tree of kvdepot.

Every error kvdepot raises on purpose derives from `KVDepotError`, so an engine integration
can catch one type. Storage failures inside the cache are normally turned into misses by the
store (fail open); these types are what crosses that boundary when a caller asks directly.
"""


class KVDepotError(Exception):
    """Base class of every error raised by kvdepot."""


class ConfigError(KVDepotError, ValueError):
    """A configuration value is missing, malformed or out of range; the message says which."""


class StorageError(KVDepotError):
    """A tier could not complete an operation."""


class TierUnavailable(StorageError):
    """A tier is down, read-only or disabled; callers treat its keys as misses."""


class CorruptChunk(StorageError):
    """A stored chunk failed validation (magic, version, sizes, checksum or codec)."""


class UnknownCodec(CorruptChunk):
    """A stored chunk names a codec this process does not have registered."""


class LayoutMismatch(KVDepotError, ValueError):
    """A KV tensor does not match the layout the cache engine was built for."""
