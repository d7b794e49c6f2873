"""Perplexity over fixed token chunks: the before/after number fine-tuning is judged by."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every position of every chunk, computed in float32."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, chunks.shape[0], batch_size):
        ids = chunks[start:start + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)
