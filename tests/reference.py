"""Reference computations the product's own numbers are checked against (kept deliberately plain)."""

from __future__ import annotations

import math

import torch


def perplexity(model, chunks: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every predicted position of every chunk, float64 accumulation."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in chunks:
            logits = model(row[None]).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")
            total += nll.item()
            count += row.numel() - 1
    return math.exp(total / count)
