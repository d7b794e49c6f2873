"""The tensor shapes config.json implies, and the one way a contradiction is reported.

A config that contradicts its weights gives a checkpoint no loader accepts, or, worse, one that loads with
the wrong sizes somewhere downstream. The rules here go by tensor name, so they also cover model types
moeify does not know; for the families and targets it knows, `arch/consistency.py` takes the FFN, expert
and router shapes from the family and target objects instead and uses only the attention and embedding
rules from here. A rule whose config key is absent is skipped (the loader then derives that size, as for
`head_dim` or `num_key_value_heads`); which keys must be present is the consistency check's business.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from moeify.arch.base import require_int
from moeify.errors import InputError
from moeify.io.reader import CheckpointReader

MAX_SIZE = 1 << 22
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"
_EMBEDDING = re.compile(r"^(?:model\.embed_tokens|lm_head)\.weight$")
# q/k/v/o, and Phi-3's fused qkv_proj ([(heads + 2 * kv) * head_dim, hidden]).
_ATTENTION = re.compile(r"^model\.layers\.\d+\.self_attn\.(q|k|v|o|qkv)_proj\.weight$")
_FFN = re.compile(r"^model\.layers\.\d+\.(mlp|mlp\.shared_expert|mlp\.experts\.\d+|block_sparse_moe\.experts\.\d+)"
                  r"\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_ROUTER = re.compile(r"^model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.gate\.weight$")
_DOWN = ("down_proj", "w2")

Dims = tuple[tuple[int, tuple[str, ...]], ...]  # per dimension: its size and the config keys that set it


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


def expected_shape(name: str, config: dict[str, Any], ffn: bool = True) -> Dims | None:
    """The shape config.json implies for tensor `name`, per dimension with its keys; None where it says nothing.

    `ffn=False` leaves FFN, expert and router tensors to the caller (a known family or target sizes them).
    """
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
        # The keys behind each size: an absent head_dim is hidden_size / heads, an absent kv count is heads.
        hd_keys = ("head_dim",) + (() if config.get("head_dim") is not None else ("num_attention_heads", "hidden_size"))
        kv_keys = ("num_key_value_heads",) + (() if config.get("num_key_value_heads") else ("num_attention_heads",))
        q = (heads * head_dim, ("num_attention_heads", *hd_keys))
        proj = m.group(1)
        if proj == "q":
            return q, h
        if proj == "o":
            return h, q
        if proj == "qkv":
            return ((heads + 2 * kv) * head_dim, ("num_attention_heads", *kv_keys, *hd_keys)), h
        return (kv * head_dim, (*kv_keys, *hd_keys)), h
    if not ffn:
        return None
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


def shape_error(reader: CheckpointReader, name: str, dims: Dims, config: dict[str, Any]) -> InputError | None:
    """The refusal for tensor `name` if its shape is not `dims`: names the tensor, the keys, and the fix."""
    shape = tuple(size for size, _ in dims)
    actual = tuple(reader.info(name).shape)
    if actual == shape:
        return None
    keys = list(dict.fromkeys(k for _, ks in dims for k in ks))
    values = ", ".join(f"{k} = {config.get(k)}" for k in keys)
    fixes = []
    if len(actual) == len(shape):
        for got, (want, ks) in zip(actual, dims, strict=True):
            if got != want and ks:
                single = len(ks) == 1 and config.get(ks[0]) == want  # the dimension is that key's value
                fixes.append(f"set {ks[0]} to {got}" if single else f"correct {' or '.join(ks)}")
    fix = " and ".join(dict.fromkeys(fixes)) or f"correct {' or '.join(keys) or 'the sizes'}"
    return InputError(f"{reader.folder}: {name} has shape {list(actual)}, but config.json ({values}) implies "
                      f"{list(shape)}", f"{fix} in config.json to match the weights, or use the config.json "
                      "saved with them")


def check_shapes(reader: CheckpointReader, config: dict[str, Any], known: Mapping[str, Dims] | None = None) -> None:
    """Refuse the first tensor (in file order) whose shape contradicts config.json; reads headers only.

    `known` gives the shapes of a known family's or target's FFN, expert and router tensors; with it, the
    name rules above size only attention and embeddings. Without it (an unknown model type) they size all.
    """
    for name in reader.names():
        dims = known.get(name) if known is not None else None
        if dims is None:
            dims = expected_shape(name, config, ffn=known is None)
        if dims is not None and (error := shape_error(reader, name, dims, config)) is not None:
            raise error
