"""CacheBlend in vLLM: the worker side, where the model and the paged KV live.

A request that carries segments (`kvdepot.blend.blend_request`) reaches the worker as a load
of its blended context (the scheduler side reports it loaded up to the question, and vLLM
computes only what follows). In `start_load_kv`, before vLLM's forward pass, `WorkerBlend`:
1. gets vLLM's model (`plugin.built_model`: vLLM hands a connector no model) and wraps it in
   `VLLMLlamaAdapter`;
2. runs `kvdepot.blend.context.Blending`, the code the transformers path runs: each segment's
   own KV fetched by its segment key (or computed on its own, by the same pass, and stored),
   moved to its position, the selected tokens recomputed through the model's own layers;
3. writes the context's KV into the request's pages (`pages.scatter_pages`).
Any failure raises: the worker reports the request's blocks as failed loads and vLLM
recomputes them (a normal prefill), counted by reason.

The adapter runs vLLM's own modules (embedding, norms, QKV and output projections, rotary
embedding, MLP) eagerly, with attention over the pass's dense context KV in torch
(`scaled_dot_product_attention`, an explicit mask for a subset of tokens): no forward context,
no attention backend, the same code on CPU and GPU. The pass runs outside vLLM's compiled
graphs and token budget (the forward vLLM then runs sees only the question).

Invariants: blended KV is approximate, so it is never stored under prefix keys (the scheduler
plans no save for a blended request) and never reused by vLLM's prefix cache (a blended
request's `cache_salt` is its own); single rank (tensor parallelism: fallback).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch.nn import functional

from kvdepot.blend.adapters import (
    BlendUnsupported,
    KVUpdate,
    grouped_attention_weights,
    rotate_halves,
)
from kvdepot.blend.blender import blend
from kvdepot.blend.context import BlendedKV, Blending
from kvdepot.blend.segments import Segment
from kvdepot.config import BlendConfig
from kvdepot.engine import CacheEngine
from kvdepot.tensors import torch_dtype

logger = logging.getLogger(__name__)

_LINEAR_ROPES = frozenset(
    {"RotaryEmbedding", "LinearScalingRotaryEmbedding", "Llama3RotaryEmbedding"}
)
"""vLLM rotary embeddings whose angle is linear in the position: keys move by a rotation."""


class VLLMLlamaAdapter:
    """`BlendAdapter` over vLLM's Llama-family modules (`model.model.layers[i]` with
    `input_layernorm`, `self_attn.{qkv_proj, rotary_emb, o_proj}`, `post_attention_layernorm`,
    `mlp`). The pass's state is vLLM's (hidden, residual) pair, `[n, hidden]` each."""

    def __init__(self, model: Any) -> None:
        inner: Any = getattr(model, "model", None)
        layers = list(getattr(inner, "layers", None) or ())
        if not layers or not all(_is_llama_layer(layer) for layer in layers):
            raise BlendUnsupported(f"{type(model).__name__} is not a Llama-family decoder")
        self.model = inner
        self.layers = layers
        attn = layers[0].self_attn
        rotary = attn.rotary_emb
        if type(rotary).__name__ not in _LINEAR_ROPES:
            raise BlendUnsupported(f"{type(rotary).__name__} cannot be moved by a rotation")
        if not rotary.is_neox_style or rotary.rotary_dim != attn.head_dim:
            raise BlendUnsupported("only full-width rotate-half RoPE is supported")
        self._rotary = rotary
        self.num_heads, self.num_kv_heads = int(attn.num_heads), int(attn.num_kv_heads)
        self.head_dim = int(attn.head_dim)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.embed_tokens(input_ids), None

    def rows(self, state: Any, index: torch.Tensor) -> Any:
        hidden, residual = state
        return hidden.index_select(0, index), (
            None if residual is None else residual.index_select(0, index)
        )

    def _normed(self, index: int, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s input norm of `state` (vLLM's fused norm may work in place: it
        gets copies, so the pass can still read the layer's input afterwards)."""
        hidden, residual = state
        norm = self.layers[index].input_layernorm
        if residual is None:  # the residual is the input: a copy (fused norms add in place)
            return norm(hidden.clone()), hidden.clone()
        normed, summed = norm(hidden.clone(), residual.clone())
        return normed, summed

    def _qkv(
        self, index: int, normed: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-RoPE queries `[H, n, D]`, keys and values `[H_kv, n, D]`."""
        attn = self.layers[index].self_attn
        qkv, _ = attn.qkv_proj(normed)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q.contiguous(), k.contiguous())
        n = normed.shape[0]
        return (
            q.reshape(n, self.num_heads, self.head_dim).transpose(0, 1),
            k.reshape(n, self.num_kv_heads, self.head_dim).transpose(0, 1),
            v.reshape(n, self.num_kv_heads, self.head_dim).transpose(0, 1),
        )

    def run_layer(
        self, index: int, state: Any, positions: torch.Tensor, mask: torch.Tensor | None,
        cache: KVUpdate,
    ) -> Any:  # fmt: skip
        layer = self.layers[index]
        attn = layer.self_attn
        normed, residual = self._normed(index, state)
        q, k, v = self._qkv(index, normed, positions[0])
        keys, values = cache.update(k[None], v[None], index)  # the context's, [1, H_kv, T, D]
        out = functional.scaled_dot_product_attention(
            q[None].to(keys.dtype), keys, values, attn_mask=mask, is_causal=mask is None,
            scale=float(attn.scaling), enable_gqa=True,
        )  # fmt: skip
        out = out[0].transpose(0, 1).reshape(q.shape[1], self.num_heads * self.head_dim)
        hidden, _ = attn.o_proj(out.to(normed.dtype))
        hidden, residual = layer.post_attention_layernorm(hidden, residual)
        return layer.mlp(hidden), residual

    def query_attention(
        self, index: int, state: Any, positions: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor:
        normed, _ = self._normed(index, state)
        q, _, _ = self._qkv(index, normed, positions[0])
        scaling = float(self.layers[index].self_attn.scaling)
        return grouped_attention_weights(q, keys, positions[0], scaling)

    def rerotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Rotate by vLLM's own table row for `delta`: the rotation vLLM applies at that
        position, in the table's dtype (the model's: bf16 for a bf16 model, as vLLM's own
        keys are rotated), applied in fp32."""
        if delta == 0:
            return keys
        table = self._rotary.cos_sin_cache
        if delta >= table.shape[0]:
            raise BlendUnsupported(f"position {delta} is past the model's RoPE table")
        cos, sin = table[delta].to(keys.device, torch.float32).chunk(2)
        keys.copy_(rotate_halves(keys, cos, sin))
        return keys


def _is_llama_layer(layer: Any) -> bool:
    attn = getattr(layer, "self_attn", None)
    return all(
        hasattr(obj, name)
        for obj, names in (
            (layer, ("input_layernorm", "post_attention_layernorm", "mlp")),
            (attn, ("qkv_proj", "o_proj", "rotary_emb", "q_size", "kv_size", "scaling")),
        )
        for name in names
    )


class WorkerBlend:
    """Blends segmented requests in vLLM's worker process (see the module docstring)."""

    def __init__(self, engine: CacheEngine, config: BlendConfig, model: Any) -> None:
        self.adapter = VLLMLlamaAdapter(model)
        param = next(model.parameters())
        if torch_dtype(engine.layout.dtype) != param.dtype:
            raise BlendUnsupported(
                f"the KV cache holds {engine.layout.dtype.name}, the model computes {param.dtype}"
            )
        self.device = param.device
        self.blending = Blending(
            engine, config, self.own_kv, dtype=param.dtype, device=param.device
        )

    def own_kv(self, tokens: list[int]) -> torch.Tensor:
        """Tokens' KV computed on their own, at positions 0..n-1: `[L, 2, n, H, D]` on CPU.
        The pass with every token forced (the same layers, the same attention)."""
        layout = self.blending.engine.layout
        n = len(tokens)
        kv = torch.zeros(
            (layout.num_layers, 2, layout.num_kv_heads, n, layout.head_dim),
            dtype=self.blending.dtype,
            device=self.device,
        )
        everyone = torch.ones(n, dtype=torch.bool)
        with torch.inference_mode():
            blend(
                self.adapter, torch.as_tensor(tokens), kv,
                candidates=~everyone, forced=everyone, ratio=0.0, check_layer=0,
            )  # fmt: skip
        return kv.permute(0, 1, 3, 2, 4).cpu()

    def context(self, segments: list[Segment], ratio: float, salt: bytes) -> BlendedKV:
        t0 = time.perf_counter()
        blended = self.blending.blend_context(self.adapter, segments, ratio, salt)
        logger.debug(
            "kvdepot: blended %d tokens (%d reused, %d computed, %d recomputed) in %.3f s",
            blended.num_context_tokens, blended.num_reused, blended.num_computed,
            blended.num_recomputed, time.perf_counter() - t0,
        )  # fmt: skip
        return blended
