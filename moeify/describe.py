"""`moeify inspect`: what a checkpoint is, read from config.json and shard headers only (no weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeify.arch import MOE_MODEL_TYPES, SOURCES, source_family
from moeify.arch.base import require_int
from moeify.errors import InputError, MoeifyError
from moeify.io.reader import CheckpointReader, load_json
from moeify.metadata import read_metadata

_FFN_MARKERS = (".mlp.", ".block_sparse_moe.")


def describe(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    config = load_json(folder / "config.json", "config.json")
    reader = CheckpointReader(folder)
    model_type = config.get("model_type")
    params = sum(i.numel for i in reader.tensors.values())
    ffn_params = sum(i.numel for n, i in reader.tensors.items() if any(m in n for m in _FFN_MARKERS)
                     and not n.endswith(("weight_scale_inv", "weight_scale", "input_scale")))
    info: dict[str, Any] = {
        "path": str(folder), "model_type": model_type, "architectures": config.get("architectures"),
        "layers": config.get("num_hidden_layers"), "hidden_size": config.get("hidden_size"),
        "parameters": params, "ffn_parameters": ffn_params, "file_bytes": reader.total_bytes(),
        "dtypes": sorted({str(i.dtype).removeprefix("torch.") for i in reader.tensors.values()}),
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        info["quantization"] = {k: quant.get(k) for k in ("quant_method", "fmt", "format", "weight_block_size")
                                if quant.get(k) is not None}
    if isinstance(model_type, str) and model_type in MOE_MODEL_TYPES:
        info.update(_describe_moe(config, reader, ffn_params))
    else:
        info["kind"] = "dense"
        info["intermediate_size"] = config.get("intermediate_size")
        try:
            family = source_family(config)
            info["family"] = family.name
            info["can_become"] = list(family.targets)
        except MoeifyError as e:
            info["family"] = None
            info["can_become"] = []
            info["why_not"] = e.message
            info["supported_families"] = [t for f in SOURCES for t in f.model_types]
    meta = read_metadata(folder)
    if meta["stages"]:
        info["moeify_stages"] = list(meta["stages"])
        split = meta["stages"].get("split", {})
        if isinstance(split, dict) and "activation_ratio" in split:
            info["activation_ratio_vs_dense"] = split["activation_ratio"]
    return info


def _describe_moe(config: dict[str, Any], reader: CheckpointReader, ffn_params: int) -> dict[str, Any]:
    # A stranger's config: every number used below is checked to be an integer in range first.
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
    per_neuron = 3 * hidden
    moe_layers = layers - len(dense_layers)
    dense_size = require_int(config, "intermediate_size") if dense_layers else 0
    total = per_neuron * (moe_layers * (experts * size + shared_size) + len(dense_layers) * dense_size)
    active = per_neuron * (moe_layers * (top_k * size + shared_size) + len(dense_layers) * dense_size)
    return {
        "kind": "moe", "experts": experts, "top_k": top_k, "expert_size": size,
        "shared_expert_size": shared_size,
        "shared_experts": (shared_size // size) if size and shared_size % size == 0 else None,
        "dense_layers": dense_layers,
        "active_ffn_parameters": active, "total_ffn_parameters": total,
        "activation_ratio": active / total if total else None,
    }
