"""Stage 2's memory: the loss never holds the whole batch's logits, and the run says what it will cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeify.finetune import FinetuneOptions, finetune
from moeify.finetune.distill import DistillConfig, chunked_kl_to_teacher, distill, kl_to_teacher
from moeify.finetune.moe_model import load_student
from moeify.finetune.run import estimate_memory, load_teacher, make_accelerator, set_trainable
from moeify.progress import RecordingReporter
from moeify.split.convert import SplitOptions, split_model

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def moe(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ftmem") / "moe"
    split_model(tiny_models["llama"], out, SplitOptions(experts=4, top_k=2, shared=1, method="weights"))
    return out


def test_chunked_kl_equals_the_plain_loss_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(3, 7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(3, 7, 16, generator=g, dtype=torch.float64)
    ws = torch.randn(50, 16, generator=g, dtype=torch.float64)
    wt = torch.randn(50, 16, generator=g, dtype=torch.float64)
    plain = kl_to_teacher(F.linear(hs, ws), F.linear(ht, wt))
    (grad_plain,) = torch.autograd.grad(plain * 3.0, hs)
    chunked = chunked_kl_to_teacher(hs, ht, ws, wt, chunk=4)  # 21 tokens: chunks of 4, 4, 4, 4, 4 and 1
    (grad_chunked,) = torch.autograd.grad(chunked * 3.0, hs)
    # both compute the softmaxes in float32, whatever the input dtype
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.allclose(grad_chunked, grad_plain, rtol=1e-4, atol=1e-6)


def test_a_training_step_keeps_no_vocabulary_wide_tensor_of_the_batch(moe, tiny_models):
    """Before: both models' [tokens, vocab] logits (and their log-softmaxes) were kept for the backward pass."""
    student, teacher = load_student(moe), load_teacher(tiny_models["llama"], "cpu")
    set_trainable(student)
    head = student.get_output_embeddings()
    vocab = student.config.vocab_size
    batch, seq = 4, 32
    chunks = torch.randint(0, vocab, (8, seq), generator=torch.Generator().manual_seed(1))
    widest = {"numel": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 2 and t.shape[-1] == vocab and t.numel() >= batch * seq * vocab:
            widest["numel"] = max(widest["numel"], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        distill(student, teacher, chunks, DistillConfig(steps=2, batch_size=batch), make_accelerator("cpu"))
    assert widest["numel"] == 0
    assert student.get_output_embeddings() is head  # the output head is back after training


def test_the_run_prints_its_plan_memory_and_warns_when_the_budget_is_one_step(moe, tiny_models, tmp_path):
    reporter = RecordingReporter()
    chunks = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    options = FinetuneOptions(teacher=str(tiny_models["llama"]), stage="2", tokens=64, batch_size=2, device="cpu")
    result = finetune(moe, tmp_path / "ft", options, reporter=reporter, chunks=chunks)
    assert result["steps"] == 1
    text_notes = "\n".join(reporter.notes)
    assert "plan: 1 step of 2 x 32 tokens" in text_notes
    assert "estimated peak RAM" in text_notes
    assert "warning: 1 step will barely move" in text_notes and "--tokens" in text_notes


def test_memory_estimate_counts_checkpointing(moe):
    student = load_student(moe)
    set_trainable(student)
    plain = estimate_memory(student, FinetuneOptions(batch_size=4), "cpu", 512)
    saved = estimate_memory(student, FinetuneOptions(batch_size=4, gradient_checkpointing=True), "cpu", 512)
    assert saved["activations"] < plain["activations"] and saved["student"] == plain["student"]
    assert plain["total"] == sum(v for k, v in plain.items() if k != "total")
