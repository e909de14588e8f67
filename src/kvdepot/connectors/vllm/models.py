"""vLLM's model classes, recording their instance for the connector (`plugin`).

Imported by vLLM's model registry in its worker process when it builds a model of one of
`plugin.ARCHITECTURES`. Each class is vLLM's own with one addition: once built, it hands
itself to `plugin.remember`. Everything else (weights, forward, compilation) is vLLM's.
"""

from __future__ import annotations

from typing import Any

from vllm.model_executor.models.llama import LlamaForCausalLM

from kvdepot.connectors.vllm.plugin import remember


class KVDepotLlamaForCausalLM(LlamaForCausalLM):  # type: ignore[misc]  # no vLLM stubs
    """vLLM's `LlamaForCausalLM`, recorded for CacheBlend."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        remember(self)
