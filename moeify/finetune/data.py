"""Training tokens: packed fixed-length chunks from moeify.data, and a batch order that resumes exactly.

Packing is moeify.data's `tokenize_chunks` (documents joined, cut into `seq_len` chunks, no padding), so
fine-tuning sees text the same way calibration and evaluation do. The order of chunks is a pure
function of (seed, epoch), and the batch of step s is a pure function of s: a resumed run draws exactly
the batches the uninterrupted run would have, on any number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moeify.errors import UsageError


def load_chunks(spec: str | None, tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """[chunks, seq_len] int64 token ids of a text file, folder or hf: dataset id."""
    from moeify.data import load_text, tokenize_chunks

    return tokenize_chunks(tokenizer, load_text(spec), seq_len, max_tokens=max_tokens, spread=True)


@dataclass(frozen=True)
class BatchPlan:
    """Which chunks each step trains on; `batch_size` is per process, `world` processes train together."""

    chunks: int
    batch_size: int
    seed: int
    world: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.chunks, generator=g)

    def indices(self, step: int, rank: int = 0) -> torch.Tensor:
        """The chunk indices process `rank` trains on at `step` (epochs wrap around the data)."""
        start = step * self.global_batch
        picked = []
        position = start
        while len(picked) < self.global_batch:
            epoch, offset = divmod(position, self.chunks)
            take = min(self.global_batch - len(picked), self.chunks - offset)
            picked.append(self.order(epoch)[offset:offset + take])
            position += take
        flat = torch.cat(picked)
        return flat[rank * self.batch_size:(rank + 1) * self.batch_size]


def steps_for(tokens: int | None, max_steps: int | None, seq_len: int, global_batch: int) -> int:
    """The number of optimiser steps a token budget or step limit means (whichever is given)."""
    if tokens is None and max_steps is None:
        raise UsageError("give a training budget", "--tokens 2M or --max-steps N")
    if tokens is not None and max_steps is not None:
        raise UsageError("--tokens and --max-steps both given", "choose one budget")
    if max_steps is not None:
        if max_steps < 1:
            raise UsageError(f"--max-steps must be positive (got {max_steps})", "e.g. --max-steps 100")
        return max_steps
    if tokens < 1:
        raise UsageError(f"--tokens must be positive (got {tokens})", "e.g. --tokens 2M")
    return max(1, math.ceil(tokens / (seq_len * global_batch)))


def parse_token_count(text: str) -> int:
    """'2M' -> 2_000_000, '500k' -> 500_000, '1.5G' -> 1_500_000_000, '4096' -> 4096."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
    raw = text.strip().lower().replace("_", "")
    factor = units.get(raw[-1:], 1) if raw else 1
    number = raw[:-1] if factor != 1 else raw
    try:
        value = float(number) * factor
    except ValueError:
        raise UsageError(f"--tokens {text!r} is not a token count", "e.g. --tokens 2M, 500k or 100000") from None
    if value < 1 or value != value:
        raise UsageError(f"--tokens {text!r} must be at least 1", "e.g. --tokens 2M")
    return int(value)
