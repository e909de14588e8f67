"""Lossy codecs (int8, fp8, cachegen): error bounds, ratios, edge cases; fuzzing every decoder."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvdepot.codec import (
    HEADER_NBYTES,
    CacheGenCodec,
    ChunkHeader,
    Codec,
    CodecRegistry,
    EncodedChunk,
    Fp8Codec,
    Int8Codec,
    decode_chunk,
    decode_chunk_into,
    default_registry,
    encode_chunk,
    parse_header,
)
from kvdepot.errors import ConfigError, CorruptChunk, UnknownCodec
from kvdepot.layout import DType

LOSSY: list[type[Codec]] = [Int8Codec, Fp8Codec, CacheGenCodec]
BY_LOSSY = pytest.mark.parametrize("codec_cls", LOSSY, ids=lambda c: c.name)
FLOATS = [DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16]
BY_FLOAT = pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: d.name)
KV_SHAPE = (4, 2, 256, 2, 32)  # [layers, K/V, tokens, kv_heads, head_dim], one engine chunk
# Relative RMS error bounds: measured on `kv_like` (int8 0.006, fp8 0.024, cachegen 0.061) and
# on SmolLM2's real KV (0.005, 0.027, 0.066), plus margin.
MAX_REL_ERROR = {"int8": 0.01, "fp8": 0.035, "cachegen": 0.09}
# Goals of issue 8 against 16-bit KV; headers included.
MIN_RATIO_16BIT = {"int8": 1.9, "fp8": 1.9, "cachegen": 3.5}


def to_bits(values: np.ndarray, dtype: DType) -> np.ndarray:
    """float64 values rounded into `dtype`'s storage."""
    tensor = torch.from_numpy(values.astype(np.float32))
    if dtype is DType.FLOAT32:
        return tensor.numpy()
    if dtype is DType.FLOAT16:
        return tensor.half().numpy()
    return tensor.bfloat16().view(torch.int16).numpy().view(np.uint16)


def to_float(bits: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype is DType.BFLOAT16:
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.astype(np.float64)


def kv_like(shape: tuple[int, ...] = KV_SHAPE, seed: int = 0) -> np.ndarray:
    """KV with the structure of real KV: K with per-channel offsets and outlier channels, V
    with per-token scales (float64)."""
    rng = np.random.default_rng(seed)
    num_layers, _, num_tokens, num_heads, head_dim = shape
    channel_scale = rng.lognormal(0.0, 0.5, (num_layers, 1, num_heads, head_dim))
    channel_scale[..., :2] *= 6  # outlier channels
    keys = rng.standard_normal((num_layers, num_tokens, num_heads, head_dim)) * channel_scale
    keys += rng.normal(0, 2, (num_layers, 1, num_heads, head_dim))
    token_scale = rng.lognormal(-1.0, 0.4, (num_layers, num_tokens, num_heads, 1))
    values = rng.standard_normal((num_layers, num_tokens, num_heads, head_dim)) * token_scale
    return np.stack([keys, values], axis=1)


def to_blob(chunk: EncodedChunk) -> bytes:
    buf = bytearray(chunk.nbytes)
    chunk.write_into(memoryview(buf))
    return bytes(buf)


def round_trip(codec: Codec, bits: np.ndarray, dtype: DType) -> tuple[np.ndarray, int]:
    blob = to_blob(encode_chunk(bits, dtype, codec).sealed())
    got_dtype, got = decode_chunk(blob, default_registry())
    assert got_dtype is dtype
    assert got.dtype == dtype.storage_dtype
    assert got.shape == bits.shape
    return got, len(blob)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(np.square(got - want).sum() / np.square(want).sum()))


# --- accuracy and size ------------------------------------------------------------------------


@BY_LOSSY
@BY_FLOAT
def test_round_trip_error_is_within_the_measured_bound(
    codec_cls: type[Codec], dtype: DType
) -> None:
    bits = to_bits(kv_like(), dtype)
    got, _ = round_trip(codec_cls(), bits, dtype)
    want = to_float(bits, dtype)
    assert rel_error(to_float(got, dtype), want) < MAX_REL_ERROR[codec_cls.name]
    assert np.isfinite(to_float(got, dtype)).all()


def half_steps(codec: Codec, values: np.ndarray) -> np.ndarray:
    """Upper bound of each element's error: half its quantization step (plus rounding)."""
    if isinstance(codec, Int8Codec):
        k_step = np.abs(values[:, 0]).max(axis=1, keepdims=True) / 127
        v_step = np.abs(values[:, 1]).max(axis=3, keepdims=True) / 127
        steps = np.stack([np.broadcast_to(k_step, values[:, 0].shape),
                          np.broadcast_to(v_step, values[:, 1].shape)], axis=1)  # fmt: skip
    else:  # cachegen: beta * std (beta <= 0.5), never below the channel's spread / 127
        centered = values - values.mean(axis=2, keepdims=True)
        spread = np.abs(centered).max(axis=2, keepdims=True)
        steps = np.maximum(0.5 * 1.01 * values.std(axis=2, keepdims=True), 1.01 * spread / 127)
    return 0.5 * steps * (1 + 2**-7) + 1e-6


@pytest.mark.parametrize("codec_cls", [Int8Codec, CacheGenCodec], ids=lambda c: c.name)
def test_integer_codecs_bound_every_element(codec_cls: type[Codec]) -> None:
    values = kv_like()
    codec = codec_cls()
    got, _ = round_trip(codec, to_bits(values, DType.FLOAT32), DType.FLOAT32)
    error = np.abs(got - values.astype(np.float32))
    assert (error <= half_steps(codec, values)).all()


@BY_LOSSY
@pytest.mark.parametrize("dtype", [DType.FLOAT16, DType.BFLOAT16], ids=lambda d: d.name)
def test_lossy_codec_meets_its_ratio_goal_on_16bit_kv(codec_cls: type[Codec], dtype: DType) -> None:
    bits = to_bits(kv_like(), dtype)
    _, blob_nbytes = round_trip(codec_cls(), bits, dtype)
    assert bits.nbytes / blob_nbytes >= MIN_RATIO_16BIT[codec_cls.name]


@BY_LOSSY
def test_lossy_codecs_compress_fp32_about_twice_as_much(codec_cls: type[Codec]) -> None:
    bits = to_bits(kv_like(), DType.FLOAT32)
    _, blob_nbytes = round_trip(codec_cls(), bits, DType.FLOAT32)
    assert bits.nbytes / blob_nbytes >= 2 * MIN_RATIO_16BIT[codec_cls.name]


def test_cachegen_spends_more_bits_where_beta_is_smaller() -> None:
    bits = to_bits(kv_like(), DType.BFLOAT16)
    fine, fine_nbytes = round_trip(CacheGenCodec(beta_first_layer=0.2, beta_last_layer=0.2),
                                   bits, DType.BFLOAT16)  # fmt: skip
    coarse, coarse_nbytes = round_trip(CacheGenCodec(beta_first_layer=0.8, beta_last_layer=0.8),
                                       bits, DType.BFLOAT16)  # fmt: skip
    want = to_float(bits, DType.BFLOAT16)
    assert fine_nbytes > coarse_nbytes
    assert rel_error(to_float(fine, DType.BFLOAT16), want) < rel_error(
        to_float(coarse, DType.BFLOAT16), want
    )


def test_cachegen_uses_anchors_where_they_pay() -> None:
    # Smooth channels (like K's low-frequency RoPE dims) plus noise: the noise makes the
    # direct symbols jump about, deltas to a nearby anchor stay small.
    t = np.arange(256, dtype=np.float64)[None, :, None, None]
    smooth = np.sin(t / 40.0 + np.arange(8)[None, None, None, :])
    noise = 0.1 * np.random.default_rng(0).standard_normal((2, 2, 256, 1, 8))
    bits = to_bits(np.stack([np.repeat(smooth, 2, axis=0)] * 2, axis=1) + noise, DType.FLOAT32)
    with_anchors = encode_chunk(bits, DType.FLOAT32, CacheGenCodec()).nbytes
    without = encode_chunk(bits, DType.FLOAT32, CacheGenCodec(group_size_tokens=1)).nbytes
    assert with_anchors < 0.95 * without
    got, _ = round_trip(CacheGenCodec(), bits, DType.FLOAT32)
    # Uniform error of a step of 0.5 std (the first layer's beta) is 0.5 / sqrt(12) = 0.144.
    assert rel_error(got.astype(np.float64), bits.astype(np.float64)) < 0.15


@pytest.mark.parametrize(
    "kwargs", [{"group_size_tokens": 0}, {"beta_first_layer": 0.0}, {"beta_last_layer": -1.0}]
)
def test_cachegen_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        CacheGenCodec(**kwargs)  # type: ignore[arg-type]


# --- edge cases -------------------------------------------------------------------------------

EDGE_SHAPES = [(1,), (7,), (3, 5), (1, 2, 1, 1, 1), (2, 2, 3, 1, 2), (2, 3, 4, 2, 2), (5, 1)]


SHAPE_TOLERANCE = {"int8": 0.01, "fp8": 0.07, "cachegen": 0.3}  # x absmax, dtype rounding aside


@BY_LOSSY
@BY_FLOAT
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
def test_any_shape_round_trips(
    codec_cls: type[Codec], dtype: DType, shape: tuple[int, ...]
) -> None:
    values = np.random.default_rng(len(shape)).standard_normal(shape)
    got, _ = round_trip(codec_cls(), to_bits(values, dtype), dtype)
    tolerance = (SHAPE_TOLERANCE[codec_cls.name] + 2**-7) * np.abs(values).max()
    assert np.abs(to_float(got, dtype) - values).max() <= tolerance


@BY_LOSSY
@BY_FLOAT
@pytest.mark.parametrize("fill", [0.0, 3.25, -1e-3], ids=["zeros", "constant", "tiny"])
def test_constant_chunks_decode_closely(codec_cls: type[Codec], dtype: DType, fill: float) -> None:
    bits = to_bits(np.full((2, 2, 8, 1, 4), fill), dtype)
    got, _ = round_trip(codec_cls(), bits, dtype)
    np.testing.assert_allclose(to_float(got, dtype), to_float(bits, dtype), rtol=0.07, atol=1e-9)


@BY_LOSSY
@BY_FLOAT
def test_non_finite_values_decode_as_finite(codec_cls: type[Codec], dtype: DType) -> None:
    values = kv_like((2, 2, 16, 1, 8))
    values[0, 0, 3, 0, 1], values[1, 1, 5, 0, 2], values[0, 1, 0, 0, 0] = np.nan, np.inf, -np.inf
    got, _ = round_trip(codec_cls(), to_bits(values, dtype), dtype)
    decoded = to_float(got, dtype)
    assert np.isfinite(decoded).all()
    finite = np.isfinite(values)
    assert rel_error(decoded[finite], values[finite]) < 0.1


EXTREMES = {
    DType.FLOAT32: [3.4e38, -3.4e38, 1e-45, -1e-45, 1e30],
    DType.FLOAT16: [65504.0, -65504.0, 6e-8, -6e-8, 1000.0],
    DType.BFLOAT16: [3.38e38, -3.38e38, 1e-40, -1e-40, 1e30],
}


@BY_LOSSY
@BY_FLOAT
@pytest.mark.parametrize(
    "pick", [slice(0, 2), slice(2, 4), slice(0, 5)], ids=["huge", "tiny", "mix"]
)
def test_extreme_values_encode_and_decode_without_warnings(
    codec_cls: type[Codec], dtype: DType, pick: slice
) -> None:
    # Far outside any KV; they are clipped, but no overflow may warn (warnings are errors).
    chosen = EXTREMES[dtype][pick]
    values = np.resize(np.array(chosen), (2, 2, 8, 1, 4))
    got, _ = round_trip(codec_cls(), to_bits(values, dtype), dtype)
    assert np.isfinite(to_float(got, dtype)).all()


@BY_LOSSY
@pytest.mark.parametrize("dtype", [DType.FLOAT8_E4M3, DType.INT8, DType.UINT8], ids=str)
def test_non_float_dtypes_are_stored_exactly(codec_cls: type[Codec], dtype: DType) -> None:
    bits = np.random.default_rng(1).integers(0, 256, (2, 2, 8, 1, 4), dtype=np.uint8)
    bits = bits.view(dtype.storage_dtype)
    got, _ = round_trip(codec_cls(), bits, dtype)
    assert got.tobytes() == bits.tobytes()


@BY_LOSSY
@pytest.mark.parametrize("dtype", [DType.FLOAT32, DType.BFLOAT16], ids=lambda d: d.name)
def test_strided_input_and_output(codec_cls: type[Codec], dtype: DType) -> None:
    base = to_bits(kv_like((2, 2, 32, 2, 8)), dtype)
    array = base[:, :, ::-2]
    reference, _ = round_trip(codec_cls(), np.ascontiguousarray(array), dtype)
    blob = to_blob(encode_chunk(array, dtype, codec_cls()).sealed())
    canvas = np.zeros((2, 2, 40, 2, 8), dtype=dtype.storage_dtype)
    for out in (canvas[:, :, 3:19], canvas[:, :, 39:23:-1]):
        decode_chunk_into(blob, out, default_registry(), verify=True)
        assert out.tobytes() == reference.tobytes()


# --- malformed payloads -----------------------------------------------------------------------


def cachegen_blob(mutate_payload: object) -> bytes:
    bits = to_bits(kv_like((2, 2, 16, 1, 8)), DType.BFLOAT16)
    payload = bytearray(encode_chunk(bits, DType.BFLOAT16, CacheGenCodec()).contiguous_payload())
    assert callable(mutate_payload)
    mutate_payload(payload)
    header = ChunkHeader(CacheGenCodec.codec_id, DType.BFLOAT16, bits.shape, len(payload))
    return header.pack() + bytes(payload)


CHANNELS = 2 * 2 * 1 * 8
CACHEGEN_DAMAGE = {
    "group-zero": lambda p: struct.pack_into("<H", p, 0, 0),
    "reserved-set": lambda p: struct.pack_into("<H", p, 2, 1),
    "mean-nan": lambda p: struct.pack_into("<H", p, 4, 0x7FC0),
    "step-inf": lambda p: struct.pack_into("<H", p, 4 + 2 * CHANNELS, 0x7F80),
    "step-zero": lambda p: struct.pack_into("<H", p, 4 + 2 * CHANNELS, 0),
    "step-negative": lambda p: struct.pack_into("<H", p, 4 + 2 * CHANNELS, 0xBF80),
    "frame-truncated": lambda p: p.__delitem__(slice(len(p) - 3, None)),
    "frame-extra-byte": lambda p: p.append(0),
    "cut-before-frame": lambda p: p.__delitem__(slice(4 + 4 * CHANNELS, None)),
}


@pytest.mark.parametrize("damage", list(CACHEGEN_DAMAGE))
def test_malformed_cachegen_payload_is_corrupt(damage: str) -> None:
    with pytest.raises(CorruptChunk):
        decode_chunk(cachegen_blob(CACHEGEN_DAMAGE[damage]), default_registry(), verify=False)


FP8_DAMAGE = {
    "nan-code": (16 + 5, b"\x7f"),
    "negative-nan-code": (16, b"\xff"),
    "nan-scale": (0, struct.pack("<f", float("nan"))),
    "negative-scale": (4, struct.pack("<f", -1.0)),
}


@pytest.mark.parametrize("damage", list(FP8_DAMAGE))
def test_malformed_fp8_payload_is_corrupt(damage: str) -> None:
    bits = to_bits(kv_like((2, 2, 4, 1, 4)), DType.FLOAT16)  # 4 slabs: 16 bytes of scales
    payload = bytearray(encode_chunk(bits, DType.FLOAT16, Fp8Codec()).contiguous_payload())
    offset, value = FP8_DAMAGE[damage]
    payload[offset : offset + len(value)] = value
    header = ChunkHeader(Fp8Codec.codec_id, DType.FLOAT16, bits.shape, len(payload))
    with pytest.raises(CorruptChunk):
        decode_chunk(header.pack() + bytes(payload), default_registry(), verify=False)


# --- fuzzing every registered decoder ---------------------------------------------------------

REGISTRY = default_registry()
ALL_CODECS = [REGISTRY.by_name(n) for n in REGISTRY.names()]


def decode_bounded(blob: bytes) -> None:
    """The fuzz oracle: only CorruptChunk escapes; a decode fills exactly the header's array
    and allocates at most a small multiple of it."""
    try:
        header = parse_header(blob)
    except CorruptChunk:
        return
    out = np.empty(header.shape, dtype=header.dtype.storage_dtype)
    tracemalloc.start()
    try:
        decode_chunk_into(blob, out, REGISTRY, verify=False)
    except CorruptChunk:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= 12 * out.nbytes + (4 << 20)  # slack: one-time lazy initialisation


def sample_blob(codec: Codec, dtype: DType, shape: tuple[int, ...], seed: int) -> bytes:
    values = np.random.default_rng(seed).standard_normal(shape)
    if dtype in FLOATS:
        bits = to_bits(values, dtype)
    else:
        bits = (values * 40).astype(np.int8).view(dtype.storage_dtype)
    return to_blob(encode_chunk(bits, dtype, codec).sealed())


_SHAPES = st.lists(st.integers(1, 6), min_size=1, max_size=5).map(tuple) | st.sampled_from(
    [(2, 2, 8, 1, 4), (1, 2, 3, 2, 2), (3, 2, 1, 1, 1)]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.sampled_from(ALL_CODECS),
    dtype=st.sampled_from(DType),
    shape=_SHAPES,
    payload=st.binary(max_size=800),
)
def test_fuzz_every_decoder_with_random_payloads(
    codec: Codec, dtype: DType, shape: tuple[int, ...], payload: bytes
) -> None:
    decode_bounded(ChunkHeader(codec.codec_id, dtype, shape, len(payload)).pack() + payload)


_EDIT = st.tuples(st.integers(0, 1 << 16), st.integers(0, 255), st.sampled_from(["set", "xor"]))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.sampled_from(ALL_CODECS),
    dtype=st.sampled_from(DType),
    shape=_SHAPES,
    edits=st.lists(_EDIT, min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 1 << 16),
)
def test_fuzz_every_decoder_with_mutated_payloads(
    codec: Codec,
    dtype: DType,
    shape: tuple[int, ...],
    edits: list[tuple[int, int, str]],
    cut: int | None,
) -> None:
    blob = bytearray(sample_blob(codec, dtype, shape, seed=len(edits)))
    payload = blob[HEADER_NBYTES:]
    for position, value, op in edits:
        if payload:
            at = position % len(payload)
            payload[at] = value if op == "set" else payload[at] ^ value
    if cut is not None:
        del payload[cut % (len(payload) + 1) :]
    header = parse_header(bytes(blob))
    mutated = ChunkHeader(codec.codec_id, header.dtype, header.shape, len(payload))
    decode_bounded(mutated.pack() + bytes(payload))


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(min_size=HEADER_NBYTES, max_size=400))
def test_fuzz_random_blobs(blob: bytes) -> None:
    decode_bounded(blob)


@pytest.mark.parametrize("codec_id", [6, 99, 999, 0xFFFF])
def test_unknown_codec_id_is_unknown_codec(codec_id: int) -> None:
    payload = bytes(32)
    blob = ChunkHeader(codec_id, DType.FLOAT32, (8,), len(payload)).pack() + payload
    with pytest.raises(UnknownCodec):
        decode_chunk(blob, REGISTRY, verify=False)
    with pytest.raises(UnknownCodec):
        decode_chunk(blob, CodecRegistry([Int8Codec()]), verify=False)


# --- the benchmark's goal lines ---------------------------------------------------------------


def test_bench_marks_each_goal_met_or_missed() -> None:
    from kvdepot.bench.codecs import CodecResult, goal_lines, report

    def result(name: str, ratio_bf16: float, ppl_pct: float, decode: float) -> CodecResult:
        return CodecResult(name, False, 2 * ratio_bf16, ratio_bf16, 1.0, 1.0, 1.0, decode, 10.0,
                           0.01, 1.0, ppl_pct, 1.0, 4, 4)  # fmt: skip

    lines = dict(goal_lines([result("int8", 1.96, 0.03, 2.0), result("cachegen", 3.4, 1.0, 0.9)]))
    assert lines == {
        "int8 ratio_bf16 >= 1.9: 1.96 met": True,
        "int8 ppl_increase_pct <= 1: 0.03 met": True,
        "cachegen ratio_bf16 >= 3.5: 3.4 MISSED": False,
        "cachegen ppl_increase_pct <= 2: 1 met": True,
        "cachegen decode_gbps_bf16 >= 0.5: 0.9 met": True,
    }
    assert "3.4 MISSED" in report([result("cachegen", 3.4, 1.0, 0.9)], 3072, 512)
