"""`moeify split`: exact through stock transformers with all experts on; sum-of-selected-experts otherwise."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from moeify.arch import target_arch
from moeify.io.reader import CheckpointReader
from moeify.split.convert import SplitOptions, expert_size_for, split_model

# (tiny model, shared experts, expected architecture)
FAMILIES = [
    ("llama", 0, "MixtralForCausalLM"),
    ("llama_tied", 1, "Qwen2MoeForCausalLM"),
    ("llama3_rope", 0, "MixtralForCausalLM"),
    ("mistral", 0, "MixtralForCausalLM"),
    ("qwen2", 2, "Qwen2MoeForCausalLM"),
    ("qwen2", 0, "Qwen2MoeForCausalLM"),
    ("qwen3", 0, "Qwen3MoeForCausalLM"),
    ("llama_sharded", 0, "MixtralForCausalLM"),
]
# Relative to the largest logit; the near-uniform router contributes ~1e-5 (see split.router_logit_std).
EXACT_TOL = 1e-4


def _logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return model(ids).logits, model


@pytest.mark.parametrize("name,shared,arch", FAMILIES)
def test_all_experts_reproduce_dense_logits(tiny_models, tmp_path, name, shared, arch):
    out = tmp_path / "moe"
    result = split_model(tiny_models[name], out, SplitOptions(experts=4, top_k=4, shared=shared))
    assert result["architecture"] == arch
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    dense, _ = _logits(tiny_models[name], ids)
    moe, model = _logits(out, ids)
    assert type(model).__name__ == arch
    err = (dense - moe).abs().max() / dense.abs().max()
    assert err <= EXACT_TOL, f"{name}: relative logit error {err:.2e}"


def test_config_carries_attention_rope_and_tokens(tiny_models, tmp_path):
    out = tmp_path / "moe"
    split_model(tiny_models["llama3_rope"], out, SplitOptions(experts=4, top_k=2))
    dense = json.loads((tiny_models["llama3_rope"] / "config.json").read_text())
    moe = json.loads((out / "config.json").read_text())
    assert moe["rope_parameters"] == dense["rope_parameters"]
    assert moe["rope_scaling"]["rope_type"] == "llama3"  # legacy key for transformers 4.x
    assert moe["num_experts"] == moe["num_local_experts"] == 4
    assert moe["num_experts_per_tok"] == 2
    for key in ("num_key_value_heads", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "bos_token_id"):
        assert moe.get(key) == dense.get(key), key
    source_has = (tiny_models["llama3_rope"] / "generation_config.json").is_file()
    assert (out / "generation_config.json").is_file() is source_has


def test_mistral_sliding_window_carried(tiny_models, tmp_path):
    out = tmp_path / "moe"
    split_model(tiny_models["mistral"], out, SplitOptions(experts=4, top_k=2))
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 16


@pytest.mark.parametrize("name,shared", [("llama", 0), ("qwen2", 1), ("qwen3", 0)])
def test_each_layer_sums_the_experts_its_router_selected(tiny_models, tmp_path, name, shared):
    """With top-k < experts, every MoE block equals shared + the selected experts, weight 1 each.

    The model runs in float32 (transformers' grouped expert matmul has no float64); the reference is
    computed in float64 from the same block inputs and the weights as written. The experts the model ran
    are read from its router; they must be the float64 top-k wherever the k-th and (k+1)-th logits are
    not a near-tie: transformers ranks float32 softmax probabilities, which resolve logit gaps of about
    6e-8 (one float32 ulp at 1.0), so gaps under 3e-7 (~5% of the 1e-5 logit spread) may go either way.
    """
    out = tmp_path / "moe"
    result = split_model(tiny_models[name], out, SplitOptions(experts=4, top_k=2, shared=shared))
    target = target_arch(result["target"])
    reader = CheckpointReader(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    config = json.loads((out / "config.json").read_text())
    seen = {}

    def hook(layer):
        def fn(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[layer] = (args[0].detach().double(), out.detach().double())
        return fn

    def gate_hook(layer):
        def fn(module, args, output):
            picked[layer] = output[2].detach()  # (logits, weights, indices)
        return fn

    picked = {}
    blocks = [getattr(layer, "block_sparse_moe", None) or layer.mlp for layer in model.model.layers]
    for i, block in enumerate(blocks):
        block.register_forward_hook(hook(i))
        block.gate.register_forward_hook(gate_hook(i))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    scale = target.routed_scale(type("P", (), {"top_k": 2, "experts": 4})())
    for i, (x, y) in seen.items():
        x = x.reshape(-1, x.shape[-1])
        router = reader.get(target.router_name(i)).double()
        logits = F.linear(x, router)
        top = torch.topk(logits, 3, dim=-1)
        clear = (top.values[:, 1] - top.values[:, 2]) > 3e-7
        chosen = picked[i].reshape(-1, 2)
        assert clear.float().mean() > 0.7
        experts = config["num_experts"]
        ran = F.one_hot(chosen, experts).sum(1)
        assert torch.equal(ran[clear], F.one_hot(top.indices[clear, :2], experts).sum(1)), f"layer {i}"
        ref = torch.zeros_like(x)
        for e in range(config["num_experts"]):
            n = target.expert_names(i, e)
            g, u, d = (reader.get(t).double() for t in (n.gate, n.up, n.down))
            expert = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d / scale)
            ref += expert * (chosen == e).any(-1, keepdim=True)
        if shared:
            n = target.shared_names(i)
            g, u, d = (reader.get(t).double() for t in (n.gate, n.up, n.down))
            ref += F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d * target.shared_gate_value)
        err = (y.reshape(-1, y.shape[-1]) - ref).abs().max() / ref.abs().max()
        assert err < 1e-4, f"layer {i}: relative error {err:.2e}"


def test_padding_to_multiple_keeps_outputs(tiny_models, tmp_path):
    out = tmp_path / "moe"
    result = split_model(tiny_models["llama"], out, SplitOptions(experts=4, top_k=4, pad_to=32))
    assert result["expert_size"] == 32 and result["padding_neurons_per_layer"] == 4 * 32 - 96
    assert any("padded" in n for n in result["notes"]) or result["notes"] == []
    ids = torch.randint(0, 128, (1, 12))
    dense, _ = _logits(tiny_models["llama"], ids)
    moe, _ = _logits(out, ids)
    assert (dense - moe).abs().max() / dense.abs().max() <= EXACT_TOL


def test_expert_sizes_stay_aligned_for_grouped_matmuls(tiny_models, tmp_path):
    """An odd expert size (171 for SmolLM2 with 9 experts) crashed transformers' grouped matmul."""
    out = tmp_path / "moe"
    result = split_model(tiny_models["qwen2"], out, SplitOptions(experts=6, top_k=2, shared=1))  # 96/7 = 13.7
    assert result["expert_size"] % 8 == 0
    ids = torch.randint(0, 128, (1, 8))
    _logits(out, ids)  # must not raise


def test_uneven_split_pads_and_records_metadata(tiny_models, tmp_path):
    out = tmp_path / "moe"
    result = split_model(tiny_models["llama"], out, SplitOptions(experts=5, top_k=2))
    assert result["expert_size"] == expert_size_for(96, 5, 0, 1) == 24  # 19.2 -> 20 -> 8-aligned
    meta = json.loads((out / "moeify.json").read_text())
    split = meta["stages"]["split"]
    assert split["complete"] and split["options"]["experts"] == 5
    assert split["source"]["config_hash"] and split["timings_s"]["total"] > 0
    assert [layer["expert_sizes"] for layer in split["layers"]] == [[24] * 5] * 2
    assert split["activation_ratio"] == pytest.approx(2 * 24 / 96, rel=1e-6)


def test_dense_layers_stay_dense_on_qwen_targets(tiny_models, tmp_path):
    out = tmp_path / "moe"
    result = split_model(tiny_models["qwen3"], out, SplitOptions(experts=4, top_k=1, dense_layers=[0]))
    assert json.loads((out / "config.json").read_text())["mlp_only_layers"] == [0]
    assert result["activation_ratio"] == pytest.approx((96 + 24) / (2 * 96))
    ids = torch.randint(0, 128, (1, 8))
    _, model = _logits(out, ids)
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"


def test_output_files_get_the_umask(tiny_models, tmp_path):
    import os
    import stat

    out = tmp_path / "moe"
    old = os.umask(0o022)
    try:
        split_model(tiny_models["llama_sharded"], out, SplitOptions(experts=2, top_k=1, max_shard_bytes=50_000))
    finally:
        os.umask(old)
    files = list(out.iterdir())
    assert len([f for f in files if f.suffix == ".safetensors"]) > 1
    assert (out / "model.safetensors.index.json").is_file()
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_sharded_output_index_is_complete(tiny_models, tmp_path):
    out = tmp_path / "moe"
    split_model(tiny_models["llama"], out, SplitOptions(experts=4, top_k=2, max_shard_bytes=40_000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    reader = CheckpointReader(out)  # validates every header against the index
    assert set(index["weight_map"]) == set(reader.names())
    assert index["metadata"]["total_size"] == reader.total_bytes()
