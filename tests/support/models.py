"""Small random-weight models of each supported family, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

L_TRAIN = 64
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def build(family: str = "llama", rope: dict | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls = FAMILIES[family]
    params = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=L_TRAIN,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(rope or {})},
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if family == "mistral":
        params["sliding_window"] = None
    params.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**params)).eval()
    # random init leaves logits nearly flat; scaling the head makes greedy choices well separated
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model
