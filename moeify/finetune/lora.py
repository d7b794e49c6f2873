"""LoRA for the experts (and optionally attention) through peft, merged back before the output is written.

transformers 5 keeps experts as fused 3-D parameters, which peft adapts with `target_parameters`
(one low-rank update per expert); the shared expert and attention are plain linear modules. Routers are
never LoRA'd: they are tiny and train fully. The merged model has exactly the original parameters, so
export writes a plain checkpoint with no adapter files.
"""

from __future__ import annotations

import torch

from moeify.arch.names import (
    FUSED_EXPERT_PARAMETERS,
    SHARED_EXPERT_PROJECTIONS,
    has_shared_expert,
    is_router_parameter,
)
from moeify.errors import InputError

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
SHARED = SHARED_EXPERT_PROJECTIONS
EXPERT_PARAMETERS = FUSED_EXPERT_PARAMETERS
DEFAULT_ATTENTION_RANK = 16


def add_lora(model: torch.nn.Module, rank: int, attention: bool) -> torch.nn.Module:
    """Wrap `model` with peft LoRA adapters; keeps routers (and fully-trained experts) trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise InputError("--lora and --attention-lora need peft", "pip install 'moeify[train]' (or peft)") from e
    r = rank or DEFAULT_ATTENTION_RANK
    modules = (ATTENTION if attention else []) + (SHARED if rank and _has_shared(model) else [])
    params = EXPERT_PARAMETERS if rank else []
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", target_modules=modules or None,
                        target_parameters=params or None)
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        base = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if is_router_parameter(name):
            p.requires_grad_(True)
        elif not rank and base in trainable_before:  # experts train fully when only attention is LoRA'd
            p.requires_grad_(True)
    return peft_model


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    return model.merge_and_unload()


def _has_shared(model: torch.nn.Module) -> bool:
    return has_shared_expert(n for n, _ in model.named_parameters())
