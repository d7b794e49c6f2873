"""Split at scale: peak memory, time against a plain copy, and per-layer time against a layer forward.

    python bench/split_bench.py [--shapes 2048x8192 8b] [--methods weights activations] [--layers 4 16]
                                [--calibration-tokens 512] [--refine-steps N] [--device auto|cpu|cuda]
                                [--workdir DIR] [--keep]
    python bench/split_bench.py --cluster [--device cuda]     # balanced clustering of 14336 neurons only

Writes synthetic random bf16 Llama checkpoints (shape `2048x8192`: hidden 2048, FFN 8192, 16 heads /
8 KV heads; shape `8b`: Llama-3-8B's hidden 4096, FFN 14336, 32 / 8 heads) with SmolLM2's tokenizer
copied in (its 49152-token vocabulary sets the embedding size), so the data-driven default method can
calibrate on the shipped text. For each shape and depth it measures, each in its own child process
(peak RSS from os.wait4, so nothing else is counted):
  - copy: shutil.copytree of the same files (the I/O floor of `--method weights`);
  - split: split_model() with the method, 8 experts top-2 (`--experts`, `--top-k`), on `--device`; the
    child records seconds and RSS after each layer, and glibc's heap statistics, to say what grows;
  - floor (activations only): one dense forward of a layer (attention and FFN) over the calibration
    tokens, the least a calibrated split of that layer can cost; median over layers 1-2.
It prints the ratios the goals of issue 15 name: peak RSS at the deepest vs the shallowest depth
(goal: within 10%), weights split / copy (goal: <= 2x), activations seconds per layer / floor (goal: <= 3x
on CPU), and on a GPU the 32-layer total (goal: <= 5 min) and peak GPU memory beside one layer's weights.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench._models import smollm2_folder  # noqa: E402, F401  (bench/cluster_ab.py imports it from here)

SHAPES = {"2048x8192": (2048, 8192, 16, 8), "8b": (4096, 14336, 32, 8), "tiny": (256, 512, 4, 2)}  # tiny: a smoke test
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja")


def write_checkpoint(folder: Path, shape: str, layers: int, tokenizer_from: Path) -> Path:
    """A random bf16 Llama checkpoint of `shape` with `layers` layers (kept when it exists already)."""
    import torch

    from moeify.io.writer import ShardedWriter, TensorSpec

    if (folder / "config.json").is_file():
        return folder
    hidden, inter, heads, kv = SHAPES[shape]
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()]
    g = torch.Generator().manual_seed(0)
    with ShardedWriter(tmp, specs, max_shard_bytes=2 * 1024**3) as w:
        for s in specs:
            t = torch.ones(s.shape) if "norm" in s.name else torch.randn(s.shape, generator=g) * 0.02
            w.write(s.name, t.to(torch.bfloat16))
            del t
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "hidden_act": "silu", "rms_norm_eps": 1e-5,
              "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, tmp / name)
    tmp.rename(folder)
    return folder


def measure(argv: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GiB) and seconds until its output is on disk, of one child process started
    with no dirty pages pending.

    Both the copy and the split write gigabytes into the page cache; what an earlier step left unflushed
    makes the kernel throttle the next writer (the same 2 GiB write took 8.4 s after a bench and 0.9 s
    after a sync), so each child starts after a `sync` that is not timed. How much a child leaves
    unflushed when it exits varies as much (the same copy of 4 GiB returned in 4.3 s and in 18.2 s), so
    the third figure also times the `sync` after it: the time until the files are durable, the stable one.
    """
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    os.sync()
    durable = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")
    return wall, usage.ru_maxrss / 1024**2, durable


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap() -> dict[str, float]:
    """glibc's view: bytes in use on the heap, free but kept on the heap, and in mmap'd blocks (GiB)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"heap_used": m.uordblks / 1024**3, "heap_free": m.fordblks / 1024**3, "mmapped": m.hblkhd / 1024**3}


def child_split(src: str, dst: str, method: str, experts: int, top_k: int, shared: int, tokens: int, device: str,
                trace_path: str, refine_steps: int | None = None) -> None:
    """Run one split in this process, recording seconds, RSS and heap after each layer."""
    import torch

    from moeify.split import convert
    from moeify.split.convert import SplitOptions, split_model

    trace: list[dict] = []
    start = time.perf_counter()
    real_write = convert._write_moe_layer

    def write_and_trace(w, target, tplan, layer, moe, dtype, std):
        real_write(w, target, tplan, layer, moe, dtype, std)
        row = {"layer": layer, "t": time.perf_counter() - start, "rss": _rss_gib(), **_heap()}
        if torch.cuda.is_available():
            row["gpu_peak"] = torch.cuda.max_memory_allocated() / 1024**3
        trace.append(row)

    convert._write_moe_layer = write_and_trace
    if os.environ.get("SPLIT_BENCH_NO_TRIM"):  # --no-trim: what the heap does without moeify's per-layer trim
        import moeify.device

        moeify.device.trim_heap = lambda: None
    refine = {} if refine_steps is None else {"refine_steps": refine_steps}
    options = SplitOptions(experts=experts, top_k=top_k, shared=shared, method=method, calibration_tokens=tokens,
                           device=device, **refine)
    result = split_model(src, dst, options, overwrite=True)
    Path(trace_path).write_text(json.dumps({"trace": trace, "timings": result["timings_s"],
                                            "first_layer_start": trace[0]["t"] if trace else None}))


def child_floor(src: str, tokens: int, device: str, out_path: str) -> None:
    """Seconds of one dense forward of a layer (attention + FFN) over the calibration tokens."""

    from moeify.device import Compute, resolve_device
    from moeify.io.reader import CheckpointReader, load_json
    from moeify.split.calibrate import LayerRunner, calibration_tokens
    from moeify.split.moe_layer import FFNWeights

    folder = Path(src)
    compute = Compute.for_device(resolve_device(device))
    reader = CheckpointReader(folder)
    ids = calibration_tokens(folder, None, tokens)
    runner = LayerRunner(folder, reader, load_json(folder / "config.json", "config"), ids, compute=compute)
    times = []
    for i in range(min(3, runner.layers)):
        compute.synchronize()
        t = time.perf_counter()
        with compute.autocast():
            x = runner.ffn_input(i)
            p = f"model.layers.{i}.mlp."
            ffn = FFNWeights(*(compute.put(reader.get(p + k + "_proj.weight")) for k in ("gate", "up", "down")))
            runner.advance(ffn.forward(x))
        compute.synchronize()
        times.append(time.perf_counter() - t)
        del ffn, x
    warm = times[1:] or times
    Path(out_path).write_text(json.dumps({"layer_s": statistics.median(warm), "all": times}))


def cluster_seconds(device: str) -> dict[str, float]:
    """Balanced clustering of one Llama-3-8B-wide layer (14336 neurons, 128-dim features) into 64 and 128."""
    import torch

    from moeify.device import Compute, resolve_device
    from moeify.split.methods.cluster import balanced_kmeans
    from moeify.split.methods.weights import neuron_features
    from moeify.split.moe_layer import FFNWeights

    compute = Compute.for_device(resolve_device(device))
    g = torch.Generator().manual_seed(1)
    hidden, inter = 4096, 14336
    ffn = FFNWeights(*(compute.put(torch.randn(s, generator=g)) for s in ((inter, hidden), (inter, hidden),
                                                                           (hidden, inter))))
    out = {}
    balanced_kmeans(torch.randn(512, 128, device=compute.device), 8)  # warm-up (threads, kernels)
    for k in (64, 128):
        compute.synchronize()
        start = time.perf_counter()
        feats = neuron_features(ffn, torch.arange(inter, device=compute.device))
        balanced_kmeans(feats, k, capacity=inter // k)
        compute.synchronize()
        out[str(k)] = time.perf_counter() - start
    return out


def one_layer_gib(shape: str) -> float:
    hidden, inter, heads, kv = SHAPES[shape]
    kv_dim = hidden // heads * kv
    return (2 * hidden * hidden + 2 * kv_dim * hidden + 3 * inter * hidden) * 4 / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["2048x8192", "8b"], choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["weights", "activations"])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--shared", type=int, default=0)
    parser.add_argument("--calibration-tokens", type=int, default=512)
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="activations method: refinement steps per layer (default: the split's default; 0 times "
                             "the closed-form steps alone against their floor)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeify-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints for a rerun")
    parser.add_argument("--cluster", action="store_true", help="only time the balanced clustering")
    parser.add_argument("--no-copy", action="store_true", help="skip the copy (saves disk on a GPU machine)")
    parser.add_argument("--no-trim", action="store_true", help="children skip the per-layer heap trim (to compare)")
    parser.add_argument("--json", type=Path, help="also write every row as JSON here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Children do the heavy work: a parent that had touched torch would pass its RSS high-water mark on
    # through fork/exec, and every child's peak RSS would read high.
    if args.child:
        kind, *rest = args.child
        if kind == "generate":
            write_checkpoint(Path(rest[0]), rest[1], int(rest[2]), Path(rest[3]))
        elif kind == "split":
            child_split(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), int(rest[5]), int(rest[6]), rest[7],
                        rest[8], None if rest[9] == "default" else int(rest[9]))
        elif kind == "floor":
            child_floor(rest[0], int(rest[1]), rest[2], rest[3])
        elif kind == "cluster":
            Path(rest[1]).write_text(json.dumps(cluster_seconds(rest[0])))
        return
    me = [sys.executable, __file__, "--child"]
    if args.no_trim:
        os.environ["SPLIT_BENCH_NO_TRIM"] = "1"
    args.workdir.mkdir(parents=True, exist_ok=True)
    scratch = args.workdir / "result.json"
    if args.cluster:
        measure([*me, "cluster", args.device, str(scratch)])
        times = json.loads(scratch.read_text())
        for k, s in times.items():
            print(f"balanced clustering of 14336 neurons into {k} experts on {args.device}: {s:.2f} s")
        return
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from bench._models import smollm2_folder; " \
        "print(smollm2_folder())"
    tok = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f}, device: {args.device}, "
          f"experts: {args.experts} top-{args.top_k} + {args.shared} shared, "
          f"calibration tokens: {args.calibration_tokens}, refine steps: "
          f"{'default' if args.refine_steps is None else args.refine_steps}", flush=True)
    rows = []
    for shape in args.shapes:
        for layers in args.layers:
            src = args.workdir / f"llama-{shape}-{layers}l"
            subprocess.run([*me, "generate", str(src), shape, str(layers), tok], check=True)
            copy_dst = args.workdir / "copy"
            shutil.rmtree(copy_dst, ignore_errors=True)
            copy_s = copy_disk_s = float("nan")
            if not args.no_copy:
                code = f"import shutil; shutil.copytree({str(src)!r}, {str(copy_dst)!r})"
                copy_s, _, copy_disk_s = measure([sys.executable, "-c", code])
                shutil.rmtree(copy_dst, ignore_errors=True)
            for method in args.methods:
                dst = args.workdir / "split"
                shutil.rmtree(dst, ignore_errors=True)
                split_s, rss, split_disk_s = measure([
                    *me, "split", str(src), str(dst), method, str(args.experts), str(args.top_k), str(args.shared),
                    str(args.calibration_tokens), args.device, str(scratch),
                    "default" if args.refine_steps is None else str(args.refine_steps)])
                trace = json.loads(scratch.read_text())
                shutil.rmtree(dst, ignore_errors=True)
                t = [r["t"] for r in trace["trace"]]
                per_layer = statistics.median([b - a for a, b in zip(t, t[1:], strict=False)]) if len(t) > 1 else t[0]
                row = {"shape": shape, "layers": layers, "method": method, "gib": folder_bytes(src) / 1024**3,
                       "copy_s": copy_s, "split_s": split_s, "copy_disk_s": copy_disk_s,
                       "split_disk_s": split_disk_s, "peak_rss": rss, "layer_s": per_layer,
                       "rss_by_layer": [round(r["rss"], 3) for r in trace["trace"]],
                       "heap_free_by_layer": [round(r.get("heap_free", 0), 3) for r in trace["trace"]],
                       "gpu_peak": trace["trace"][-1].get("gpu_peak") if trace["trace"] else None,
                       "timings": trace["timings"]}
                if method == "activations":
                    measure([*me, "floor", str(src), str(args.calibration_tokens), args.device, str(scratch)])
                    row["floor_s"] = json.loads(scratch.read_text())["layer_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(src, ignore_errors=True)
    report(rows, args)


def report(rows: list[dict], args) -> None:
    print("\n| shape | layers | method | checkpoint GiB | copy s | split s | split / copy | copy on disk s | "
          "split on disk s | on disk: split / copy | s per layer | layer forward s | per layer / forward | "
          "peak RSS GiB | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        floor = r.get("floor_s")
        gpu = f"{r['gpu_peak']:.2f}" if r.get("gpu_peak") else "-"
        floor_s, ratio = (f"{floor:.2f}", f"{r['layer_s'] / floor:.2f}x") if floor else ("-", "-")
        print(f"| {r['shape']} | {r['layers']} | {r['method']} | {r['gib']:.2f} | {r['copy_s']:.1f} | "
              f"{r['split_s']:.1f} | {r['split_s'] / r['copy_s']:.2f}x | {r['copy_disk_s']:.1f} | "
              f"{r['split_disk_s']:.1f} | {r['split_disk_s'] / r['copy_disk_s']:.2f}x | {r['layer_s']:.2f} | "
              f"{floor_s} | {ratio} | "
              f"{r['peak_rss']:.2f} | {gpu} |")
    print()
    for shape in args.shapes:
        for method in args.methods:
            group = sorted((r for r in rows if r["shape"] == shape and r["method"] == method),
                           key=lambda r: r["layers"])
            if len(group) >= 2:
                lo, hi = group[0], group[-1]
                print(f"{shape} {method}: peak RSS {hi['layers']} vs {lo['layers']} layers: "
                      f"{hi['peak_rss'] / lo['peak_rss'] - 1:+.1%} (goal: within 10%)")
            for r in group:
                if method == "weights":
                    print(f"{shape} weights {r['layers']} layers: split / copy {r['split_s'] / r['copy_s']:.2f}x "
                          f"as the processes returned, {r['split_disk_s'] / r['copy_disk_s']:.2f}x until on disk "
                          "(goal: <= 2x)")
                elif r.get("floor_s"):
                    print(f"{shape} activations {r['layers']} layers: {r['layer_s']:.2f} s per layer / "
                          f"{r['floor_s']:.2f} s layer forward = {r['layer_s'] / r['floor_s']:.2f}x "
                          "(goal: <= 3x on CPU)")
                if r.get("gpu_peak"):
                    print(f"{shape} {method} {r['layers']} layers: peak GPU memory {r['gpu_peak']:.2f} GiB "
                          f"(one layer in float32: {one_layer_gib(shape):.2f} GiB)")
                if r["layers"] != 32 and shape == "8b" and method == "activations":
                    est = r["split_s"] + (32 - r["layers"]) * r["layer_s"]
                    print(f"8b activations: extrapolated to 32 layers from {r['layers']}: {est:.0f} s "
                          "(an extrapolation, not a measurement)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
