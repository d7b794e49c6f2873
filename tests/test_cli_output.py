"""What the CLI prints where nobody watches a terminal: progress lines in logs, results never cut to a width."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from moeify.cli import app
from moeify.pipeline.recipe import shipped_recipes
from tests.char_tokenizer import add_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_split_prints_plain_progress_lines_when_stderr_is_a_file(tiny_models, tmp_path):
    """Under nohup or `2> log`, a long loop reports `layer i of n`, its rate and the time left, as plain lines."""
    log = tmp_path / "stderr.log"
    env = {**os.environ, "MOEIFY_PROGRESS_EVERY": "0", "COLUMNS": "60"}
    env.pop("MOEIFY_PROGRESS", None)
    with open(log, "w") as err:
        done = subprocess.run([sys.executable, "-m", "moeify", "split", str(tiny_models["llama"]), "-e", "4", "-k",
                               "2", "-o", str(tmp_path / "moe")], stdout=subprocess.PIPE, stderr=err, env=env,
                              cwd=ROOT, timeout=300)
    assert done.returncode == 0, log.read_text()
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("Splitting layers: ")]
    assert lines and lines[-1].startswith("Splitting layers: 2/2 (100%)"), text
    assert "left " in lines[0] and "elapsed " in lines[0], lines
    assert "\x1b[" not in text  # no terminal escape codes in a log file


def test_eval_and_finetune_progress_reach_a_non_terminal(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEIFY_PROGRESS_EVERY", "0")
    monkeypatch.delenv("MOEIFY_PROGRESS", raising=False)
    runner = CliRunner()
    dense = add_char_tokenizer(tiny_models["llama"], copy_to=tmp_path / "dense")
    moe = tmp_path / "moe"
    assert runner.invoke(app, ["split", str(dense), "-e", "4", "-k", "2", "-o", str(moe),
                               "--method", "weights", "-q"]).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 80)
    r = runner.invoke(app, ["eval", str(moe), "--text", str(text), "--seq-len", "32", "--max-chunks", "3"])
    assert r.exit_code == 0, r.output
    assert "Evaluating: 3/3 (100%)" in r.stderr, r.stderr
    r = runner.invoke(app, ["finetune", str(moe), "--teacher", str(dense), "--data", str(text),
                            "--stage", "2", "--max-steps", "3", "--batch-size", "2", "--seq-len", "32",
                            "--device", "cpu", "-o", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("Distilling: ")]
    assert lines and lines[-1].startswith("Distilling: 3/3 (100%)") and "tok/s" in lines[-1], r.stderr


def test_names_users_copy_are_never_cut_at_60_columns(tiny_models, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["recipes", "list"], env={"COLUMNS": "60"})
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout
    for name in shipped_recipes():
        assert name in r.stdout.split(), name
    deep = tmp_path / "a-rather-long-folder-name-for-the-output" / "of-a-split-that-users-copy"
    r = runner.invoke(app, ["split", str(tiny_models["llama"]), "-e", "2", "-k", "1", "-o", str(deep)],
                      env={"COLUMNS": "60"})
    assert r.exit_code == 0, r.output
    assert str(deep) in r.stdout and "…" not in r.stdout
