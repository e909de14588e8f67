"""vLLM plugin: hands the model vLLM builds to the connector, for CacheBlend.

Loaded by vLLM in each of its processes through the `vllm.general_plugins` entry point
(vLLM's documented plugin mechanism; `VLLM_PLUGINS` selects plugins by name, `kvdepot`
here). vLLM gives a KV connector the paged KV tensors but never the model, and the blend
pass (`kvdepot.connectors.vllm.blend`) runs the model's layers. So `register` registers, in
vLLM's model registry (`ModelRegistry.register_model`, which lets a plugin override an
architecture), a subclass of vLLM's own Llama class whose one addition is to record the
instance (`models.KVDepotLlamaForCausalLM`). Nothing of vLLM is edited or patched: the
subclass runs vLLM's code unchanged, with or without the connector. `KVDEPOT_VLLM_PLUGIN=0`
turns the override off (blending then falls back, counted as `no-model`).

Runs in vLLM's processes; the worker process is the one that builds the model. Holds weak
references only: a model vLLM drops is not kept alive.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

logger = logging.getLogger(__name__)

ARCHITECTURES = {"LlamaForCausalLM": "kvdepot.connectors.vllm.models:KVDepotLlamaForCausalLM"}
"""vLLM architectures whose model the connector can blend with, and their recording class."""

_models: list[weakref.ref[Any]] = []


def register() -> None:
    """The entry point: register the recording subclasses (never raises: a plugin that
    failed must not stop vLLM)."""
    if os.environ.get("KVDEPOT_VLLM_PLUGIN", "1") == "0":
        return
    try:
        from vllm import ModelRegistry

        for arch, cls in ARCHITECTURES.items():
            ModelRegistry.register_model(arch, cls)
    except Exception as exc:
        logger.warning("kvdepot: vLLM plugin not registered (no CacheBlend): %s", exc)


def remember(model: Any) -> None:
    """Called by a recording subclass when vLLM has built it."""
    _models[:] = [ref for ref in _models if ref() is not None]
    _models.append(weakref.ref(model))


def built_models() -> list[Any]:
    """The models vLLM built in this process and still holds, latest first (a process may
    hold several engines; the worker picks its own by its KV caches)."""
    return [model for ref in reversed(_models) if (model := ref()) is not None]
