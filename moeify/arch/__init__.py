"""Registry of supported dense source families and MoE target architectures (one module each)."""

from __future__ import annotations

from typing import Any

from moeify.arch.base import FFNNames, SourceFamily, TargetArch, TargetPlan
from moeify.arch.llama import Llama
from moeify.arch.mistral import Mistral
from moeify.arch.mixtral import Mixtral
from moeify.arch.phi3 import Phi3
from moeify.arch.qwen2 import Qwen2
from moeify.arch.qwen2_moe import Qwen2Moe
from moeify.arch.qwen3 import Qwen3
from moeify.arch.qwen3_moe import Qwen3Moe
from moeify.errors import InputError, UnsupportedModelError

SOURCES: list[SourceFamily] = [Llama(), Mistral(), Qwen2(), Qwen3(), Phi3()]
TARGETS: dict[str, TargetArch] = {t.name: t for t in (Mixtral(), Qwen2Moe(), Qwen3Moe())}
MOE_MODEL_TYPES = {t.model_type: t for t in TARGETS.values()}

__all__ = ["FFNNames", "SourceFamily", "TargetArch", "TargetPlan", "SOURCES", "TARGETS", "source_family",
           "target_arch", "MOE_MODEL_TYPES"]


def source_family(config: dict[str, Any]) -> SourceFamily:
    """The dense family of a config, or a clear refusal naming the supported ones and why."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise InputError("config.json has no model_type", "is this a transformers model folder?")
    for family in SOURCES:
        if model_type in family.model_types:
            family.check(config)
            return family
    supported = ", ".join(t for f in SOURCES for t in f.model_types)
    if model_type in MOE_MODEL_TYPES:
        raise UnsupportedModelError(f"{model_type} is already a Mixture-of-Experts model",
                                    f"split takes dense models: {supported}")
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported",
        f"supported dense families: {supported} (SwiGLU FFN, separate or fused gate/up, with a stock MoE "
        "counterpart in transformers and vLLM)")


def target_arch(name: str) -> TargetArch:
    try:
        return TARGETS[name]
    except KeyError:
        raise UnsupportedModelError(f"unknown target {name!r}", f"choose one of: {', '.join(TARGETS)}") from None
