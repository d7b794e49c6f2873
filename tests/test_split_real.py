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


def test_default_split_stays_within_3x_dense_on_heldout_text(smollm2_dir, tmp_path):
    """`moeify split MODEL` with nothing else: the default layout (shared experts, half of the FFN) must not be
    a trap. Scored on the shipped held-out excerpts, which share no passage with the calibration text; the
    bound (3x, the issue's) is well above the measured figure in docs/quality.md, so only a real regression
    (defaults back to no shared experts, calibration or repair broken) fails it."""
    from moeify.data import packaged_text
    from moeify.evaluate import EvalOptions, evaluate_model

    torch.set_num_threads(2)
    out = tmp_path / "moe"
    result = split_model(smollm2_dir, out, SplitOptions())
    assert 0.45 <= result["activation_ratio"] <= 0.55 and result["options"]["shared"] > 0
    opts = dict(seq_len=512, max_chunks=2)
    ratios = {}
    for name in ("eval_sense_and_sensibility.txt", "eval_wikipedia.txt"):
        text = str(packaged_text(name))
        dense = evaluate_model(smollm2_dir, EvalOptions(text, **opts))["perplexity"]
        ratios[name] = evaluate_model(out, EvalOptions(text, **opts))["perplexity"] / dense
    assert ratios["eval_sense_and_sensibility.txt"] <= 3.0, ratios
    assert ratios["eval_wikipedia.txt"] <= 4.0, ratios
