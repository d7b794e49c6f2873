"""Name patterns over every MoE layout moeify writes, for the stages that find tensors by name.

quant/ (what to quantize, what to keep), finetune/ (export back to the per-expert layout, the modules
of a loaded student) and `moeify inspect` (which parameters are FFN) ask here instead of spelling names.
Every pattern is built from the targets' declared name parts (`TargetArch.moe_block`, `expert_parts`,
...), so a new target is covered by listing it in `arch/__init__.py`. Patterns are anchored at a module
boundary and at the end, so the router pattern `mlp.gate` can never catch `mlp.gate_proj`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from moeify.arch import SOURCES, TARGETS
from moeify.arch.base import require_int

_T = list(TARGETS.values())


def _alt(items: Any) -> str:
    return "|".join(re.escape(i) for i in dict.fromkeys(items))


_EXPERT_LAYOUTS = {t.moe_block: set() for t in _T}
for _t in _T:
    _EXPERT_LAYOUTS[_t.moe_block].update(_t.expert_parts)
_SHARED = [(t.moe_block, t.shared_block, t.dense_parts) for t in _T if t.shared_block]

# One routed expert's projection weight: `...mlp.experts.3.gate_proj.weight`, `...block_sparse_moe.experts.3.w1.weight`.
EXPERT_WEIGHT = re.compile(r"^(?:.+\.)?(?:" + "|".join(
    rf"{re.escape(block)}\.experts\.\d+\.(?:{_alt(sorted(parts))})" for block, parts in _EXPERT_LAYOUTS.items())
    + r")\.weight$")
# The shared expert's projections; DeepSeek-style checkpoints spell it `shared_experts`, read the same.
SHARED_EXPERT_WEIGHT = re.compile(r"^(?:.+\.)?(?:" + "|".join(
    rf"{re.escape(block)}\.{re.escape(shared)}s?\.(?:{_alt(parts)})" for block, shared, parts in _SHARED)
    + r")\.weight$")
# A dense FFN's projections (a dense model's, or a layer an MoE target keeps dense).
DENSE_FFN_WEIGHT = re.compile(rf"^(?:.+\.)?(?:{_alt(t.dense_block for t in _T)})\.(?:"
                              rf"{_alt(p for t in _T for p in t.dense_parts)})\.weight$")
# Router modules (and the shared expert's gate): kept in their source dtype by quantize.
ROUTER_MODULE = re.compile(r"^(?:.+\.)?(?:" + _alt(
    [f"{t.moe_block}.{t.router}" for t in _T] + [f"{t.moe_block}.{t.shared_gate}" for t in _T if t.shared_gate])
    + r")$")

# transformers 5 holds experts fused in memory, under the block name `mlp` for every target, as
# `experts.gate_up_proj` [E, 2I, H] (gate rows first) and `experts.down_proj` [E, H, I].
MEMORY_BLOCK = "mlp"
FUSED_GATE_UP, FUSED_DOWN = "gate_up_proj", "down_proj"
# Fused expert tensors ([experts, out, in]) are not a layout moeify writes or quantizes.
FUSED_EXPERTS = re.compile(r"(?:^|\.)experts\.(?:" + _alt(
    [FUSED_GATE_UP, FUSED_DOWN] + [p for t in _T for p in (*t.expert_parts, *t.dense_parts)]) + r")$")
# Module attribute names of a loaded transformers MoE: the block of a decoder layer, in lookup order,
# and the router inside it (the same name for every target).
MOE_BLOCK_ATTRS = tuple(dict.fromkeys(t.moe_block for t in _T))
# ... and of any decoder layer's FFN: an MoE block first, else the dense block (`mlp` in every source family).
FFN_ATTRS = tuple(dict.fromkeys([*MOE_BLOCK_ATTRS, *(t.dense_block for t in _T)]))
ROUTER_ATTR = _T[0].router
assert all(t.router == ROUTER_ATTR for t in _T), "finetune swaps routers by one attribute name"
# Any stored tensor under an MoE block's routed experts: per-expert projections, their quantization
# scales, fused tensors (`experts.gate_up_proj`). Shared experts (`shared_expert(s).`) are not routed.
_ROUTED_EXPERT_TENSOR = re.compile(rf"(?:^|\.)(?:{_alt([*MOE_BLOCK_ATTRS, MEMORY_BLOCK])})\.experts\.")

_ROLE = {part: role for t in _T for part, role in zip(t.expert_parts, ("gate", "up", "down"), strict=True)}
_MEMORY_EXPERT = re.compile(rf"^(model\.layers\.\d+\.{MEMORY_BLOCK})\.experts\.(\d+)\.(\w+)\.weight$")


def memory_name(name: str) -> str:
    """The in-memory (transformers 5) name of checkpoint tensor `name`: Mixtral's block is `mlp` there."""
    for t in _T:
        if t.moe_block != MEMORY_BLOCK:
            name = name.replace(f".{t.moe_block}.", f".{MEMORY_BLOCK}.")
    return name


def fused_expert_slice(name: str) -> tuple[str, int, str] | None:
    """For a per-expert checkpoint name: the fused in-memory tensor holding it, the expert and its role.

    The role is `gate`, `up` (the halves of `gate_up_proj`) or `down`; None when `name` is no expert's.
    """
    m = _MEMORY_EXPERT.match(memory_name(name))
    if not m:
        return None
    prefix, expert, role = m.group(1), int(m.group(2)), _ROLE[m.group(3)]
    return f"{prefix}.experts.{FUSED_DOWN if role == 'down' else FUSED_GATE_UP}", expert, role


def is_ffn_tensor(name: str) -> bool:
    """Whether a checkpoint tensor belongs to an FFN: a dense family's, or an MoE block's (experts, router)."""
    markers = {f".{t.moe_block}." for t in _T} | {f".{t.dense_block}." for t in _T}
    return any(m in name for m in markers) or any(f.is_ffn_tensor(name) for f in SOURCES)


def is_routed_expert_tensor(name: str) -> bool:
    """Whether a checkpoint tensor belongs to a routed expert, in any layout or dtype (scales included):
    the tensors a token reads only a top-k share of (`moeify inspect`'s decode traffic)."""
    return _ROUTED_EXPERT_TENSOR.search(name) is not None


def is_router_tensor(name: str) -> bool:
    """Whether a checkpoint tensor is a router's (or a shared expert gate's) weight: read at every
    token by the MoE, absent from its dense equivalent."""
    return name.endswith(".weight") and ROUTER_MODULE.match(name.removesuffix(".weight")) is not None


def ffn_block(decoder_layer: nn.Module) -> tuple[str, nn.Module] | None:
    """A loaded decoder layer's FFN and its attribute name, dense or MoE: the MoE block is `mlp` for
    Qwen2-MoE, Qwen3-MoE and transformers 5's Mixtral, `block_sparse_moe` for Mixtral before transformers 5,
    so hooks and stand-ins (eval, calibration) must not assume one name. None when the layer has none."""
    return _first_block(decoder_layer, FFN_ATTRS)


def sparse_block(decoder_layer: nn.Module) -> tuple[str, nn.Module] | None:
    """A loaded decoder layer's FFN module and its attribute name (`block_sparse_moe` or `mlp`)."""
    return _first_block(decoder_layer, MOE_BLOCK_ATTRS)


def _first_block(decoder_layer: nn.Module, attrs: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for attr in attrs:
        block = getattr(decoder_layer, attr, None)
        if block is not None:
            return attr, block
    return None


def fused_experts(experts: nn.Module) -> tuple[Any, Any]:
    """The fused `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] of a transformers experts module."""
    return getattr(experts, FUSED_GATE_UP, None), getattr(experts, FUSED_DOWN, None)


def shared_expert(block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """A loaded block's shared expert and its gate (Qwen2-MoE), or None when the target has none."""
    for t in _T:
        if t.shared_block and getattr(block, t.shared_block, None) is not None:
            return getattr(block, t.shared_block), getattr(block, t.shared_gate)
    return None


@dataclass(frozen=True)
class MoELayout:
    """The expert layout an MoE config.json declares, each number checked to be an integer in range."""

    experts: int
    top_k: int
    expert_size: int
    shared_size: int
    layers: int
    dense_layers: list[int]
    hidden: int
    dense_size: int  # the FFN width of layers kept dense (0 when none are)


def moe_layout(config: dict[str, Any]) -> MoELayout:
    """Read a stranger's MoE config (any of the targets' key spellings) without trusting it."""
    from moeify.errors import InputError

    experts = require_int(config, "num_local_experts" if "num_local_experts" in config else "num_experts")
    top_k = require_int(config, "num_experts_per_tok", maximum=experts)
    size = require_int(config, "moe_intermediate_size" if config.get("moe_intermediate_size") is not None
                       else "intermediate_size")
    shared_size = (require_int(config, "shared_expert_intermediate_size", minimum=0)
                   if config.get("shared_expert_intermediate_size") is not None else 0)
    layers = require_int(config, "num_hidden_layers", maximum=10_000)
    dense_layers = config.get("mlp_only_layers") or []
    if not isinstance(dense_layers, list) or not all(isinstance(i, int) and 0 <= i < layers for i in dense_layers):
        raise InputError(f"config.json: mlp_only_layers must list layer indices below {layers}",
                         "the config is corrupt")
    hidden = require_int(config, "hidden_size")
    dense_size = require_int(config, "intermediate_size") if dense_layers else 0
    return MoELayout(experts, top_k, size, shared_size, layers, dense_layers, hidden, dense_size)


# Parameter names of a loaded student, for what finetune trains and what peft adapts. The router's
# parameters are moeify's own `ScaledRouter` (finetune/moe_model.py), installed as the block's router.
SHARED_EXPERT_BLOCKS = tuple(dict.fromkeys(t.shared_block for t in _T if t.shared_block))
SHARED_EXPERT_PROJECTIONS = [f"{b}.{p}" for b in SHARED_EXPERT_BLOCKS for p in _T[0].dense_parts]
FUSED_EXPERT_PARAMETERS = [f"experts.{FUSED_GATE_UP}", f"experts.{FUSED_DOWN}"]
_SCALED_ROUTER = (f".{ROUTER_ATTR}.weight_unit", f".{ROUTER_ATTR}.log_scale")


def is_router_parameter(name: str) -> bool:
    """A `ScaledRouter`'s unit direction or log temperature (trained fully, never LoRA'd)."""
    return any(marker in name for marker in _SCALED_ROUTER)


def is_expert_parameter(name: str) -> bool:
    """A routed expert's (fused) weight or a shared expert's projection."""
    return ".experts." in name or any(f".{b}." in name for b in SHARED_EXPERT_BLOCKS)


def has_shared_expert(parameter_names: Any) -> bool:
    return any(f"{b}." in n for n in parameter_names for b in SHARED_EXPERT_BLOCKS)
