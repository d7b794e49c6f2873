"""Qwen3: q/k norms and an explicit head_dim; only Qwen3-MoE carries that attention unchanged."""

from __future__ import annotations

from moeify.arch.base import SourceFamily


class Qwen3(SourceFamily):
    name = "qwen3"
    model_types = ("qwen3",)
    default_target = "qwen3_moe"
    targets = ("qwen3_moe",)
