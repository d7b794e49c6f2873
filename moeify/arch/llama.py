"""Llama (and SmolLM, which is Llama): Mixtral by default, Qwen2-MoE when shared experts are wanted."""

from __future__ import annotations

from typing import Any

from moeify.arch.base import SourceFamily
from moeify.errors import UnsupportedModelError


class Llama(SourceFamily):
    name = "llama"
    model_types = ("llama",)
    default_target = "mixtral"
    targets = ("mixtral", "qwen2_moe")

    def check(self, config: dict[str, Any]) -> None:
        super().check(config)
        if config.get("attention_bias"):
            raise UnsupportedModelError("attention_bias: true (o_proj bias) has no place in the MoE targets",
                                        "only bias-free Llama attention can be converted")

    def choose_target(self, shared: int, requested: str | None) -> str:
        # Mixtral has no shared expert; Qwen2-MoE does, and carries Llama attention with zero q/k/v biases.
        return super().choose_target(shared, requested or ("qwen2_moe" if shared else None))
