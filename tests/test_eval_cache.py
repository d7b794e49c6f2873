"""`moeify eval MOE --baseline DENSE` scores the dense baseline once per weights and tokens, then reuses it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import moeify.evaluate as evaluate
from moeify.cli import app
from moeify.evaluate import EvalOptions, evaluate_model
from moeify.progress import RecordingReporter
from moeify.split.convert import SplitOptions, split_model
from tests.char_tokenizer import add_char_tokenizer

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40


@pytest.fixture()
def setup(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEIFY_CACHE", str(tmp_path / "cache"))
    dense = add_char_tokenizer(tiny_models["llama"], copy_to=tmp_path / "dense")
    moe = tmp_path / "moe"
    split_model(dense, moe, SplitOptions(experts=4, top_k=2, method="weights"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    calls = {"n": 0}
    original = evaluate.chunk_nll

    def counting(model, chunk):
        calls["n"] += 1
        return original(model, chunk)

    monkeypatch.setattr(evaluate, "chunk_nll", counting)
    return dense, moe, text, calls


def test_second_eval_uses_the_cached_baseline_and_says_so(setup):
    dense, moe, text, calls = setup
    options = EvalOptions(str(text), seq_len=64, max_chunks=3)
    first = evaluate_model(moe, options, baseline=dense)
    assert calls["n"] == 6 and first["baseline_cached"] is False  # 3 chunks, model and baseline
    reporter = RecordingReporter()
    second = evaluate_model(moe, options, baseline=dense, reporter=reporter)
    assert calls["n"] == 9  # only the MoE's 3 chunks
    assert second["baseline_cached"] is True
    assert second["baseline_perplexity"] == first["baseline_perplexity"]
    assert second["perplexity"] == first["perplexity"]
    assert second["layer_reconstruction_error"] == first["layer_reconstruction_error"]
    assert any("from the cache" in n for n in reporter.notes)
    # other settings (here: fewer chunks) are other tokens: scored again
    evaluate_model(moe, EvalOptions(str(text), seq_len=64, max_chunks=2), baseline=dense)
    assert calls["n"] == 9 + 4
    # asked not to use the cache
    again = evaluate_model(moe, EvalOptions(str(text), seq_len=64, max_chunks=3, baseline_cache=False),
                           baseline=dense)
    assert calls["n"] == 13 + 6 and again["baseline_cached"] is False


def test_cli_marks_a_cached_baseline(setup):
    dense, moe, text, _ = setup
    args = ["eval", str(moe), "--baseline", str(dense), "--text", str(text), "--seq-len", "64", "--max-chunks", "2"]
    runner = CliRunner()
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "(cached: same weights and tokens)" in res.stdout and "from the cache" in res.stderr
    data = json.loads(runner.invoke(app, [*args, "--json", "--recompute-baseline"]).stdout)
    assert data["baseline_cached"] is False
