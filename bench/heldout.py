"""Held-out quality of real `moeify split` outputs on SmolLM2-135M: docs/quality.md's refinement tables.

    python bench/heldout.py [--chunks 4] [--workdir /tmp/moeify-heldout] CONFIG [CONFIG ...]

CONFIG is `name` or `name:key=value,key=value` with SplitOptions fields (experts, top_k, shared,
refine_steps, calibration_tokens, calibration, stream, down_ridge, active, dense_layers, ...; a list is
`dense_layers=12;13`, `dense_layers=auto:2` asks the screening pass); `default` alone is the split
a user gets from `moeify split MODEL`. Each config is split with the real entry point (files written to disk),
loaded by stock transformers, and scored on two held-out texts that share no passage with the calibration
text: the shipped Sense and Sensibility excerpt (in domain: the calibration holds Pride and Prejudice) and
the shipped Wikipedia excerpt (out of domain for the novel, and articles absent from the mixed calibration
text). One JSON line per config: perplexity ratios to dense, their geometric mean, split time.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._models import smollm2_folder  # noqa: E402
from moeify.data import load_tokenizer, packaged_text, tokenize_chunks  # noqa: E402
from moeify.evaluate import chunk_nll, load_model  # noqa: E402
from moeify.split.convert import SplitOptions, split_model  # noqa: E402

TEXTS = {"sense": "eval_sense_and_sensibility.txt", "wiki": "eval_wikipedia.txt"}


def perplexities(folder: Path, chunks: dict[str, torch.Tensor]) -> dict[str, float]:
    return model_perplexities(load_model(folder), chunks)


def model_perplexities(model, chunks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Perplexity per named text of token chunks (shared with bench/quantize_bench.py)."""
    out = {}
    with torch.no_grad():
        for name, rows in chunks.items():
            nll = count = 0.0
            for row in rows:
                a, b = chunk_nll(model, row)
                nll, count = nll + a, count + b
            out[name] = math.exp(nll / count)
    return out


def parse(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if ";" in value:  # a list of integers: dense_layers=12;13
            kwargs[key] = [int(v) for v in value.split(";") if v]
            continue
        for cast in (int, float):
            try:
                kwargs[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            kwargs[key] = None if value == "none" else value
    return name, kwargs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--chunks", type=int, default=4, help="512-token chunks per held-out text")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moeify-heldout"))
    ap.add_argument("--keep", action="store_true", help="keep the split folders")
    args = ap.parse_args()
    dense = smollm2_folder()
    tok = load_tokenizer(dense)
    chunks = {k: tokenize_chunks(tok, packaged_text(v).read_text(), 512, max_chunks=args.chunks, spread=True)
              for k, v in TEXTS.items()}
    args.workdir.mkdir(parents=True, exist_ok=True)
    cache = args.workdir / f"dense-{args.chunks}.json"
    if not cache.exists():
        cache.write_text(json.dumps(perplexities(dense, chunks)))
    base = json.loads(cache.read_text())
    print(json.dumps({"config": "dense", **{k: round(v, 3) for k, v in base.items()}}), flush=True)
    for spec in args.configs:
        name, kwargs = parse(spec)
        out = args.workdir / name
        t0 = time.perf_counter()
        result = split_model(dense, out, SplitOptions(**kwargs), overwrite=True)
        split_s = time.perf_counter() - t0
        ppl = perplexities(out, chunks)
        ratios = {k: ppl[k] / base[k] for k in ppl}
        info = result["method_info"]
        print(json.dumps({
            "config": name, "options": kwargs, "activation_ratio": result["activation_ratio"],
            "experts": result["options"]["experts"], "top_k": result["options"]["top_k"],
            "shared": result["options"]["shared"],
            **{k: round(v, 3) for k, v in ppl.items()}, **{f"{k}_x": round(v, 3) for k, v in ratios.items()},
            "geomean_x": round(math.sqrt(math.prod(ratios.values())), 3), "split_s": round(split_s, 1),
            **{k: v for k, v in info.items() if k.startswith("mean_") or k == "refined_layers"},
            "layer_errors": [layer.get("error_after_refine", layer.get("error_after_repair"))
                             for layer in result["layers"]],
        }), flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
