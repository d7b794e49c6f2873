"""The `moeify` command: this module only wires the commands, each defined in its own module.

Every command is registered here, by name, so the list of commands is this file (nothing registers itself
as a side effect of being imported).
"""

from __future__ import annotations

import typer

from moeify.cli import (
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
from moeify.cli.common import Command, Group

app = typer.Typer(
    name="moeify",
    help="Turn a dense Hugging Face language model into a Mixture-of-Experts model and ship it small.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Group,
)

recipes_app = typer.Typer(help="The recipes shipped with moeify: list, show, copy to edit.", no_args_is_help=True,
                          cls=Group)

_COMMANDS = [
    (app, "split", split_cmd.split),
    (app, "finetune", finetune_cmd.finetune),
    (app, "quantize", quantize_cmd.quantize_command),
    (app, "dequantize", quantize_cmd.dequantize_command),
    (app, "eval", eval_cmd.eval_command),
    (app, "inspect", inspect_cmd.inspect_),
    (app, "push", push_cmd.push_command),
    (app, "run", run_cmd.run),
    (app, "validate", run_cmd.validate),
    (app, "demo", demo_cmd.demo),
    (recipes_app, "list", recipes_cmd.list_recipes),
    (recipes_app, "show", recipes_cmd.show),
    (recipes_app, "cp", recipes_cmd.copy),
]
for _group, _name, _function in _COMMANDS:
    _group.command(_name, cls=Command)(_function)
app.add_typer(recipes_app, name="recipes")


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
