"""Messages that say what happened: help texts, recipe errors in recipe words, sizes against the real
source dtype, and an offline recipe check that answers at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from moeify.cli import app
from moeify.pipeline.demo import DEMO_RECIPE
from moeify.pipeline.recipe import find_recipe, load_recipe
from moeify.quant.plan import choose_scheme

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_demo_help_describes_the_split_it_runs():
    split = load_recipe(find_recipe(DEMO_RECIPE)).options("split")
    text = " ".join(runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "200"}).output.split())
    assert f"{split['experts']} experts (top-{split['top_k']}) + {split['shared']} shared" in text, text
    assert "into 8 experts" not in text and "--model-path" in text


def test_a_scheme_given_in_a_recipe_is_not_said_to_come_from_the_command_line():
    scheme, reason = choose_scheme({"w": (64, 64)}, "channel")
    assert scheme == "channel" and "recipe" in reason and reason != "chosen with --scheme"


def test_recipe_errors_name_recipe_fields(tiny_models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_models['llama']}\noutput: {tmp_path / 'out'}\nsplit:\n  experts: 4\n"
                      "  top_k: 9\n")
    res = runner.invoke(app, ["validate", str(recipe)], env={"COLUMNS": "300"})
    assert res.exit_code == 2
    message = res.stderr.split("(hint:")[0]
    assert "split.top_k" in message and "split.experts" in message and "--top-k" not in message, res.stderr
    assert "split.top_k=" in res.stderr  # the hint's example is a recipe override


def test_quantize_compares_with_the_source_dtype(tiny_models, tmp_path):
    """The tiny models are float32: FP8 is about a quarter of them, not "51.9% of bf16"."""
    moe = tmp_path / "moe"
    assert runner.invoke(app, ["split", str(tiny_models["llama"]), "-e", "2", "-k", "1", "-o", str(moe),
                               "--method", "weights", "-q"]).exit_code == 0
    res = runner.invoke(app, ["quantize", str(moe), "-o", str(tmp_path / "q")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output  # --fp8 is the default
    line = next(x for x in res.stdout.splitlines() if x.startswith("quantized tensors"))
    assert "of their float32 size" in line and "of bf16)" in line and "vs bf16" not in res.stdout, line


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_offline_recipe_check_answers_at_once_with_the_hint(tmp_path):
    """A Hub that cannot be reached: one note at once, naming model=PATH, and no retry warnings."""
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf"), "MOEIFY_CACHE": str(tmp_path / "cache"), "COLUMNS": "300"}
    for args in (["validate", DEMO_RECIPE], ["run", DEMO_RECIPE, "--dry-run", f"output={tmp_path / 'o'}"]):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "moeify", *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=120)
        seconds = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        assert "Retrying" not in done.stderr and "Retry" not in done.stderr, done.stderr
        notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
        assert len(notes) == 1 and "cannot be reached" in notes[0] and "model=PATH" in notes[0], done.stderr
        assert "moeify demo --model-path" in notes[0]
        assert seconds < 20, seconds  # before: about 27-31 s of retries


def test_demo_model_path_prints_the_cached_folder_alone(monkeypatch, tmp_path):
    import moeify.pipeline.demo as demo

    monkeypatch.setattr(demo, "demo_model_path", lambda reporter=None: tmp_path / "SmolLM2-135M-x")
    res = runner.invoke(app, ["demo", "--model-path"])
    assert res.exit_code == 0 and res.stdout == f"{tmp_path / 'SmolLM2-135M-x'}\n"


def test_the_demo_writes_under_the_cache_not_into_the_current_folder(monkeypatch, tmp_path):
    import moeify.pipeline.demo as demo

    monkeypatch.setenv("MOEIFY_CACHE", str(tmp_path / "cache"))
    assert demo.demo_dir() == tmp_path / "cache" / "demo"
    seen = {}

    def fake_run_demo(output, **kwargs):
        seen["output"] = output
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    runner.invoke(app, ["demo"])
    assert seen["output"] is None  # run_demo then resolves demo_dir()
    assert "/moeify-demo/" in (ROOT / ".gitignore").read_text()  # an older -o moeify-demo is ignored too
