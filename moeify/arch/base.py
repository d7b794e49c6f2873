"""The two small interfaces every model family implements: a dense source and an MoE target.

Adding a family means adding one module with one of these classes and listing it in `arch/__init__.py`.
A source says how to load a layer's FFN, which tensors that consumes, how its other tensors map onto the
target's layout and whether its config can be converted at all; a target says how the MoE config and
tensor names are written so that stock transformers and vLLM load them. Nothing outside arch/ spells a
tensor name of an FFN, an expert or a router: it asks these classes or `arch/names.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from moeify.errors import InputError, UnsupportedModelError
from moeify.io.checks import require_finite
from moeify.io.reader import CheckpointReader
from moeify.split.moe_layer import FFNWeights

# Keys of a dense config that carry over to every target unchanged (attention, norms, rope, tokens).
CARRIED_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor",
    "sliding_window", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
)
# Keys dropped on purpose: they describe the dense FFN or the file, not the network we write.
IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "intermediate_size", "mlp_bias", "pretraining_tp",
    "_name_or_path", "_model_name_or_path", "auto_map", "quantization_config", "unk_token_id", "output_attentions",
    "output_hidden_states", "return_dict", "layer_types", "use_sliding_window", "max_window_layers",
    "attention_bias", "qkv_bias", "_attn_implementation_autoset", "id2label", "label2id", "tokenizer_class",
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
    "resid_pdrop", "embd_pdrop", "original_max_position_embeddings",  # Phi-3: dropouts; longrope only (refused)
}
_LAYER_FFN = re.compile(r"^model\.layers\.\d+\.mlp\.")


@dataclass(frozen=True)
class FFNNames:
    """Tensor names of one SwiGLU block: gate and up are [inter, hidden], down is [hidden, inter]."""

    gate: str
    up: str
    down: str


@dataclass
class TargetPlan:
    """What a target needs to know to write the MoE: sizes and the user's choices."""

    experts: int
    top_k: int
    shared: int
    expert_size: int  # neurons per routed (and per shared) expert, after padding
    dense_layers: list[int] = field(default_factory=list)


def require_int(config: dict[str, Any], key: str, minimum: int = 1, maximum: int = 1 << 22) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"config.json: {key} is missing or not an integer ({value!r})", "the config is incomplete")
    if not minimum <= value <= maximum:
        raise InputError(f"config.json: {key} = {value} is out of range [{minimum}, {maximum}]",
                         "the config is corrupt")
    return value


def read_finite(reader: CheckpointReader, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    """One stored tensor in `dtype`, refused (named) when it holds NaN or inf."""
    tensor = reader.get(name, dtype)
    require_finite(name, tensor)
    return tensor


class SourceFamily:
    """A dense decoder family whose FFN is `mlp.{gate,up,down}_proj` with SiLU gating.

    A family with another FFN layout (Phi-3's fused `gate_up_proj`) overrides `ffn_tensors`,
    `ffn_shapes` and `load_ffn`; one whose attention differs from the target's overrides `convert_tensor`.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    default_target: str = "mixtral"
    targets: tuple[str, ...] = ("mixtral",)

    def ffn_names(self, layer: int) -> FFNNames:
        p = f"model.layers.{layer}.mlp."
        return FFNNames(p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight")

    def ffn_tensors(self, layer: int) -> tuple[str, ...]:
        """The checkpoint tensors layer `layer`'s FFN consumes (not carried to the output as they are)."""
        names = self.ffn_names(layer)
        return names.gate, names.up, names.down

    def ffn_shapes(self, layer: int, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The shape config.json implies for each tensor of `ffn_tensors(layer)`, checked before any work."""
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        names = self.ffn_names(layer)
        return {names.gate: (inter, hidden), names.up: (inter, hidden), names.down: (hidden, inter)}

    def load_ffn(self, reader: CheckpointReader, layer: int, dtype: torch.dtype | None = torch.float32
                 ) -> FFNWeights:
        """Layer `layer`'s FFN as separate gate [inter, hidden], up [inter, hidden] and down [hidden, inter].

        In `dtype` (None: as stored). Each stored tensor is checked finite as read, so a NaN is reported
        under its checkpoint name.
        """
        names = self.ffn_names(layer)
        return FFNWeights(*(read_finite(reader, n, dtype) for n in (names.gate, names.up, names.down)))

    def is_ffn_tensor(self, name: str) -> bool:
        """Whether `name` belongs to some layer's FFN module (what calibration replaces by its capture)."""
        return bool(_LAYER_FFN.match(name))

    def ffn_norm_name(self, layer: int) -> str:
        """The RMSNorm whose output is the FFN input (its gain shapes the router's input distribution)."""
        return f"model.layers.{layer}.post_attention_layernorm.weight"

    def convert_tensor(self, name: str, tensor: torch.Tensor, config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A carried (non-FFN) tensor in the target's layout; may split one into several (fused q/k/v).

        Called on meta tensors to plan the output, and on the real ones to write it: shapes must follow.
        """
        return {name: tensor}

    def check(self, config: dict[str, Any]) -> None:
        """Refuse configs whose FFN is not plain SwiGLU without bias (the split would be wrong)."""
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            require_int(config, key, maximum=1 << 20 if key != "num_hidden_layers" else 10_000)
        for key in ("rope_parameters", "rope_scaling"):
            if config.get(key) is not None and not isinstance(config[key], dict):
                raise InputError(f"config.json: {key} must be an object, not {type(config[key]).__name__}",
                                 "the config is corrupt")
        act = config.get("hidden_act", "silu")
        if not isinstance(act, str) or act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {act!r} is not SiLU; moeify splits SwiGLU FFNs only")
        if config.get("mlp_bias"):
            raise UnsupportedModelError("the FFN has biases (mlp_bias: true), which MoE targets cannot express")

    def choose_target(self, shared: int, requested: str | None) -> str:
        if requested:
            if requested not in self.targets:
                raise UnsupportedModelError(f"{self.name} cannot become {requested}",
                                            f"targets for {self.name}: {', '.join(self.targets)}")
            return requested
        return self.default_target


class TargetArch:
    """An MoE architecture that stock transformers and vLLM load from per-expert tensors."""

    name: str = ""
    architecture: str = ""
    model_type: str = ""
    supports_shared: bool = False
    supports_dense_layers: bool = False
    # Mixtral renormalises the top-k softmax: each of k near-equal weights is 1/k, so experts are scaled by k.
    renormalizes_top_k: bool = True
    shared_gate_value: float = 1.0  # what the shared expert's gate multiplies by when its weight is zero
    # The names, as parts: `model.layers.{i}.{moe_block}.{router}` and `....experts.{j}.{expert_parts}`.
    # arch/names.py builds the patterns quant/, finetune/ and inspect match from these, over all targets.
    moe_block: str = "mlp"
    router: str = "gate"
    expert_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared_block: str | None = None  # `{moe_block}.{shared_block}.{dense_parts}`, when the target has one
    shared_gate: str | None = None  # `{moe_block}.{shared_gate}`: the shared expert's [1, hidden] gate
    dense_block: str = "mlp"  # a layer kept dense: `{dense_block}.{dense_parts}`
    dense_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def check(self, config: dict[str, Any], plan: TargetPlan, source: SourceFamily) -> None:
        if plan.shared and not self.supports_shared:
            raise UnsupportedModelError(f"{self.architecture} has no shared experts",
                                        "use --shared 0, or a target that has them (qwen2_moe)")
        if plan.dense_layers and not self.supports_dense_layers:
            raise UnsupportedModelError(f"{self.architecture} cannot keep layers dense",
                                        "drop --dense-layers or use the qwen2_moe/qwen3_moe target")

    def routed_scale(self, plan: TargetPlan) -> float:
        """Factor on each routed expert's down_proj so that near-uniform routing weights become 1."""
        return float(plan.top_k if self.renormalizes_top_k else plan.experts)

    def build_config(self, dense: dict[str, Any], plan: TargetPlan) -> dict[str, Any]:
        config = {k: dense[k] for k in CARRIED_KEYS if k in dense}
        rope = dense.get("rope_parameters")
        if isinstance(rope, dict):  # transformers 4.x reads these legacy keys; 5.x reads rope_parameters
            if "rope_theta" in rope:
                config.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") != "default":
                config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        config.update(architectures=[self.architecture], model_type=self.model_type,
                      num_experts_per_tok=plan.top_k, num_experts=plan.experts, num_local_experts=plan.experts,
                      output_router_logits=False)
        return config

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_block}.{self.router}.weight"

    def expert_names(self, layer: int, expert: int) -> FFNNames:
        p = f"model.layers.{layer}.{self.moe_block}.experts.{expert}."
        return FFNNames(*(f"{p}{part}.weight" for part in self.expert_parts))

    def shared_names(self, layer: int) -> FFNNames | None:
        if self.shared_block is None:
            return None
        p = f"model.layers.{layer}.{self.moe_block}.{self.shared_block}."
        return FFNNames(*(f"{p}{part}.weight" for part in self.dense_parts))

    def shared_gate_name(self, layer: int) -> str | None:
        return None if self.shared_gate is None else f"model.layers.{layer}.{self.moe_block}.{self.shared_gate}.weight"

    def dense_names(self, layer: int) -> FFNNames:
        p = f"model.layers.{layer}.{self.dense_block}."
        return FFNNames(*(f"{p}{part}.weight" for part in self.dense_parts))

    def rename(self, name: str) -> str:
        """Name of a carried-over (non-FFN) tensor in the target; identical for every family so far."""
        return name

    def extra_tensors(self, dense: dict[str, Any], layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors the target needs that the source lacks (e.g. zero q/k/v biases)."""
        return {}
