"""Split text or markdown into chunks for retrieval.

>>> chunk("# Ports\\n\\nThe gateway listens on 8888. Chat is on 50054.", size=40, overlap=10)
['# Ports\\n\\nThe gateway listens on 8888.', 'on 8888. Chat is on 50054.']

Every chunk is a verbatim slice of the text, without surrounding whitespace, of at most ``size``
characters; in order, the chunks cover all of the text. A chunk ends at the strongest boundary
within reach: where a markdown heading begins (a section), a blank line (a paragraph), a
sentence end, a line break, a space; a word longer than ``size`` is cut. A boundary that adds
less than a quarter of the room for new text is passed over for a later one when there is one
(a section boundary never is), so that a short paragraph does not make a chunk of its own. A
heading stays with the text that follows it: a chunk never ends on a heading line unless the
heading alone is too long (``#`` lines inside code fences are code, not headings).

Neighbouring chunks share about ``overlap`` characters, in whole words: the next chunk starts at
the first word at most ``overlap`` characters before the previous one ended, or later when that
leaves no boundary within reach. After a section boundary the next chunk starts at the heading,
with no overlap: a section's text is not repeated in the next one. A word cut because it is
longer than ``size`` is not overlapped either.

The same input always gives the same chunks.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

#: Boundary strengths; a chunk ends at the strongest one within reach.
FORCED = 0  # on a heading line (inside or just after it): only when nothing else fits
WORD = 1
LINE = 2
SENTENCE = 3
PARAGRAPH = 4
SECTION = 5  # a heading follows

_GAP = re.compile(r"\s+")
_HEADING = re.compile(r"^[ ]{0,3}(#{1,6})(?:[ \t]|$)", re.M)
_FENCE = re.compile(r"^[ ]{0,3}(?:```|~~~)", re.M)
#: Terminal punctuation, maybe followed by closing quotes, brackets or markdown emphasis.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]*_]*$")
_ABBREVIATIONS = frozenset({"e.g.", "i.e.", "vs.", "cf.", "mr.", "mrs.", "ms.", "dr.", "st."})


@dataclass(frozen=True, slots=True)
class _Gap:
    """A run of whitespace: text may end a chunk at ``end`` and resumes at ``start``."""

    end: int
    start: int
    strength: int


def chunk(text: str, size: int, overlap: int) -> list[str]:
    """The chunks of ``text``: at most ``size`` characters each, neighbours sharing ~``overlap``.

    Whitespace-only text has no chunks. Raises ValueError unless ``size >= 1`` and
    ``0 <= overlap < size``.
    """
    return [text[start:end] for start, end in spans(text, size, overlap)]


def spans(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each chunk of ``text``, as :func:`chunk` cuts it."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1 character, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(
            f"chunk overlap must be within 0..{size - 1} characters (below the chunk size, "
            f"{size}), got {overlap}"
        )
    leading = _GAP.match(text)
    begin = leading.end() if leading else 0
    finish = len(text.rstrip())
    if begin >= finish:
        return []
    gaps = _gaps(text, begin, finish)
    ends = [g.end for g in gaps]
    starts = [g.start for g in gaps]
    min_new = max(1, (size - overlap) // 4)

    result: list[tuple[int, int]] = []
    start = done = begin  # the previous chunk's start and end (or where the next one starts)
    fresh = True  # the next chunk overlaps nothing: the first one, or one after a section
    while True:
        if fresh:
            candidates = [start]
        else:
            first = bisect.bisect_left(starts, max(start + 1, done - overlap))
            candidates = [*starts[first : bisect.bisect_left(starts, done)]]
            candidates.append(_resume(gaps, ends, done))
        gap: _Gap | None = None
        for at in candidates:
            if finish - at <= size:
                result.append((at, finish))
                return result
            gap = _best(gaps, ends, done, at + size, min_new)
            if gap is not None:
                break
        else:  # no boundary within reach: a heading line, or a word, too long for one chunk
            gap = _furthest(gaps, ends, done, at + size)
        end = gap.end if gap is not None else at + size
        result.append((at, end))
        start, done, fresh = at, end, False
        if gap is not None and gap.strength == SECTION:
            start, fresh = gap.start, True


def _resume(gaps: list[_Gap], ends: list[int], done: int) -> int:
    """Where text resumes after a chunk that ends at ``done``."""
    i = bisect.bisect_left(ends, done)
    return gaps[i].start if i < len(gaps) and gaps[i].end == done else done


def _best(gaps: list[_Gap], ends: list[int], done: int, limit: int, min_new: int) -> _Gap | None:
    """The strongest boundary (not a forced one) in ``(done, limit]``, the furthest of equals.

    Boundaries adding at least ``min_new`` characters, or starting a section, come first.
    """
    best: _Gap | None = None
    short: _Gap | None = None
    for gap in gaps[bisect.bisect_right(ends, done) : bisect.bisect_right(ends, limit)]:
        if gap.strength == FORCED:
            continue
        if gap.end - done >= min_new or gap.strength == SECTION:
            if best is None or gap.strength >= best.strength:
                best = gap
        elif short is None or gap.strength >= short.strength:
            short = gap
    return best if best is not None else short


def _furthest(gaps: list[_Gap], ends: list[int], done: int, limit: int) -> _Gap | None:
    """The last boundary of any kind in ``(done, limit]``; None: cut the word at ``limit``."""
    lo, hi = bisect.bisect_right(ends, done), bisect.bisect_right(ends, limit)
    return gaps[hi - 1] if hi > lo else None


def _gaps(text: str, begin: int, finish: int) -> list[_Gap]:
    """Every run of whitespace within ``text[begin:finish]``, with its boundary strength."""
    fences = [m.start() for m in _FENCE.finditer(text)]
    headings: list[tuple[int, int]] = []  # (line start, line end) of each heading line
    marks: set[int] = set()  # where each heading's "#" is
    for m in _HEADING.finditer(text):
        if bisect.bisect_right(fences, m.start()) % 2 == 0:  # not inside a fenced block
            line_end = text.find("\n", m.start())
            headings.append((m.start(), len(text) if line_end < 0 else line_end))
            marks.add(m.start(1))
    heading_starts = [h[0] for h in headings]

    gaps: list[_Gap] = []
    for m in _GAP.finditer(text, begin, finish):
        end, start = m.span()
        space = m.group()
        h = bisect.bisect_right(heading_starts, end - 1) - 1
        if h >= 0 and end - 1 < headings[h][1]:
            strength = FORCED
        elif start in marks:
            strength = SECTION
        elif space.count("\n") >= 2:
            strength = PARAGRAPH
        elif _ends_sentence(text, end):
            strength = SENTENCE
        elif "\n" in space:
            strength = LINE
        else:
            strength = WORD
        gaps.append(_Gap(end, start, strength))
    return gaps


def _ends_sentence(text: str, end: int) -> bool:
    """Whether the word that ends at ``end`` ends a sentence."""
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:end]
    return bool(_SENTENCE_END.search(word)) and word.lower() not in _ABBREVIATIONS
