"""The real SmolLM2-135M: with every expert on, the split model keeps dense perplexity (within 0.1%)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeify.data import load_tokenizer, tokenize_chunks
from moeify.split.convert import SplitOptions, split_model
from tests.reference import perplexity

pytestmark = pytest.mark.slow


def test_all_experts_keep_dense_perplexity(smollm2_dir, shared_text, tmp_path):
    torch.set_num_threads(2)
    out = tmp_path / "moe"
    split_model(smollm2_dir, out, SplitOptions(experts=8, top_k=8, method="weights"))
    tok = load_tokenizer(smollm2_dir)
    chunks = tokenize_chunks(tok, shared_text("sense_and_sensibility.txt")[50_000:], 256, max_chunks=3)
    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    p_dense, p_moe = perplexity(dense, chunks), perplexity(moe, chunks)
    assert abs(p_moe / p_dense - 1) < 1e-3, (p_dense, p_moe)
