"""Tiny random dense checkpoints, one per supported family and layout quirk, built from configs."""

from __future__ import annotations

from pathlib import Path

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

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every weight (norms, biases too) non-trivial values so a dropped tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model.eval()


def configs() -> dict[str, object]:
    return {
        "llama": LlamaConfig(**COMMON, tie_word_embeddings=False),
        "llama_tied": LlamaConfig(**COMMON, tie_word_embeddings=True),
        "llama3_rope": LlamaConfig(**COMMON, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "mistral": MistralConfig(**COMMON, sliding_window=16),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**COMMON, head_dim=32),
    }


MODEL_CLASSES = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
                 "qwen3": Qwen3ForCausalLM}


def build(name: str, folder: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    config = configs()[name]
    cls = MODEL_CLASSES[config.model_type]
    torch.manual_seed(seed)
    model = _randomize(cls(config), seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def build_all(root: Path) -> dict[str, Path]:
    out = {name: build(name, root / name, seed=i) for i, name in enumerate(configs())}
    out["llama_sharded"] = build("llama", root / "llama_sharded", seed=7, max_shard_size="100KB")
    return out
