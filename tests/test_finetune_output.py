"""`moeify finetune` claims its output before training: a second run to the same -o fails in seconds, not
after the first one's training; Ctrl-C releases the claim and --resume still continues from OUT.ckpt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeify.finetune import FinetuneOptions, finetune
from moeify.finetune.state import TrainingInterrupted, checkpoint_dir
from moeify.io.output import LOCK_SUFFIX
from moeify.io.reader import CheckpointReader
from moeify.progress import Reporter
from moeify.split.convert import SplitOptions, split_model
from tests.hostile import leftovers
from tests.test_finetune import _InterruptAt

torch.set_num_threads(2)
TEXT = " ".join(f"w{i % 97} w{(i * 7) % 89} w{(i * 13) % 83}" for i in range(600))


@pytest.fixture(scope="module")
def moe(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A split tiny Llama with a word tokenizer, so the CLI can train it on a text file."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("ft_output")
    folder = root / "moe"
    split_model(tiny_models["llama"], folder, SplitOptions(experts=4, top_k=2, method="weights"))
    vocab = {"[UNK]": 0, "[EOS]": 1}
    for word in TEXT.split():
        if len(vocab) < 128 and word not in vocab:
            vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(folder)
    data = root / "text.txt"
    data.write_text(TEXT)
    return {"moe": folder, "dense": tiny_models["llama"], "data": data}


def _options(moe, **kw) -> FinetuneOptions:
    base = dict(teacher=str(moe["dense"]), data=str(moe["data"]), stage="2", max_steps=2, seq_len=16,
                batch_size=2, lr=1e-3, device="cpu")
    return FinetuneOptions(**{**base, **kw})


def _lock(output: Path) -> Path:
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


class _AtFirstStep(Reporter):
    """Calls `action()` once, when the training loop reaches its first step (the output must be claimed)."""

    def __init__(self, action):
        self.action = action

    def track(self, items, description, total=None, postfix=None):
        for i, item in enumerate(items):
            if description == "Distilling" and i == 0:
                self.action()
            yield item


def test_second_run_to_the_same_output_fails_before_training(moe, tmp_path):
    out = tmp_path / "out"
    second: dict[str, object] = {}

    def start_second_run() -> None:
        assert _lock(out).read_text() == str(os.getpid())  # claimed before the first step
        cmd = [sys.executable, "-m", "moeify", "finetune", str(moe["moe"]), "-o", str(out), "--teacher",
               str(moe["dense"]), "--data", str(moe["data"]), "--stage", "2", "--max-steps", "1", "--seq-len",
               "16", "--batch-size", "2", "--device", "cpu"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        env.pop("MOEIFY_DEBUG", None)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        second.update(code=proc.returncode, err=proc.stderr, ckpt=checkpoint_dir(out).exists())

    result = finetune(moe["moe"], out, _options(moe), reporter=_AtFirstStep(start_second_run))

    # Before the fix the second run trained its step and wrote `out` while the first was still training.
    err = str(second["err"]).strip()
    assert second["code"] == 1, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert f"another moeify run (pid {os.getpid()}) is writing {out}" in err, err
    assert not second["ckpt"]
    # The first run is unharmed: complete output, lock and temporaries gone.
    assert result["steps"] == 2
    assert leftovers(out) == ["out"]
    assert CheckpointReader(out).names() == CheckpointReader(moe["moe"]).names()


def test_existing_output_is_refused_before_any_work(moe, tmp_path):
    from typer.testing import CliRunner

    from moeify.cli import app

    out = tmp_path / "out"
    out.mkdir()
    args = ["finetune", str(moe["moe"]), "-o", str(out), "--teacher", str(moe["dense"]), "--data", str(moe["data"]),
            "--stage", "2", "--max-steps", "1", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert leftovers(out) == ["out"] and not checkpoint_dir(out).exists()


def test_ctrl_c_releases_the_output_and_resume_still_works(moe, tmp_path):
    out = tmp_path / "out"
    options = _options(moe, max_steps=3, checkpoint_every=1)
    with pytest.raises(TrainingInterrupted):
        finetune(moe["moe"], out, options, reporter=_InterruptAt(2))
    assert not out.exists() and not _lock(out).exists()
    assert leftovers(out) == []  # no temporary folder, no lock: only the checkpoint beside it
    assert checkpoint_dir(out).is_dir()
    resumed = finetune(moe["moe"], out, _options(moe, max_steps=3, checkpoint_every=1, resume=True))
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 3
    assert leftovers(out) == ["out"] and not checkpoint_dir(out).exists()
