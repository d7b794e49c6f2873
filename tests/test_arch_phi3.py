"""Phi-3, the fused family: `gate_up_proj` split on load, `qkv_proj` split when carried, exact MoE out.

Adding it took one module (moeify/arch/phi3.py); these tests are what proves that the rest of the split
never needed to know. The tiny model is built from a stock `Phi3Config` like tests/tiny_models.py does.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

from moeify.arch import source_family
from moeify.errors import UnsupportedModelError
from moeify.io.reader import CheckpointReader
from moeify.split.convert import SplitOptions, split_model
from tests.char_tokenizer import add_char_tokenizer
from tests.tiny_models import COMMON, _randomize

# float32 end to end, relative to the largest logit: the near-uniform router contributes ~1e-5, the
# rest is float32 summation order (the same bound test_split.py holds every other family to).
EXACT_TOL = 1e-4


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3")
    config = Phi3Config(**COMMON, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(3)
    _randomize(Phi3ForCausalLM(config), 3).save_pretrained(folder, safe_serialization=True)
    return folder


def _logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return model(ids).logits, type(model).__name__


@pytest.mark.parametrize("shared,arch,method", [(0, "MixtralForCausalLM", "weights"),
                                                (1, "Qwen2MoeForCausalLM", "weights"),
                                                (1, "Qwen2MoeForCausalLM", "activations")])
def test_all_experts_reproduce_dense_phi3_logits(phi3_dir, tmp_path, shared, arch, method):
    out = tmp_path / "moe"
    folder = add_char_tokenizer(phi3_dir, copy_to=tmp_path / "dense")  # calibration text for `activations`
    result = split_model(folder, out, SplitOptions(experts=4, top_k=4, shared=shared, method=method,
                                                   calibration_tokens=256))
    assert result["architecture"] == arch
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    dense, _ = _logits(phi3_dir, ids)
    moe, loaded = _logits(out, ids)
    assert loaded == arch
    err = (dense - moe).abs().max() / dense.abs().max()
    assert err <= EXACT_TOL, f"relative logit error {err:.2e}"


def test_calibration_sees_the_phi3_ffn_input(phi3_dir):
    """The layer-by-layer runner drives Phi-3's own decoder layers: its X is what Phi3MLP receives."""
    from moeify.io.reader import load_json
    from moeify.split.calibrate import LayerRunner

    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    runner = LayerRunner(phi3_dir, CheckpointReader(phi3_dir), load_json(phi3_dir / "config.json", "config"),
                         tokens)
    model = AutoModelForCausalLM.from_pretrained(phi3_dir, dtype=torch.float32, local_files_only=True).eval()
    seen = []
    hook = model.model.layers[1].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(tokens)
    hook.remove()
    family = source_family(load_json(phi3_dir / "config.json", "config"))
    for layer in range(2):
        x = runner.ffn_input(layer)
        runner.advance(family.load_ffn(runner.reader, layer).forward(x))
    assert torch.allclose(x, seen[0].reshape(-1, 64), atol=1e-5)


def test_fused_tensors_are_split_by_rows(phi3_dir, tmp_path):
    out = tmp_path / "moe"
    split_model(phi3_dir, out, SplitOptions(experts=4, top_k=2, method="weights"))
    dense, moe = CheckpointReader(phi3_dir), CheckpointReader(out)
    assert not [n for n in moe.names() if "qkv_proj" in n or "gate_up_proj" in n]
    qkv = dense.get("model.layers.1.self_attn.qkv_proj.weight")
    q, k, v = (moe.get(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv")
    assert q.shape == (64, 64) and k.shape == v.shape == (32, 64)  # 4 heads, 2 kv heads of 16
    assert torch.equal(torch.cat([q, k, v]), qkv)
    # Every neuron of the fused FFN lands in exactly one expert: the written gates are a permutation.
    gate, _up = dense.get("model.layers.0.mlp.gate_up_proj.weight").chunk(2)
    experts = torch.cat([moe.get(f"model.layers.0.block_sparse_moe.experts.{j}.w1.weight") for j in range(4)])
    rows = {tuple(r.tolist()) for r in experts if r.abs().sum() > 0}
    assert rows == {tuple(r.tolist()) for r in gate}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["intermediate_size"] == 24


@pytest.mark.parametrize("change,why", [
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
     "longrope"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}},
     "partial_rotary_factor"),
])
def test_phi3_layouts_mixtral_cannot_express_are_refused(phi3_dir, change, why):
    config = {**json.loads((phi3_dir / "config.json").read_text()), **change}
    config.pop("rope_parameters", None) if "rope_scaling" in change else None
    with pytest.raises(UnsupportedModelError, match=why):
        source_family(config)
