"""Resumable training state: trainable weights, optimiser moments and progress, saved atomically.

A checkpoint is a folder of two safetensors files (our own tensors: no pickle is ever written or read)
and `state.json` with the step, the loss log and the options that must match on `--resume`. It is
written beside the final output (`OUT.ckpt/`), replaced atomically each time, and deleted once the
output is complete. Data order and learning rate are functions of the step (see data.py), so restoring
weights, moments and step reproduces the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moeify.errors import InputError, UsageError

STATE_NAME = "state.json"
PARAMS_NAME = "params.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
# Options that change the training trajectory: a resume with different values would silently be another run.
RESUME_KEYS = ("seed", "lr", "warmup", "seq_len", "batch_size", "steps", "lora", "attention_lora",
               "balance_coef", "data_fingerprint", "world")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after a resumable checkpoint was saved; the CLI exits 130 with `message`."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def checkpoint_dir(output: Path) -> Path:
    return output.parent / f"{output.name}.ckpt"


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Replace the checkpoint at `folder` with the current state (a killed write leaves the old one)."""
    _remove_stale(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in trainable_parameters(model).items()}
    save_file(params, str(tmp / PARAMS_NAME))
    tensors, layout = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / OPTIMIZER_NAME))
    (tmp / STATE_NAME).write_text(json.dumps({**state, "optimizer_layout": layout}, indent=1) + "\n")
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale(folder: Path) -> None:
    """Hidden halves of a save that a killed run left behind (its pid is gone): nothing else removes them."""
    from moeify.io.output import _pid_alive

    for stale in [*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_NAME
    if not path.is_file():
        raise InputError(f"{folder}: no resumable checkpoint here", "run without --resume to start afresh")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable checkpoint state ({e})", "delete the folder and start afresh") from e


def check_resumable(state: dict[str, Any], options: dict[str, Any], folder: Path) -> None:
    for key in RESUME_KEYS:
        if state.get("options", {}).get(key) != options.get(key):
            raise UsageError(f"--resume: the checkpoint in {folder} was made with {key}="
                             f"{state.get('options', {}).get(key)!r}, this run has {options.get(key)!r}",
                             "rerun with the original options, or drop --resume to start afresh")


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights and optimiser moments in place; returns the saved state (step, log, ...)."""
    state = read_state(folder)
    params = load_file(str(folder / PARAMS_NAME))
    targets = trainable_parameters(model)
    if set(params) != set(targets):
        raise InputError(f"{folder}: the checkpoint's trainable tensors do not match this model",
                         "resume with the same MOE_DIR and options")
    with torch.no_grad():
        for name, p in targets.items():
            p.copy_(params[name].to(p.device, p.dtype))
    tensors = load_file(str(folder / OPTIMIZER_NAME))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer_layout"]))
    return state


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in layout.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": layout["param_groups"]}
