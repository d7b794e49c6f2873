"""How library code reports progress without knowing about Rich or the terminal.

Stages take a `Reporter`; the CLI passes one that draws Rich progress bars on stderr, Python callers
get the silent default. This keeps the library free of UI imports and usable from notebooks and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Reporter:
    """Silent reporter: the default for library calls."""

    def track(self, items: Iterable[T], description: str, total: int | None = None,
              postfix: Callable[[], str] | None = None) -> Iterator[T]:
        """Iterate `items` with a progress bar; `postfix()` is live text after it (e.g. 'loss 2.31')."""
        yield from items

    def note(self, message: str) -> None:
        """A remark the user should see (e.g. 'experts padded to 128'), not an error."""

    def status(self, message: str) -> None:
        """A live one-line status for a long step with no loop (e.g. 'loading GGUF')."""


class RecordingReporter(Reporter):
    """Keeps notes in a list; handy for tests and for moeify.json."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


SILENT = Reporter()
