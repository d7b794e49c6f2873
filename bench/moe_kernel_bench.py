"""One FFN block at decode (batch 1) in vLLM's own CPU kernels: where a split's time goes, layout by layout.

    /work/venvs/vllm/bin/python bench/moe_kernel_bench.py [--layouts 48x16-s16 56x8-s8 ...] [--tokens 1]
        [--rounds 200] [--layers 30]

serve_bench.py measures whole-model tokens/s; this says why a layout is as fast as it is. It runs in the vLLM
venv (no model, random bf16 weights of SmolLM2's shapes: hidden 576, FFN 1536) and times, per FFN block:
- dense: gate_up and down through the linear vLLM dispatches for this CPU (`dispatch_cpu_unquantized_gemm`:
  oneDNN, or SGL's packed GEMM for small weights on AMX) and vLLM's `silu_and_mul`;
- each layout `E x K [-sS] [-pP]` (serve_bench.py's grammar; a target suffix changes nothing here): the router
  (same dispatch), softmax and top-k, `cpu_fused_moe` with the ISA vLLM picks (`amx` with AMX tiles, else the
  portable `vec`), its experts zero-padded as vLLM pads them at load time (its kernel class's alignment, 32
  neurons in vLLM 0.32), and for S > 0 Qwen2-MoE's shared expert (gate_up, silu_and_mul,
  down, the sigmoid gate, the add). "kernel" is the fused call alone with fixed routing.

Each case cycles through `--layers` copies of its weights, so they stream from memory as in a real decode
step (one layer's weights fit in cache; 30 layers' do not). Eager mode: vLLM's compiled graph fuses the
small elementwise ops, so the non-GEMM parts here are an upper bound. Bytes/s is per useful byte (the padded
zeros are read, not counted): it is what the kernel delivers of the bandwidth the bound assumes. It is printed
for `--tokens 1` only; with more tokens each picks its own random experts, which is not the routing of a real
prompt either, so read those runs as kernel call times only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.serve_bench import parse_config  # noqa: E402  (the same E x K [-sS] grammar as the serving bench)

HIDDEN, FFN = 576, 1536
DEFAULT_LAYOUTS = ["8x2", "8x4", "22x4-s2", "56x8-s8", "52x4-s12", "50x2-s14", "18x6-s6", "36x12-s12",
                   "48x16-s16", "40x8-s24", "36x4-s28", "72x24-s24", "64x32"]


class _Linear(torch.nn.Module):
    """A weight-only linear given vLLM's CPU GEMM dispatch, as its model layers get it."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02,
                                         requires_grad=False)
        dispatch_cpu_unquantized_gemm(self, remove_weight=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpu_linear(x, self.weight, None)


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
    torch.ops._C.silu_and_mul(out, gate_up)
    return out


def _time(calls: list[Callable[[], object]], rounds: int) -> float:
    """Microseconds per call, cycling through the calls (each a layer's weights) so none stays in cache."""
    for _ in range(3):
        for call in calls:
            call()
    start = time.perf_counter()
    for _ in range(rounds):
        for call in calls:
            call()
    return (time.perf_counter() - start) / (rounds * len(calls)) * 1e6


def _isa() -> str:
    return "amx" if torch.cpu._is_amx_tile_supported() else "vec"


def _padded(size: int) -> int:
    """The expert size vLLM pads to at load time (`_pad_moe_intermediate`), asked of its kernel class."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
        CPUUnquantizedExperts,
        X86CPUUnquantizedExperts,
    )
    from vllm.utils.math_utils import round_up

    kernel = X86CPUUnquantizedExperts if _isa() == "amx" else CPUUnquantizedExperts
    return round_up(size, kernel._intermediate_alignment())


def dense_block(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    gate_up, down = _Linear(2 * FFN, HIDDEN), _Linear(HIDDEN, FFN)
    return lambda: down(_silu_and_mul(gate_up(x)))


def moe_block(x: torch.Tensor, experts: int, top_k: int, shared: int, size: int, kernel_only: bool
              ) -> Callable[[], torch.Tensor]:
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    isa, padded = _isa(), _padded(size)
    w13 = cpu_prepack_moe_weight(torch.randn(experts, 2 * padded, HIDDEN, dtype=torch.bfloat16) * 0.02, isa)
    w2 = cpu_prepack_moe_weight(torch.randn(experts, HIDDEN, padded, dtype=torch.bfloat16) * 0.02, isa)
    router = _Linear(experts, HIDDEN)
    out = torch.empty(x.shape[0], HIDDEN, dtype=torch.bfloat16)
    fixed_ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(x.shape[0])]).to(torch.int32)
    fixed_w = torch.full((x.shape[0], top_k), 1.0 / top_k)
    block = (_Linear(2 * shared * size, HIDDEN), _Linear(HIDDEN, shared * size), _Linear(1, HIDDEN)) if shared else None

    def call() -> torch.Tensor:
        if kernel_only:
            cpu_fused_moe(out, x, w13, w2, None, None, fixed_w, fixed_ids, "silu", isa, False)
            return out
        weights, ids = torch.topk(torch.softmax(router(x).float(), dim=-1), top_k, dim=-1)
        cpu_fused_moe(out, x, w13, w2, None, None, weights, ids.to(torch.int32), "silu", isa, False)
        if block is None:
            return out
        gate_up, down, gate = block
        return out + torch.sigmoid(gate(x)) * down(_silu_and_mul(gate_up(x)))

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS)
    ap.add_argument("--tokens", type=int, default=1, help="tokens per call (1: decode at batch 1)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--layers", type=int, default=30, help="weight copies cycled, so they stream from memory")
    args = ap.parse_args()
    layouts = {name: parse_config(name) for name in args.layouts}  # bad names fail here, before any timing
    torch.manual_seed(0)
    x = torch.randn(args.tokens, HIDDEN, dtype=torch.bfloat16)
    dense_bytes = 3 * FFN * HIDDEN * 2
    dense_us = _time([dense_block(x) for _ in range(args.layers)], args.rounds)
    print(json.dumps({"isa": _isa(), "threads": torch.get_num_threads(), "tokens": args.tokens}), flush=True)
    print(json.dumps({"layout": "dense", "active": 1.0, "full_us": round(dense_us, 1), "x_dense": 1.0,
                      "gemm_gb_s": round(dense_bytes / dense_us / 1e3, 1)}), flush=True)
    for name, layout in layouts.items():
        experts, top_k, shared = layout["experts"], layout["top_k"], layout["shared"]
        size = FFN // (experts + shared)
        stored = -(-size // layout["pad_to"]) * layout["pad_to"]  # `--pad-to` zeros, stored in the checkpoint
        calls = [moe_block(x, experts, top_k, shared, stored, kernel_only=False) for _ in range(args.layers)]
        kernel = [moe_block(x, experts, top_k, shared, stored, kernel_only=True) for _ in range(args.layers)]
        full_us, kernel_us = _time(calls, args.rounds), _time(kernel, args.rounds)
        routed_bytes = top_k * size * HIDDEN * 3 * 2
        row = {"layout": name, "expert_neurons": size, "padded_to": _padded(stored),
               "active": round((top_k + shared) * size / FFN, 3), "full_us": round(full_us, 1),
               "kernel_us": round(kernel_us, 1), "x_dense": round(dense_us / full_us, 2),
               "kernel_gb_s": round(routed_bytes / kernel_us / 1e3, 1)}
        if args.tokens > 1:  # tokens share the experts they pick: bytes per token no longer describe the call
            del row["kernel_gb_s"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
