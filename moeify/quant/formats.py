"""The `quantization_config` entries of config.json that loaders read, one per scheme.

`block` is the DeepSeek-V3 FP8 format (`quant_method: fp8`), read by transformers' FineGrainedFP8 and
vLLM's Fp8 loaders. `channel` and `tensor` are compressed-tensors `float-quantized` checkpoints with
dynamic per-token FP8 activations (llm-compressor's FP8_DYNAMIC preset for `channel`), read by vLLM
and by transformers (on a CPU with `CompressedTensorsConfig(dequantize=True)`). Unquantized modules are
named in full, which every reader matches exactly.

The compressed-tensors entry is checked against compressed-tensors' own config model
(`QuantizationConfig`) whenever that package is installed (it is a dev extra, and every vLLM install
has it): the model must accept the entry and read back every value moeify wrote. It stays a dict
written here rather than the model's dump, on purpose: a hard dependency would pull compressed-tensors
and its torch/transformers pins into every install for two of three schemes, and dumping through
whatever version is installed would make config.json depend on the environment (0.20 adds a
`moe_sparsity_config` key, for one). The test suite runs the check with the package present.
"""

from __future__ import annotations

from typing import Any

from moeify.quant.fp8 import BLOCK


def quantization_config(scheme: str, unquantized_modules: list[str]) -> dict[str, Any]:
    if scheme == "block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [BLOCK, BLOCK], "modules_to_not_convert": list(unquantized_modules)}
    if scheme not in ("channel", "tensor"):
        raise ValueError(f"unknown scheme {scheme!r}")
    config = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                            "strategy": scheme, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                                      "strategy": "token", "dynamic": True},
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "ignore": list(unquantized_modules),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    check_compressed_tensors(config)
    return config


def check_compressed_tensors(config: dict[str, Any]) -> None:
    """compressed-tensors' `QuantizationConfig` must accept `config` and read every value back unchanged."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:  # not installed: nothing to check against here (the tests run it with the package)
        return
    parsed = QuantizationConfig.model_validate(config).model_dump()
    drift = sorted(k for k, v in config.items() if parsed.get(k) != v)
    if drift:
        raise RuntimeError(f"compressed-tensors reads quantization_config differently: {', '.join(drift)}")


def scheme_from_config(config: dict[str, Any]) -> str | None:
    """The moeify scheme a config.json's quantization_config describes, or None when it is not FP8 we know."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        return "block" if qc.get("weight_block_size") else "tensor"
    if method == "compressed-tensors" and qc.get("format") in ("float-quantized", None):
        groups = qc.get("config_groups")
        weights = [g["weights"] for g in (groups.values() if isinstance(groups, dict) else [])
                   if isinstance(g, dict) and isinstance(g.get("weights"), dict)]
        strategies = {w.get("strategy") for w in weights}
        types = {w.get("type") for w in weights}
        if types == {"float"} and len(strategies) == 1 and strategies <= {"channel", "tensor"}:
            return strategies.pop()
    return None
