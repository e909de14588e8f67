"""What the scheduler side tells the worker side each step, and per-request state.

`KVDepotMetadata` is built in vLLM's scheduler process (EngineCore) and read in the worker
process; `RequestState` lives in the scheduler only. The helpers read a vLLM `Request`: its
cacheable prompt, tenant salt and per-request opt-outs (`kv_transfer_params`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

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
        block_ids: the request's block table (KV cache group 0), in token order.
        load_start, load_end: tokens whose KV to load; empty when equal.
        save_start, save_end: tokens whose KV to store (`save_start` on a chunk boundary,
            `save_end` too unless it is the end of `token_ids`); empty when equal.
        is_finished: the request has finished and vLLM holds its blocks until the worker
            reports this save done (`get_finished`), even if it fails.
    """

    req_id: str
    token_ids: list[int]
    tenant_salt: bytes
    block_ids: list[int]
    load_start: int = 0
    load_end: int = 0
    save_start: int = 0
    save_end: int = 0
    is_finished: bool = False


@dataclass
class KVDepotMetadata(KVConnectorMetadata):  # type: ignore[misc]  # Any without vLLM stubs
    """What the worker side does in one step."""

    requests: list[RequestTransfer] = field(default_factory=list)


@dataclass(slots=True)
class RequestState:
    """Scheduler-side state of one live request."""

    token_ids: list[int]
    tenant_salt: bytes
    num_saved_tokens: int  # prompt tokens known to be in kvdepot
    is_storing: bool = True  # the request did not opt out of stores
    block_ids: list[int] = field(default_factory=list)
    num_load_tokens: int = 0  # external tokens granted, loaded in the next step
    num_expected_tokens: int = 0  # computed tokens after the last planned step


def cacheable_prompt(request: Request) -> list[int] | None:
    """The prompt, or None for requests whose KV is not a function of tokens alone."""
    if request.prompt_token_ids is None or request.mm_features:
        return None
    if getattr(request, "prompt_embeds", None) is not None:
        return None
    return list(request.prompt_token_ids)


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
    `cache_salt` and, for a LoRA request, its adapter's fingerprint (`lora`). A base request's
    salt is its `cache_salt` in UTF-8, which never holds a 0xff byte, so no `cache_salt` can
    spell a LoRA request's salt."""
    salt = (request.cache_salt or "").encode()
    if adapter is None:
        return salt
    return b"\xfflora:" + adapter.encode() + b"\xff" + salt
