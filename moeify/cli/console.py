"""The one output sink of the CLI: Rich progress on stderr, results on stdout, in human, --json or --quiet mode.

Only the CLI imports this module; library code reports through `moeify.progress.Reporter`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from moeify.progress import Reporter

T = TypeVar("T")


class Output(Reporter):
    """Progress bars and notes go to stderr; `result()` prints a table or JSON to stdout."""

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.err = Console(stderr=True, highlight=False)
        self.out = Console(highlight=False, soft_wrap=True)
        self.notes: list[str] = []

    # Reporter -----------------------------------------------------------------
    def track(self, items: Iterable[T], description: str, total: int | None = None,
              postfix: Callable[[], str] | None = None) -> Iterator[T]:
        if self.quiet or self.json_mode or not self.err.is_terminal and not _force_progress():
            yield from items
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()]
        if postfix is not None:
            columns.append(TextColumn("{task.fields[postfix]}"))
        with Progress(*columns, console=self.err, transient=False) as progress:
            task = progress.add_task(description, total=total, postfix="")
            for item in items:
                yield item
                if postfix is not None:
                    progress.update(task, advance=1, postfix=postfix())
                else:
                    progress.advance(task)

    def note(self, message: str) -> None:
        self.notes.append(message)
        if not self.quiet and not self.json_mode:
            self.err.print(f"[cyan]note:[/] {redact(message)}")

    def status(self, message: str) -> None:
        if not self.quiet and not self.json_mode:
            self.err.print(f"[dim]{message}[/]")

    # Results --------------------------------------------------------------------
    def result(self, data: dict[str, Any], title: str | None = None, rows: list[tuple[str, Any]] | None = None,
               tables: list[Table] | None = None) -> None:
        """Print the outcome: JSON in --json mode, else a key/value table (and extra tables)."""
        if self.json_mode:
            payload = dict(data)
            if self.notes:
                payload.setdefault("notes", self.notes)
            sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
            return
        if self.quiet:
            return
        if rows is None:
            rows = [(k, v) for k, v in data.items() if not isinstance(v, dict | list)]
        table = Table(title=title, show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(str(key), _fmt(value))
        self.out.print(table)
        for extra in tables or []:
            self.out.print(extra)

    def error(self, message: str, hint: str | None = None) -> None:
        text = f"[bold red]error:[/] {_escape(message)}"
        if hint:
            text += f" [yellow](hint: {_escape(hint)})[/]"
        self.err.print(text, soft_wrap=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(redact(" ".join(text.splitlines())))  # an error is one line, whatever an exception says


_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")


def redact(text: str) -> str:
    """Blank out anything shaped like a Hugging Face token: a last guard for messages built from exceptions."""
    return _TOKEN.sub("hf_***", text)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _force_progress() -> bool:
    import os

    return os.environ.get("MOEIFY_PROGRESS") == "1"
