"""Mistral: the same layout as Llama, with sliding-window attention that Mixtral also has."""

from __future__ import annotations

from moeify.arch.llama import Llama


class Mistral(Llama):
    name = "mistral"
    model_types = ("mistral",)
