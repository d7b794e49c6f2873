"""The split and inspect commands: results on stdout, one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moeify.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_split_then_inspect_json(tiny_models, tmp_path):
    out = tmp_path / "moe"
    r = invoke("split", tiny_models["llama"], "--experts", "4", "--top-k", "2", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["architecture"] == "MixtralForCausalLM" and data["activation_ratio"] == pytest.approx(0.5)
    r = invoke("inspect", out, "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "moe" and info["experts"] == 4 and info["top_k"] == 2
    assert info["activation_ratio"] == pytest.approx(0.5)
    r = invoke("inspect", tiny_models["qwen2"], "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "dense" and info["can_become"] == ["qwen2_moe"]


@pytest.mark.parametrize(("top_k", "shown", "suggested"), [(2, "50.0%", "0.25"), (1, "25.0%", "0.5")])
def test_active_hint_suggests_another_share(tiny_models, tmp_path, top_k, shown, suggested):
    r = invoke("split", tiny_models["llama"], "-e", "4", "-k", str(top_k), "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert f"{shown} of the dense FFN per token (another with --active, e.g. {suggested})" in r.stdout


def test_active_hint_never_repeats_the_share_used():
    from moeify.cli.split_cmd import active_hint

    for ratio in (0.05, 0.125, 0.25, 0.3, 0.375, 0.5, 0.75, 1.0):
        suggested = float(active_hint(ratio).rsplit(" ", 1)[1])
        assert abs(suggested - ratio) >= 0.125, (ratio, suggested)


def test_quiet_prints_nothing(tiny_models, tmp_path):
    r = invoke("split", tiny_models["llama"], "-e", "2", "-k", "1", "-o", tmp_path / "o", "--quiet")
    assert r.exit_code == 0 and r.stdout == ""


def _unsupported(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    return folder


@pytest.mark.parametrize("case,args,message", [
    ("missing folder", ["split", "{tmp}/nope", "-o", "{tmp}/out"], "no such folder"),
    ("top-k > experts", ["split", "{llama}", "-e", "4", "-k", "5", "-o", "{tmp}/out"], "--top-k must be between"),
    ("zero experts", ["split", "{llama}", "-e", "0", "-o", "{tmp}/out"], "--experts must be at least 1"),
    ("too many experts", ["split", "{llama}", "-e", "200", "-k", "1", "-o", "{tmp}/out"], "more neurons than"),
    ("shared on qwen3", ["split", "{qwen3}", "-e", "4", "-s", "1", "-o", "{tmp}/out"], "no shared expert"),
    ("shared on mixtral", ["split", "{llama}", "-e", "4", "-s", "1", "--target", "mixtral", "-o", "{tmp}/out"],
     "no shared experts"),
    ("unsupported family", ["split", "{gpt2}", "-o", "{tmp}/out"], "not supported"),
    ("existing output", ["split", "{llama}", "-o", "{llama}/../qwen2"], "already exists"),
    ("output inside input", ["split", "{llama}", "-o", "{llama}/moe"], "inside the input"),
    ("unknown method", ["split", "{llama}", "--method", "magic", "-o", "{tmp}/out"], "unknown --method"),
    ("dense layers on mixtral", ["split", "{llama}", "-e", "4", "-k", "2", "--dense-layers", "0", "-o", "{tmp}/out"],
     "cannot keep layers"),
])
def test_bad_input_is_one_line_exit_2(tiny_models, tmp_path, case, args, message):
    gpt2 = _unsupported(tmp_path)
    subst = {"tmp": tmp_path, "llama": tiny_models["llama"], "qwen3": tiny_models["qwen3"], "gpt2": gpt2}
    argv = [a.format(**subst) for a in args]
    r = invoke(*argv)
    assert r.exit_code == 2, (case, r.output)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".moeify-tmp-*"))


def test_pickle_only_checkpoint_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2,
                                                   "vocab_size": 10}))
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    r = invoke("split", folder, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "never unpickles" in r.stderr
