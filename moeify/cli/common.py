"""Option types shared by every command, and the wrapper that turns exceptions into one-line errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from moeify.cli.console import Output
from moeify.errors import MoeifyError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output folder (written atomically).")]
ModelArg = Annotated[str, typer.Argument(help="Local folder, Hub id (org/name) or .gguf file.")]
DirArg = Annotated[Path, typer.Argument(help="A checkpoint folder.")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="Hugging Face token (default: HF_TOKEN or the saved login). Never printed.",
                 show_default=False),
]


def run_command(out: Output, fn: Callable[[], Any]) -> Any:
    """Run a command body; a MoeifyError becomes one line and its exit code, Ctrl-C exits 130.

    Unexpected exceptions are bugs: one line asking for a report, the traceback only with MOEIFY_DEBUG=1.
    """
    debug = os.environ.get("MOEIFY_DEBUG") == "1"
    try:
        return fn()
    except MoeifyError as e:
        if debug:
            raise
        out.error(e.message, e.hint)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        out.error("interrupted; no output was left half-written")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except MemoryError:
        if debug:
            raise
        out.error("out of memory", "use a machine with more RAM or a smaller model")
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            raise
        out.error(f"internal error: {type(e).__name__}: {e}",
                  "rerun with MOEIFY_DEBUG=1 for the traceback and report it")
        raise typer.Exit(1) from None


def echo_err(message: str) -> None:
    sys.stderr.write(message + "\n")
