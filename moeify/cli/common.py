"""Option types shared by every command, and the one decorator that gives a command its output sink.

`cli_command` builds the `Output` from the command's own `--json`/`--quiet` values, hands it to the command
as `out`, and turns exceptions into one-line errors: each command body is just its work and its result.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

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

F = TypeVar("F", bound=Callable[..., Any])


def cli_command(fn: F | None = None, *, rank_zero_only: bool = False) -> Any:
    """Give a command its output sink and one-line errors.

    The decorated function takes `out: Output` (hidden from the command line) and may declare `json_mode` and
    `quiet` options; the sink is built from them. With `rank_zero_only`, processes other than the first one
    of an `accelerate launch` print nothing (they all run the same command).
    """

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        if "out" not in signature.parameters:
            raise TypeError(f"{func.__name__} must take an `out` parameter")

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            json_mode, quiet = bool(kwargs.get("json_mode", False)), bool(kwargs.get("quiet", False))
            if rank_zero_only and os.environ.get("RANK", "0") != "0":
                json_mode, quiet = False, True  # not even the JSON result: the first process prints it
            out = Output(json_mode=json_mode, quiet=quiet)
            return run_command(out, lambda: func(*args, out=out, **kwargs))

        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p for name, p in signature.parameters.items() if name != "out"])
        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate


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
    except KeyboardInterrupt as e:
        # TrainingInterrupted (a KeyboardInterrupt) says where the resumable checkpoint is.
        out.error(getattr(e, "message", None) or "interrupted; no output was left half-written")
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


def _flags_without_metavar(params: list[Any]) -> list[Any]:
    """A flag takes no value: without this, typer's help shows `<bool>` next to it as if it took one."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """Every moeify command: flags shown as flags in --help."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))


class Group(TyperGroup):
    """The moeify app and its sub-apps: flags shown as flags in --help."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))
