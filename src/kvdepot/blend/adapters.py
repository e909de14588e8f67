"""Model-family adapters for blending: the only model-specific code of CacheBlend.

Runs in the engine's process, next to the model. The blender drives the model's own decoder
layers (their projections, norms, RoPE, attention and MLP run unchanged); an adapter only says
where the parts are and how the family's rotary embedding moves keys to another position.
Add a family by writing a `BlendAdapter` and listing its `model_type`s in `ADAPTERS`.

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
    """Access to one model's decoder stack, as the blender needs it."""

    @property
    def layers(self) -> list[torch.nn.Module]:
        """The decoder layers, called as HF decoder layers are (hidden states first)."""
        ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[1, n]` token ids -> `[1, n, hidden]` input hidden states."""
        ...

    def position_embeddings(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) the layers take for `[1, n]` positions."""
        ...

    def rerotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """`[..., n, head_dim]` post-RoPE keys moved `delta` positions later, in place."""
        ...

    def query_attention(
        self, layer: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
        keys: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Mean attention weight each key gets from the query rows `hidden` (`[1, n, hidden]`,
        the layer's input, at `[1, n]` positions) in `layer`, over `keys` (`[H_kv, T, D]`,
        post-RoPE): `[T]`; keys after a row's position get nothing from it."""
        ...


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

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)  # type: ignore[no-any-return]

    def position_embeddings(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.model.model.rotary_emb(hidden, positions)
        return cos, sin

    def rerotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        if delta == 0:
            return keys
        cos, sin = self._rotation(delta, keys.device)
        half = keys.shape[-1] // 2
        k = keys.float()
        first, second = k[..., :half], k[..., half:]
        moved = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        keys.copy_(moved)
        return keys

    def query_attention(
        self, layer: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
        keys: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        block: Any = layer
        attn = block.self_attn
        num_kv_heads, num_keys, head_dim = keys.shape
        projected: torch.Tensor = attn.q_proj(block.input_layernorm(hidden))
        q = projected.view(hidden.shape[1], -1, head_dim).transpose(0, 1)  # [H, n, D]
        cos, sin = self.position_embeddings(hidden, positions)
        half = head_dim // 2
        rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        q = q * cos[0] + rotated * sin[0]
        # Grouped-query attention: the query heads of one KV head share its keys.
        q = q.reshape(num_kv_heads, -1, head_dim).float()
        scores = q @ keys.float().transpose(1, 2) * float(attn.scaling)  # [H_kv, g * n, T]
        rows = positions[0].repeat(q.shape[1] // positions.shape[1])
        future = torch.arange(num_keys, device=keys.device)[None] > rows[:, None]
        scores.masked_fill_(future[None], float("-inf"))
        return scores.softmax(dim=-1).mean(dim=(0, 1))

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
