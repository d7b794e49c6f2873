"""Training-time experts: all experts of a layer as one masked dense FFN, instead of transformers' forward.

A split MoE can have many small experts (48 of 24 neurons for SmolLM2 at 50%). transformers 5 computes
them with grouped matmuls (`grouped_mm`, its default; `eager` loops over experts): every token is copied
once per chosen expert and each expert multiplies its own small group, in the forward and again in the
backward pass, so the cost grows with top-k. Because the experts of one layer share the input, the same
function is one wide matmul over all experts' neurons, a per-neuron routing weight (zero for experts a
token did not choose), and one wide matmul back:

    sum_{e in topk} w_e * down_e(silu(gate_e x) * up_e x) = down_all((silu(gate_all x) * up_all x) * mask)

That is E/k times the arithmetic of the sparse forward, in two large GEMMs with no per-token copies: on
CPU about 2x faster than `grouped_mm` at top-16 of 48 and slower at top-2 and top-4 (docs/finetune.md),
hence `--experts-forward auto`. Gradients are identical too: unchosen experts' neurons are multiplied by
zero, and a router only receives gradient through its chosen experts' weights, as in the sparse forward.
Only training uses it; the written checkpoint is the stock architecture.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from moeify.arch.names import fused_experts


def masked_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """Drop-in for a fused experts module's forward (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    experts, two_i, hidden = self.gate_up_proj.shape
    inner = two_i // 2
    # [E, 2, I, H] -> [2, E, I, H]: all gate rows first, then all up rows, each in expert order
    gate_up = self.gate_up_proj.view(experts, 2, inner, hidden).transpose(0, 1).reshape(2 * experts * inner, hidden)
    gate, up = F.linear(hidden_states, gate_up).view(-1, 2, experts * inner).unbind(1)
    # one column per expert (plus one for the expert-parallel sentinel index E, dropped)
    weights = hidden_states.new_zeros(hidden_states.shape[0], experts + 1)
    weights = weights.scatter(1, top_k_index, top_k_weights.to(weights.dtype))[:, :experts]
    active = (self.act_fn(gate) * up).view(-1, experts, inner) * weights[:, :, None].to(gate.dtype)
    down = self.down_proj.permute(1, 0, 2).reshape(hidden, experts * inner)
    return F.linear(active.reshape(-1, experts * inner), down).to(hidden_states.dtype)


def supports_masked(experts: nn.Module) -> bool:
    """The fused, gated, non-transposed, bias-free layout this forward assumes (all moeify targets)."""
    gate_up, down = fused_experts(experts)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not hasattr(experts, "act_fn"):
        return False
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
        return False
    if not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True):
        return False
    e, two_i, h = gate_up.shape
    return two_i % 2 == 0 and tuple(down.shape) == (e, h, two_i // 2)


def use_masked_experts(model: nn.Module) -> int:
    """Switch every supported experts module of `model` to the masked forward; returns how many."""
    switched = 0
    for module in model.modules():
        if type(module).__name__.endswith("Experts") and supports_masked(module):
            module.forward = types.MethodType(masked_experts_forward, module)
            switched += 1
    return switched
