"""The local-disk tier: one sealed, checksummed file per chunk under a root directory.

Runs in the process that owns the `TieredStore` (engine or daemon). One `DiskTier` owns a
root at a time: two owners would evict each other's files unseen. Layout:
`root/<namespace hex>/<hash hex[:2]>/<hash hex>.kvc`; temp files live in `root/.tmp/`, on
the same filesystem, so that `os.replace` is atomic.

Invariants:
- A chunk file appears at its final path only complete (temp → fsync → `os.replace`), and the
  index learns of it only afterwards; every read verifies the checksum, and a chunk that
  fails it is deleted and answered as a miss.
- `used_bytes` (indexed files + bytes reserved by writes in flight) never exceeds
  `capacity_bytes`; the policy holds exactly the indexed keys.
- Index, policy and counters change only under `self._lock`; file I/O runs outside it. A key
  whose file is being written or unlinked is in `self._busy`, so no second writer, and no
  re-store racing an unlink of the same path, can touch it meanwhile.
- A full, read-only or permission-denied filesystem disables writes for the tier's lifetime
  (one error logged); reads keep working.
- `read_into` keeps up to `read_threads` file reads of one batch in flight (a disk, local
  SSD or virtual, reads faster with several requests queued); each read is still verified.
- Files and the directories the tier creates are private by default (0600 / 0700, set
  exactly, whatever the umask); `file_mode` / `dir_mode` widen them for a shared group.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

from kvdepot.codec.format import HEADER_NBYTES, MAX_CHUNK_BYTES, EncodedChunk, open_blob
from kvdepot.errors import ConfigError, CorruptChunk, TierUnavailable
from kvdepot.keys import ChunkHash, ChunkKey
from kvdepot.logutil import RateLimitedLog
from kvdepot.metrics import Metrics, TierMetrics
from kvdepot.tiers.base import TierUsage
from kvdepot.tiers.policy import EvictionPolicy, PrefixAwarePolicy

logger = logging.getLogger(__name__)

_SUFFIX = ".kvc"
_TMP_DIR = ".tmp"
_KEY_PART_HEX_CHARS = 32  # namespace digest and chunk hash are 16 bytes each
_DISABLING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # + PermissionError
DEFAULT_FILE_MODE = 0o600
DEFAULT_DIR_MODE = 0o700
DEFAULT_READ_THREADS = 4


@dataclass(slots=True, eq=False)
class _Entry:
    """An indexed file. Compared by identity: a key stored again gets a new entry."""

    nbytes: int


class DiskTier:
    """Chunks as files on a local filesystem, evicted by a byte budget."""

    name = "disk"

    def __init__(
        self,
        root: Path,
        capacity_bytes: int,
        *,
        fsync: bool = True,
        policy: EvictionPolicy | None = None,
        metrics: TierMetrics | None = None,
        file_mode: int = DEFAULT_FILE_MODE,
        dir_mode: int = DEFAULT_DIR_MODE,
        read_threads: int = DEFAULT_READ_THREADS,
    ) -> None:
        """Wire a tier over `root`; use `DiskTier.open` to also load what is on disk.

        Args:
            root: directory that holds the chunk files (created by `open`).
            capacity_bytes: byte budget for chunk files (headers included).
            fsync: fsync each file before it becomes visible (crash durability).
            policy: eviction order; prefix-aware LRU by default.
            metrics: where to count; a private registry by default.
            file_mode: permission bits of chunk files.
            dir_mode: permission bits of the directories the tier creates.
            read_threads: file reads of one `read_into` batch kept in flight.
        """
        if capacity_bytes <= 0:
            raise ConfigError(f"disk capacity_bytes must be positive, got {capacity_bytes}")
        if read_threads < 1:
            raise ConfigError(f"disk read_threads must be at least 1, got {read_threads}")
        self.root = root
        self.capacity_bytes = capacity_bytes
        self._fsync = fsync
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._policy = policy if policy is not None else PrefixAwarePolicy()
        self._metrics = metrics if metrics is not None else Metrics().tier(self.name)
        self._log = RateLimitedLog(logger)
        self._lock = threading.Lock()
        self._index: dict[ChunkKey, _Entry] = {}
        self._busy: set[ChunkKey] = set()
        self._indexed_bytes = 0
        self._reserved_bytes = 0
        self._is_writable = True
        self._read_threads = read_threads
        self._readers: ThreadPoolExecutor | None = None  # made on the first batch that needs it

    @classmethod
    def open(
        cls,
        root: Path,
        capacity_bytes: int,
        *,
        fsync: bool = True,
        policy: EvictionPolicy | None = None,
        metrics: TierMetrics | None = None,
        file_mode: int = DEFAULT_FILE_MODE,
        dir_mode: int = DEFAULT_DIR_MODE,
        read_threads: int = DEFAULT_READ_THREADS,
    ) -> DiskTier:
        """Create `root` if needed, remove leftover temp files and index the chunks found.

        Raises:
            TierUnavailable: `root` cannot be created or listed.
        """
        tier = cls(
            root, capacity_bytes, fsync=fsync, policy=policy, metrics=metrics,
            file_mode=file_mode, dir_mode=dir_mode, read_threads=read_threads,
        )  # fmt: skip
        try:
            _make_dirs(root / _TMP_DIR, dir_mode)
            for leftover in (root / _TMP_DIR).iterdir():
                leftover.unlink()
            tier._rebuild_index()
        except OSError as exc:
            raise TierUnavailable(f"disk tier root {root} is unusable: {exc}") from exc
        return tier

    def _rebuild_index(self) -> None:
        """Index the chunk files on disk (in a new tier), oldest mtime least recent.

        Names that do not parse are ignored; files shorter than a header are deleted; if the
        files exceed the budget, the least recent are evicted.
        """
        found = sorted(self._scan(), key=lambda item: item[0])
        with self._lock:
            for _, key, nbytes in found:
                self._index[key] = _Entry(nbytes)
                self._indexed_bytes += nbytes
                self._policy.touch([key])  # one at a time: a batch would be reordered
            victims = self._evict_for(0)
        self._unlink(victims)
        self._publish()

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [key in self._index for key in keys]

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        start = time.perf_counter()
        with self._lock:
            entries = [self._index.get(key) for key in keys]
        blobs = [
            None if entry is None else _as_bytes(self._read(key, entry))
            for key, entry in zip(keys, entries, strict=True)
        ]
        hits = [key for key, blob in zip(keys, blobs, strict=True) if blob is not None]
        with self._lock:
            self._policy.touch([key for key in hits if key in self._index])
        self._metrics.op("get", "hit", len(hits))
        self._metrics.op("get", "miss", len(keys) - len(hits))
        self._metrics.bytes("read", sum(len(blob) for blob in blobs if blob is not None))
        self._metrics.latency("get", time.perf_counter() - start)
        return blobs

    def blob_sizes(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        with self._lock:
            entries = [self._index.get(key) for key in keys]
        return [None if entry is None else entry.nbytes for entry in entries]

    def read_into(self, items: Sequence[tuple[ChunkKey, memoryview]]) -> list[bool]:
        start = time.perf_counter()
        with self._lock:
            entries = [self._index.get(key) for key, _ in items]

        def read_one(i: int) -> bool:
            entry = entries[i]
            key, buffer = items[i]
            return entry is not None and self._read(key, entry, buffer) is not None

        if len(items) > 1 and self._read_threads > 1:
            hits = list(self._reader_pool().map(read_one, range(len(items))))
        else:
            hits = [read_one(i) for i in range(len(items))]
        read = [(key, buffer) for (key, buffer), hit in zip(items, hits, strict=True) if hit]
        with self._lock:
            self._policy.touch([key for key, _ in read if key in self._index])
        self._metrics.op("get", "hit", len(read))
        self._metrics.op("get", "miss", len(items) - len(read))
        self._metrics.bytes("read", sum(len(buffer) for _, buffer in read))
        self._metrics.latency("get", time.perf_counter() - start)
        return hits

    def _reader_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(
                    self._read_threads, thread_name_prefix="kvdepot-disk-read"
                )
            return self._readers

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int:
        start = time.perf_counter()
        batch = dict(items)
        with self._lock:
            present = dict.fromkeys(key for key in batch if key in self._index)
            # Touched now so this batch's evictions take them last, and again at commit so
            # that a chain partly stored before keeps its head most recent.
            self._policy.touch(list(present))
        written: dict[ChunkKey, _Entry] = {}
        try:
            for key, chunk in batch.items():
                entry = None if key in present else self._store(key, chunk)
                if entry is not None:
                    written[key] = entry
        finally:
            num_stored = self._commit(list(batch), written)
        self._metrics.op("put", "ok", num_stored)
        self._metrics.latency("put", time.perf_counter() - start)
        return num_stored

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            doomed = [key for key in dict.fromkeys(keys) if self._drop(key)]
            for key in doomed:
                self._policy.remove(key)
        self._unlink(doomed)
        self._publish()

    def clear(self) -> None:
        with self._lock:
            keys = list(self._index)
        self.delete(keys)

    def usage(self) -> TierUsage:
        """Occupancy; `used_bytes` includes bytes reserved by writes in flight."""
        with self._lock:
            used_bytes = self._indexed_bytes + self._reserved_bytes
            return TierUsage(used_bytes, self.capacity_bytes, len(self._index))

    def close(self) -> None:
        """Stop writing and forget the index; the files stay for the next `open`."""
        with self._lock:
            self._is_writable = False
            for key in self._index:
                self._policy.remove(key)
            self._index.clear()
            self._indexed_bytes = 0
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True)
        self._publish()

    def _path(self, key: ChunkKey) -> Path:
        chunk_hex = key.chunk_hash.hex()
        return self.root / key.namespace.hex() / chunk_hex[:2] / f"{chunk_hex}{_SUFFIX}"

    def _scan(self) -> Iterator[tuple[int, ChunkKey, int]]:
        """(mtime_ns, key, size) of each well-named chunk file; deletes headerless ones."""
        for ns_dir in self.root.iterdir():
            namespace = _parse_hex(ns_dir.name)
            if namespace is None or not ns_dir.is_dir():
                continue
            for path in ns_dir.glob(f"??/*{_SUFFIX}"):
                chunk_hash = _parse_hex(path.name.removesuffix(_SUFFIX))
                if chunk_hash is None or path.parent.name != path.name[:2]:
                    continue
                stat = path.stat()
                if not S_ISREG(stat.st_mode):
                    continue
                if not HEADER_NBYTES <= stat.st_size <= HEADER_NBYTES + MAX_CHUNK_BYTES:
                    path.unlink()
                    continue
                yield stat.st_mtime_ns, ChunkKey(namespace, ChunkHash(chunk_hash)), stat.st_size

    def _read(
        self, key: ChunkKey, entry: _Entry, into: memoryview | None = None
    ) -> bytes | memoryview | None:
        """The validated blob, read into `into` when given (it must be the blob's length)."""
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as file:
                data = file.read(entry.nbytes + 1) if into is None else _read_exactly(file, into)
            open_blob(data, key=key, verify=True)
        except FileNotFoundError:
            self._forget(key, entry)
            return None
        except CorruptChunk as exc:
            self._metrics.corrupt([key])
            self._log.warning("corrupt", "disk tier: deleting corrupt chunk %s: %s", path, exc)
            self._forget(key, entry)
            return None
        except OSError as exc:
            self._metrics.op("get", "error")
            self._log.warning("read", "disk tier: reading %s failed: %s", path, exc)
            return None
        return data

    def _store(self, key: ChunkKey, chunk: EncodedChunk) -> _Entry | None:
        """Reserve room, then write `key`'s file; its entry, or None if not written."""
        nbytes = chunk.nbytes
        reserved, victims = self._reserve(key, nbytes)
        self._unlink(victims)
        if not reserved:
            return None
        try:
            self._write_file(key, chunk.bound(key).sealed())
        except BaseException as exc:
            with self._lock:
                self._reserved_bytes -= nbytes
                self._busy.discard(key)
            if not isinstance(exc, OSError):
                raise
            self._on_write_error(exc)
            return None
        self._metrics.bytes("write", nbytes)
        return _Entry(nbytes)

    def _reserve(self, key: ChunkKey, nbytes: int) -> tuple[bool, list[ChunkKey]]:
        """(whether `nbytes` were reserved for `key`, victims evicted to make room)."""
        with self._lock:
            if not self._is_writable:
                outcome = "disabled"
            elif key in self._index or key in self._busy:
                outcome = "busy"  # stored or being written by another thread meanwhile
            elif nbytes > self.capacity_bytes:
                outcome = "too_large"
            elif self._reserved_bytes + nbytes > self.capacity_bytes:
                outcome = "no_room"  # writes in flight hold the rest of the budget
            else:
                victims = self._evict_for(nbytes)
                self._reserved_bytes += nbytes
                self._busy.add(key)
                return True, victims
        self._metrics.op("put", outcome)
        return False, []

    def _evict_for(self, nbytes: int) -> list[ChunkKey]:
        """Evict in policy order until `nbytes` more fit; the victims' files still exist."""
        victims: list[ChunkKey] = []
        while self._indexed_bytes + self._reserved_bytes + nbytes > self.capacity_bytes:
            victim = self._policy.pop_victim(_is_never_pinned)
            if victim is None:
                break
            if self._drop(victim):
                victims.append(victim)
        if victims:
            self._metrics.evicted(victims)
        return victims

    def _drop(self, key: ChunkKey) -> bool:
        """Unindex `key` and mark it busy until `_unlink` (policy is the caller's business)."""
        entry = self._index.pop(key, None)
        if entry is None:
            return False
        self._indexed_bytes -= entry.nbytes
        self._busy.add(key)
        return True

    def _forget(self, key: ChunkKey, entry: _Entry) -> None:
        """Delete `key`'s file if it is still the one `entry` stands for."""
        with self._lock:
            is_same = self._index.get(key) is entry
            if is_same:
                self._drop(key)
                self._policy.remove(key)
        if is_same:
            self._unlink([key])
            self._publish()

    def _unlink(self, keys: list[ChunkKey]) -> None:
        """Remove the files of dropped (busy) keys, then release them."""
        if not keys:
            return
        for key in keys:
            try:
                self._path(key).unlink(missing_ok=True)
            except OSError as exc:
                self._log.warning("unlink", "disk tier: cannot delete %s: %s", key.hex(), exc)
        with self._lock:
            self._busy.difference_update(keys)

    def _write_file(self, key: ChunkKey, chunk: EncodedChunk) -> None:
        path = self._path(key)
        tmp_path = self.root / _TMP_DIR / f"{key.hex()}.tmp"  # unique: the key is busy
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self._file_mode)
            try:
                os.fchmod(fd, self._file_mode)  # exactly: the umask would narrow it
                _write_all(fd, chunk.header.pack())
                _write_all(fd, chunk.contiguous_payload())
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            _make_dirs(path.parent, self._dir_mode)
            # No directory fsync: a rename lost in a crash only costs a miss.
            os.replace(tmp_path, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
            raise

    def _on_write_error(self, exc: OSError) -> None:
        self._metrics.op("put", "error")
        if not (isinstance(exc, PermissionError) or exc.errno in _DISABLING_ERRNOS):
            self._log.warning("write", "disk tier: chunk write failed, skipped: %s", exc)
            return
        with self._lock:
            was_writable, self._is_writable = self._is_writable, False
        if was_writable:
            logger.error("disk tier %s: writes disabled, reads continue: %s", self.root, exc)

    def _commit(self, keys: list[ChunkKey], written: dict[ChunkKey, _Entry]) -> int:
        """Index the written files, touch the batch in order; how many keys are stored."""
        with self._lock:
            for key, entry in written.items():
                self._index[key] = entry
                self._indexed_bytes += entry.nbytes
                self._reserved_bytes -= entry.nbytes
                self._busy.discard(key)
            stored = [key for key in keys if key in self._index]
            self._policy.touch(stored)
        self._publish()
        return len(stored)

    def _publish(self) -> None:
        usage = self.usage()
        self._metrics.usage(usage.used_bytes, usage.capacity_bytes, usage.num_objects)


def _make_dirs(path: Path, mode: int) -> None:
    """Create `path` and its missing parents with exactly `mode`; existing ones are kept."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    except FileNotFoundError:
        _make_dirs(path.parent, mode)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            return
    os.chmod(path, mode)  # mkdir's mode is narrowed by the umask


def _is_never_pinned(key: ChunkKey) -> bool:
    return False


def _parse_hex(text: str) -> bytes | None:
    """The bytes of a canonical (lower-case, 16-byte) hex name, else None."""
    if len(text) != _KEY_PART_HEX_CHARS or text.strip("0123456789abcdef"):
        return None
    return bytes.fromhex(text)


def _as_bytes(blob: bytes | memoryview | None) -> bytes | None:
    return blob if blob is None or isinstance(blob, bytes) else bytes(blob)


def _read_exactly(file: io.FileIO, buffer: memoryview) -> memoryview:
    """Fill `buffer` from `file`; CorruptChunk if the file is shorter or longer."""
    view = buffer.cast("B")
    filled = 0
    while filled < len(view):
        num_read = file.readinto(view[filled:])
        if not num_read:
            raise CorruptChunk(f"file ended after {filled} of {len(view)} bytes (torn write?)")
        filled += num_read
    if file.read(1):
        raise CorruptChunk(f"file is longer than its indexed {len(view)} bytes")
    return view


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]
