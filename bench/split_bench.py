"""Split streaming benchmark: peak RSS and wall time at 4 and 16 Llama-3-8B-shaped layers, beside a plain copy.

    python bench/split_bench.py [--layers 4 16] [--experts 8] [--workdir /tmp/moeify-bench]

Writes synthetic random bf16 checkpoints with Llama-3-8B layer shapes (hidden 4096, intermediate 14336,
32 heads / 8 KV heads; vocabulary cut to 32000 so the embedding does not dominate), then for each one
measures, each in its own child process (peak RSS from os.wait4, so nothing else is counted):
  - copy: shutil.copytree of the same files (the I/O floor);
  - split: `python -m moeify split SRC --experts E --top-k 2 -q`.
Both read a freshly written checkpoint, so both find it in the page cache. Targets (issue 2): peak RSS
at 16 layers within 10% of 4 layers; split time at most 2x the copy time.
Also times one layer's balanced clustering into 64 experts (14336 neurons), which must take seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTER, HEADS, KV, VOCAB = 4096, 14336, 32, 8, 32000


def write_checkpoint(folder: Path, layers: int) -> Path:
    import torch

    from moeify.io.writer import ShardedWriter, TensorSpec

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * head_dim, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER)})
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()]
    g = torch.Generator().manual_seed(0)
    with ShardedWriter(folder, specs, max_shard_bytes=2 * 1024**3) as w:
        for s in specs:
            t = torch.ones(s.shape) if "norm" in s.name else torch.randn(s.shape, generator=g) * 0.02
            w.write(s.name, t.to(torch.bfloat16))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "vocab_size": VOCAB, "hidden_act": "silu", "rms_norm_eps": 1e-5,
              "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def measure(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")
    return wall, usage.ru_maxrss / 1024**2


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def cluster_64_seconds() -> float:
    import torch

    from moeify.split.methods.cluster import balanced_kmeans
    from moeify.split.methods.weights import neuron_features
    from moeify.split.moe_layer import FFNWeights

    g = torch.Generator().manual_seed(1)
    ffn = FFNWeights(torch.randn(INTER, HIDDEN, generator=g), torch.randn(INTER, HIDDEN, generator=g),
                     torch.randn(HIDDEN, INTER, generator=g))
    start = time.perf_counter()
    feats = neuron_features(ffn, torch.arange(INTER))
    balanced_kmeans(feats, 64, capacity=INTER // 64)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeify-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints for a rerun")
    parser.add_argument("--generate", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
    parser.add_argument("--cluster64", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Children do the heavy work: a parent that had touched torch would pass its RSS high-water mark on
    # through fork/exec, and every child's peak RSS would read high.
    if args.generate:
        write_checkpoint(Path(args.generate[0]), int(args.generate[1]))
        return
    if args.cluster64:
        print(f"{cluster_64_seconds():.1f}")
        return
    rows = []
    for layers in args.layers:
        src = args.workdir / f"llama8b-shape-{layers}l"
        subprocess.run([sys.executable, __file__, "--generate", str(src), str(layers)], check=True)
        copy_dst, split_dst = args.workdir / f"copy-{layers}", args.workdir / f"split-{layers}"
        for d in (copy_dst, split_dst):
            shutil.rmtree(d, ignore_errors=True)
        copy_s, copy_rss = measure([sys.executable, "-c", f"import shutil; shutil.copytree({str(src)!r}, "
                                    f"{str(copy_dst)!r})"])
        split_s, split_rss = measure([sys.executable, "-m", "moeify", "split", str(src), "-o", str(split_dst),
                                      "--experts", str(args.experts), "--top-k", "2", "--method", "weights", "-q"])
        rows.append({"layers": layers, "gib": folder_bytes(src) / 1024**3, "copy_s": copy_s, "copy_rss": copy_rss,
                     "split_s": split_s, "split_rss": split_rss})
        shutil.rmtree(copy_dst, ignore_errors=True)
        shutil.rmtree(split_dst, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f}, experts: {args.experts}")
    print("| layers | checkpoint GiB | copy s | copy peak RSS GiB | split s | split peak RSS GiB | split / copy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['gib']:.2f} | {r['copy_s']:.1f} | {r['copy_rss']:.2f} | {r['split_s']:.1f} | "
              f"{r['split_rss']:.2f} | {r['split_s'] / r['copy_s']:.2f}x |")
    if len(rows) >= 2:
        print(f"peak RSS {rows[-1]['layers']} vs {rows[0]['layers']} layers: "
              f"{rows[-1]['split_rss'] / rows[0]['split_rss'] - 1:+.1%}")
    seconds = subprocess.run([sys.executable, __file__, "--cluster64"], check=True, capture_output=True, text=True)
    print(f"balanced clustering of one 14336-neuron layer into 64 experts: {seconds.stdout.strip()} s")


if __name__ == "__main__":
    main()
