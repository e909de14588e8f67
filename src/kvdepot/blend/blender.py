"""Selective recompute: fix a cache assembled from separately computed segments.

Runs in the engine's process, on the model's device, inside `torch.inference_mode`. Input: the
context's KV `[L, 2, H, T, D]` (each segment computed on its own, keys already moved to their
positions), which tokens to consider, and which to always compute. The pass (CacheBlend,
EuroSys 2025) runs the model's own decoder layers, through its engine's `BlendAdapter`
(transformers and vLLM models alike: the pass, and so the selection, is the same code):
- layers `0..check_layer` on every context token, replacing their KV with the true KV; at the
  check layer it measures each token's KV deviation (squared L2 of K and V over heads);
- from the next layer on, only the selected tokens (the `ratio` of candidates with the
  highest score, plus the forced ones) go through; their fresh KV is written over the
  reused KV, and they attend to the whole blended context (reused KV for everyone else).
Scores: the deviation (CacheBlend), or, when the context ends with the question's tokens
(`num_query`, forced), the deviation times the attention the question pays each token at the
check layer ("query-aware": a token's error matters as much as the question looks at it).
Invariants: tokens not selected keep their reused KV from the layer after the check layer
on; with ratio 1 the result is a full prefill's KV up to float rounding; the cost is about
`(check_layer + 1 + ratio * (L - check_layer - 1)) / L` of a prefill's layer compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvdepot.blend.adapters import BlendAdapter
from kvdepot.errors import ConfigError


@dataclass(frozen=True, slots=True)
class BlendStats:
    """What one pass did: tokens computed past the check layer (`selected`, sorted context
    positions: the recomputed candidates and the forced tokens), and the check layer."""

    num_selected: int
    num_candidates: int
    check_layer: int
    selected: torch.Tensor


class BlendKV:
    """The context's KV while the pass runs the model's layers (for transformers layers it
    stands in for the HF cache object).

    `update(k, v, layer)` is the one method attention calls, with `[1, H, n, D]` keys and
    values of the tokens in flight: it writes them into the context's KV and hands back the
    whole context's KV, `[1, H, T, D]` each.
    """

    def __init__(self, kv: torch.Tensor, check_layer: int) -> None:
        self.kv = kv
        self.check_layer = check_layer
        self.selected: torch.Tensor | None = None  # None: every token is in flight
        self.deviation: torch.Tensor | None = None

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.kv[layer_idx, 0], self.kv[layer_idx, 1]  # [H, T, D]
        new_k, new_v = keys[0].to(old_k.dtype), values[0].to(old_v.dtype)
        if self.selected is None:
            if layer_idx == self.check_layer:
                k_dev = (new_k.float() - old_k.float()).square().sum(dim=(0, 2))
                v_dev = (new_v.float() - old_v.float()).square().sum(dim=(0, 2))
                self.deviation = k_dev + v_dev
            old_k.copy_(new_k)
            old_v.copy_(new_v)
        else:
            old_k.index_copy_(1, self.selected, new_k)
            old_v.index_copy_(1, self.selected, new_v)
        return old_k.unsqueeze(0), old_v.unsqueeze(0)


def select_tokens(
    score: torch.Tensor, candidates: torch.Tensor, forced: torch.Tensor, ratio: float
) -> torch.Tensor:
    """Sorted positions: the `ratio` of `candidates` with the highest score, and `forced`."""
    num_select = round(ratio * int(candidates.sum()))
    score = score.float().masked_fill(~candidates, float("-inf"))
    chosen = forced.clone()
    if num_select > 0:
        chosen[torch.topk(score, num_select).indices] = True
    return chosen.nonzero().flatten()


def blend(
    adapter: BlendAdapter,
    input_ids: torch.Tensor,
    kv: torch.Tensor,
    *,
    candidates: torch.Tensor,
    forced: torch.Tensor,
    ratio: float,
    check_layer: int = 1,
    num_query: int = 0,
) -> BlendStats:
    """Recompute part of the context's KV in place (see the module docstring).

    Args:
        input_ids: the context's `[T]` token ids.
        kv: `[L, 2, H, T, D]`, the assembled context KV; updated in place.
        candidates: `[T]` bool, tokens that may be selected (reused at a new position).
        forced: `[T]` bool, tokens always computed (their `kv` entries may hold anything).
        ratio: fraction of the candidates to recompute, 0..1.
        check_layer: layer at which deviations are measured; layers up to it are computed
            for every token.
        num_query: the context's last `num_query` tokens are the question (forced): weigh
            each token's deviation by the attention they pay it (0: deviation alone).
    """
    num_layers = adapter.num_layers
    num_tokens = input_ids.shape[0]
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"recompute ratio must be within 0..1, got {ratio}")
    if not 0 <= check_layer < num_layers:
        raise ConfigError(f"check_layer must be within 0..{num_layers - 1}, got {check_layer}")
    if not 0 <= num_query <= num_tokens or not bool(forced[num_tokens - num_query :].all()):
        raise ConfigError("the last num_query context tokens must exist and be forced")
    if kv.shape[0] != num_layers or kv.shape[3] != num_tokens:
        raise ConfigError(f"KV {list(kv.shape)} does not cover {num_tokens} tokens of the model")
    device = kv.device
    cache = BlendKV(kv, check_layer)
    positions = torch.arange(num_tokens, device=device).unsqueeze(0)
    state = adapter.embed(input_ids.to(device))
    selected = torch.arange(num_tokens, device=device)
    rows: torch.Tensor | None = None  # None: every token in flight, plain causal attention
    for index in range(num_layers):
        layer_input = state
        state = adapter.run_layer(index, state, positions, rows, cache)
        if index == check_layer:
            assert cache.deviation is not None
            score = cache.deviation
            if num_query > 0:
                last = torch.arange(num_tokens - num_query, num_tokens, device=device)
                score = score * adapter.query_attention(
                    index, adapter.rows(layer_input, last), positions[:, -num_query:],
                    kv[index, 0],
                )  # fmt: skip
            selected = select_tokens(score, candidates.to(device), forced.to(device), ratio)
            if selected.numel() == 0:
                break
            cache.selected = selected
            if selected.numel() == num_tokens:  # every token goes on: plain causal attention
                continue
            state = adapter.rows(state, selected)
            positions = positions.index_select(1, selected)
            # A selected token at position p attends to every context position <= p.
            keys = torch.arange(num_tokens, device=device)
            rows = (keys.unsqueeze(0) <= selected.unsqueeze(1))[None, None]
    return BlendStats(int(selected.numel()), int(candidates.sum()), check_layer, selected)
