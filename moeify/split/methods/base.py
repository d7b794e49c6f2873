"""The interface of a splitting method: how a dense FFN becomes experts, a shared block and a router.

Methods are called layer by layer, in order, by `split.py`, which owns all reading, writing and
target-specific scaling. A method that needs data (calibration) sets itself up in `prepare` and may
run the dense model alongside, one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeify.arch.base import SourceFamily, TargetArch
from moeify.device import CPU, Compute
from moeify.io.reader import CheckpointReader
from moeify.progress import Reporter
from moeify.split.moe_layer import FFNWeights, MoELayer


@dataclass
class SplitContext:
    """Everything a method may need to know about the run, fixed before the first layer."""

    folder: Path
    reader: CheckpointReader
    config: dict[str, Any]
    family: SourceFamily
    target: TargetArch
    experts: int
    top_k: int
    shared: int
    expert_size: int
    seed: int
    reporter: Reporter
    calibration: str | None = None
    calibration_tokens: int = 4096
    dense_layers: tuple[int, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)  # the method's own options (SplitOptions fields)
    compute: Compute = CPU  # where the arithmetic runs (--device) and in which precision


class SplitMethod:
    name: str = ""
    needs_calibration: bool = False
    settings: tuple[str, ...] = ()  # names of SplitOptions fields this method reads into attributes
    # True: build() takes the FFN in the checkpoint's dtype (a method that only gathers stored rows and
    # columns); False: in float32, which every method that computes new weights needs.
    stored_dtype: bool = False

    def prepare(self, ctx: SplitContext) -> None:
        self.ctx = ctx
        for name in self.settings:
            if name in ctx.settings:
                setattr(self, name, ctx.settings[name])

    def build(self, layer: int, ffn: FFNWeights) -> MoELayer:
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        """Method-specific facts for moeify.json (e.g. per-layer reconstruction error)."""
        return {}
