"""The tensor shapes config.json implies, checked against the safetensors headers before any work.

A config that contradicts its weights gives a checkpoint no loader accepts, or, worse, one that loads with
the wrong sizes somewhere downstream. `split` and `quantize` both refuse it up front, naming the tensor,
its shape, the config values that imply another shape and the fix. The rules go by tensor name, so they
cover dense models (Llama, Mistral, Qwen2/3) and the MoE layouts moeify writes (Mixtral, Qwen2/3-MoE)
alike; a rule whose config key is absent is skipped, so a config that simply omits a size is not refused.
"""

from __future__ import annotations

import re
from typing import Any

from moeify.arch.base import require_int
from moeify.errors import InputError
from moeify.io.reader import CheckpointReader

MAX_SIZE = 1 << 22
_EMBEDDING = re.compile(r"^(?:model\.embed_tokens|lm_head)\.weight$")
_ATTENTION = re.compile(r"^model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight$")
_FFN = re.compile(r"^model\.layers\.\d+\.(mlp|mlp\.shared_expert|mlp\.experts\.\d+|block_sparse_moe\.experts\.\d+)"
                  r"\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_ROUTER = re.compile(r"^model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.gate\.weight$")
_DOWN = ("down_proj", "w2")


def _size(config: dict[str, Any], key: str, maximum: int = MAX_SIZE) -> int | None:
    """The config's value for `key`, or None when it does not give one (that rule is then skipped)."""
    return None if config.get(key) is None else require_int(config, key, maximum=maximum)


def _ffn_width_key(module: str, config: dict[str, Any]) -> str:
    """The config key that sizes this FFN: the dense MLP, a routed expert or the shared expert."""
    if module == "mlp" or module.startswith("block_sparse_moe."):  # dense layer, or Mixtral's experts
        return "intermediate_size"
    if module == "mlp.shared_expert":
        return "shared_expert_intermediate_size"
    return "moe_intermediate_size" if "moe_intermediate_size" in config else "intermediate_size"


Dims = tuple[tuple[int, tuple[str, ...]], ...]  # per dimension: its size and the config keys that set it


def expected_shape(name: str, config: dict[str, Any]) -> Dims | None:
    """The shape config.json implies for tensor `name`, per dimension with its keys; None where it says nothing."""
    hidden = _size(config, "hidden_size")
    if hidden is None:
        return None
    h = (hidden, ("hidden_size",))
    if _EMBEDDING.match(name):
        vocab = _size(config, "vocab_size")
        return None if vocab is None else ((vocab, ("vocab_size",)), h)
    if m := _ATTENTION.match(name):
        heads = _size(config, "num_attention_heads")
        if heads is None:
            return None
        kv = _size(config, "num_key_value_heads", maximum=heads) or heads
        head_dim = _size(config, "head_dim") or hidden // heads
        q = (heads * head_dim, ("num_attention_heads", "head_dim"))
        proj = m.group(1)
        if proj == "q":
            return q, h
        if proj == "o":
            return h, q
        return (kv * head_dim, ("num_key_value_heads", "head_dim")), h
    if m := _FFN.match(name):
        key = _ffn_width_key(m.group(1), config)
        width = _size(config, key)
        if width is None:
            return None
        return (h, (width, (key,))) if m.group(2) in _DOWN else ((width, (key,)), h)
    if _ROUTER.match(name):
        key = "num_local_experts" if "num_local_experts" in config else "num_experts"
        experts = _size(config, key)
        return None if experts is None else ((experts, (key,)), h)
    return None


def check_config_shapes(reader: CheckpointReader, config: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors contradict config.json; reads headers only."""
    for name in reader.names():
        dims = expected_shape(name, config)
        if dims is None:
            continue
        shape = tuple(size for size, _ in dims)
        actual = tuple(reader.info(name).shape)
        if actual == shape:
            continue
        keys = list(dict.fromkeys(k for _, ks in dims for k in ks))
        values = ", ".join(f"{k} = {config.get(k)}" for k in keys)
        fixes = []
        if len(actual) == len(shape):
            for got, (want, ks) in zip(actual, dims, strict=True):
                if got != want:
                    fixes.append(f"set {ks[0]} to {got}" if len(ks) == 1 else f"correct {' or '.join(ks)}")
        fix = " and ".join(dict.fromkeys(fixes)) or f"correct {' or '.join(keys)}"
        raise InputError(f"{reader.folder}: {name} has shape {list(actual)}, but config.json ({values}) implies "
                         f"{list(shape)}", f"{fix} in config.json to match the weights, or use the config.json "
                         "saved with them")
