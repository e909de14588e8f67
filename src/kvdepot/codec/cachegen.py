"""The `cachegen` codec (id 5): CacheGen-style (SIGCOMM 2024) quantization + entropy coding.

Pure code, used in every process. Per chunk and per channel (layer, K/V, head, dim):
1. *Step size.* Values are quantized with a uniform step proportional to the channel's
   spread over the chunk's tokens (`step = beta_layer * std`, never below `absmax / 127`, so
   every symbol fits int8). Steps proportional to std give every channel the same symbol
   statistics, so one entropy model fits all of them. `beta` is interpolated geometrically
   from the first to the last layer. CacheGen spends fewer bits on later layers; on SmolLM2
   the *early* layers measured less sensitive, and no schedule beat a flat `beta` = 0.25 on
   greedy agreement at the same size, so that is the default (docs/codecs.md has the numbers).
2. *Token groups and anchors.* Tokens form groups of `group_size_tokens`; the first token of
   a group is its anchor. A channel is coded either against its chunk mean, or as deltas
   against the group's (reconstructed) anchor; the encoder picks per channel whichever gives
   smaller symbols (one flag bit each). Deltas win for slowly varying channels (low-frequency
   RoPE dims of K); on SmolLM2 most channels vary too fast for deltas to pay.
3. *Entropy coding.* The int8 symbols go through zstd level 1, whose Huffman literal coder
   comes within ~0.05 bit/value of the order-0 entropy here and decodes >1 G symbols/s;
   an ANS coder (`constriction`) is exact but decoded ~60 M symbols/s on this CPU, far below
   the 0.5 GB/s a remote tier needs.

Payload: group size u16 | 0 u16 | means `[C]` bf16 | steps `[C]` bf16 | anchor flags
`ceil(C/8)` bytes | zstd frame of int8 symbols `[L, S, T, H, D]`, where C = L*S*H*D.
Non-float dtypes are stored as they are.
"""

from __future__ import annotations

import struct

import numpy as np
import zstandard

from kvdepot.codec._floats import (
    FLOAT_DTYPES,
    MAX_MAGNITUDE,
    as_float32,
    bf16_round_nearest,
    bf16_round_up,
    canonical_shape,
    layer_views,
    read_bf16,
    store_float32,
)
from kvdepot.codec.format import ChunkHeader
from kvdepot.errors import ConfigError, CorruptChunk
from kvdepot.layout import DType

_QMAX = 127
_PREFIX = struct.Struct("<HH")


def _anchor_offsets(anchors: np.ndarray, group: int, num_tokens: int) -> np.ndarray:
    """Per-token offsets from the group anchors (0 on the anchors themselves)."""
    offsets = np.repeat(anchors, group, axis=2)[:, :, :num_tokens]
    offsets[:, :, ::group] = 0
    return offsets


def _add_anchor_offsets(block: np.ndarray, use_anchor: np.ndarray, group: int) -> None:
    """Add each group's anchor to the other tokens of its group, in flagged channels.

    `block` is one layer `[S, T, H, D]`; broadcasting over a `[S, T/G, G, H, D]` view avoids
    materializing per-token offsets.
    """
    num_tokens = block.shape[1]
    anchors = block[:, ::group] * use_anchor
    num_full = num_tokens // group
    if num_full:
        grouped = block[:, : num_full * group].reshape(
            block.shape[0], num_full, group, *block.shape[2:]
        )
        grouped[:, :, 1:] += anchors[:, :num_full, None]
    if num_tokens > num_full * group + 1:
        block[:, num_full * group + 1 :] += anchors[:, num_full, None]


class CacheGenCodec:
    """Per-channel scaled quantization, anchor deltas where they pay, zstd (lossy, ~4x)."""

    name = "cachegen"
    codec_id = 5
    is_lossless = False

    def __init__(
        self,
        *,
        group_size_tokens: int = 8,
        beta_first_layer: float = 0.25,
        beta_last_layer: float = 0.25,
        zstd_level: int = 1,
    ) -> None:
        if not 1 <= group_size_tokens <= 0xFFFF:
            raise ConfigError(f"group_size_tokens {group_size_tokens} not in [1, 65535]")
        if not (beta_first_layer > 0 and beta_last_layer > 0):
            raise ConfigError("cachegen betas must be positive")
        self.group_size_tokens = group_size_tokens
        self.beta_first_layer = beta_first_layer
        self.beta_last_layer = beta_last_layer
        self.zstd_level = zstd_level

    def _betas(self, num_layers: int) -> np.ndarray:
        depth = np.arange(num_layers, dtype=np.float64) / max(num_layers - 1, 1)
        ratio = self.beta_last_layer / self.beta_first_layer
        return (self.beta_first_layer * ratio**depth).astype(np.float32)

    def encode(self, array: np.ndarray, dtype: DType) -> np.ndarray:
        if dtype not in FLOAT_DTYPES:
            return np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        shape = canonical_shape(array.shape)
        values = as_float32(array, dtype).reshape(shape)
        mean_bits, mean = bf16_round_nearest(values.mean(axis=2))
        values -= mean[:, :, None]
        spread = np.abs(values).max(axis=2)
        std = np.sqrt(np.square(values).mean(axis=2))
        step = np.maximum(self._betas(shape[0])[:, None, None, None] * std, spread / _QMAX)
        step = np.minimum(np.where(step > 0, step, np.float32(1)), np.float32(MAX_MAGNITUDE))
        step_bits, step = bf16_round_up(step)
        group = self.group_size_tokens
        direct = np.rint(values / step[:, :, None])
        anchors = direct[:, :, ::group] * step[:, :, None]
        delta = np.rint((values - _anchor_offsets(anchors, group, shape[2])) / step[:, :, None])
        use_anchor = (np.abs(delta).sum(axis=2) < np.abs(direct).sum(axis=2)) & (
            np.abs(delta).max(axis=2) <= _QMAX
        )
        symbols = np.where(use_anchor[:, :, None], delta, direct).astype(np.int8)
        frame = zstandard.ZstdCompressor(level=self.zstd_level).compress(symbols.data)
        parts = [
            _PREFIX.pack(group, 0),
            mean_bits.tobytes(),
            step_bits.tobytes(),
            np.packbits(use_anchor.reshape(-1)).tobytes(),
            frame,
        ]
        return np.frombuffer(b"".join(parts), dtype=np.uint8)

    def decode_into(self, header: ChunkHeader, payload: memoryview, out: np.ndarray) -> None:
        if header.dtype not in FLOAT_DTYPES:
            if len(payload) != out.nbytes:
                raise CorruptChunk(f"cachegen payload is {len(payload)} bytes, not {out.nbytes}")
            np.copyto(out, np.frombuffer(payload, dtype=out.dtype).reshape(out.shape))
            return
        shape = canonical_shape(header.shape)
        channels = shape[0] * shape[1] * shape[3] * shape[4]
        frame_at = _PREFIX.size + 4 * channels + (channels + 7) // 8
        if len(payload) < frame_at:
            raise CorruptChunk(f"cachegen payload is {len(payload)} bytes, under {frame_at}")
        group, reserved = _PREFIX.unpack_from(payload)
        if group == 0 or reserved:
            raise CorruptChunk(f"cachegen group size {group} / reserved {reserved} invalid")
        stats_shape = (shape[0], shape[1], 1, shape[3], shape[4])
        mean = read_bf16(payload, _PREFIX.size, channels, what="cachegen means")
        step = read_bf16(payload, _PREFIX.size + 2 * channels, channels, what="cachegen steps")
        if not (step > 0).all():
            raise CorruptChunk("cachegen steps must be positive")
        flags = np.frombuffer(payload[_PREFIX.size + 4 * channels : frame_at], dtype=np.uint8)
        flag_bits = np.unpackbits(flags)
        if flag_bits[channels:].any():
            raise CorruptChunk("cachegen anchor flags have padding bits set")
        symbols = self._symbols(payload[frame_at:], out.size).reshape(shape)
        use_anchor = flag_bits[:channels].reshape(stats_shape).astype(bool)
        mean, step = mean.reshape(stats_shape), step.reshape(stats_shape)
        block = np.empty(shape[1:], dtype=np.float32)
        for layer, view in enumerate(layer_views(out, shape)):
            np.multiply(symbols[layer], step[layer], out=block)
            if use_anchor[layer].any():
                _add_anchor_offsets(block, use_anchor[layer], group)
            block += mean[layer]
            store_float32(block, view, header.dtype)

    @staticmethod
    def _symbols(frame: memoryview, num_values: int) -> np.ndarray:
        try:
            # The frame states its size; check it before zstd allocates that much.
            claimed = zstandard.frame_content_size(frame)
            if claimed != num_values:
                raise CorruptChunk(f"cachegen frame claims {claimed} symbols, not {num_values}")
            raw = zstandard.ZstdDecompressor().decompress(
                frame, max_output_size=num_values, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"cachegen symbols do not decompress: {exc}") from None
        if len(raw) != num_values:
            raise CorruptChunk(f"cachegen frame gave {len(raw)} symbols, not {num_values}")
        return np.frombuffer(raw, dtype=np.int8)
