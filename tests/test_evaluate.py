"""`moeify eval`: perplexity equals a reference computation; load, ratio and layer errors are consistent."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moeify.cli import app
from moeify.data import load_tokenizer, tokenize_chunks
from moeify.evaluate import EvalOptions, evaluate_model
from moeify.split.convert import SplitOptions, split_model
from tests.char_tokenizer import add_char_tokenizer

TEXT = ("Mrs. Dashwood was surprised only for a moment at seeing him; for the end of his coming to Barton was, "
        "in her opinion, of all things the most natural.\n") * 12


@pytest.fixture(scope="module")
def dense_and_moe(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    folder = add_char_tokenizer(tiny_models["llama"], copy_to=root / "dense")
    out = root / "moe"
    split_model(folder, out, SplitOptions(experts=4, top_k=2, method="weights", dtype="float32"))
    text = out.parent / "text.txt"
    text.write_text(TEXT)
    return folder, out, text


def _reference_perplexity(folder, text, seq_len, max_chunks):
    """float64 cross-entropy over the same fixed chunks, computed by hand from the logits."""
    chunks = tokenize_chunks(load_tokenizer(folder), text, seq_len, max_chunks=max_chunks)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in chunks:
            logp = torch.log_softmax(model(row[None]).logits[0].double(), dim=-1)
            nll -= logp[torch.arange(len(row) - 1), row[1:]].sum().item()
            n += len(row) - 1
    return math.exp(nll / n), chunks.numel()


def test_perplexity_equals_reference(dense_and_moe):
    folder, moe, text = dense_and_moe
    result = evaluate_model(moe, EvalOptions(str(text), seq_len=64, max_chunks=4), baseline=folder)
    ref_moe, tokens = _reference_perplexity(moe, TEXT, 64, 4)
    ref_dense, _ = _reference_perplexity(folder, TEXT, 64, 4)
    assert result["tokens"] == tokens
    assert result["perplexity"] == pytest.approx(ref_moe, rel=1e-5)
    assert result["baseline_perplexity"] == pytest.approx(ref_dense, rel=1e-5)
    assert result["perplexity_ratio"] == pytest.approx(ref_moe / ref_dense, rel=1e-5)


def test_load_ratio_and_layer_errors(dense_and_moe):
    folder, moe, text = dense_and_moe
    result = evaluate_model(moe, EvalOptions(str(text), seq_len=64, max_chunks=2), baseline=folder)
    assert result["chunks"] == 2
    assert set(result["expert_load"]) == {"0", "1"}
    for counts in result["expert_load"].values():
        assert len(counts) == 4 and sum(counts) == 2 * 64 * 2  # every token picks top-2
    assert result["activation_ratio"] == pytest.approx(0.5)
    errors = result["layer_reconstruction_error"]
    assert len(errors) == 2 and all(0 < e < 2 for e in errors)
    dense = evaluate_model(folder, EvalOptions(str(text), seq_len=64, max_chunks=2))
    assert dense["activation_ratio"] == 1.0 and "expert_load" not in dense


def test_all_experts_reconstruct_exactly(tiny_models, tmp_path):
    folder = add_char_tokenizer(tiny_models["llama"], copy_to=tmp_path / "dense")
    split_model(folder, tmp_path / "moe", SplitOptions(experts=4, top_k=4, method="weights", dtype="float32"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    result = evaluate_model(tmp_path / "moe", EvalOptions(str(text), seq_len=64, max_chunks=1), baseline=folder)
    assert max(result["layer_reconstruction_error"]) < 1e-4
    assert result["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_cli_json_and_plot(dense_and_moe, tmp_path):
    pytest.importorskip("matplotlib")
    folder, moe, text = dense_and_moe
    png = tmp_path / "load.png"
    res = CliRunner().invoke(app, ["eval", str(moe), "--baseline", str(folder), "--text", str(text),
                                   "--seq-len", "64", "--max-chunks", "1", "--json", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["chunks"] == 1


def test_cli_errors_are_one_line(dense_and_moe, tmp_path):
    folder, moe, _ = dense_and_moe
    res = CliRunner().invoke(app, ["eval", str(moe), "--text", str(tmp_path / "missing.txt")])
    assert res.exit_code == 2
    assert "no such text file" in res.output
    res = CliRunner().invoke(app, ["eval", str(moe), "--max-chunks", "0"])
    assert res.exit_code == 2 and "--max-chunks" in res.output
