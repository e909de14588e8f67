"""Model-family adapters for blending: the only model- and engine-specific code of CacheBlend.

Runs in the engine's process, next to the model. The blender drives the model's own decoder
layers (their projections, norms, RoPE and MLP run unchanged); an adapter says where the
parts are, how one layer runs over the tokens in flight, and how the family's rotary
embedding moves keys to another position. This module holds the `BlendAdapter` protocol and
the transformers adapters (a transformers layer runs whole: its attention calls the pass's KV
through the HF cache interface); vLLM's is `kvdepot.connectors.vllm.blend`. Add a
transformers family by writing a `BlendAdapter` and listing its `model_type`s in `ADAPTERS`.

Invariant: `rerotate(keys, delta)` equals the keys computed `delta` positions later, up to
fp32 rounding: RoPE rotates each pair of dimensions by `position * inv_freq`, so rotating by
`delta * inv_freq` composes exactly (the math runs in fp32, angles in fp64). Families whose
angle is not linear in the position (dynamic NTK, YaRN's attention factor, ...) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from kvdepot.errors import KVDepotError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_LINEAR_ROPE_TYPES = frozenset({"default", "linear", "llama3"})


class BlendUnsupported(KVDepotError):
    """This model cannot be blended (family, RoPE variant or cache type not supported)."""


class BlendAdapter(Protocol):
    """One model's decoder stack, as the blend pass drives it.

    The pass carries an opaque per-token `state` between layers (for transformers the hidden
    states `[1, n, hidden]`; for vLLM the (hidden, residual) pair) and never looks inside it.
    """

    @property
    def num_layers(self) -> int:
        """Decoder layers (each with one KV cache layer)."""
        ...

    def embed(self, input_ids: torch.Tensor) -> Any:
        """`[n]` token ids -> the first layer's input state."""
        ...

    def run_layer(
        self, index: int, state: Any, positions: torch.Tensor, mask: torch.Tensor | None,
        cache: KVUpdate,
    ) -> Any:  # fmt: skip
        """Layer `index` on the tokens in flight (`[1, n]` positions): their KV goes through
        `cache.update`, which hands back the keys and values they attend to; `mask` is None
        (every context token in flight: causal) or `[1, 1, n, T]` bool (True: may attend)."""
        ...

    def rows(self, state: Any, index: torch.Tensor) -> Any:
        """The state of the tokens at `index` (positions within the tokens in flight)."""
        ...

    def rerotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """`[..., n, head_dim]` post-RoPE keys moved `delta` positions later, in place."""
        ...

    def query_attention(
        self, index: int, state: Any, positions: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor:
        """Mean attention weight each key gets from the query rows `state` (layer `index`'s
        input, at `[1, n]` positions) in layer `index`, over `keys` (`[H_kv, T, D]`,
        post-RoPE): `[T]`; keys after a row's position get nothing from it."""
        ...


class KVUpdate(Protocol):
    """What attention calls in the pass (`blender.BlendKV`)."""

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: object
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def grouped_attention_weights(
    q: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Mean attention weight per key from post-RoPE queries `q` `[H, n, D]` at positions
    `rows` `[n]` over `keys` `[H_kv, T, D]` (grouped-query attention: the query heads of one
    KV head share its keys); keys after a row's position get nothing from it: `[T]`."""
    num_kv_heads, num_keys, head_dim = keys.shape
    q = q.reshape(num_kv_heads, -1, head_dim).float()
    scores = q @ keys.float().transpose(1, 2) * scaling  # [H_kv, g * n, T]
    rows = rows.repeat(q.shape[1] // rows.shape[0])
    future = torch.arange(num_keys, device=keys.device)[None] > rows[:, None]
    scores.masked_fill_(future[None], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=(0, 1))


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the two halves of the last dim (Llama's "neox" style), in fp32."""
    half = x.shape[-1] // 2
    k = x.float()
    first, second = k[..., :half], k[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


@dataclass
class LlamaAdapter:
    """Llama-family decoders (Llama, SmolLM2, Mistral, Qwen2, ...): `model.model` holds
    `embed_tokens`, `layers` and `rotary_emb`; RoPE rotates the two halves of each head."""

    model: Any

    def __post_init__(self) -> None:
        rotary = getattr(self.model.model, "rotary_emb", None)
        rope_type = getattr(rotary, "rope_type", None)
        if rotary is None or rope_type not in _LINEAR_ROPE_TYPES:
            raise BlendUnsupported(f"RoPE type {rope_type!r} cannot be moved by a rotation")
        if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
            raise BlendUnsupported("RoPE with an attention scaling factor is not supported")
        self._inv_freq = rotary.inv_freq.detach().to("cpu", torch.float64)
        self._rotations: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def layers(self) -> list[torch.nn.Module]:
        return list(self.model.model.layers)

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids.unsqueeze(0))  # type: ignore[no-any-return]

    def run_layer(
        self, index: int, state: Any, positions: torch.Tensor, mask: torch.Tensor | None,
        cache: KVUpdate,
    ) -> Any:  # fmt: skip
        out = self.model.model.layers[index](
            state,
            attention_mask=mask,
            position_ids=positions,
            position_embeddings=self.position_embeddings(state, positions),
            past_key_values=cache,
            use_cache=True,
        )
        return out[0] if isinstance(out, tuple) else out

    def rows(self, state: Any, index: torch.Tensor) -> Any:
        return state.index_select(1, index)

    def position_embeddings(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.model.model.rotary_emb(hidden, positions)
        return cos, sin

    def rerotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        if delta == 0:
            return keys
        cos, sin = self._rotation(delta, keys.device)
        keys.copy_(rotate_halves(keys, cos, sin))
        return keys

    def query_attention(
        self, index: int, state: Any, positions: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor:
        block: Any = self.model.model.layers[index]
        attn = block.self_attn
        head_dim = keys.shape[-1]
        projected: torch.Tensor = attn.q_proj(block.input_layernorm(state))
        q = projected.view(state.shape[1], -1, head_dim).transpose(0, 1)  # [H, n, D]
        cos, sin = self.position_embeddings(state, positions)
        half = head_dim // 2
        rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        q = q * cos[0] + rotated * sin[0]
        return grouped_attention_weights(q, keys, positions[0], float(attn.scaling))

    def _rotation(self, delta: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._rotations.get((delta, device))
        if cached is None:
            angle = delta * self._inv_freq
            cached = (angle.cos().float().to(device), angle.sin().float().to(device))
            if len(self._rotations) > 256:
                self._rotations.clear()
            self._rotations[(delta, device)] = cached
        return cached


ADAPTERS: dict[str, type[LlamaAdapter]] = {
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": LlamaAdapter,
}
"""model_type -> adapter class."""


def adapter_for(model: PreTrainedModel) -> BlendAdapter:
    """The blend adapter of `model`'s family; BlendUnsupported if there is none."""
    model_type = getattr(model.config, "model_type", None)
    factory = ADAPTERS.get(str(model_type))
    if factory is None:
        raise BlendUnsupported(
            f"model family {model_type!r} has no blend adapter (supported: {sorted(ADAPTERS)})"
        )
    return factory(model)
