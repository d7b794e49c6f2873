"""Mixtral: routed experts only, top-k softmax always renormalised, legacy per-expert w1/w2/w3 names.

The `block_sparse_moe.experts.{j}.w1/w2/w3` layout is what vLLM loads and what transformers 5 converts
on load; transformers' own fused layout is not portable (see shared/README.md).
"""

from __future__ import annotations

from typing import Any

from moeify.arch.base import SourceFamily, TargetArch, TargetPlan
from moeify.errors import UnsupportedModelError


class Mixtral(TargetArch):
    name = "mixtral"
    architecture = "MixtralForCausalLM"
    model_type = "mixtral"
    renormalizes_top_k = True
    moe_block = "block_sparse_moe"
    expert_parts = ("w1", "w3", "w2")  # gate, up, down

    def check(self, config: dict[str, Any], plan: TargetPlan, source: SourceFamily) -> None:
        if plan.shared:
            raise UnsupportedModelError(
                "MixtralForCausalLM has no shared experts",
                "use --shared 0, or --target qwen2_moe (Llama/Mistral with shared experts become Qwen2-MoE)")
        super().check(config, plan, source)

    def build_config(self, dense: dict[str, Any], plan: TargetPlan) -> dict[str, Any]:
        config = super().build_config(dense, plan)
        config.update(intermediate_size=plan.expert_size, router_jitter_noise=0.0, router_aux_loss_coef=0.001)
        return config
