"""The held-out texts must share no passage with the default calibration text: every quality figure in
docs/quality.md and the slow real-model test rely on it, and the calibration text has been rewritten several times
(bench/spread_calibration.py), so the promise is checked here rather than trusted."""

from __future__ import annotations

import re

import pytest

from moeify.data import default_calibration_path, packaged_text, shared_passages


@pytest.mark.parametrize("name", ["eval_wikipedia.txt", "eval_sense_and_sensibility.txt"])
def test_held_out_text_shares_no_passage_with_calibration(name: str) -> None:
    calibration = default_calibration_path().read_text(encoding="utf-8")
    held_out = packaged_text(name).read_text(encoding="utf-8")
    assert len(held_out) > 2000
    shared = shared_passages(held_out, calibration)
    assert not shared, f"{name} shares {len(shared)} 200-character windows with calibration.txt (first at {shared[0]})"


def test_calibration_text_is_a_third_novel_two_thirds_encyclopaedia() -> None:
    """The mix is what makes the default generalise (docs/quality.md): neither part may silently vanish,
    and the measured proportion (a third of the text from the novel) must not drift."""
    text = default_calibration_path().read_text(encoding="utf-8")
    novel, boundary, wiki = text.partition("Anarchism\n\nAnarchism is")  # the sample's first article opens it
    assert boundary, "the Wikipedia part no longer starts with the sample's first article"
    assert "Elizabeth" in novel and "Darcy" in novel
    assert 65_000 < len(novel) < 80_000 and 150_000 < len(wiki) < 170_000
    assert "Darcy" not in wiki and "Bennet" not in wiki
    # spread over the whole book (measured better than its opening), not the first chapters only
    assert max(int(n) for n in re.findall(r"Chapter (\d+)", novel)) >= 40
