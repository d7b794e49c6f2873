"""The compressed-tensors `quantization_config` moeify writes, checked by compressed-tensors' own model."""

from __future__ import annotations

import pytest

from moeify.quant.formats import check_compressed_tensors, quantization_config, scheme_from_config

pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("scheme", ["channel", "tensor"])
def test_written_config_is_what_compressed_tensors_reads(scheme):
    from compressed_tensors.quantization import QuantizationConfig

    config = quantization_config(scheme, ["lm_head", "model.layers.0.mlp.gate"])
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.config_groups["group_0"].weights.strategy == scheme
    assert parsed.config_groups["group_0"].input_activations.dynamic is True
    assert parsed.ignore == ["lm_head", "model.layers.0.mlp.gate"]
    assert scheme_from_config({"quantization_config": config}) == scheme


def test_a_config_compressed_tensors_rejects_is_refused():
    config = quantization_config("channel", [])
    config["config_groups"]["group_0"]["weights"]["strategy"] = "per-row"  # no such strategy
    with pytest.raises(ValueError):
        check_compressed_tensors(config)
    config = quantization_config("channel", [])
    config["config_groups"]["group_0"]["weights"]["num_bits"] = "8"  # coerced: read back differently
    with pytest.raises(RuntimeError, match="config_groups"):
        check_compressed_tensors(config)
