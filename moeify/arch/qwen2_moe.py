"""Qwen2-MoE: routed experts plus one sigmoid-gated shared expert, and layers that may stay dense.

A zero `shared_expert_gate` weight makes the gate exactly sigmoid(0) = 0.5, so the shared expert's
down_proj is doubled. `norm_topk_prob` is off: each near-uniform routing weight is 1/E, so experts are
scaled by E, and any top-k chosen later at inference still sums the selected experts with weight 1.
"""

from __future__ import annotations

from typing import Any

import torch

from moeify.arch.base import SourceFamily, TargetArch, TargetPlan
from moeify.errors import UnsupportedModelError


class QwenMoeNames(TargetArch):
    """Tensor names shared by Qwen2-MoE and Qwen3-MoE: `mlp.gate` router, `mlp.experts.{j}.*_proj`.

    These are TargetArch's default names; the class stays so that the two Qwen targets read as a pair.
    """


class Qwen2Moe(QwenMoeNames):
    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    model_type = "qwen2_moe"
    supports_shared = True
    supports_dense_layers = True
    renormalizes_top_k = False
    shared_gate_value = 0.5
    shared_block = "shared_expert"
    shared_gate = "shared_expert_gate"

    def check(self, config: dict[str, Any], plan: TargetPlan, source: SourceFamily) -> None:
        super().check(config, plan, source)
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        if head_dim * heads != config["hidden_size"]:
            raise UnsupportedModelError(
                f"Qwen2-MoE needs head_dim == hidden_size / heads, but {head_dim} x {heads} != "
                f"{config['hidden_size']}", "use --shared 0 to write Mixtral instead")

    def build_config(self, dense: dict[str, Any], plan: TargetPlan) -> dict[str, Any]:
        config = super().build_config(dense, plan)
        config.pop("head_dim", None)  # Qwen2-MoE derives it; checked equal above
        config.update(
            intermediate_size=dense["intermediate_size"],  # used by layers kept dense
            moe_intermediate_size=plan.expert_size,
            shared_expert_intermediate_size=plan.shared * plan.expert_size,
            norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=list(plan.dense_layers),
            qkv_bias=True, router_aux_loss_coef=0.001,
            use_sliding_window=bool(dense.get("use_sliding_window", False)),
            max_window_layers=dense.get("max_window_layers", dense["num_hidden_layers"]),
        )
        if "sliding_window" not in dense or dense.get("sliding_window") is None:
            config["sliding_window"] = None
        return config

    def extra_tensors(self, dense: dict[str, Any], layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Llama/Mistral attention has no q/k/v biases; Qwen2-MoE always has them, so write zeros."""
        if dense.get("model_type") == "qwen2":
            return {}
        heads, kv = dense["num_attention_heads"], dense.get("num_key_value_heads") or dense["num_attention_heads"]
        head_dim = dense["hidden_size"] // heads
        p = f"model.layers.{layer}.self_attn."
        return {p + "q_proj.bias": torch.zeros(heads * head_dim, dtype=dtype),
                p + "k_proj.bias": torch.zeros(kv * head_dim, dtype=dtype),
                p + "v_proj.bias": torch.zeros(kv * head_dim, dtype=dtype)}
