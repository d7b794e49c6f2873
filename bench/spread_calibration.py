"""Write the shipped calibration text: a third novel, two thirds Wikipedia, both spread over their source.

    python bench/spread_calibration.py moeify/data/calibration.txt      # how the shipped text was made
    python bench/heldout.py --chunks 4 w50:calibration=OUT.txt w25:calibration=OUT.txt,active=0.25 ...

The text is windows of whole paragraphs spread evenly over the whole of Pride and Prejudice, then windows
spread evenly over every article of the Wikipedia sample except the three the held-out excerpt
(moeify/data/eval_wikipedia.txt) is cut from, so a split calibrated on it sees the whole novel and some
thirty topics and still shares no passage with the held-out text (checked before writing).

History, measured with bench/heldout.py (docs/quality.md):
- until the morning of 2026-12-07 the Wikipedia half was the sample's first ~120,000 characters, two
  articles (Anarchism and Autism), after ~120,000 characters of the novel;
- then 40 spread windows (~107,000 characters) after the same novel half, about the same tokens: better
  on all four draws of the default (-2.7%, -3.2% at 50%, -2.6%, -3.7% at 25%);
- then a third novel (its first 72,000 characters, ~18,000 tokens) and two thirds Wikipedia (62 windows,
  ~161,000 characters, ~36,000 tokens), the same ~54,000 tokens: -2.0%, -0.3% at 50%, -1.9%, -1.3% at 25%,
  with the novel worse on every draw (+5% to +11%) and Wikipedia better (-6% to -13%);
- later that day the novel part spread too: 24 windows over the whole book instead of its first 72,000
  characters (~72,500 characters, ~17,900 tokens): -1.2%, +0.1% at 50%, -1.8%, -1.9% at 25%, the novel
  better on three draws (up to -7%) and Wikipedia worse by up to 4%.
Needs ../shared/data.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moeify.data import shared_passages  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
NOVEL_CHARS = 83_000  # a ceiling for the novel part: whole paragraphs fill ~72,500 of it, ~18,000 tokens
NOVEL_WINDOWS = 24  # spread over the whole book, every few chapters
WIKI_CHARS = 186_000  # a ceiling for the Wikipedia part: whole paragraphs fill ~161,000 of it, ~36,000 tokens
WIKI_WINDOWS = 62
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


def spread_windows(text: str, ranges: list[tuple[int, int]], count: int, ceiling: int) -> str:
    """`count` windows of whole paragraphs at even steps over `ranges` of `text`, `ceiling` chars in all."""
    allowed = sum(b - a for a, b in ranges)
    step, size = allowed / count, ceiling // count
    windows = []
    for i in range(count):
        offset = i * step
        for a, b in ranges:
            if offset < b - a:
                windows.append(paragraph_window(text, a + int(offset), size, b))
                break
            offset -= b - a
    return "\n\n".join(w for w in windows if w)


def novel_part(book: str) -> str:
    return spread_windows(book, [(0, len(book))], NOVEL_WINDOWS, NOVEL_CHARS)


def wikipedia_part(sample: str, held_out: str) -> str:
    lo = sample.index(HELD_OUT_ARTICLES[0]) + 1
    hi = sample.index(HELD_OUT_ARTICLES[1]) + 1
    if not lo <= sample.index(held_out[:200]) < sample.index(held_out[-200:]) < hi:
        raise SystemExit("the held-out excerpt is not inside the excluded articles: update HELD_OUT_ARTICLES")
    return spread_windows(sample, [(0, lo), (hi, len(sample))], WIKI_WINDOWS, WIKI_CHARS)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/spread_calibration.py OUT.txt")
    out = Path(sys.argv[1])
    novel = novel_part((SHARED / "pride_and_prejudice.txt").read_text(encoding="utf-8"))
    sample = (SHARED / "wikipedia_sample.txt").read_text(encoding="utf-8")
    held_out = (REPO / "moeify" / "data" / "eval_wikipedia.txt").read_text(encoding="utf-8")
    text = novel + "\n\n" + wikipedia_part(sample, held_out) + "\n"
    shared = shared_passages(held_out, text)  # the promise docs/quality.md makes, checked
    if shared:
        raise SystemExit(f"calibration text shares a passage with the held-out excerpt at {shared[0]}")
    out.write_text(text, encoding="utf-8")
    print(f"{out}: {len(text)} characters ({len(novel)} novel)")


if __name__ == "__main__":
    main()
