"""Write the shipped calibration text: a novel half and a Wikipedia half spread over some thirty articles.

    python bench/spread_calibration.py moeify/data/calibration.txt      # how the shipped text was made
    python bench/heldout.py --chunks 4 w50:calibration=OUT.txt w25:calibration=OUT.txt,active=0.25 ...

Until 2026-12-07 the shipped calibration text's Wikipedia half was the first ~120,000 characters of the
sample: two articles (Anarchism and Autism). This writes the same novel half with the Wikipedia half replaced
by 40 windows of whole paragraphs spread evenly over every article of the sample except the three the held-out
excerpt (moeify/data/eval_wikipedia.txt) is cut from, about the same number of tokens (54167 against 54484),
so a split calibrated on it sees some thirty topics and still shares no passage with the held-out text
(checked before writing).

Measured (docs/quality.md): on 2026-12-06 better at 25% on both seeds (-5.8%, -3.8%), mixed at 50% (+2.4%,
-2.1%); on 2026-12-07, on the default with reassignment and 150 refinement steps, better on all four draws
(-2.7%, -3.2% at 50%, -2.6%, -3.7% at 25%), so it ships. Needs ../shared/data.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moeify.data import shared_passages  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
NOVEL_CHARS = 119_819  # the novel half of the shipped text, unchanged
WIKI_CHARS = 119_458  # the size of the shipped Wikipedia part: a ceiling, whole paragraphs fill ~107,000 of it
WINDOWS = 40
# The titles that open the held-out excerpt's first article (Andorra) and the first article after its last
# (Alaska): no calibration window comes from between them, so Andorra, Animal Farm and Amphibian stay unseen.
HELD_OUT_ARTICLES = ("\nAndorra\n\n", "\nAlaska\n\n")


def paragraph_window(text: str, start: int, size: int, stop: int) -> str:
    """Whole paragraphs from the first paragraph start at or after `start`, at most `size` chars, before `stop`."""
    begin = text.find("\n\n", start)
    begin = start if start == 0 or begin < 0 else begin + 2
    end = begin
    while True:  # whole paragraphs while they fit (the first one always)
        nxt = text.find("\n\n", end + 2)
        if nxt < 0 or nxt > stop or (end > begin and nxt - begin > size):
            break
        end = nxt
    return text[begin:end].strip()


def wikipedia_part(sample: str, held_out: str) -> str:
    lo = sample.index(HELD_OUT_ARTICLES[0]) + 1
    hi = sample.index(HELD_OUT_ARTICLES[1]) + 1
    if not lo <= sample.index(held_out[:200]) < sample.index(held_out[-200:]) < hi:
        raise SystemExit("the held-out excerpt is not inside the excluded articles: update HELD_OUT_ARTICLES")
    ranges = [(0, lo), (hi, len(sample))]
    allowed = sum(b - a for a, b in ranges)
    step, size = allowed / WINDOWS, WIKI_CHARS // WINDOWS
    windows = []
    for i in range(WINDOWS):
        offset = i * step
        for a, b in ranges:
            if offset < b - a:
                windows.append(paragraph_window(sample, a + int(offset), size, b))
                break
            offset -= b - a
    return "\n\n".join(w for w in windows if w)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/spread_calibration.py OUT.txt")
    out = Path(sys.argv[1])
    novel = (SHARED / "pride_and_prejudice.txt").read_text(encoding="utf-8")[:NOVEL_CHARS]
    sample = (SHARED / "wikipedia_sample.txt").read_text(encoding="utf-8")
    held_out = (REPO / "moeify" / "data" / "eval_wikipedia.txt").read_text(encoding="utf-8")
    text = novel + wikipedia_part(sample, held_out) + "\n"
    shared = shared_passages(held_out, text)  # the promise docs/quality.md makes, checked
    if shared:
        raise SystemExit(f"calibration text shares a passage with the held-out excerpt at {shared[0]}")
    out.write_text(text, encoding="utf-8")
    print(f"{out}: {len(text)} characters ({len(novel)} novel)")


if __name__ == "__main__":
    main()
