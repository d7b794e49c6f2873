"""Qwen3-MoE: routed experts only (no shared expert exists in this architecture), q/k norms kept."""

from __future__ import annotations

from typing import Any

from moeify.arch.base import SourceFamily, TargetPlan
from moeify.arch.qwen2_moe import QwenMoeNames
from moeify.errors import UnsupportedModelError


class Qwen3Moe(QwenMoeNames):
    name = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"
    supports_dense_layers = True
    renormalizes_top_k = False

    def check(self, config: dict[str, Any], plan: TargetPlan, source: SourceFamily) -> None:
        if plan.shared:
            raise UnsupportedModelError("Qwen3MoeForCausalLM has no shared expert, so Qwen3 cannot keep one",
                                        "use --shared 0 (routed experts only)")
        super().check(config, plan, source)

    def build_config(self, dense: dict[str, Any], plan: TargetPlan) -> dict[str, Any]:
        config = super().build_config(dense, plan)
        config.update(
            intermediate_size=dense["intermediate_size"], moe_intermediate_size=plan.expert_size,
            norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=list(plan.dense_layers),
            attention_bias=bool(dense.get("attention_bias", False)), router_aux_loss_coef=0.001,
            use_sliding_window=bool(dense.get("use_sliding_window", False)),
            max_window_layers=dense.get("max_window_layers", dense["num_hidden_layers"]),
        )
        return config
