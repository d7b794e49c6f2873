"""The one output sink of the CLI: Rich progress on stderr, results on stdout, in human, --json or --quiet mode.

Only the CLI imports this module; library code reports through `moeify.progress.Reporter`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.measure import Measurement
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
        if self.quiet or self.json_mode:
            yield from items
            return
        if not self.err.is_terminal and not _force_progress():
            yield from self._plain_track(items, description, total, postfix)
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

    def _plain_track(self, items: Iterable[T], description: str, total: int | None,
                     postfix: Callable[[], str] | None) -> Iterator[T]:
        """Progress for logs (nohup, CI, `2> file`): a plain line after the first item, then at most every
        MOEIFY_PROGRESS_EVERY seconds (default 30), and one at the end, each self-contained:
        `Splitting layers: 3/30 (10%), 12.1 s/item, elapsed 0:36, left 5:27, <postfix>`."""
        every = _progress_interval()
        start = last = time.monotonic()
        done = 0
        for item in items:
            yield item
            done += 1
            now = time.monotonic()
            if done == 1 or now - last >= every or done == total:
                last = now
                self.err.print(_plain_line(description, done, total, now - start,
                                           postfix() if postfix is not None else ""),
                               markup=False, highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        self.notes.append(message)
        if not self.quiet and not self.json_mode:
            self.err.print(f"[cyan]note:[/] {_escape_keep_lines(message)}", soft_wrap=True)

    def status(self, message: str) -> None:
        if not self.quiet and not self.json_mode:
            self.err.print(f"[dim]{_escape_keep_lines(message)}[/]", soft_wrap=True)

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
        for t in [table, *(tables or [])]:
            print_uncut(self.out, t)

    def error(self, message: str, hint: str | None = None) -> None:
        text = f"[bold red]error:[/] {_escape(message)}"
        if hint:
            text += f" [yellow](hint: {_escape(hint)})[/]"
        self.err.print(text, soft_wrap=True)


def print_uncut(console: Console, renderable: Any) -> None:
    """Print a table at its natural width when the console is narrower (or is a file, which Rich sizes at 80).

    Recipe names, Hub ids and paths in a result are what users copy: Rich would wrap or cut them with an
    ellipsis to fit the width, so a wide table is printed whole and the terminal wraps the long lines instead.
    """
    natural = Measurement.get(console, console.options.update_width(10**6), renderable).maximum
    width = console.width
    if natural <= width:
        console.print(renderable)
        return
    console.width = natural  # print(width=...) is capped at the console's width
    try:
        console.print(renderable)
    finally:
        console.width = width


def _escape_keep_lines(text: str) -> str:
    from rich.markup import escape

    return escape(redact(text))  # a path like [x] in a note is text, not Rich markup


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
    return os.environ.get("MOEIFY_PROGRESS") == "1"


def _progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("MOEIFY_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


def _plain_line(description: str, done: int, total: int | None, elapsed: float, postfix: str) -> str:
    parts = [f"{description}: {done}" + (f"/{total} ({done / total:.0%})" if total else "")]
    rate = elapsed / done if done else 0.0
    parts.append(f"{rate:.1f} s/item" if rate >= 1 else f"{1 / rate:.1f} items/s" if rate > 0 else "")
    parts.append(f"elapsed {_clock(elapsed)}")
    if total and done < total:
        parts.append(f"left {_clock(rate * (total - done))}")
    if postfix:
        parts.append(postfix)
    return ", ".join(p for p in parts if p)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"
