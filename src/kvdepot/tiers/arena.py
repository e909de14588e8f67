"""Host memory for the RAM tier: one buffer mapped once, and an offset allocator over it.

Runs in the process that owns the RAM tier. Memory the kernel hands out fresh is several
times slower to write than memory already touched (page faults, and on these VMs freed memory
goes back to the host), so the tier's whole budget is mapped and touched once, with
transparent huge pages requested, and then reused forever.

`ArenaAllocator` is not thread-safe: the tier calls it under its own lock. Invariants: extents
handed out never overlap and lie inside [0, capacity); freed extents coalesce with their
neighbours, so a fully freed arena is one extent again.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
from pathlib import Path

import numpy as np

ALIGNMENT_BYTES = 64


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0])


def _round_up(nbytes: int) -> int:
    return (nbytes + ALIGNMENT_BYTES - 1) // ALIGNMENT_BYTES * ALIGNMENT_BYTES


class HostBuffer:
    """A mapping of `capacity_bytes` (private, or a shared-memory file), touched up front."""

    def __init__(self, mapping: mmap.mmap, path: Path | None = None) -> None:
        self._mapping = mapping
        self.view = memoryview(mapping)
        self.path = path
        self._base_address = _address(self.view)

    @classmethod
    def create_shared(cls, path: Path, capacity_bytes: int, *, prefault: bool = True) -> HostBuffer:
        """A new shared-memory file at `path` (mode 0600), mapped and touched; the creator
        unlinks it (`unlink`) when done."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            return cls.map_new_file(fd, path, capacity_bytes, prefault=prefault)
        finally:
            os.close(fd)

    @classmethod
    def map_new_file(
        cls, fd: int, path: Path, capacity_bytes: int, *, prefault: bool = True
    ) -> HostBuffer:
        """Size the new, empty file open as `fd` (at `path`), map and touch it; the caller
        keeps `fd` (e.g. to hold a lock on the file)."""
        os.ftruncate(fd, max(capacity_bytes, 1))
        mapping = mmap.mmap(fd, max(capacity_bytes, 1), flags=mmap.MAP_SHARED)
        if prefault and capacity_bytes:
            np.frombuffer(mapping, dtype=np.uint8)[:: mmap.PAGESIZE] = 0
        return cls(mapping, path)

    @classmethod
    def map_shared(cls, path: Path) -> HostBuffer:
        """Map an existing shared-memory file created by another process.

        The page tables are populated up front (MAP_POPULATE): otherwise every first write
        through this mapping takes a page fault, and a new client's first stores run at a
        fraction of memory speed.
        """
        fd = os.open(path, os.O_RDWR)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        try:
            mapping = mmap.mmap(fd, os.fstat(fd).st_size, flags=flags)
        finally:
            os.close(fd)
        return cls(mapping, path)

    def offset_of(self, view: memoryview) -> int:
        """Where a slice of `self.view` starts in the buffer."""
        return _address(view) - self._base_address

    def unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    @classmethod
    def allocate(cls, capacity_bytes: int, *, prefault: bool = True) -> HostBuffer:
        mapping = mmap.mmap(-1, max(capacity_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # kernels without transparent huge pages
                mapping.madvise(mmap.MADV_HUGEPAGE)
        if prefault and capacity_bytes:
            # One write per 4 KiB page faults the whole range in (huge pages make it ~4x faster).
            np.frombuffer(mapping, dtype=np.uint8)[:: mmap.PAGESIZE] = 0
        return cls(mapping)

    @property
    def nbytes(self) -> int:
        return len(self.view)

    def close(self) -> None:
        """Unmap now, or leave it to the garbage collector while views are still alive."""
        try:
            self.view.release()
            self._mapping.close()
        except BufferError:
            pass


class ArenaAllocator:
    """First-fit allocator of aligned extents in [0, capacity_bytes)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._starts: list[int] = [0] if capacity_bytes else []
        self._sizes: list[int] = [capacity_bytes] if capacity_bytes else []
        self.used_bytes = 0

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new extent of at least `nbytes`, or None if no free extent fits."""
        need = _round_up(max(nbytes, 1))
        for i, size in enumerate(self._sizes):
            if size >= need:
                offset = self._starts[i]
                if size == need:
                    del self._starts[i], self._sizes[i]
                else:
                    self._starts[i] += need
                    self._sizes[i] -= need
                self.used_bytes += need
                return offset
        return None

    def free(self, offset: int, nbytes: int) -> None:
        """Return the extent allocated at `offset` for `nbytes`."""
        size = _round_up(max(nbytes, 1))
        i = bisect.bisect_left(self._starts, offset)
        self._starts.insert(i, offset)
        self._sizes.insert(i, size)
        self.used_bytes -= size
        if i + 1 < len(self._starts) and offset + size == self._starts[i + 1]:
            self._sizes[i] += self._sizes.pop(i + 1)
            del self._starts[i + 1]
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == offset:
            self._sizes[i - 1] += self._sizes.pop(i)
            del self._starts[i]

    def largest_free(self) -> int:
        return max(self._sizes, default=0)

    @staticmethod
    def footprint(nbytes: int) -> int:
        """Bytes an allocation of `nbytes` really takes."""
        return _round_up(max(nbytes, 1))
