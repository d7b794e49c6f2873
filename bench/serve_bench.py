"""Serving speed of moeify splits of SmolLM2-135M against the dense model, in vLLM (side by side, one run).

    flock /tmp/moeify-heavy.lock python bench/serve_bench.py [--configs dense 8x2 28x4-s4 ...]
        [--method weights|activations] [--ppl] [--hf] [--work DIR] [--device cpu|cuda] [--fp8]

Builds (or reuses, cached under --work) the dense SmolLM2-135M as bf16 safetensors and its splits
(`moeify split`'s library call, bf16 output), then serves each folder in vLLM in its own child process
(the vLLM venv, --vllm-python) with the same prompt token ids and settings: greedy, ignore EOS, fixed
prompt and output lengths, prefix caching off, two warm-up rounds excluded, the median of --repeats.

Per model it reports
- decode tokens/s at batch 1: (output tokens - 1) / (time of a request of 1+D tokens - time of 1 token),
  the prefill of the same 64-token prompt cancelling out;
- throughput at batch 16 (prefill-heavy: 16 prompts of 256 tokens, 8 output tokens each), prompt plus
  output tokens per second;
- peak resident memory of the serving process tree (CPU) and the weight bytes on disk;
- the ratio of each to the dense model measured in the same run (the dense model runs first and last,
  both rows are shown so drift is visible, and ratios are to their mean);
- the analytic bound: weight bytes read per decoded token, dense over MoE (moeify.describe);
- optionally (--hf) transformers' own generate speed at batch 1, for reference only;
- optionally (--ppl) perplexity of the same files, as ratios to the dense bf16 files, on held-out text:
  the shipped novel excerpt (moeify/data/eval_sense_and_sensibility.txt) and the shipped Wikipedia
  excerpt (moeify/data/eval_wikipedia.txt; else the second half of ../shared/data/wikipedia_sample.txt),
  neither in the shipped calibration text, and their geometric mean. Cached in --work/ppl.json.

A configuration is `E x K [-sS] [-pP] [-tTARGET]`: E routed experts, top-K, S shared experts (Qwen2-MoE),
--pad-to P, target override (mixtral, qwen2_moe). `--method weights` keeps the bench cheap when only
speed matters (speed does not depend on the weights at batch 1: K experts run for every token); the
Pareto table in docs/benchmarks.md uses the default method so that perplexity and speed come from the
same files.

`--device cuda` serves on a GPU (CUDA graphs on, as users run it); `--fp8` also quantizes every split
with `moeify quantize --fp8` (default scheme) and serves those: vLLM's CPU build needs AMX-FP8 for its
FP8 MoE kernels, so on a CPU without it the FP8 rows report the engine's error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
DEFAULT_CONFIGS = ["dense", "8x2", "16x4", "15x3-s1", "28x4-s4", "8x4", "16x8", "14x6-s2", "48x16-s16"]
_CONFIG = re.compile(r"^(\d+)x(\d+)(?:-s(\d+))?(?:-p(\d+))?(?:-t(mixtral|qwen2_moe))?$")
PROMPT_1, DECODE_1 = 64, 128
PROMPT_16, DECODE_16, BATCH = 256, 8, 16


def parse_config(name: str) -> dict:
    m = _CONFIG.match(name)
    if not m:
        sys.exit(f"bad configuration {name!r}: write EXK[-sS][-pP][-tTARGET], e.g. 28x4-s4-p32")
    e, k, s, p, t = m.groups()
    return {"experts": int(e), "top_k": int(k), "shared": int(s or 0), "pad_to": int(p or 1), "target": t}


def dense_bf16(work: Path) -> Path:
    """The real SmolLM2-135M (float32 from the GGUF, cached by moeify) cast to bf16 safetensors."""
    out = work / "dense-bf16"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from safetensors.torch import load_file, save_file

    from bench._models import smollm2_folder

    src = smollm2_folder()
    tmp = work / "dense-bf16.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(f).items()})
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            (tmp / f.name).write_bytes(f.read_bytes())
    tmp.rename(out)
    return out


def split_folder(work: Path, dense: Path, name: str, method: str) -> Path:
    out = work / f"{method}-{name}"
    if not (out / "config.json").exists():
        from moeify.split.convert import SplitOptions, split_model

        c = parse_config(name)
        split_model(dense, out, SplitOptions(experts=c["experts"], top_k=c["top_k"], shared=c["shared"],
                                             pad_to=c["pad_to"], target=c["target"], method=method), overwrite=True)
    return out


def fp8_folder(src: Path) -> Path:
    from moeify.quant import quantize_fp8

    out = src.with_name(src.name + "-fp8")
    if not (out / "config.json").exists():
        quantize_fp8(src, out)
    return out


def prompts(dense: Path) -> dict:
    """Fixed prompt token ids from the shipped held-out novel excerpt (no BOS: SmolLM2 adds none)."""
    from moeify.data import load_tokenizer, packaged_text

    ids = load_tokenizer(dense)(packaged_text("eval_sense_and_sensibility.txt").read_text(),
                                add_special_tokens=False)["input_ids"]
    return {"one": ids[:PROMPT_1],
            "batch": [ids[1000 + i * PROMPT_16: 1000 + (i + 1) * PROMPT_16] for i in range(BATCH)]}


# --------------------------------------------------------------------------- worker (vLLM venv)

def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


def _gpu_used_mb() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return int(out[0]) if out else 0
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


def worker(spec_path: Path) -> None:
    """Serve one folder, print and write one JSON result. Runs in the vLLM venv, in its own process."""
    import threading

    spec = json.loads(spec_path.read_text())
    peak = [0]
    stop = threading.Event()

    gpu_peak = [0]
    gpu_start = _gpu_used_mb() if spec["device"] == "cuda" else 0

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(os.getpid()))
            if spec["device"] == "cuda":
                gpu_peak[0] = max(gpu_peak[0], _gpu_used_mb() - gpu_start)
            time.sleep(0.1 if spec["device"] == "cpu" else 0.5)

    threading.Thread(target=sample, daemon=True).start()
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    kwargs = dict(model=spec["folder"], dtype="bfloat16", max_model_len=512, seed=0, max_num_seqs=BATCH,
                  enable_prefix_caching=False)
    if spec["device"] == "cuda":
        kwargs["gpu_memory_utilization"] = 0.3
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - start
    one = [{"prompt_token_ids": spec["prompts"]["one"]}]
    batch = [{"prompt_token_ids": p} for p in spec["prompts"]["batch"]]

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)

    def timed(reqs, n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        out = llm.generate(reqs, params(n), use_tqdm=False)
        return time.perf_counter() - t, list(out[0].outputs[0].token_ids)

    for _ in range(2):  # warm-up: the first rounds build caches and allocate
        timed(one, DECODE_1 + 1)
        timed(batch, DECODE_16)
    decode, prefill, batched = [], [], []
    tokens: list[int] = []
    for _ in range(spec["repeats"]):
        t1, _ = timed(one, 1)
        tn, tokens = timed(one, DECODE_1 + 1)
        decode.append(DECODE_1 / max(tn - t1, 1e-9))
        prefill.append(t1)
        tb, _ = timed(batch, DECODE_16)
        batched.append(BATCH * (PROMPT_16 + DECODE_16) / tb)
    stop.set()
    result = {"load_s": round(load_s, 1), "decode_tok_s": statistics.median(decode),
              "decode_tok_s_all": [round(x, 2) for x in decode], "ttft_s": statistics.median(prefill),
              "batch16_tok_s": statistics.median(batched), "peak_rss_mb": round(peak[0] / 2**20),
              "tokens": tokens[:16]}
    if spec["device"] == "cuda":  # includes the KV-cache pool vLLM preallocates (gpu_memory_utilization 0.3)
        result["peak_gpu_mb"] = gpu_peak[0]
    Path(spec["out"]).write_text(json.dumps(result))


def serve(vllm_python: str, folder: Path, device: str, prompt_ids: dict, repeats: int, work: Path) -> dict:
    spec = work / "spec.json"
    out = work / "result.json"
    out.unlink(missing_ok=True)
    spec.write_text(json.dumps({"folder": str(folder), "device": device, "prompts": prompt_ids,
                                "repeats": repeats, "out": str(out)}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    proc = subprocess.run([vllm_python, str(Path(__file__).resolve()), "--worker", str(spec)], env=env,
                          capture_output=True, text=True, cwd="/")
    log = work / "logs" / f"{folder.name}.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text(proc.stdout + "\n" + proc.stderr)
    if not out.exists():
        lines = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln]
        return {"error": (lines[-1] if lines else proc.stderr[-400:]).strip()[:400], "log": str(log)}
    return json.loads(out.read_text())


def hf_decode(folder: Path, prompt: list[int], new: int = 32, device: str = "cpu") -> float:
    """transformers' generate at batch 1, bf16, tokens/s after one warm-up (reference only)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval().to(device)
    ids = torch.tensor([prompt], device=device)
    times = []
    with torch.no_grad():
        for n in (1, new + 1, 1, new + 1):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            times.append(time.perf_counter() - t)
    return new / max(times[3] - times[2], 1e-9)


# --------------------------------------------------------------------------- perplexity

def heldout_texts(work: Path) -> dict[str, Path]:
    """The shipped novel excerpt and the shipped Wikipedia excerpt (else the second half of ../shared's)."""
    from moeify.data import packaged_text

    novel = packaged_text("eval_sense_and_sensibility.txt")
    shipped = novel.with_name("eval_wikipedia.txt")
    if shipped.is_file():
        return {"novel": novel, "wikipedia": shipped}
    wiki = work / "wikipedia_heldout.txt"
    if not wiki.exists():
        text = (SHARED / "wikipedia_sample.txt").read_text()
        wiki.write_text(text[len(text) // 2:])
    return {"novel": novel, "wikipedia": wiki}


def perplexities(work: Path, folders: dict[str, Path], chunks: int) -> dict[str, dict]:
    from moeify.evaluate import EvalOptions, evaluate_model

    cache_file = work / "ppl.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    texts = heldout_texts(work)
    for folder in folders.values():
        key = f"{folder.name}@{chunks}"
        if key not in cache:
            cache[key] = {name: evaluate_model(folder, EvalOptions(text=str(path), max_chunks=chunks))["perplexity"]
                          for name, path in texts.items()}
            cache_file.write_text(json.dumps(cache, indent=2))
    return {name: cache[f"{folder.name}@{chunks}"] for name, folder in folders.items()}


# --------------------------------------------------------------------------- main

def analytic(folder: Path) -> dict:
    from moeify.describe import describe

    info = describe(folder)
    return {"active": info.get("active_parameters_per_token"), "bytes": info.get("weight_bytes_per_token"),
            "ratio": info.get("activation_ratio"), "file_mb": info["file_bytes"] / 1e6}


def default_vllm_python() -> str:
    if os.environ.get("VLLM_PYTHON"):
        return os.environ["VLLM_PYTHON"]
    venv = Path("/work/venvs/vllm/bin/python")  # where docs/interop.md installs it
    return str(venv) if venv.exists() else sys.executable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    ap.add_argument("--method", default="weights", help="split method (the table uses the default, activations)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moeify-serve-bench"))
    ap.add_argument("--vllm-python", default=default_vllm_python(),
                    help="python of a venv with vLLM ($VLLM_PYTHON, else /work/venvs/vllm, else this python)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--fp8", action="store_true", help="also serve moeify quantize --fp8 outputs of every split")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate (reference only)")
    ap.add_argument("--ppl", action="store_true", help="perplexity ratios of the same files on held-out text")
    ap.add_argument("--ppl-chunks", type=int, default=4)
    ap.add_argument("--prepare-only", action="store_true", help="build the folders (and --ppl) but serve nothing")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    args.work.mkdir(parents=True, exist_ok=True)
    dense = dense_bf16(args.work)
    folders = {"dense": dense}
    for name in args.configs:
        if name != "dense":
            folders[name] = split_folder(args.work, dense, name, args.method)
            if args.fp8:
                folders[name + "-fp8"] = fp8_folder(folders[name])
    ppl = perplexities(args.work, folders, args.ppl_chunks) if args.ppl else {}
    if args.prepare_only:
        print(json.dumps(ppl, indent=2))
        return
    prompt_ids = prompts(dense)
    order = list(folders) + ["dense"]  # dense first and last: drift shows
    results: dict[str, dict] = {}
    for i, name in enumerate(order):
        r = serve(args.vllm_python, folders[name], args.device, prompt_ids, args.repeats, args.work)
        key = name if i < len(order) - 1 else "dense (again)"
        results[key] = {**r, **analytic(folders[name])}
        with (args.work / "partial.jsonl").open("a") as f:  # a run cut short keeps what it measured
            f.write(json.dumps({"config": key, **results[key]}) + "\n")
        print(f"{key:16s} " + (f"decode {r['decode_tok_s']:.1f} tok/s  batch16 {r['batch16_tok_s']:.0f} tok/s  "
                               f"peak {r['peak_rss_mb']} MB" if "error" not in r else f"ERROR {r['error']}"),
              flush=True)
        if args.hf and "error" not in r and i < len(order) - 1:
            results[key]["hf_decode_tok_s"] = hf_decode(folders[name], prompt_ids["one"], device=args.device)
    # the base is the mean of the dense runs that bracket the others, so slow drift cancels to first order
    runs = [r for k, r in results.items() if k.startswith("dense") and "error" not in r]
    base = {"decode_tok_s": statistics.mean(r["decode_tok_s"] for r in runs),
            "batch16_tok_s": statistics.mean(r["batch16_tok_s"] for r in runs),
            "bytes": results["dense"].get("bytes")} if runs else {"error": "dense failed"}
    rows = []
    for key, r in results.items():
        row = {"config": key, "folder": str(folders.get(key, dense)), **r}
        if "error" not in r and "error" not in base:
            row["decode_x"] = r["decode_tok_s"] / base["decode_tok_s"]
            row["batch16_x"] = r["batch16_tok_s"] / base["batch16_tok_s"]
            row["bound_x"] = base["bytes"] / r["bytes"] if r.get("bytes") else None
        if key in ppl:
            ratios = {t: ppl[key][t] / ppl["dense"][t] for t in ppl[key]}
            row["ppl"] = ppl[key]
            row["ppl_x"] = ratios
            row["ppl_x_geomean"] = math.exp(sum(math.log(v) for v in ratios.values()) / len(ratios))
        rows.append(row)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"device": args.device, "method": args.method, "repeats": args.repeats,
              "settings": {"batch1": [PROMPT_1, DECODE_1], "batch16": [BATCH, PROMPT_16, DECODE_16]},
              "started": stamp, "rows": rows}
    (args.work / f"serve-{args.device}-{stamp}.json").write_text(json.dumps(report, indent=2))
    print_table(rows)
    print(f"written {args.work / f'serve-{args.device}-{stamp}.json'}")


def print_table(rows: list[dict]) -> None:
    head = ("| config | FFN active | bytes/token (MB) | bound | decode tok/s b1 | x dense | batch-16 tok/s | x dense "
            "| peak RSS MB | ppl x dense (novel, wiki, geomean) | HF tok/s |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | error: {r['error'][:120]} |")
            continue
        ppl = (", ".join(f"{v:.2f}" for v in r["ppl_x"].values()) + f", {r['ppl_x_geomean']:.2f}"
               if "ppl_x" in r else "-")
        act = f"{r['ratio']:.1%}" if r.get("ratio") else "100%"
        print(f"| {r['config']} | {act} | {r['bytes'] / 1e6:.0f} | {r.get('bound_x') or 0:.2f}x "
              f"| {r['decode_tok_s']:.1f} | {r.get('decode_x', 0):.2f}x | {r['batch16_tok_s']:.0f} "
              f"| {r.get('batch16_x', 0):.2f}x | {r['peak_rss_mb']} | {ppl} | "
              f"{r['hf_decode_tok_s']:.1f} |" if "hf_decode_tok_s" in r else
              f"| {r['config']} | {act} | {(r['bytes'] or 0) / 1e6:.0f} | {r.get('bound_x') or 0:.2f}x "
              f"| {r['decode_tok_s']:.1f} | {r.get('decode_x', 0):.2f}x | {r['batch16_tok_s']:.0f} "
              f"| {r.get('batch16_x', 0):.2f}x | {r['peak_rss_mb']} | {ppl} | - |")


if __name__ == "__main__":
    main()
