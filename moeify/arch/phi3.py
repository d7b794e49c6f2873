"""Phi-3 / Phi-4 (`Phi3ForCausalLM`): Llama's network with fused projections, so Mixtral carries it.

Phi-3 stores the FFN's gate and up as one `mlp.gate_up_proj` [2 * inter, hidden] (gate rows first, as
`Phi3MLP` chunks it) and attention's q, k, v as one `self_attn.qkv_proj` [(heads + 2 * kv) * head_dim,
hidden]. Both are split by rows here: the FFN on load, q/k/v when the tensor is carried, so the targets
(Mixtral, or Qwen2-MoE with shared experts) receive exactly the layout they have for Llama. Its dropouts
(`resid_pdrop`, `embd_pdrop`) are inactive at inference. Refused: longrope scaling (the 128k variants)
and partial rotary (Phi-4-mini), which Mixtral's attention cannot express.
"""

from __future__ import annotations

from typing import Any

import torch

from moeify.arch.base import FFNNames, read_finite, require_int
from moeify.arch.llama import Llama
from moeify.errors import UnsupportedModelError
from moeify.io.reader import CheckpointReader
from moeify.split.moe_layer import FFNWeights


class Phi3(Llama):
    name = "phi3"
    model_types = ("phi3",)

    def check(self, config: dict[str, Any]) -> None:
        super().check(config)
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise UnsupportedModelError(f"Phi-3 with {kind!r} rope scaling has no counterpart in Mixtral",
                                        "convert a Phi-3 without rope scaling (e.g. the 4k-context variants)")
        partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise UnsupportedModelError(f"partial_rotary_factor {partial} (rotary on part of each head) has no "
                                        "counterpart in Mixtral", "only full-rotary Phi-3 models can be converted")
        heads = require_int(config, "num_attention_heads")
        if config.get("head_dim") not in (None, config["hidden_size"] // heads):
            raise UnsupportedModelError("Phi-3 with head_dim != hidden_size / heads is not supported",
                                        "the fused qkv_proj is split assuming hidden_size / heads per head")

    def ffn_names(self, layer: int) -> FFNNames:
        raise NotImplementedError("Phi-3 fuses gate and up: use ffn_tensors / load_ffn")

    def ffn_tensors(self, layer: int) -> tuple[str, ...]:
        p = f"model.layers.{layer}.mlp."
        return p + "gate_up_proj.weight", p + "down_proj.weight"

    def ffn_shapes(self, layer: int, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        gate_up, down = self.ffn_tensors(layer)
        return {gate_up: (2 * inter, hidden), down: (hidden, inter)}

    def load_ffn(self, reader: CheckpointReader, layer: int, dtype: torch.dtype | None = torch.float32
                 ) -> FFNWeights:
        gate_up, down = self.ffn_tensors(layer)
        gate, up = read_finite(reader, gate_up, dtype).chunk(2, dim=0)
        return FFNWeights(gate.contiguous(), up.contiguous(), read_finite(reader, down, dtype))

    def convert_tensor(self, name: str, tensor: torch.Tensor, config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`self_attn.qkv_proj.weight` becomes the `q_proj`, `k_proj` and `v_proj` the targets have."""
        if not name.endswith(".self_attn.qkv_proj.weight"):
            return {name: tensor}
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        head_dim = config["hidden_size"] // heads
        q, k, v = tensor.split([heads * head_dim, kv * head_dim, kv * head_dim], dim=0)
        p = name.removesuffix("qkv_proj.weight")
        return {p + "q_proj.weight": q.contiguous(), p + "k_proj.weight": k.contiguous(),
                p + "v_proj.weight": v.contiguous()}
