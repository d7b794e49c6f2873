"""The exception hierarchy: every failure a user can cause or fix carries a one-line message and a hint.

The CLI renders a `MoeifyError` as one line (plus the hint) and exits with `exit_code`; anything else is
a bug and shows a traceback only with MOEIFY_DEBUG=1. Library code raises these and never calls
`sys.exit`, so it behaves the same from Python.
"""

from __future__ import annotations


class MoeifyError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(MoeifyError):
    """Options that contradict each other or the model: exit code 2, like a typo in a flag."""

    exit_code = 2


class InputError(MoeifyError):
    """The input checkpoint, config or text is missing, malformed or inconsistent."""

    exit_code = 2


class UnsupportedModelError(InputError):
    """A model family or layout moeify cannot convert."""


class OutputError(MoeifyError):
    """The output folder exists, is locked by another run, or could not be written (disk full)."""


class HubError(MoeifyError):
    """The Hub refused or failed a request."""
