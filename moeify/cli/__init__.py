"""The `moeify` command: the top-level app only wires the commands, one module each."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="moeify",
    help="Turn a dense Hugging Face language model into a Mixture-of-Experts model and ship it small.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module registers its command(s) on `app` when imported.
from moeify.cli import (  # noqa: E402,F401
    demo_cmd,
    eval_cmd,
    finetune_cmd,
    inspect_cmd,
    push_cmd,
    quantize_cmd,
    recipes_cmd,
    run_cmd,
    split_cmd,
)


def main() -> None:
    _quiet_third_party_progress()
    app()


def _quiet_third_party_progress() -> None:
    """transformers' and huggingface_hub's own tqdm bars would interleave with ours (and ignore --quiet)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
