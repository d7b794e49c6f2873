"""Ctrl-C, SIGKILL, a full disk and a second run at the same output never leave a half-written output.

Signals: each run is a fork of tests/interrupt_driver.py (a fork server that imported moeify once), held
at an exact point by a pause patched in from outside and announced by a file, then signalled, so nothing
depends on timing. Afterwards there is either no output
folder or a complete one identical to an uninterrupted run's; Ctrl-C removes the temporary folder and the
lock; after SIGKILL the next run reports the stale temporary folder and removes it. A full disk is
simulated with RLIMIT_FSIZE in the forked run (the shard write fails with EFBIG) and with ENOSPC raised at
chosen writes in-process. Inputs are hashed before and after every run.
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeify.io.output import TMP_PREFIX
from moeify.io.reader import CheckpointReader
from moeify.metadata import read_metadata
from tests.hostile import Run, Zygote, assert_clean_failure, cli, file_hashes, leftovers, write_checkpoint

SPLIT = ["split", "--experts", "4", "--top-k", "2"]
QUANTIZE = ["quantize", "--fp8"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("interrupt") / "model")


@pytest.fixture(scope="module")
def zygote():
    server = Zygote()
    yield server
    server.close()


@pytest.fixture(scope="module")
def references(model, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Hashes of the weight files of uninterrupted runs: what a finished output must be, byte for byte."""
    root = tmp_path_factory.mktemp("reference")
    refs = {}
    for name, args in (("split", SPLIT), ("quantize", QUANTIZE)):
        out = root / name
        result = cli(args[0], model, "-o", out, *args[1:])
        assert result.exit_code == 0, result.stderr
        refs[name] = _weights(out)
    return refs


def _weights(folder: Path) -> dict[str, str]:
    return {k: v for k, v in file_hashes(folder).items() if k.endswith((".safetensors", ".index.json"))}


def _args(command: str, model: Path, out: Path) -> list[str]:
    args = SPLIT if command == "split" else QUANTIZE
    return [args[0], model, "-o", out, *args[1:]]


def _wait_paused(run: Run, control: Path) -> None:
    """Poll for the driver's `paused` file; fail with the run's output if it ended first."""
    deadline = time.monotonic() + 120  # a safety net against a hung test, not a timing assertion
    while not (control / "paused").exists():
        if not run.alive():
            pytest.fail(f"the run ended (exit {run.wait()}) before pausing:\n{run.stderr}")
        if time.monotonic() > deadline:
            run.send_signal(signal.SIGKILL)
            pytest.fail("the run never reached its pause point")
        time.sleep(0.01)


def _assert_complete(out: Path, reference: dict[str, str], stage: str) -> None:
    assert _weights(out) == reference
    CheckpointReader(out)  # every header valid, index consistent
    json.loads((out / "config.json").read_text())
    assert read_metadata(out)["stages"][stage]["complete"] is True


POINTS = [  # (command, pause point, signal)
    ("split", "write:1", signal.SIGINT),
    ("split", "write:20", signal.SIGKILL),
    ("split", "write:last", signal.SIGINT),
    ("split", "metadata", signal.SIGKILL),
    ("split", "replace", signal.SIGKILL),
    ("quantize", "write:17", signal.SIGINT),
    ("quantize", "write:3", signal.SIGKILL),
    ("quantize", "metadata", signal.SIGINT),
    ("quantize", "replace", signal.SIGKILL),
]


@pytest.mark.parametrize(("command", "point", "sig"), POINTS,
                         ids=[f"{c}-{p}-{s.name}" for c, p, s in POINTS])
def test_signal_mid_run_leaves_no_output_and_the_next_run_recovers(zygote, model, references, tmp_path, command,
                                                                   point, sig):
    before = file_hashes(model)
    out = tmp_path / "out"
    run = zygote.start(_args(command, model, out), tmp_path, pause_at=point)
    _wait_paused(run, tmp_path / "control")
    temporaries = [p for p in tmp_path.iterdir() if p.name.startswith(f"{TMP_PREFIX}out-")]
    assert len(temporaries) == 1  # the work happens in a hidden temporary folder, never at `out`
    run.send_signal(sig)
    code, err = run.wait(), run.stderr

    assert not out.exists()
    assert file_hashes(model) == before
    if sig == signal.SIGINT:
        assert code == 130, err
        assert err.strip().splitlines()[-1].startswith("error: interrupted"), err
        assert "Traceback" not in err
        assert leftovers(out) == []  # temporary folder and lock removed
    else:
        assert code == -signal.SIGKILL
        assert temporaries[0].exists()  # nothing could clean up: the next run must

    again = cli(*_args(command, model, out))
    assert again.exit_code == 0, again.stderr
    if sig == signal.SIGKILL:
        assert f"removed {temporaries[0].name}, left by a killed run" in again.stderr
    assert leftovers(out) == ["out"]
    _assert_complete(out, references[command], command)


def test_two_runs_at_the_same_output_one_wins_the_other_fails_clearly(zygote, model, references, tmp_path):
    out = tmp_path / "out"
    first = zygote.start(_args("split", model, out), tmp_path, pause_at="write:5")
    _wait_paused(first, tmp_path / "control")
    second = cli(*_args("split", model, out))
    err = assert_clean_failure(second, code=1, contains=f"another moeify run (pid {first.pid}) is writing")
    assert "--overwrite" not in err
    assert_clean_failure(cli(*_args("split", model, out), "--overwrite"), code=1, contains="another moeify run")
    assert_clean_failure(cli(*_args("quantize", model, out)), code=1, contains="another moeify run")
    (tmp_path / "control" / "go").touch()
    assert first.wait() == 0, first.stderr
    assert leftovers(out) == ["out"]
    _assert_complete(out, references["split"], "split")


@pytest.mark.parametrize("command", ["split", "quantize"])
def test_file_size_limit_is_a_clean_error_and_leaves_nothing(zygote, model, tmp_path, command):
    """RLIMIT_FSIZE of 50 kB (Python ignores SIGXFSZ, so the write fails with EFBIG as on a full quota)."""
    before = file_hashes(model)
    out = tmp_path / "out"
    run = zygote.start(_args(command, model, out), tmp_path, fsize=50_000)
    code, err = run.wait(), run.stderr
    lines = err.strip().splitlines()
    assert code == 1, err
    assert "Traceback" not in err
    assert lines[-1].startswith("error: ") and "File too large" in lines[-1], err
    assert "free disk space" in lines[-1]
    assert leftovers(out) == []
    assert file_hashes(model) == before


@pytest.mark.parametrize("where", ["first tensor", "last tensor", "config.json", "moeify.json"])
@pytest.mark.parametrize("command", ["split", "quantize"])
def test_no_space_left_at_any_write_is_a_clean_error(model, tmp_path, monkeypatch, command, where):
    """ENOSPC raised in-process at a chosen write (what a full disk does mid-stream, after the shard exists)."""
    import moeify.io.writer as writer

    before = file_hashes(model)
    full = OSError(errno.ENOSPC, "No space left on device")
    if where.endswith("tensor"):
        original = writer.ShardedWriter.write

        def no_space(tensor):
            raise full

        def write(self, name, tensor):
            done = sum(len(shard.written) for shard in self._shards)
            if done == (0 if where == "first tensor" else len(self._specs) - 1):
                with monkeypatch.context() as m:
                    m.setattr(writer, "tensor_bytes", no_space)
                    return original(self, name, tensor)
            return original(self, name, tensor)

        monkeypatch.setattr(writer.ShardedWriter, "write", write)
    else:
        original_write_text = Path.write_text

        def write_text(self, *args, **kwargs):
            if where in self.name and TMP_PREFIX in str(self.parent):  # moeify.json goes via a temp name
                raise full
            return original_write_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "out"
    err = assert_clean_failure(cli(*_args(command, model, out)), out, code=1)
    assert "No space left on device" in err and "free disk space" in err
    assert file_hashes(model) == before


def test_stale_lock_of_a_killed_run_does_not_block(model, references, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".out.moeify-lock").write_text(dead.stdout.strip())
    stale = tmp_path / f"{TMP_PREFIX}out-{dead.stdout.strip()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    result = cli(*_args("split", model, out))
    assert result.exit_code == 0, result.stderr
    assert f"removed {stale.name}" in result.stderr
    assert leftovers(out) == ["out"]
    _assert_complete(out, references["split"], "split")


def test_interrupted_overwrite_keeps_the_old_output(zygote, model, tmp_path):
    """--overwrite replaces the old output only at the very end: Ctrl-C before that leaves it as it was."""
    out = tmp_path / "out"
    shutil.copytree(model, out)
    old = file_hashes(out)
    run = zygote.start([*_args("split", model, out), "--overwrite"], tmp_path, pause_at="metadata")
    _wait_paused(run, tmp_path / "control")
    run.send_signal(signal.SIGINT)
    assert run.wait() == 130
    assert file_hashes(out) == old
    assert leftovers(out) == ["out"]


def test_moeify_json_is_replaced_atomically(tmp_path, monkeypatch):
    """Stages that add a record to an existing folder (eval) rewrite moeify.json: a failure keeps the old one."""
    import os

    from moeify.metadata import write_metadata

    write_metadata(tmp_path, "split", {"experts": 4})
    before = (tmp_path / "moeify.json").read_bytes()

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        write_metadata(tmp_path, "eval", {"ppl": 1.0}, read_metadata(tmp_path))
    assert (tmp_path / "moeify.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["moeify.json"]


@pytest.fixture(scope="module")
def finetune_inputs(model, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A dense model with a tokenizer, its split MoE and a text: what `moeify finetune` needs."""
    from tests.char_tokenizer import add_char_tokenizer

    root = tmp_path_factory.mktemp("finetune")
    dense = add_char_tokenizer(Path(shutil.copytree(model, root / "dense")))
    moe = root / "moe"
    assert cli("split", dense, "-o", moe, "--experts", "4", "--method", "weights").exit_code == 0
    text = root / "text.txt"
    text.write_text("Elinor, this eldest daughter, possessed a strength of understanding.\n" * 30)
    return dense, moe, text


FINETUNE_POINTS = [("track:distilling:2", signal.SIGINT), ("track:distilling:2", signal.SIGKILL),
                   ("write:5", signal.SIGKILL)]


@pytest.mark.parametrize(("point", "sig"), FINETUNE_POINTS, ids=[f"{p}-{s.name}" for p, s in FINETUNE_POINTS])
def test_finetune_interrupted_leaves_no_output_and_the_next_run_recovers(zygote, finetune_inputs, tmp_path,
                                                                         point, sig):
    dense, moe, text = finetune_inputs
    before = file_hashes(moe)
    out = tmp_path / "out"
    args = ["finetune", moe, "-o", out, "--teacher", dense, "--data", text, "--stage", "2", "--max-steps", "3",
            "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]
    run = zygote.start(args, tmp_path, pause_at=point)
    _wait_paused(run, tmp_path / "control")
    temporaries = [p for p in tmp_path.iterdir() if p.name.startswith(f"{TMP_PREFIX}out-")]
    assert len(temporaries) == 1  # the output is claimed (lock and temporary folder) before training starts
    run.send_signal(sig)
    (tmp_path / "control" / "go").touch()  # training stops at the next step boundary after Ctrl-C
    code, err = run.wait(), run.stderr

    assert not out.exists()
    assert file_hashes(moe) == before
    if sig == signal.SIGINT:
        assert code == 130, err
        assert err.strip().splitlines()[-1].startswith("error: interrupted"), err
        assert "Traceback" not in err
        assert leftovers(out) == []
    else:
        assert code == -signal.SIGKILL
    resume = ["--resume"] if (tmp_path / "out.ckpt" / "state.json").is_file() else []
    again = cli(*args, *resume)
    assert again.exit_code == 0, again.stderr
    if temporaries and sig == signal.SIGKILL:
        assert f"removed {temporaries[0].name}, left by a killed run" in again.stderr
    assert leftovers(out) == ["out"]
    CheckpointReader(out)
    record = read_metadata(out)["stages"]["finetune"]
    assert record["complete"] is True and record["steps"] == 3


def test_halves_of_a_killed_checkpoint_save_are_removed_by_the_next_save(tmp_path):
    import torch

    from moeify.finetune.state import save_checkpoint

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = dead.stdout.strip()
    for name in (f".out.ckpt.tmp-{pid}", f".out.ckpt.old-{pid}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.safetensors").write_bytes(b"half")
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "out.ckpt", model, optimizer, {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ckpt"]


def test_kill_right_after_an_overwrite_swap_leaves_the_new_output_complete(zygote, model, references, tmp_path):
    """--overwrite swaps old and new in one atomic rename: at no instant is there no (or a mixed) output."""
    out = tmp_path / "out"
    shutil.copytree(model, out)
    run = zygote.start([*_args("split", model, out), "--overwrite"], tmp_path, pause_at="exchanged")
    _wait_paused(run, tmp_path / "control")
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    _assert_complete(out, references["split"], "split")
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(f"{TMP_PREFIX}out-")]
    assert len(stale) == 1 and (stale[0] / "model.safetensors").is_file()  # the old output, hidden
    again = cli(*_args("split", model, out), "--overwrite")
    assert again.exit_code == 0 and f"removed {stale[0].name}" in again.stderr
    assert leftovers(out) == ["out"]
