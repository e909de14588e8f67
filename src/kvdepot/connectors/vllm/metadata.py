"""What the scheduler side tells the worker side each step, and per-request state.

`KVDepotMetadata` is built in vLLM's scheduler process (EngineCore) and read in the worker
process; `RequestState` lives in the scheduler only. The helpers read a vLLM `Request`: its
cacheable prompt, tenant salt and per-request opt-outs (`kv_transfer_params`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvdepot.blend.segments import BLEND_SALT_MARK
from kvdepot.logutil import RateLimitedLog

if TYPE_CHECKING:
    from vllm.v1.request import Request


@dataclass(slots=True)
class RequestTransfer:
    """One request's work in one step.

    Attributes:
        req_id: vLLM's request id.
        token_ids: the prompt; for a finished request, the prompt and the generated tokens
            whose KV was computed.
        tenant_salt: the request's `cache_salt` (and LoRA adapter), as bytes (`tenant_salt`).
        block_ids: the request's block table per KV cache group, in token order; a
            sliding-window group's blocks before its window are vLLM's null block (0).
        load_start, load_end: tokens whose KV to load; empty when equal.
        save_start, save_end: tokens whose KV to store (`save_start` on a chunk boundary,
            `save_end` too unless it is the end of `token_ids`); empty when equal.
        is_finished: the request has finished and vLLM holds its blocks until the worker
            reports this save done (`get_finished`), even if it fails.
        is_async: the load is vLLM's asynchronous kind (the request waits outside the
            batch until the worker reports it received, or failed: several KV cache groups).
        blend: the load is a blended context (CacheBlend): how to build it.
    """

    req_id: str
    token_ids: list[int]
    tenant_salt: bytes
    block_ids: list[list[int]]
    load_start: int = 0
    load_end: int = 0
    save_start: int = 0
    save_end: int = 0
    is_finished: bool = False
    is_async: bool = False
    blend: BlendLoad | None = None


@dataclass(slots=True)
class BlendLoad:
    """A segmented request's context, to blend (`kvdepot.connectors.vllm.blend`).

    Attributes:
        lengths: its segments' lengths, in prompt order (they cover the prompt).
        reuse: which segments are reusable (the last, the question, is not).
        ratio: the share of reused tokens to recompute.
    """

    lengths: list[int]
    reuse: list[bool]
    ratio: float


@dataclass
class KVDepotMetadata(KVConnectorMetadata):  # type: ignore[misc]  # Any without vLLM stubs
    """What the worker side does in one step."""

    requests: list[RequestTransfer] = field(default_factory=list)
    num_step_tokens: int = 0  # tokens vLLM computes in this step (all requests)


@dataclass(slots=True)
class RequestState:
    """Scheduler-side state of one live request."""

    token_ids: list[int]
    tenant_salt: bytes
    num_saved_tokens: int  # prompt tokens known to be in kvdepot
    is_storing: bool = True  # the request did not opt out of stores
    block_ids: list[list[int]] = field(default_factory=list)  # per KV cache group
    num_load_tokens: int = 0  # external tokens granted, loaded in the next step
    num_expected_tokens: int = 0  # computed tokens after the last planned step
    blend: BlendLoad | None = None  # a blended request: its context is built, never stored


def cacheable_prompt(request: Request) -> list[int] | None:
    """The prompt, or None for requests whose KV is not a function of their tokens and salt
    (`tenant_salt`): prompt embeddings instead of tokens, multimodal inputs without an
    identity (`uncacheable_reason` says which)."""
    return None if uncacheable_reason(request) else list(request.prompt_token_ids)


def uncacheable_reason(request: Request) -> str | None:
    """Why vLLM alone must serve the request (a metric label), or None."""
    if getattr(request, "prompt_embeds", None) is not None or request.prompt_token_ids is None:
        return "prompt-embeds"
    for feature in request.mm_features or ():
        if (
            not getattr(feature, "identifier", None)
            or getattr(feature, "mm_position", None) is None
        ):
            return "multimodal-unhashed"
    return None


def opts_in(request: Request, name: str, log: RateLimitedLog) -> bool:
    """The request's `kv_transfer_params["kvdepot.<name>"]` (load, store); true by default."""
    params = getattr(request, "kv_transfer_params", None) or {}
    value = params.get(f"kvdepot.{name}", True)
    if not isinstance(value, bool):
        key, message = f"param-{name}", "kvdepot: kv_transfer_params['kvdepot.%s'] %r ignored"
        log.warning(key, message + ": it must be true or false", name, value)
        return True
    return value


def tenant_salt(request: Request, adapter: str | None = None) -> bytes:
    """What keeps a request's keys apart from other requests' with the same tokens: its
    `cache_salt`; for a LoRA request its adapter's fingerprint (`lora`); for a multimodal
    request each input's identity (vLLM's hash of the item) and place in the prompt, since
    the placeholder tokens of two images are the same tokens. A plain request's salt is its
    `cache_salt` in UTF-8, which never holds a 0xff byte, so no `cache_salt` can spell the
    salt of a LoRA or multimodal request."""
    # A segmented request's salt ends with a nonce (`blend_request`) that keeps vLLM's own
    # prefix cache from sharing its blocks; served without blending, its KV is exact and is
    # keyed by its tenant, as the tenant's other requests are.
    salt = (request.cache_salt or "").split(BLEND_SALT_MARK, 1)[0].encode()
    parts = [] if adapter is None else [f"lora:{adapter}"]
    features = sorted(request.mm_features or (), key=lambda f: f.mm_position.offset)
    parts += [
        f"mm:{f.modality}:{f.identifier}@{f.mm_position.offset}+{f.mm_position.length}"
        for f in features
    ]
    if not parts:
        return salt
    return b"\xff" + b"\xff".join(part.encode() for part in parts) + b"\xff" + salt


NULL_BLOCK = 0
"""vLLM's null block: a sliding-window group's table holds it for blocks out of its window."""


def first_live_token(block_ids: list[int], block_size: int) -> int:
    """The first token whose block is not the null block (sliding-window groups drop the
    blocks before their window; full attention keeps all)."""
    for i, block in enumerate(block_ids):
        if block != NULL_BLOCK:
            return i * block_size
    return len(block_ids) * block_size
