"""llama.cpp's per-sequence KV state blob (`llama_state_seq_get_data`), parsed and rebuilt.

Pure code (numpy), used in the engine process by `kvdepot.connectors.llama_cpp`. The format
is llama.cpp's `llama_kv_cache::state_write` (checked against real blobs of llama-cpp-python
0.3.36 by the tests):

    u32 magic (0xaf143cd8), i32 seq_id         (llama_context::state_seq_get_data)
    u32 n_stream
    per stream:  u32 cell_count;  if cell_count == 0: nothing more for this stream
      cells:     per cell: i32 pos, u32 n_seq_id, i32 seq_id x n_seq_id
      data:      u32 v_trans, u32 n_layer
                 per layer: i32 k_type, u64 k_row_bytes, K rows (cell_count x k_row_bytes)
                 v_trans == 0: per layer: i32 v_type, u64 v_row_bytes, V rows
                 v_trans == 1: per layer: i32 v_type, u32 v_elem_bytes, u32 n_embd_v,
                               then for each of the n_embd_v elements: cell_count elements

What this module keeps of it is the KV as rows per token and layer, `[layers, 2, tokens,
row_bytes]` of raw bytes in position order (V transposed back when llama.cpp stores it
transposed), and the `StateFormat` every blob of one model and context shares. Invariants:
- `parse` accepts only a blob of exactly one sequence in one stream, at positions 0..n-1
  (a prompt's prefix), in the format it knows, and raises `StateFormatError` for anything
  else (another llama.cpp version, a model with extra per-cell data): the caller then does
  not cache, it never guesses.
- `build(fmt, kv)` is the inverse of `parse` for the first n tokens: a blob llama.cpp
  restores into one sequence at positions 0..n-1.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvdepot.errors import KVDepotError

IO_MAGIC = 0xAF143CD8
"""llama.cpp's `io_magic`, the first word of a sequence state blob."""


class StateFormatError(KVDepotError, ValueError):
    """A state blob this parser does not know (its message says where it stopped)."""


@dataclass(frozen=True, slots=True)
class StateFormat:
    """What all state blobs of one model and context share.

    Attributes:
        n_stream: llama.cpp's KV streams (one per sequence unless unified); the blob names
            them all, `stream` is the one that holds the sequence.
        stream: index of the stream holding the sequence.
        v_trans: V stored transposed (llama.cpp does without flash attention).
        n_layer: layers with KV.
        k_type / v_type: ggml type ids of K and V.
        row_bytes: bytes of one token's K (and of its V) in one layer.
        v_elem_bytes: bytes of one V element (transposed V only; else 0).
    """

    n_stream: int
    stream: int
    v_trans: bool
    n_layer: int
    k_type: int
    v_type: int
    row_bytes: int
    v_elem_bytes: int

    @property
    def key(self) -> str:
        """What enters the cache key: everything that makes two blobs' rows incompatible."""
        return (
            f"st{self.n_stream}.{self.stream}-vt{int(self.v_trans)}-L{self.n_layer}"
            f"-k{self.k_type}-v{self.v_type}-r{self.row_bytes}-e{self.v_elem_bytes}"
        )


class _Reader:
    def __init__(self, blob: bytes | memoryview) -> None:
        self.view = memoryview(blob)
        self.at = 0

    def take(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.view):
            raise StateFormatError(f"state blob ends at byte {len(self.view)}, in a header")
        values = struct.unpack_from(fmt, self.view, self.at)
        self.at += size
        return values

    def array(self, nbytes: int) -> np.ndarray:
        if self.at + nbytes > len(self.view):
            raise StateFormatError(f"state blob ends at byte {len(self.view)}, in KV data")
        out = np.frombuffer(self.view, dtype=np.uint8, count=nbytes, offset=self.at)
        self.at += nbytes
        return out


def _elements(nbytes: int) -> np.dtype[Any]:
    """A numpy type of `nbytes` per element (V is transposed element by element)."""
    return np.dtype(
        {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(nbytes, f"V{nbytes}")
    )


def parse(blob: bytes | memoryview) -> tuple[StateFormat, np.ndarray]:
    """(format, KV `[layers, 2, tokens, row_bytes]` uint8 in position order) of a blob.

    Raises:
        StateFormatError: not one sequence at positions 0..n-1 in a format this knows.
    """
    r = _Reader(blob)
    magic, _ = r.take("<Ii")  # the sequence id: a restore names its own
    if magic != IO_MAGIC:
        raise StateFormatError(f"not a sequence state (magic {magic:#x})")
    (n_stream,) = r.take("<I")
    if not 0 < n_stream <= 1024:
        raise StateFormatError(f"implausible stream count {n_stream}")
    found: tuple[StateFormat, np.ndarray] | None = None
    for stream in range(n_stream):
        (cell_count,) = r.take("<I")
        if cell_count == 0:
            continue
        if found is not None:
            raise StateFormatError("cells in two streams: not one sequence")
        found = _parse_stream(r, n_stream, stream, cell_count)
    if found is None:
        raise StateFormatError("an empty state")
    if r.at != len(r.view):
        raise StateFormatError(f"{len(r.view) - r.at} bytes after the state")
    return found


def _parse_stream(
    r: _Reader, n_stream: int, stream: int, cell_count: int
) -> tuple[StateFormat, np.ndarray]:
    cells = r.array(12 * cell_count).view("<i4").reshape(cell_count, 3)  # pos, n_seq_id, seq
    if not np.all(cells[:, 1] == 1):
        raise StateFormatError("a cell belongs to more (or fewer) than one sequence")
    positions = cells[:, 0]
    is_sorted = np.array_equal(positions, np.arange(cell_count))
    order = None if is_sorted else np.argsort(positions, kind="stable")
    if order is not None and not np.array_equal(positions[order], np.arange(cell_count)):
        raise StateFormatError("the cells are not positions 0..n-1 (not a prefix)")
    v_trans, n_layer = r.take("<II")
    if v_trans not in (0, 1) or not 0 < n_layer <= 4096:
        raise StateFormatError(f"implausible data header (v_trans {v_trans}, {n_layer} layers)")
    kv: np.ndarray | None = None
    k_type = v_type = row_bytes = elem = -1
    for layer in range(n_layer):
        this_type, this_row = r.take("<iQ")
        if kv is None:
            k_type, row_bytes = this_type, int(this_row)
            if not 0 < row_bytes <= 1 << 24:
                raise StateFormatError(f"implausible row size {row_bytes}")
            kv = np.empty((n_layer, 2, cell_count, row_bytes), dtype=np.uint8)
        if (this_type, this_row) != (k_type, row_bytes):
            raise StateFormatError("layers differ in K type or row size (not supported)")
        kv[layer, 0] = r.array(cell_count * row_bytes).reshape(cell_count, row_bytes)
    assert kv is not None
    for layer in range(n_layer):
        if not v_trans:
            this_type, this_row = r.take("<iQ")
            this_elem = 0
        else:
            this_type, this_elem, n_embd = r.take("<iII")
            this_row = this_elem * n_embd
        if layer == 0:
            v_type, elem = this_type, this_elem
        if (this_type, this_row, this_elem) != (v_type, row_bytes, elem):
            raise StateFormatError("V differs from K in row size, or layers in V type")
        data = r.array(cell_count * row_bytes)
        if not v_trans:
            kv[layer, 1] = data.reshape(cell_count, row_bytes)
        else:
            t = _elements(elem)
            kv[layer, 1].view(t)[...] = data.view(t).reshape(row_bytes // elem, cell_count).T
    fmt = StateFormat(n_stream, stream, bool(v_trans), n_layer, k_type, v_type, row_bytes,
                      elem if v_trans else 0)  # fmt: skip
    return fmt, (kv if order is None else kv[:, :, order])


def build(fmt: StateFormat, kv: np.ndarray | Sequence[np.ndarray], seq_id: int = 0) -> np.ndarray:
    """A state blob (uint8 array) of the tokens of `kv` (`[layers, 2, tokens, row_bytes]`
    uint8, or a list of such pieces in token order) at positions 0..n-1 of one sequence, in
    `fmt`. One pass over the bytes: V is transposed straight into place."""
    pieces = [kv] if isinstance(kv, np.ndarray) else list(kv)
    n = sum(int(piece.shape[2]) for piece in pieces)
    n_layer, row = fmt.n_layer, fmt.row_bytes
    if n == 0 or any(p.shape[:2] + p.shape[3:] != (n_layer, 2, row) for p in pieces):
        shapes = [p.shape for p in pieces]
        raise StateFormatError(f"KV of shapes {shapes} does not fit {fmt.key}")
    # magic, seq id, stream count; a count per stream; the cells; v_trans and n_layer; per
    # layer a 12-byte header (type, row size or element size and count) and its rows, K and V
    size = 12 + 4 * fmt.n_stream + 12 * n + 8 + 2 * n_layer * (12 + n * row)
    out = np.empty(size, dtype=np.uint8)
    at = 0

    def put(data: bytes) -> None:
        nonlocal at
        out[at : at + len(data)] = np.frombuffer(data, dtype=np.uint8)
        at += len(data)

    put(struct.pack("<IiI", IO_MAGIC, seq_id, fmt.n_stream))
    for stream in range(fmt.n_stream):
        if stream != fmt.stream:
            put(struct.pack("<I", 0))
            continue
        put(struct.pack("<I", n))
        cells = out[at : at + 12 * n].view("<i4").reshape(n, 3)
        cells[:, 0] = np.arange(n)
        cells[:, 1] = 1
        cells[:, 2] = seq_id
        at += 12 * n
        put(struct.pack("<II", int(fmt.v_trans), n_layer))
        for layer in range(n_layer):
            put(struct.pack("<iQ", fmt.k_type, row))
            rows = out[at : at + n * row].reshape(n, row)
            _fill(rows, [p[layer, 0] for p in pieces])
            at += n * row
        for layer in range(n_layer):
            if not fmt.v_trans:
                put(struct.pack("<iQ", fmt.v_type, row))
                _fill(out[at : at + n * row].reshape(n, row), [p[layer, 1] for p in pieces])
            else:
                elem = fmt.v_elem_bytes
                put(struct.pack("<iII", fmt.v_type, elem, row // elem))
                t = _elements(elem)
                columns = out[at : at + n * row].view(t).reshape(row // elem, n)
                start = 0
                for p in pieces:
                    m = int(p.shape[2])
                    columns[:, start : start + m] = np.ascontiguousarray(p[layer, 1]).view(t).T
                    start += m
            at += n * row
    if at != size:
        raise AssertionError(f"built {at} of {size} bytes")
    return out


def _fill(rows: np.ndarray, parts: list[np.ndarray]) -> None:
    start = 0
    for part in parts:
        rows[start : start + part.shape[0]] = part
        start += part.shape[0]
