"""Where SmolLM2's FFN output energy sits: the first token of each sequence, layer by layer.

    python bench/massive_tokens.py [--chunks 8]

Runs the dense model (stock transformers, float32) on the first chunks of 512 tokens of the shipped calibration
text and prints, per layer, the share of the FFN output energy at position 0 and in positions 0-3, the first
token's FFN output and residual norm over the median token's, and the residual's 99th percentile over its median.
It is why the split's least-squares fits are dominated by a few hundred tokens at some layers, and why weighting
them down loses (bench/_variant_token_weights.py, docs/quality.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._models import smollm2_folder  # noqa: E402
from moeify.data import load_tokenizer, packaged_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8, help="sequences of 512 tokens")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    folder = smollm2_folder()
    ids = load_tokenizer(folder)(packaged_text("calibration.txt").read_text()[:200_000])["input_ids"]
    tokens = torch.tensor(ids[:512 * args.chunks]).view(args.chunks, 512)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outputs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, out.detach()))
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    print("layer  pos0 share  pos0-3 share  ffn out pos0/median  residual pos0/median  residual p99/median")
    for i in range(len(model.model.layers)):
        energy = outputs[i].pow(2).sum(-1)  # [chunks, 512]
        out_norm, resid = outputs[i].norm(dim=-1), hidden[i + 1].norm(dim=-1)
        share0, share4 = float(energy[:, 0].sum() / energy.sum()), float(energy[:, :4].sum() / energy.sum())
        print(f"{i:5d}  {share0:10.3f}  {share4:12.3f}  {float(out_norm[:, 0].mean() / out_norm[:, 1:].median()):19.1f}"
              f"  {float(resid[:, 0].mean() / resid[:, 1:].median()):20.1f}"
              f"  {float(resid[:, 1:].quantile(0.99) / resid[:, 1:].median()):19.2f}")


if __name__ == "__main__":
    main()
