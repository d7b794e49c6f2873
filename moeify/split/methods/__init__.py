"""Registry of splitting methods (`--method`)."""

from __future__ import annotations

from moeify.errors import UsageError
from moeify.split.methods.activations import ActivationsMethod
from moeify.split.methods.base import SplitContext, SplitMethod
from moeify.split.methods.weights import WeightsMethod

METHODS: dict[str, type[SplitMethod]] = {"activations": ActivationsMethod, "weights": WeightsMethod}
DEFAULT_METHOD = "activations"

__all__ = ["METHODS", "DEFAULT_METHOD", "SplitContext", "SplitMethod", "make_method"]


def make_method(name: str) -> SplitMethod:
    try:
        return METHODS[name]()
    except KeyError:
        raise UsageError(f"unknown --method {name!r}", f"choose one of: {', '.join(METHODS)}") from None
