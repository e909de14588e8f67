"""Announced recipes: how an engine keys its chunks, so a prompt can be looked up by model name.

Runs in the process that owns the `TieredStore` (the daemon, or an embedded engine). A chunk
key is opaque to the store: it mixes the model's fingerprint, the KV layout, the shard and the
tenant into a digest. A router knows none of these; it knows the served model name and the
prompt's token ids. So engines announce a `Recipe` when they open (and again whenever they
reconnect to a restarted daemon): the names the model is served under, the chunk size and
hash, and the namespace of every shard a hit needs (each tensor-parallel rank's). The lookup
API (`answer`) hashes a prompt under each recipe of the model, for one tenant, and reports the
leading run of chunks every shard holds, with the slowest tier each came from.

Invariants:
- Bounded: at most `MAX_RECIPES` recipes, the least recently announced dropped first.
- No secret is kept: a tenant's salt comes with each lookup and is never stored.
- An answer is a hint, like any lookup: a chunk may be evicted right after it is counted. It
  never reads or promotes a chunk, and never counts toward the store's hit statistics.
- A chunk counts only when every shard of the recipe holds it (a lost shard is a miss for
  all), and the run stops at the first chunk that does not: the same rule as the engines'.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from kvdepot.errors import ConfigError
from kvdepot.keys import (
    CacheNamespace,
    ChunkKey,
    HashAlgorithm,
    chain_hashes,
    token_bytes,
)

MAX_RECIPES = 256
"""Recipes kept (model names x setups x engines that differ in shards)."""
MAX_LOOKUP_TOKENS = 1 << 20
"""Longest prompt the lookup API hashes."""


class Shard(msgspec.Struct, frozen=True):
    """One shard's namespace, less the tenant (`kvdepot.keys.CacheNamespace`)."""

    fingerprint: str
    layout_id: str
    rank: int = 0


class Recipe(msgspec.Struct, frozen=True):
    """How an engine keys its chunks (a value; the same on the wire).

    Attributes:
        models: the names the model is looked up by (served names first); never empty.
        chunk_size_tokens: tokens per chunk.
        algorithm: `kvdepot.keys.HashAlgorithm` value.
        shards: every shard a hit needs, rank order (one without tensor parallelism, and one
            for MLA, whose latents are the same on every rank).
    """

    models: tuple[str, ...]
    chunk_size_tokens: int
    algorithm: str
    shards: tuple[Shard, ...]

    def check(self) -> Recipe:
        """Self, after checking it can key a prompt (a peer may send anything)."""
        if not self.models or not all(self.models) or not self.shards:
            raise ConfigError("a recipe needs a model name and at least one shard")
        if not 0 < self.chunk_size_tokens <= 1 << 16:
            raise ConfigError(f"bad chunk size in a recipe: {self.chunk_size_tokens}")
        HashAlgorithm(self.algorithm)  # ValueError when unknown
        return self

    def keys(self, tokens: Sequence[int], tenant_salt: bytes) -> list[list[ChunkKey]]:
        """The keys of every full chunk of `tokens`, per shard (head first)."""
        raw = token_bytes(tokens)
        algorithm = HashAlgorithm(self.algorithm)
        out = []
        for shard in self.shards:
            ns = CacheNamespace(shard.fingerprint, shard.layout_id, shard.rank, tenant_salt,
                                algorithm)  # fmt: skip
            hashes = chain_hashes(raw, self.chunk_size_tokens, ns)
            out.append([ChunkKey(ns.digest, h) for h in hashes])
        return out


class Recipes:
    """The recipes announced to one store (thread-safe, bounded)."""

    def __init__(self, max_recipes: int = MAX_RECIPES) -> None:
        self.max_recipes = max_recipes
        self._recipes: OrderedDict[Recipe, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, recipe: Recipe) -> None:
        with self._lock:
            self._recipes[recipe] = None
            self._recipes.move_to_end(recipe)
            while len(self._recipes) > self.max_recipes:
                self._recipes.popitem(last=False)

    def of(self, model: str) -> list[Recipe]:
        """The recipes that name `model`, the most recently announced first."""
        with self._lock:
            return [r for r in reversed(self._recipes) if model in r.models]

    def models(self) -> list[str]:
        """Every model name announced (for an error that says what is known)."""
        with self._lock:
            return sorted({name for recipe in self._recipes for name in recipe.models})

    def __len__(self) -> int:
        return len(self._recipes)


@dataclass(frozen=True, slots=True)
class Answer:
    """How many leading tokens of a prompt one store holds, and where.

    Attributes:
        cached_tokens: tokens of the leading run of whole chunks every shard holds.
        by_tier: those tokens by the tier each chunk would be read from (for a chunk held
            on several tiers or shards: the slowest of the fastest copies), tier order.
        chunk_size_tokens: the recipe's chunk size.
        prompt_tokens: tokens in the prompt.
    """

    cached_tokens: int
    by_tier: dict[str, int]
    chunk_size_tokens: int
    prompt_tokens: int


def answer(
    recipes: Sequence[Recipe],
    tokens: Sequence[int],
    tenant_salt: bytes,
    where: Callable[[Sequence[ChunkKey]], list[int | None]],
    tier_names: Sequence[str],
) -> Answer | None:
    """The best answer over `recipes` (the longest run), None when there is no recipe.

    `where(keys)` gives, per key, the index in `tier_names` of the fastest tier holding it
    (None: no tier does), e.g. `TieredStore.where`.
    """
    if len(tokens) > MAX_LOOKUP_TOKENS:
        raise ConfigError(f"a lookup takes at most {MAX_LOOKUP_TOKENS} tokens")
    best: Answer | None = None
    for recipe in recipes:
        per_shard = recipe.keys(tokens, tenant_salt)
        tiers = [where(keys) for keys in per_shard]
        by_tier: dict[str, int] = {}
        num_chunks = 0
        for found in zip(*tiers, strict=True):
            if any(t is None for t in found):
                break
            slowest = max(t for t in found if t is not None)
            name = tier_names[slowest]
            by_tier[name] = by_tier.get(name, 0) + recipe.chunk_size_tokens
            num_chunks += 1
        ordered = {n: by_tier[n] for n in tier_names if n in by_tier}
        cached = num_chunks * recipe.chunk_size_tokens
        if best is None or cached > best.cached_tokens:
            best = Answer(cached, ordered, recipe.chunk_size_tokens, len(tokens))
    return best
