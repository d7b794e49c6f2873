"""Re-read a written FP8 checkpoint and compare it with its source, tensor by tensor.

Verification reads the files back from disk rather than trusting the tensors it just computed, so it
also catches a wrong header, a misplaced offset or a scale written under the wrong name. For each
quantized kind it reports the worst relative error ||W - Q*s||_F / ||W||_F; kept tensors must be
identical to their source bit for bit.

e4m3 keeps 3 mantissa bits, so rounding moves a normal value by at most 2^-4 of itself; the Frobenius
error of a well-scaled matrix sits near 2-3%. Anything above `MAX_RELATIVE_ERROR` means the output is
broken (not merely imprecise) and fails the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeify.errors import OutputError
from moeify.io.reader import CheckpointReader
from moeify.progress import SILENT, Reporter
from moeify.quant.fp8 import dequantize
from moeify.quant.plan import QuantPlan

MAX_RELATIVE_ERROR = 2.0**-3


@dataclass
class VerifyReport:
    worst_by_kind: dict[str, tuple[float, str]] = field(default_factory=dict)  # kind -> (error, tensor)
    kept_identical: int = 0

    def add(self, kind: str, error: float, name: str) -> None:
        if kind not in self.worst_by_kind or error > self.worst_by_kind[kind][0]:
            self.worst_by_kind[kind] = (error, name)

    def as_dict(self) -> dict[str, Any]:
        return {"worst_relative_error": {k: {"error": round(e, 6), "tensor": n}
                                         for k, (e, n) in sorted(self.worst_by_kind.items())},
                "kept_identical": self.kept_identical}


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.to(torch.float32)
    norm = torch.linalg.vector_norm(ref).item()
    diff = torch.linalg.vector_norm(ref - approx.to(torch.float32)).item()
    return 0.0 if norm == 0 and diff == 0 else diff / max(norm, 1e-30)


def verify_output(source: CheckpointReader, folder: Path, plan: QuantPlan, reporter: Reporter = SILENT
                  ) -> VerifyReport:
    written = CheckpointReader(folder)
    report = VerifyReport()
    expected = {s.name for s in plan.specs}
    if set(written.tensors) != expected:
        missing = sorted(expected - set(written.tensors))[:1] or sorted(set(written.tensors) - expected)[:1]
        raise OutputError(f"{folder}: written tensors differ from the plan (e.g. {missing[0]!r})",
                          "this is a bug; please report it")
    for name, original in reporter.track(source.iter_tensors(), "verifying", total=len(source.tensors)):
        target = plan.targets.get(name)
        if target is None:
            stored = written.get(name)
            if stored.dtype != original.dtype or not torch.equal(_bits(stored), _bits(original)):
                raise OutputError(f"{folder}: kept tensor {name!r} differs from its source",
                                  "this is a bug; please report it")
            report.kept_identical += 1
            continue
        approx = dequantize(written.get(name), written.get(target.scale_name), plan.scheme)  # type: ignore[arg-type]
        error = relative_error(original, approx)
        if not error <= MAX_RELATIVE_ERROR:
            raise OutputError(f"{folder}: {name} dequantizes with relative error {error:.3g}",
                              "the output is broken; this is a bug, please report it")
        report.add(target.kind, error, name)
    return report


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)
