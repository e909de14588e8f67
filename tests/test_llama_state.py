"""llama.cpp's sequence state format (`kvdepot.connectors.llama_state`), on blobs written the
way llama.cpp's `state_write` writes them; real blobs are checked in tests/test_llama_cpp.py."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from kvdepot.connectors.llama_state import IO_MAGIC, StateFormatError, build, parse

L, ROW, F16 = 3, 12, 1  # layers, bytes per token row, ggml's f16 type id


def llama_blob(kv: np.ndarray, positions: list[int], *, v_trans: bool, n_stream: int = 1,
               stream: int = 0) -> bytes:  # fmt: skip
    """What llama.cpp writes for one sequence whose cells hold `positions` (cell order) with
    `kv[layer, 0|1, cell]` rows."""
    n = len(positions)
    out = [struct.pack("<IiI", IO_MAGIC, 0, n_stream)]
    for s in range(n_stream):
        if s != stream:
            out.append(struct.pack("<I", 0))
            continue
        out.append(struct.pack("<I", n))
        for pos in positions:
            out.append(struct.pack("<iIi", pos, 1, 0))
        out.append(struct.pack("<II", int(v_trans), L))
        for layer in range(L):
            out.append(struct.pack("<iQ", F16, ROW) + kv[layer, 0].tobytes())
        for layer in range(L):
            if not v_trans:
                out.append(struct.pack("<iQ", F16, ROW) + kv[layer, 1].tobytes())
            else:
                out.append(struct.pack("<iII", F16, 2, ROW // 2))
                for j in range(ROW // 2):  # element j of every cell, then element j + 1
                    out.append(kv[layer, 1, :, 2 * j : 2 * j + 2].tobytes())
    return b"".join(out)


def random_kv(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (L, 2, n, ROW), dtype=np.uint8)


@pytest.mark.parametrize("v_trans", [False, True])
def test_a_blob_parses_into_rows_by_position_and_builds_back(v_trans: bool) -> None:
    kv = random_kv(5)
    blob = llama_blob(kv, [0, 1, 2, 3, 4], v_trans=v_trans)
    fmt, got = parse(blob)
    assert (fmt.v_trans, fmt.n_layer, fmt.row_bytes, fmt.k_type) == (v_trans, L, ROW, F16)
    assert np.array_equal(got, kv)
    assert build(fmt, got).tobytes() == blob
    # The first 3 tokens alone: what llama.cpp would have written for them.
    assert build(fmt, got[:, :, :3]).tobytes() == llama_blob(
        kv[:, :, :3], [0, 1, 2], v_trans=v_trans
    )


def test_cells_out_of_position_order_are_sorted() -> None:
    kv = random_kv(4, seed=1)
    order = [2, 0, 3, 1]  # cell i holds position order[i]
    blob = llama_blob(kv, order, v_trans=True)
    _, got = parse(blob)
    for cell, pos in enumerate(order):
        assert np.array_equal(got[:, :, pos], kv[:, :, cell])


def test_other_streams_are_kept_empty() -> None:
    kv = random_kv(3)
    blob = llama_blob(kv, [0, 1, 2], v_trans=False, n_stream=4, stream=2)
    fmt, got = parse(blob)
    assert (fmt.n_stream, fmt.stream) == (4, 2)
    assert build(fmt, got).tobytes() == blob


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:-1], "ends"),
        (lambda b: b + b"\0", "after the state"),
        (lambda b: b[:8] + struct.pack("<I", 1) + struct.pack("<I", 0), "empty"),
        (lambda b: b[:16] + struct.pack("<iIi", 0, 2, 0) + b[28:], "one sequence"),
        (lambda b: b"\0\0\0\0" + b[4:], "magic"),
    ],
)
def test_a_blob_it_does_not_know_is_refused(mangle: object, message: str) -> None:
    blob = llama_blob(random_kv(3), [0, 1, 2], v_trans=False)
    with pytest.raises(StateFormatError, match=message):
        parse(mangle(blob))  # type: ignore[operator]


def test_a_gap_in_positions_is_not_a_prefix() -> None:
    blob = llama_blob(random_kv(3), [0, 1, 5], v_trans=False)
    with pytest.raises(StateFormatError, match="prefix"):
        parse(blob)
