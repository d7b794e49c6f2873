"""`moeify inspect`: what a checkpoint is, read from config.json and shard headers only (no weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeify.arch import MOE_MODEL_TYPES, SOURCES, source_family
from moeify.arch.names import is_ffn_tensor, moe_layout
from moeify.errors import MoeifyError
from moeify.io.reader import CheckpointReader, load_json
from moeify.metadata import read_metadata


def describe(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    config = load_json(folder / "config.json", "config.json")
    reader = CheckpointReader(folder)
    model_type = config.get("model_type")
    params = sum(i.numel for i in reader.tensors.values())
    ffn_params = sum(i.numel for n, i in reader.tensors.items() if is_ffn_tensor(n)
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
    layout = moe_layout(config)
    experts, top_k, size, shared_size = layout.experts, layout.top_k, layout.expert_size, layout.shared_size
    dense_layers, dense_size = layout.dense_layers, layout.dense_size
    per_neuron = 3 * layout.hidden
    moe_layers = layout.layers - len(dense_layers)
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
