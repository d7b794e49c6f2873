"""Where the heavy arithmetic runs: one meaning of `--device auto|cpu|cuda|cuda:N` for every command.

`split` (calibration, clustering, router fit, repair), `eval` and `finetune` all resolve their option
here, so "auto" means the same everywhere: the first visible GPU, else the CPU. An unavailable device
is a usage error (exit 2) raised before any output exists.

`Compute` is the precision policy that goes with the device. On the CPU everything stays float32 (the
exactness tests depend on it). On a GPU the large matrix products run in bf16 with float32 accumulation
(autocast; cuBLAS accumulates bf16 products in float32), and callers convert results back to float32
or float64 before anything that must be exact: sums over tokens, normal equations, solves.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from dataclasses import dataclass

import torch

from moeify.errors import UsageError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEVICE_HELP = "auto (a GPU when one is visible), cpu, cuda or cuda:N."
_CUDA = re.compile(r"cuda(?::(\d+))?")


def check_device_name(requested: str, flag: str = "--device") -> None:
    """Syntax only (no CUDA query): for validating recipes and options on machines without the device."""
    text = str(requested).strip().lower()
    if text not in ("auto", "cpu") and not _CUDA.fullmatch(text):
        raise UsageError(f"{flag} {requested!r} is not one of {DEVICE_CHOICES}", f"e.g. {flag} auto")


def resolve_device(requested: str | None = "auto", flag: str = "--device") -> torch.device:
    """The torch device a `--device` value names, checked to exist now."""
    text = str(requested or "auto").strip().lower()
    check_device_name(text, flag)
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"{flag} {requested}: no CUDA GPU is visible", f"use {flag} cpu or auto")
    index = int(_CUDA.fullmatch(text).group(1) or 0)  # type: ignore[union-attr]
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"{flag} {requested}: only {count} CUDA GPU{'s' if count != 1 else ''} visible",
                         f"use cuda:0 to cuda:{count - 1}, or {flag} auto")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Compute:
    """A device and its matmul precision (None: plain float32)."""

    device: torch.device
    matmul_dtype: torch.dtype | None = None

    @classmethod
    def for_device(cls, device: torch.device | str, matmul_dtype: torch.dtype | None | str = "auto") -> Compute:
        device = torch.device(device) if isinstance(device, str) else device
        if matmul_dtype == "auto":
            matmul_dtype = torch.bfloat16 if device.type == "cuda" else None
        return cls(device, matmul_dtype)  # type: ignore[arg-type]

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 products with float32 accumulation on the GPU; a no-op in the float32 CPU policy."""
        if self.matmul_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.matmul_dtype)

    def put(self, tensor: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """`tensor` on this device (in `dtype`; None keeps it); a no-op when it is there already."""
        return tensor.to(device=self.device, dtype=dtype if dtype is not None else tensor.dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release(self) -> None:
        """Hand the memory of a finished layer back: the GPU's cached blocks and the CPU heap's free pages.

        Called between layers so that peak memory stays one layer's worth at any depth: glibc keeps freed
        blocks below its (dynamic, up to 32 MiB) mmap threshold on the heap, and the heap only shrinks
        from the top, so without a trim the resident size creeps up as layers of different tensor sizes
        fragment it.
        """
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        trim_heap()


def trim_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the OS (a no-op elsewhere)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def return_freed_blocks_promptly(threshold: int = 1 << 20) -> bool:
    """Make glibc serve blocks of `threshold` bytes and more from mmap, so freeing one returns it at once.

    glibc carves blocks under its dynamic mmap threshold (which climbs to 32 MiB as big blocks are freed)
    from its heaps and keeps them after free; a training step's activations and their recomputation under
    gradient checkpointing (MBs each) then leave the resident size well above what is live: the SmolLM2
    fine-tune peaked at 5.15 GiB, 3.43 GiB after a malloc_trim (docs/benchmarks.md "Fine-tune memory"). A fixed 1 MiB
    threshold brought the peak to 3.60 GiB at about 25% fewer tokens/s (fresh pages are faulted in and
    zeroed on every allocation), so only memory-saving runs (`--gradient-checkpointing` on CPU) ask for it.
    It is process-wide and stays set. Returns whether the allocator took it (False off glibc).
    """
    libc = _libc()
    if not libc:
        return False
    m_mmap_threshold = -3  # malloc.h; setting it also turns off glibc's dynamic threshold
    return bool(libc.mallopt(m_mmap_threshold, int(threshold)))


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


_LIBC: ctypes.CDLL | bool | None = None


CPU = Compute(torch.device("cpu"))
