"""The connector's settings: kvdepot config from vLLM's, model identity, KV layout checks.

Runs in both vLLM processes (scheduler and worker); each side builds the same
`ConnectorSettings` from vLLM's config, so keys agree across processes.

Chunk size: unless `kv_connector_extra_config` sets `chunk_size_tokens`, a chunk is the
smallest multiple of vLLM's KV block size that holds at least `MIN_CHUNK_TOKENS` (128 tokens
with the CPU backend's 128-token blocks, 8 blocks of 16 on GPU). A new prompt that shares a
prefix with a stored one recomputes the tokens past its last whole shared chunk: on CPU at
most one block, as vLLM's own prefix cache does. An explicit size wins, and must be a
multiple of the block size, so that chunk boundaries fall on block boundaries.

Tensor parallelism: each rank holds its own KV heads, so a chunk is stored as one shard per
rank, under keys that carry the rank and the world size (`shard_names`). The scheduler counts
a chunk as hit only when every rank's shard of it is there (`SchedulerSide`), so a rank that
lost its shard makes the chunk a miss for all ranks, never a mix of cached and recomputed
heads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xxhash
from vllm.v1.kv_cache_interface import FullAttentionSpec

from kvdepot.config import KVDepotConfig, load_config
from kvdepot.connectors.vllm.pages import cpu_attention_isa
from kvdepot.engine import CacheEngine
from kvdepot.errors import ConfigError, KVDepotError
from kvdepot.keys import HashAlgorithm
from kvdepot.layout import KVLayout
from kvdepot.store import ChunkStore
from kvdepot.tensors import dtype_from_torch

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

CONNECTOR_KEYS = ("model_fingerprint",)
"""Keys of `kv_connector_extra_config` that are not `KVDepotConfig` overrides."""
_SAMPLE_BYTES = 1 << 20
MIN_CHUNK_TOKENS = 128
"""The default chunk is the smallest multiple of vLLM's block size with at least this many
tokens: smaller chunks mean more keys per prompt, larger ones more recompute on a shared
prefix."""


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """What both sides of the connector share, fixed at start.

    Attributes:
        config: kvdepot's config (from `kv_connector_extra_config`).
        layout: the model's KV layout (one KV cache group, full attention).
        layer_names: vLLM's attention layers, in layer order.
        block_size: vLLM's block size, in tokens.
        cpu_isa: the CPU attention kernel family; None off CPU.
        is_token_exact: page rows are tokens (partial pages and tails can move).
        socket_path: where an embedded worker of TP rank 0 serves its store to the
            scheduler (`rank_socket_path` for the others).
        model: (model, revision), for the default fingerprint.
        fingerprint: an explicit model fingerprint, or None.
        tp_size: vLLM's tensor-parallel world size; each rank stores its own shard.
        group_layers: per KV cache group (vLLM's hybrid allocator: full-attention and
            sliding-window layers in groups of their own), its layers' indices in
            `layer_names`; one group of all layers for most models.
        windowed_groups: per group, whether it is sliding-window attention (its table
            holds vLLM's null block for blocks before its window).
        is_mla: multi-head latent attention: one latent row per token and layer (its two
            halves in the chunk's K and V places), the same on every TP rank, so stored once
            under keys without a rank.
        kv_cache_dtype: vLLM's `kv_cache_dtype` when the KV cache is quantized (fp8,
            fp8_e4m3, fp8_e5m2; per-tensor scales), else "": it enters the keys, since the
            pages hold bytes in that format (`layout.dtype` is uint8 then).
        served_names: the model's served names and its path: what routers look it up by.
    """

    config: KVDepotConfig
    layout: KVLayout
    layer_names: list[str]
    block_size: int
    cpu_isa: str | None
    is_token_exact: bool
    socket_path: Path
    model: tuple[str, str | None]
    fingerprint: str | None
    tp_size: int = 1
    group_layers: list[list[int]] = field(default_factory=list)
    windowed_groups: list[bool] = field(default_factory=list)  # sliding-window groups
    is_mla: bool = False  # one latent per token, the same on every TP rank
    kv_cache_dtype: str = ""  # a quantized KV cache's format (it enters the keys)
    served_names: tuple[str, ...] = ()  # what routers call the model (`kvdepot.namespaces`)
    blend_blocker: str = ""  # an engine feature CacheBlend cannot run beside (a metric label)

    @property
    def num_groups(self) -> int:
        return max(len(self.group_layers), 1)

    @classmethod
    def from_vllm(
        cls, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig
    ) -> ConnectorSettings:
        """Parse and check; ConfigError for what kvdepot does not support."""
        transfer = vllm_config.kv_transfer_config
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise ConfigError(
                "kvdepot's vLLM connector does not support pipeline parallelism "
                f"(pipeline_parallel_size={parallel.pipeline_parallel_size}); use tensor "
                "parallelism, which it supports"
            )
        layout, groups, spec = kv_layout(kv_cache_config)
        layer_names = sorted((name for group in groups for name in group), key=layer_order)
        group_layers = [sorted(layer_names.index(name) for name in group) for group in groups]
        windowed = [
            attention_kind(group.kv_cache_spec) != "full attention"
            for group in kv_cache_config.kv_cache_groups
        ]
        block_size = int(spec.block_size)
        extra = transfer.kv_connector_extra_config
        config, fingerprint = connector_config(extra, block_size)
        is_mla = attention_kind(spec) == MLA
        cpu_isa = None if is_mla else cpu_attention_isa(spec.dtype, block_size, int(spec.head_size))
        # Off CPU (NHD/HND), with CPU_ATTN's fp32 "vec" kernels, and MLA, a page row is a token.
        is_token_exact = cpu_isa is None or (cpu_isa == "vec" and spec.dtype == torch.float32)
        model = (vllm_config.model_config.model, vllm_config.model_config.revision)
        socket_path = embedded_socket_path(config, str(transfer.engine_id))
        kv_cache_dtype = quantized_kv_format(vllm_config, spec)
        return cls(config, layout, layer_names, block_size, cpu_isa, is_token_exact,
                   socket_path, model, fingerprint, int(parallel.tensor_parallel_size),
                   group_layers, windowed, is_mla, kv_cache_dtype,
                   served_names(vllm_config.model_config),
                   blend_blocker(vllm_config, kv_cache_dtype))  # fmt: skip

    @property
    def shard_names(self) -> list[str]:
        """What each TP rank's chunks are called in their keys: one name per rank, or one
        empty name without tensor parallelism."""
        if self.tp_size == 1:
            return [""]
        if self.is_mla:  # every rank holds the same latents: one copy, read by all
            return [""] * self.tp_size
        return [f"tp{rank}of{self.tp_size}" for rank in range(self.tp_size)]

    def rank_socket_path(self, rank: int) -> Path:
        """Where an embedded worker of TP rank `rank` serves its store."""
        return rank_socket_path(self.socket_path, rank)

    def make_engine(self, store: ChunkStore, rank: int = 0) -> CacheEngine:
        """A `CacheEngine` over `store` with the keys of this model's shard on TP rank `rank`."""
        fingerprint = self.fingerprint or model_fingerprint(*self.model)
        if not self.is_token_exact:  # chunks hold pages in this kernel's own format
            fingerprint += f":pages-cpu-{self.cpu_isa}"
        if self.is_mla:
            fingerprint += ":mla"
        if self.kv_cache_dtype:
            fingerprint += f":kv-{self.kv_cache_dtype}"
        if shard := self.shard_names[rank]:
            fingerprint += f":{shard}"
        return CacheEngine(
            store,
            self.layout,
            fingerprint,
            chunk_size_tokens=self.config.chunk_size_tokens,
            hash_algorithm=HashAlgorithm(self.config.hash_algorithm),
            partial_match=self.config.partial_match and self.is_token_exact,
            min_partial_tokens=self.config.partial_match_min_tokens,
            names=self.served_names,
        )


def served_names(model_config: Any) -> tuple[str, ...]:
    """vLLM's served model names (`--served-model-name`, one or a list), then the model."""
    served = getattr(model_config, "served_model_name", None) or []
    names = [served] if isinstance(served, str) else list(served)
    return tuple(dict.fromkeys(str(n) for n in [*names, model_config.model] if n))


def connector_config(
    extra: Mapping[str, object], block_size: int | None = None
) -> tuple[KVDepotConfig, str | None]:
    """(kvdepot config, explicit model fingerprint) from `kv_connector_extra_config`.

    Args:
        extra: vLLM's `kv_connector_extra_config`.
        block_size: vLLM's KV block size in tokens; when given, `chunk_size_tokens` defaults
            to `aligned_chunk_size(block_size)`, and an explicit one must be a multiple of it.
    """
    overrides: dict[str, object] = {}

    def flatten(tree: Mapping[str, object], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                flatten(value, f"{prefix}{key}.")
            else:
                overrides[f"{prefix}{key}"] = value

    flatten({k: v for k, v in extra.items() if k not in CONNECTOR_KEYS}, "")
    fingerprint = extra.get("model_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ConfigError("kv_connector_extra_config.model_fingerprint must be a string")
    config = load_config(overrides=overrides)
    if block_size is None:
        return config, fingerprint
    is_explicit = any(k.replace("-", "_") == "chunk_size_tokens" for k in overrides)
    if not is_explicit:
        return replace(config, chunk_size_tokens=aligned_chunk_size(block_size)), fingerprint
    if config.chunk_size_tokens % block_size:
        raise ConfigError(
            f"chunk_size_tokens {config.chunk_size_tokens} must be a multiple of vLLM's KV "
            f"block size {block_size} (e.g. {aligned_chunk_size(block_size)}), or left out "
            "to get that default"
        )
    return config, fingerprint


def aligned_chunk_size(block_size: int) -> int:
    """The default chunk size: the smallest multiple of `block_size` >= `MIN_CHUNK_TOKENS`."""
    return cdiv(MIN_CHUNK_TOKENS, block_size) * block_size


def model_fingerprint(model: str, revision: str | None = None) -> str:
    """Identity of vLLM's weights, the same in every process that reads them.

    A local folder: its config.json and, per weight file, its size and three 1 MiB samples
    (start, middle, end), so fine-tunes of one base differ. A hub name: name and revision.
    """
    path = Path(model)
    if not (path / "config.json").is_file():
        return f"vllm:{model}@{revision or 'main'}"
    config = json.loads((path / "config.json").read_text())
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    digest = xxhash.xxh3_128(json.dumps(config, sort_keys=True).encode())
    for file in sorted([*path.glob("*.safetensors"), *path.glob("*.bin")]):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            for offset in (0, max(size // 2 - _SAMPLE_BYTES // 2, 0), max(size - _SAMPLE_BYTES, 0)):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_BYTES))
    return f"vllm:{config.get('model_type', 'model')}:{digest.hexdigest()}"


def kv_layout(
    kv_cache_config: KVCacheConfig,
) -> tuple[KVLayout, list[list[str]], FullAttentionSpec]:
    """(layout of all attention layers, each KV cache group's layer names, the first group's
    spec); ConfigError when not supported.

    Several groups (vLLM's hybrid allocator) are supported when every group holds full or
    sliding-window attention layers of one shape (KV heads, head size, dtype, block size). A
    chunk then holds every layer's KV; each group loads what vLLM keeps for it (a
    sliding-window group: its window).
    """
    groups = kv_cache_config.kv_cache_groups
    specs = [group.kv_cache_spec for group in groups]
    if len(specs) == 1 and attention_kind(specs[0]) == MLA:
        return mla_layout(groups[0])
    for spec in specs:
        if (kind := attention_kind(spec)) not in WINDOWED_KINDS:
            raise ConfigError(
                f"kvdepot's vLLM connector does not support {kind}; it supports full and "
                "sliding-window attention"
            )
        if spec.kv_quant_mode.name not in SUPPORTED_KV_QUANT:
            raise ConfigError(
                "kvdepot's vLLM connector supports fp8 KV caches with per-tensor scales, not "
                f"{spec.kv_quant_mode.name} (stored as {spec.dtype}): use kv_cache_dtype "
                "'auto' or 'fp8'"
            )
    shapes = {(s.num_kv_heads, s.head_size, s.dtype, s.block_size) for s in specs}
    if len(shapes) != 1:
        raise ConfigError(
            "kvdepot's vLLM connector needs every KV cache group to have the same KV heads, "
            f"head size, dtype and block size; this model's groups have {sorted(map(str, shapes))}"
        )
    spec = specs[0]
    try:
        dtype = dtype_from_torch(spec.dtype)
    except KVDepotError as exc:
        raise ConfigError(f"KV cache dtype not supported: {exc}") from None
    names = [list(group.layer_names) for group in groups]
    layout = KVLayout(sum(map(len, names)), spec.num_kv_heads, spec.head_size, dtype)
    return layout, names, spec


WINDOWED_KINDS = ("full attention", "sliding-window attention")
SUPPORTED_KV_QUANT = ("NONE", "FP8_PER_TENSOR")
"""vLLM KV quantization modes the connector stores: none, and fp8 with one scale per layer
tensor (the scales are the checkpoint's, a function of the weights the fingerprint covers)."""


def quantized_kv_format(vllm_config: VllmConfig, spec: Any) -> str:
    """The quantized KV cache's format for the keys ("" when not quantized); ConfigError for
    scales that are not a function of the weights: computed from each engine's first batch
    (`calculate_kv_scales`), they differ between engines, so equal tokens would not mean
    equal KV bytes."""
    if spec.kv_quant_mode.name == "NONE":
        return ""
    cache = getattr(vllm_config, "cache_config", None)
    if getattr(cache, "calculate_kv_scales", False):
        raise ConfigError(
            "kvdepot's vLLM connector cannot key an fp8 KV cache whose scales each engine "
            "computes from its first batch (calculate_kv_scales=True): turn it off (the "
            "checkpoint's scales, or 1.0, are the same in every engine)"
        )
    return str(getattr(cache, "cache_dtype", "fp8"))


MLA = "multi-head latent attention (MLA)"


def mla_layout(group: Any) -> tuple[KVLayout, list[list[str]], Any]:
    """MLA: a latent row of `head_size` values per token and layer, kept as two halves."""
    spec = group.kv_cache_spec
    if spec.kv_quant_mode.name != "NONE" or spec.head_size % 2 or spec.num_kv_heads != 1:
        raise ConfigError(
            f"kvdepot's vLLM connector supports unquantized MLA latents of an even size, "
            f"not {spec.kv_quant_mode.name} x {spec.head_size}"
        )
    try:
        dtype = dtype_from_torch(spec.dtype)
    except KVDepotError as exc:
        raise ConfigError(f"KV cache dtype not supported: {exc}") from None
    names = list(group.layer_names)
    return KVLayout(len(names), 1, spec.head_size // 2, dtype), [names], spec


def attention_kind(spec: object) -> str:
    """What a vLLM KV cache spec holds, in words (for messages and refusals)."""
    name = type(spec).__name__
    if "Mamba" in name:
        return "state-space (Mamba) layers, whose per-request state is not KV"
    if "MLA" in name:
        return MLA
    if getattr(spec, "sliding_window", None):
        return "sliding-window attention"
    if getattr(spec, "attention_chunk_size", None):
        return "chunked local attention"
    if name not in ("FullAttentionSpec", "SlidingWindowSpec", "ChunkedLocalAttentionSpec"):
        return f"{name} layers"
    if getattr(spec, "head_size_v", None) not in (None, getattr(spec, "head_size", None)):
        return "K and V of different head sizes"
    return "full attention"


def blend_blocker(vllm_config: VllmConfig, kv_cache_dtype: str) -> str:
    """Why this engine cannot blend (a metric label), or "": LoRA layers apply the previous
    batch's adapter mapping outside a forward pass; a speculative decoder builds a second
    model; a quantized KV cache holds another dtype than the pass computes."""
    if getattr(vllm_config, "lora_config", None) is not None:
        return "lora-engine"
    if getattr(vllm_config, "speculative_config", None) is not None:
        return "speculative"
    if kv_cache_dtype:
        return "quantized-kv"
    return ""


def embedded_socket_path(config: KVDepotConfig, engine_id: str) -> Path:
    """Where an embedded worker serves its store to its scheduler (and to `kvdepot stats`)."""
    digest = hashlib.blake2b(engine_id.encode(), digest_size=6).hexdigest()
    return Path(config.daemon.socket_path).parent / f"vllm-{digest}.sock"


def rank_socket_path(socket_path: Path, rank: int) -> Path:
    """TP rank `rank`'s embedded socket: rank 0's path, suffixed for the other ranks."""
    return socket_path if rank == 0 else socket_path.with_name(f"{socket_path.stem}-r{rank}.sock")


def layer_order(name: str) -> tuple[int, str]:
    digits = [int(part) for part in name.split(".") if part.isdigit()]
    return (digits[0] if digits else -1, name)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
