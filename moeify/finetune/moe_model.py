"""The MoE checkpoint as a trainable transformers model, with routers re-parametrised for training.

`moeify split` writes routers in a near-uniform regime: logits spread about `router_logit_std` (1e-5), so
the routing weights are effectively constant and only the top-k *choice* depends on the router. Trained
as stored, a router's gradients are that small too, and Adam's epsilon swamps them. So training swaps
each stock router for a `ScaledRouter` holding a unit-scale direction `weight_unit` and a learnable log
temperature, with `weight = weight_unit * exp(log_scale)`: the model computes exactly the stored
function, while the optimiser sees unit-scale parameters. On export the product is written back as a
plain router weight, so the output is a stock checkpoint; the scales written are recorded in moeify.json.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moeify.arch import MOE_MODEL_TYPES
from moeify.arch.names import ROUTER_ATTR, fused_experts, shared_expert, sparse_block
from moeify.errors import InputError
from moeify.metadata import read_metadata

MOE_TYPES = tuple(MOE_MODEL_TYPES)  # the targets `moeify split` writes, in arch's order
DEFAULT_ROUTER_SCALE = 1e-5


class ScaledRouter(nn.Module):
    """Drop-in for transformers' top-k routers (Mixtral/Qwen2-MoE/Qwen3-MoE), computed in float32.

    Returns (logits, scores, indices) like the stock router, and keeps the last logits and choices so
    the training loop can add a load-balancing term without asking transformers for router outputs.
    """

    def __init__(self, weight: torch.Tensor, scale: float, top_k: int, normalize: bool):
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.num_experts, self.hidden_dim = weight.shape
        self.weight_unit = nn.Parameter(weight.detach().float() / scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32))
        self.last_logits: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None

    def effective_weight(self) -> torch.Tensor:
        return self.weight_unit * self.log_scale.exp()

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # never below float32
            logits = F.linear(x.to(dtype), self.weight_unit.to(dtype)) * self.log_scale.exp().to(dtype)
            probs = logits.softmax(dim=-1)
            top, indices = torch.topk(probs, self.top_k, dim=-1)
            if self.normalize:
                top = top / top.sum(dim=-1, keepdim=True)
        self.last_logits, self.last_indices = logits, indices
        return logits, top.to(hidden_states.dtype), indices


@dataclass
class MoEBlock:
    """One sparse layer of the loaded model, with what training and export need to know."""

    layer: int
    block: nn.Module  # the SparseMoeBlock
    router: ScaledRouter
    prefix: str  # name prefix of the block in the loaded model, e.g. model.layers.3.mlp.

    @property
    def experts(self) -> nn.Module:
        return self.block.experts


def load_student(folder: Path, dtype: torch.dtype = torch.float32):
    """Load the MoE checkpoint with stock transformers (no remote code) and install `ScaledRouter`s."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.model_type not in MOE_TYPES:
        raise InputError(f"{folder}: model_type {config.model_type!r} is not an MoE that moeify fine-tunes",
                         f"give the output of `moeify split` ({', '.join(MOE_TYPES)})")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                 trust_remote_code=False)
    scales = saved_router_scales(folder, config.num_hidden_layers)
    install_routers(model, scales)
    model.config.use_cache = False
    return model


def saved_router_scales(folder: Path, layers: int) -> list[float]:
    """The router scale each layer was written with: finetune's record, else split's router_logit_std."""
    stages = read_metadata(folder)["stages"]
    finetune = stages.get("finetune") or {}
    std = ((stages.get("split") or {}).get("options") or {}).get("router_logit_std")
    value = float(std) if isinstance(std, int | float) and 0 < std <= 1e3 else DEFAULT_ROUTER_SCALE
    scales = finetune.get("router_scales")
    if isinstance(scales, list) and len(scales) == layers:  # null for layers kept dense
        return [float(s) if isinstance(s, int | float) and 0 < s <= 1e3 else value for s in scales]
    return [value] * layers


def install_routers(model: nn.Module, scales: list[float]) -> None:
    for layer, module in enumerate(model.model.layers):
        found = sparse_block(module)
        block = found[1] if found else None
        gate = getattr(block, ROUTER_ATTR, None)
        if gate is None or not hasattr(block, "experts") or isinstance(gate, ScaledRouter):
            continue
        normalize = bool(getattr(gate, "norm_topk_prob", True))  # Mixtral's router always renormalises
        setattr(block, ROUTER_ATTR, ScaledRouter(gate.weight.data, scales[layer], gate.top_k, normalize))


def moe_blocks(model: nn.Module) -> Iterator[MoEBlock]:
    """The sparse layers of a student (after `install_routers`), in order; dense layers are skipped."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "module", inner)
    for layer, module in enumerate(inner.model.layers):
        found = sparse_block(module)
        if found is not None and isinstance(router := getattr(found[1], ROUTER_ATTR, None), ScaledRouter):
            yield MoEBlock(layer, found[1], router, f"model.layers.{layer}.{found[0]}.")


def uniform_weight(model: nn.Module) -> float:
    """The routing weight of each chosen expert in the near-uniform regime (1/k renormalised, else 1/E)."""
    config = model.config
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    target = MOE_MODEL_TYPES.get(config.model_type)
    if (target is not None and target.renormalizes_top_k) or getattr(config, "norm_topk_prob", False):
        return 1.0 / config.num_experts_per_tok
    return 1.0 / experts


def expert_outputs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every routed expert's raw output on x: [experts, tokens, hidden] (before routing weights)."""
    gate_up, down = fused_experts(block.experts)
    outs = []
    for e in range(gate_up.shape[0]):
        gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, down[e]))
    return torch.stack(outs)


def shared_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The always-on part of a block (Qwen2-MoE's gated shared expert), zeros when there is none."""
    found = shared_expert(block)
    if found is None:
        return torch.zeros_like(x)
    shared, gate = found
    return torch.sigmoid(gate(x)) * shared(x)
