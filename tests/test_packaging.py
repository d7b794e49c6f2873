"""The package metadata builds without setuptools' deprecation warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_applies_without_deprecation_warnings(tmp_path, monkeypatch):
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)  # the readme and package data are relative to the project
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    messages = [str(w.message).splitlines()[0] for w in caught
                if issubclass(w.category, DeprecationWarning | UserWarning) or "deprecat" in str(w.message).lower()]
    assert not [m for m in messages if "license" in m.lower() or "deprecat" in m.lower()], messages
    assert dist.metadata.license_expression == "Apache-2.0"
