"""Active parameters and weight bytes per decoded token (`moeify inspect`/`eval`), against a hand computation.

The tiny Llama of tests/tiny_models.py: hidden 64, FFN 96, 2 layers, 4 heads of 16 (2 KV heads), vocab 128,
float32. Per layer: attention q 64x64 + k 32x64 + v 32x64 + o 64x64 = 12288, two norms 128, FFN 3*64*96 =
18432. A decoded token reads one embedding row (64) unless the embedding is tied (then it is the output
head and read in full), the final norm (64) and lm_head (128*64 = 8192).
"""

from __future__ import annotations

import pytest

from moeify.describe import decode_traffic_vs, describe
from moeify.quant import quantize_fp8
from moeify.split.convert import SplitOptions, split_model
from tests.tiny_models import build

ATTN, NORMS, HEAD, ROW, FINAL = 12288, 128, 128 * 64, 64, 64
DENSE = ROW + HEAD + FINAL + 2 * (ATTN + NORMS + 3 * 64 * 96)  # 70016


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("traffic") / "llama")


def test_dense_reads_every_weight_but_one_embedding_row(llama):
    info = describe(llama)
    assert info["active_parameters_per_token"] == DENSE
    assert info["weight_bytes_per_token"] == 4 * DENSE  # float32
    assert "decode_bound_vs_dense" not in info


def test_tied_embedding_is_read_in_full(tmp_path):
    info = describe(build("llama_tied", tmp_path / "tied"))
    # no lm_head tensor: the 128x64 embedding serves as the head, so the token reads it whole, not one row
    assert info["active_parameters_per_token"] == HEAD + FINAL + 2 * (ATTN + NORMS + 3 * 64 * 96)


def test_mixtral_split_reads_top_k_experts(llama, tmp_path):
    out = tmp_path / "mixtral"
    split_model(llama, out, SplitOptions(experts=4, top_k=1, method="weights"))
    info = describe(out)
    router = 4 * 64  # float32 like the rest here
    expert = 3 * 64 * 24  # 96 / 4 = 24 neurons
    active = ROW + HEAD + FINAL + 2 * (ATTN + NORMS + router + expert)
    assert info["active_parameters_per_token"] == active
    assert info["weight_bytes_per_token"] == 4 * active
    # the dense equivalent reads all 4 experts and no router: exactly the dense model
    assert info["dense_parameters_per_token"] == DENSE
    assert info["decode_bound_vs_dense"] == pytest.approx(DENSE / active)
    against_source = decode_traffic_vs(out, llama)
    assert against_source["dense_weight_bytes_per_token"] == 4 * DENSE
    assert against_source["decode_bound_vs_dense"] == pytest.approx(DENSE / active)


def test_shared_expert_and_padding_count(llama, tmp_path):
    out = tmp_path / "qwen2moe"
    # 3 routed + 1 shared, padded to 16: 96/4 = 24 -> 32 neurons, 4*32 - 96 = 32 zero neurons per layer
    split_model(llama, out, SplitOptions(experts=3, top_k=1, shared=1, pad_to=16, method="weights"))
    info = describe(out)
    biases = 64 + 32 + 32  # Qwen2-MoE attention carries (zero) q/k/v biases
    routed, shared, router, gate = 3 * 64 * 32, 3 * 64 * 32, 3 * 64, 64
    per_layer = ATTN + biases + NORMS + router + gate + routed + shared
    assert info["active_parameters_per_token"] == ROW + HEAD + FINAL + 2 * per_layer
    # dense equivalent: every expert, no router or gate, the padding neurons taken back out
    assert info["dense_parameters_per_token"] == DENSE + 2 * biases


def test_fp8_counts_one_byte_per_weight_plus_scales(llama, tmp_path):
    split = tmp_path / "mixtral"
    split_model(llama, split, SplitOptions(experts=4, top_k=1, method="weights"))
    fp8 = tmp_path / "fp8"
    quantize_fp8(split, fp8, scheme="channel", verify=False)
    info = describe(fp8)
    attn = ATTN + 4 * (64 + 32 + 32 + 64)  # fp8 values + one float32 scale per output row
    expert = 3 * 64 * 24 + 4 * (24 + 24 + 64)
    kept = 4 * (ROW + HEAD + FINAL + 2 * (NORMS + 4 * 64))  # embedding row, head, norms, router stay float32
    assert info["weight_bytes_per_token"] == kept + 2 * (attn + expert)
