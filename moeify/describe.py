"""`moeify inspect`: what a checkpoint is, read from config.json and shard headers only (no weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeify.arch import MOE_MODEL_TYPES, SOURCES, source_family
from moeify.arch.names import is_ffn_tensor, is_routed_expert_tensor, is_router_tensor, moe_layout
from moeify.arch.shapes import EMBED, LM_HEAD
from moeify.errors import MoeifyError
from moeify.io.reader import CheckpointReader, load_json
from moeify.metadata import read_metadata

_SCALES = ("weight_scale_inv", "weight_scale", "input_scale")  # quantization companions, not parameters
_EMBED_MODULE = EMBED.removesuffix("weight")  # the weight and any companion of the input embedding


def describe(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    config = load_json(folder / "config.json", "config.json")
    reader = CheckpointReader(folder)
    model_type = config.get("model_type")
    params = sum(i.numel for i in reader.tensors.values())
    ffn_params = sum(i.numel for n, i in reader.tensors.items() if is_ffn_tensor(n)
                     and not n.endswith(_SCALES))
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
    split_meta = meta["stages"].get("split", {})
    padding = split_meta.get("padding_neurons_per_layer", 0) if isinstance(split_meta, dict) else 0
    info.update(decode_traffic(config, reader, info.get("top_k"), info.get("experts"),
                               padding if isinstance(padding, int) else 0))
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


def decode_traffic(config: dict[str, Any], reader: CheckpointReader, top_k: int | None = None,
                   experts: int | None = None, padding_neurons: int = 0) -> dict[str, Any]:
    """Parameters and weight bytes one decoded token reads at batch 1: the analytic bound on decode speed.

    At batch 1 a decode step is bound by reading weights: every tensor is read in full except the routed
    experts (top_k of `experts` per layer) and the input embedding (one row, unless it is tied and so
    also serves as the output head, read in full). Bytes count each tensor's stored dtype, scales
    included, so FP8 halves them; the KV cache and activations are not weights and are left out. For an
    MoE the same figures are given for its dense equivalent (every expert read, routers, shared-expert
    gates and `padding_neurons` zero neurons per layer left out): dense bytes / MoE bytes is the most a
    split can speed decoding up.
    """
    tied = bool(config.get("tie_word_embeddings", False)) and LM_HEAD not in reader.tensors
    share = top_k / experts if top_k and experts else 1.0
    params = nbytes = dense_params = dense_bytes = 0.0
    ffn_itemsize = 0
    for name, t in reader.tensors.items():
        read, dense = 1.0, 1.0
        if name.startswith(_EMBED_MODULE) and not tied and t.shape:
            read = dense = 1.0 / t.shape[0]
        elif is_routed_expert_tensor(name):
            read = share
            ffn_itemsize = max(ffn_itemsize, t.nbytes // max(1, t.numel))
        elif is_router_tensor(name):
            dense = 0.0
        counted = 0 if name.endswith(_SCALES) else t.numel
        params += counted * read
        nbytes += t.nbytes * read
        dense_params += counted * dense
        dense_bytes += t.nbytes * dense
    out: dict[str, Any] = {"active_parameters_per_token": round(params), "weight_bytes_per_token": round(nbytes)}
    if share != 1.0:
        layers = config.get("num_hidden_layers") or 0
        moe_layers = layers - len(config.get("mlp_only_layers") or [])
        pad = 3 * (config.get("hidden_size") or 0) * padding_neurons * moe_layers
        out["dense_parameters_per_token"] = round(dense_params - pad)
        out["dense_weight_bytes_per_token"] = round(dense_bytes - pad * ffn_itemsize)
        out["decode_bound_vs_dense"] = out["dense_weight_bytes_per_token"] / nbytes if nbytes else None
    return out


def decode_traffic_vs(folder: str | Path, baseline: str | Path | None = None) -> dict[str, Any]:
    """`decode_traffic` of a checkpoint against a dense one: what `moeify eval` reports.

    With a baseline folder the dense figures are that model's own (its dtype included: a float32 dense
    model against a bf16 MoE counts both the sparsity and the smaller weights). Without one, an MoE is
    compared with its dense equivalent (every expert read, in the MoE's own dtypes).
    """
    info = describe(folder)
    out = {k: info[k] for k in ("active_parameters_per_token", "weight_bytes_per_token")}
    if baseline is not None:
        dense = describe(baseline)
        out["dense_parameters_per_token"] = dense["active_parameters_per_token"]
        out["dense_weight_bytes_per_token"] = dense["weight_bytes_per_token"]
    elif "dense_weight_bytes_per_token" in info:
        out["dense_parameters_per_token"] = info["dense_parameters_per_token"]
        out["dense_weight_bytes_per_token"] = info["dense_weight_bytes_per_token"]
    if "dense_weight_bytes_per_token" in out and out["weight_bytes_per_token"]:
        out["decode_bound_vs_dense"] = out["dense_weight_bytes_per_token"] / out["weight_bytes_per_token"]
    return out
