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
from moeify.cli import inspect_cmd, split_cmd  # noqa: E402,F401
from moeify.cli import quantize_cmd  # noqa: E402,F401
from moeify.cli import push_cmd  # noqa: E402,F401


def main() -> None:
    app()
