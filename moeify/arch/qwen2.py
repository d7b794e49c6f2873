"""Qwen2 / Qwen2.5: q/k/v biases and optional sliding window, both of which Qwen2-MoE has too."""

from __future__ import annotations

from moeify.arch.base import SourceFamily


class Qwen2(SourceFamily):
    name = "qwen2"
    model_types = ("qwen2",)
    default_target = "qwen2_moe"
    targets = ("qwen2_moe",)
