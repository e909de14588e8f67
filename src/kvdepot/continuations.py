"""Continuation index: which stored chunks follow a prefix, so a chunk can be reused in part.

Runs in the process that owns the cache (the embedded `TieredStore`, or the daemon), beside
the tiers. Prefix keys are exact: chunk i's key stands for every token up to its end, so a
prompt that shares a stored prompt's first 3,000 tokens but differs inside the 24th chunk
matches 23 chunks only. Yet KV of token j depends only on tokens 0..j, so the stored 24th
chunk's first m tokens are valid for any prompt whose 24th chunk begins with the same m
tokens. This index remembers, per parent (the key of the chain position a chunk follows),
the chunks stored after it and their tokens, and answers "which child shares the longest
leading run of tokens with these?" - a new question on a cached document then recomputes
only the question, not the whole last chunk.

Invariants:
- It is a hint, never the truth: an answer names a child key, and the caller reads that key
  from the tiers like any other (checksummed; a miss if it is gone). Children no longer in
  any tier are dropped when found.
- Bounded: at most `max_children` children per parent (the newest kept), `max_entries`
  children in all and `max_bytes` of them (tokens + `ENTRY_OVERHEAD_BYTES` each; least
  recently used parents go first). A child's tokens longer than a chunk can hold
  (`MAX_CHUNK_TOKENS`) are not kept. ~12 MB at the default entry cap with 128-token chunks.
- Keys carry the namespace digest (model, layout, tenant salt), so a parent in one namespace
  never lists a child of another.
- It also remembers the roots of the namespaces it has seen (at most `MAX_ROOTS`), so that
  a prompt that misses in its own namespace can be checked against the others' chains
  (`held_elsewhere`: the "another namespace" miss reason, `kvdepot.misses`).
- Saved on a clean close and loaded at start when the store has a disk tier (`save`/`load`,
  beside the chunk files); a crash, or chunks another machine put in a shared tier, leave
  matching to whole chunks until the chunks are stored again. A file that does not load is
  ignored (logged): the index is a hint.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from kvdepot.keys import MAX_CHUNK_TOKENS, ChunkKey

logger = logging.getLogger(__name__)
_FILE_VERSION = 1
MAX_ROOTS = 64
"""Namespace roots remembered for `held_elsewhere` (the least recently seen go first)."""
ENTRY_OVERHEAD_BYTES = 256
"""Memory an entry costs besides its tokens (keys, dict slots, the array object)."""


class _Saved(msgspec.Struct):
    """The index on disk: (parent, child, tokens) triples, least recently used first."""

    version: int
    parents: list[bytes]
    children: list[bytes]
    tokens: list[bytes]
    roots: list[bytes] = []


Continuation = tuple[ChunkKey, ChunkKey, bytes]
"""(parent key, child key, the child's token ids as little-endian int32 bytes)."""

Root = tuple[ChunkKey, str, int]
"""(a namespace's root key, the model name its chunks are announced under in KV events, ""
for never, and its chunk size in tokens): sent with continuations (`kvdepot.events`)."""


@dataclass(frozen=True, slots=True)
class TailQuery:
    """What a store needs to extend a chain's leading run of whole chunks by a partial match
    in the same call: the prompt's tokens and the chain's root.

    Attributes:
        root: the parent of the chain's first chunk (the namespace's root key).
        tokens: the prompt's token ids as little-endian int32 bytes, from its start.
        chunk_size_tokens: tokens per chunk; chunk i holds tokens[i * c : (i + 1) * c].
        min_tokens: a partial match shorter than this is no match.
    """

    root: ChunkKey
    tokens: bytes
    chunk_size_tokens: int
    min_tokens: int = 1

    def after(self, keys: Sequence[ChunkKey], num_chunks: int) -> tuple[ChunkKey, bytes]:
        """(parent, tokens) of the chunk that follows the first `num_chunks` of `keys`."""
        parent = keys[num_chunks - 1] if num_chunks else self.root
        step = 4 * self.chunk_size_tokens
        return parent, self.tokens[num_chunks * step : (num_chunks + 1) * step]


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the leading run of equal elements of two 1-D arrays."""
    n = min(a.size, b.size)
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class ContinuationIndex:
    """parent key -> the chunks stored after it, with their tokens (thread-safe)."""

    def __init__(
        self,
        max_entries: int = 16384,
        max_children: int = 8,
        max_bytes: int = 64 << 20,
        on_evict: Callable[[int], object] | None = None,
    ) -> None:
        """`on_evict(n)` is told whenever a bound drops n entries (for a metric)."""
        if max_entries < 1 or max_children < 1 or max_bytes < 0:
            raise ValueError("max_entries and max_children must be >= 1, max_bytes >= 0")
        self.max_entries = max_entries
        self.max_children = max_children
        self.max_bytes = max_bytes
        self._on_evict = on_evict
        self._parents: OrderedDict[ChunkKey, OrderedDict[ChunkKey, np.ndarray]] = OrderedDict()
        self._roots: OrderedDict[ChunkKey, None] = OrderedDict()
        self._num_entries = 0
        self._num_bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """What the entries cost, as the byte budget counts it."""
        return self._num_bytes

    def __len__(self) -> int:
        return self._num_entries

    def add(self, entries: Sequence[Continuation]) -> None:
        """Remember that each child key (holding these tokens) follows its parent."""
        num_evicted = 0
        with self._lock:
            for parent, child, raw in entries:
                if not 0 < len(raw) <= 4 * MAX_CHUNK_TOKENS or len(raw) % 4:
                    continue  # not the tokens of a chunk
                if child.namespace != parent.namespace:
                    continue  # never a child of another model, layout or tenant
                tokens = np.frombuffer(raw, dtype="<i4")
                children = self._parents.get(parent)
                if children is None:
                    children = self._parents[parent] = OrderedDict()
                else:
                    self._parents.move_to_end(parent)
                if child in children:
                    children.move_to_end(child)
                    continue
                children[child] = tokens
                self._num_entries += 1
                self._num_bytes += _cost(tokens)
                if len(children) > self.max_children:
                    _, dropped = children.popitem(last=False)
                    self._num_entries -= 1
                    self._num_bytes -= _cost(dropped)
                    num_evicted += 1
            while self._parents and (
                self._num_entries > self.max_entries or self._num_bytes > self.max_bytes
            ):
                _, oldest = self._parents.popitem(last=False)
                self._num_entries -= len(oldest)
                self._num_bytes -= sum(_cost(t) for t in oldest.values())
                num_evicted += len(oldest)
        if num_evicted and self._on_evict is not None:
            self._on_evict(num_evicted)

    def best(
        self,
        parent: ChunkKey,
        raw_tokens: bytes,
        is_present: Callable[[Sequence[ChunkKey]], list[bool]],
    ) -> tuple[ChunkKey, int] | None:
        """(child, m): the present child whose first m >= 1 tokens equal `raw_tokens`' first m,
        for the largest m; None when no child shares even the first token.

        `is_present` is asked about the candidates (outside the lock); absent ones are dropped.
        """
        tokens = np.frombuffer(raw_tokens, dtype="<i4")
        with self._lock:
            children = self._parents.get(parent)
            if not children:
                return None
            self._parents.move_to_end(parent)
            ranked = sorted(
                ((common_prefix_len(t, tokens), child) for child, t in children.items()),
                key=lambda item: -item[0],
            )
        candidates = [(m, child) for m, child in ranked if m > 0]
        if not candidates:
            return None
        present = is_present([child for _, child in candidates])
        gone = [child for (_, child), ok in zip(candidates, present, strict=True) if not ok]
        if gone:
            self._forget(parent, gone)
        for (m, child), ok in zip(candidates, present, strict=True):
            if ok:
                return child, m
        return None

    def note_root(self, root: ChunkKey) -> None:
        """`root` is a namespace's root (a lookup named it)."""
        with self._lock:
            self._roots[root] = None
            self._roots.move_to_end(root)
            if len(self._roots) > MAX_ROOTS:
                self._roots.popitem(last=False)

    def held_elsewhere(
        self,
        root: ChunkKey,
        raw_tokens: bytes,
        is_present: Callable[[Sequence[ChunkKey]], list[bool]],
    ) -> int:
        """How many leading tokens of `raw_tokens` (a prompt, int32 bytes) some namespace
        other than `root`'s holds: the longest walk down another root's chain of present
        children whose tokens equal the prompt's (chunk sizes may differ)."""
        with self._lock:
            others = [r for r in self._roots if r.namespace != root.namespace]
        return max((self._held_under(r, raw_tokens, is_present) for r in others), default=0)

    def _held_under(
        self,
        root: ChunkKey,
        raw_tokens: bytes,
        is_present: Callable[[Sequence[ChunkKey]], list[bool]],
    ) -> int:
        """Leading tokens of `raw_tokens` that the chain under `root` holds."""
        tokens = np.frombuffer(raw_tokens, dtype="<i4")
        parent, held = root, 0
        while held < tokens.size:
            with self._lock:
                children = list((self._parents.get(parent) or {}).items())
            ranked = sorted(
                ((common_prefix_len(t, tokens[held:]), t.size, child) for child, t in children),
                key=lambda item: -item[0],
            )
            ranked = [item for item in ranked if item[0] > 0]
            present = is_present([child for _, _, child in ranked]) if ranked else []
            step = next(
                (
                    (m, size, child)
                    for (m, size, child), ok in zip(ranked, present, strict=True)
                    if ok
                ),
                None,
            )
            if step is None:
                break
            m, size, parent = step
            held += m
            if m < size:
                break  # the prompt parts from this chain inside the child
        return held

    def save(self, path: Path, mode: int = 0o600) -> None:
        """Write the index to `path` atomically (temp file, then rename), with file `mode`."""
        with self._lock:
            triples = [
                (parent.to_bytes(), child.to_bytes(), tokens.tobytes())
                for parent, children in self._parents.items()
                for child, tokens in children.items()
            ]
            roots = [root.to_bytes() for root in self._roots]
        saved = _Saved(
            _FILE_VERSION,
            [t[0] for t in triples],
            [t[1] for t in triples],
            [t[2] for t in triples],
            roots,
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        # Private like the chunk files: the tokens are other people's prompts.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as file:
            os.fchmod(fd, mode)
            file.write(msgspec.msgpack.encode(saved))
        os.replace(tmp, path)

    def load(self, path: Path) -> int:
        """Add the entries saved at `path`; returns how many (0 if it is missing or unusable)."""
        try:
            saved = msgspec.msgpack.decode(path.read_bytes(), type=_Saved)
            if saved.version != _FILE_VERSION:
                raise ValueError(f"version {saved.version}")
            entries = [
                (ChunkKey.from_bytes(p), ChunkKey.from_bytes(c), t)
                for p, c, t in zip(saved.parents, saved.children, saved.tokens, strict=True)
            ]
            roots = [ChunkKey.from_bytes(r) for r in saved.roots]
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            logger.warning("continuation index %s not loaded (a hint only): %s", path, exc)
            return 0
        self.add(entries)
        for root in roots:
            self.note_root(root)
        return len(entries)

    def clear(self) -> None:
        with self._lock:
            self._parents.clear()
            self._roots.clear()
            self._num_entries = 0
            self._num_bytes = 0

    def _forget(self, parent: ChunkKey, children: Sequence[ChunkKey]) -> None:
        with self._lock:
            known = self._parents.get(parent)
            if known is None:
                return
            for child in children:
                if (tokens := known.pop(child, None)) is not None:
                    self._num_entries -= 1
                    self._num_bytes -= _cost(tokens)
            if not known:
                del self._parents[parent]


def _cost(tokens: np.ndarray) -> int:
    return int(tokens.nbytes) + ENTRY_OVERHEAD_BYTES
