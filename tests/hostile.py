"""Helpers for the hardening tests: tiny checkpoints written by hand, ways to damage them, CLI runners.

The checkpoints are written with moeify's own safetensors writer instead of transformers, so building one
takes milliseconds and every byte is under the test's control (a damaged header is damaged exactly as the
test says). `assert_clean_failure` is the contract every hostile input must meet: a non-zero exit code, one
line on stderr starting with `error:`, no traceback, and no output folder or temporary left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from moeify.io.output import LOCK_SUFFIX, TMP_PREFIX
from moeify.io.writer import ShardedWriter, TensorSpec

REPO = Path(__file__).resolve().parent.parent
TOKEN = "hf_MARKERtoken0123456789abcdefSECRET"

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def tiny_config(**overrides) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False,
              "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "dtype": "float32", **TINY}
    config.update(overrides)
    return config


def tiny_tensors(config: dict | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a bias-free Llama with the given sizes, small random values."""
    c = config or tiny_config()
    h, m, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return 0.08 * torch.randn(shape, generator=g)

    tensors = {"model.embed_tokens.weight": rnd(v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": 1 + rnd(h),
                    p + "post_attention_layernorm.weight": 1 + rnd(h),
                    p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                    p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
                    p + "mlp.gate_proj.weight": rnd(m, h), p + "mlp.up_proj.weight": rnd(m, h),
                    p + "mlp.down_proj.weight": rnd(h, m)}
    tensors |= {"model.norm.weight": 1 + rnd(h), "lm_head.weight": rnd(v, h)}
    return tensors


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor] | None = None, config: dict | None = None,
                     max_shard_bytes: int = 1 << 40) -> Path:
    """A safetensors checkpoint folder (sharded with an index when `max_shard_bytes` is small)."""
    config = config or tiny_config()
    tensors = tensors if tensors is not None else tiny_tensors(config)
    folder.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(folder, specs, max_shard_bytes) as w:
        for name, t in tensors.items():
            w.write(name, t.contiguous())
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# --- damaging a safetensors file ------------------------------------------------------------------


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_file(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, data = split_file(path)
    edit(header)
    join_file(path, header, data)


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- running the CLI ------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None):
    """Run `moeify ARGS` in-process; exceptions are not swallowed, so a traceback fails the test loudly."""
    from typer.testing import CliRunner

    from moeify.cli import app

    return CliRunner(env=env).invoke(app, [str(a) for a in args], catch_exceptions=False)


def leftovers(output: Path) -> list[str]:
    """The output folder, temporaries and lock files a run aimed at `output` left beside it."""
    parent = output.parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir()
                  if p.name == output.name or p.name.startswith(f"{TMP_PREFIX}{output.name}-")
                  or p.name == f".{output.name}{LOCK_SUFFIX}")


def assert_clean_failure(result, output: Path | None = None, code: int = 2,
                         contains: str | None = None) -> str:
    """Exit `code`, one stderr line `error: ...` (last, after notes), no traceback, nothing at `output`."""
    err = result.stderr.strip()
    assert result.exit_code == code, f"exit {result.exit_code}, stderr: {err!r}, stdout: {result.stdout!r}"
    assert "Traceback" not in result.output, err
    assert "internal error" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.splitlines()[-1].startswith("error: "), err  # notes may come before it
    err = errors[0]
    if contains is not None:
        assert contains.lower() in err.lower(), err
    if output is not None:
        assert leftovers(output) == [], leftovers(output)
    return err


# --- subprocesses (signals, resource limits) ---------------------------------------------------------

DRIVER = Path(__file__).resolve().parent / "interrupt_driver.py"


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEIFY_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


class Run:
    """One forked `moeify` run: its pid, signals, and its exit code and output once it ends."""

    def __init__(self, zygote: Zygote, pid: int, stdout: Path, stderr: Path):
        self.zygote, self.pid, self._stdout, self._stderr = zygote, pid, stdout, stderr
        self.returncode: int | None = None

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 300.0) -> int:
        """The run's exit code; a run still going after `timeout` seconds is killed and fails the test
        (a lost signal must show as a failure, not hang CI)."""
        if self.returncode is None:
            message: dict = {}
            reader = threading.Thread(target=lambda: message.update(json.loads(self.zygote.proc.stdout.readline())),
                                      daemon=True)
            reader.start()
            reader.join(timeout)
            if reader.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                reader.join(30)
                raise AssertionError(f"run {self.pid} was still going after {timeout:.0f} s; killed it")
            self.returncode = message["exit"]
        return self.returncode

    @property
    def stdout(self) -> str:
        return self._stdout.read_text()

    @property
    def stderr(self) -> str:
        return self._stderr.read_text()


class Zygote:
    """tests/interrupt_driver.py as a fork server: moeify imported once, each run forked from it."""

    def __init__(self, **env: str):
        self.proc = subprocess.Popen([sys.executable, str(DRIVER)], cwd=REPO, env=subprocess_env(**env),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.count = 0

    def start(self, args: list, workdir: Path, pause_at: str = "", fsize: int = 0) -> Run:
        self.count += 1
        control = workdir / "control"
        control.mkdir(exist_ok=True)
        stdout, stderr = workdir / f"run{self.count}.out", workdir / f"run{self.count}.err"
        job = {"args": [str(a) for a in args], "control": str(control), "pause_at": pause_at,
               "stdout": str(stdout), "stderr": str(stderr), "fsize": fsize}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return Run(self, json.loads(self.proc.stdout.readline())["pid"], stdout, stderr)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
