"""BM25 (Okapi) over a small set of passages, and the text analysis it rests on (rerank, chat).

Analysis: lowercase words (runs of letters and digits), a short English stopword list dropped,
a light suffix stemmer (plurals, -ing, -ed, -ly, a final -e) so that "indexes", "indexed" and
"indexing" meet. Scoring: Okapi BM25 with the IDF taken over the passages being scored, in
Lucene's smoothed form ``ln(1 + (N - n + 0.5) / (n + 0.5))``, which stays positive when a term
is in every passage.

>>> passages = [terms("The cat sat."), terms("Dogs chase cats, cats run.")]
>>> scores(terms("cats"), passages)  # both mention cats; the second twice
[0.221..., 0.223...]
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Collection, Sequence

#: A word: a run of letters and digits (``_`` separates, as punctuation does).
WORD = re.compile(r"[^\W_]+")
# ASCII punctuation to spaces, on UTF-8 bytes: multi-byte sequences hold no ASCII bytes.
_PUNCTUATION = bytes.maketrans(string.punctuation.encode(), b" " * len(string.punctuation))

_STOPWORD_LIST = """
    a about after all also am an and any are as at be been before being between both but by
    can could d did do does doing down during each few for from further had has have having he
    her here hers him his how i if in into is it its itself just ll m me more most my no nor
    not now of off on once only or other our ours out over own re s same she should so some
    such t than that the their theirs them then there these they this those through to too
    under until up ve very was we were what when where which while who whom why will with
    would you your yours
"""
STOPWORDS = frozenset(_STOPWORD_LIST.split())

_VOWEL = re.compile(r"[aeiouy]")
# Doubled final consonants that an -ing/-ed leaves behind ("running" -> "runn" -> "run").
_UNDOUBLE = frozenset("bdgkmnprt")


def stem(word: str) -> str:
    """A light suffix stemmer: enough to match inflections, not a linguistic analysis."""
    if len(word) <= 3 or not word.isalpha():
        return word
    base = word
    if word.endswith("ies") and len(word) > 4:
        base = word[:-3] + "y"
    elif word.endswith(("sses", "xes", "ches", "shes", "zes")):
        base = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        base = word[:-1]
    elif word.endswith("ing") and _VOWEL.search(word[:-3]) and len(word) >= 6:
        base = _undouble(word[:-3])
    elif word.endswith("ed") and _VOWEL.search(word[:-2]) and len(word) >= 5:
        base = _undouble(word[:-2])
    elif word.endswith("ly") and len(word) >= 6:
        base = word[:-2]
    if base.endswith("e") and len(base) >= 4:
        base = base[:-1]
    return base


def _undouble(base: str) -> str:
    if len(base) >= 3 and base[-1] == base[-2] and base[-1] in _UNDOUBLE:
        return base[:-1]
    return base


class _Terms(dict[str, str]):
    """word -> its term ("" for a stopword), computed on first sight; emptied when full.

    A dict subclass with ``__missing__`` costs a plain dict lookup on a hit, half the price of
    an ``lru_cache`` call, and every word of every passage goes through it.
    """

    limit = 1 << 17

    def __missing__(self, word: str) -> str:
        if len(self) >= self.limit:
            self.clear()
        term = "" if word in STOPWORDS else stem(word)
        self[word] = term
        return term


_TERMS = _Terms()


def words(text: str) -> list[str]:
    """Every word of ``text``, lowercased, stopwords included: ``WORD.findall(text.lower())``.

    Computed by splitting on whitespace after turning ASCII punctuation into spaces, which takes
    half the time of the regular expression; only pieces still holding other characters (curly
    quotes, dashes ...) go through it.
    """
    lowered = text.lower()
    pieces = lowered.encode("utf-8", "surrogatepass").translate(_PUNCTUATION)
    split = pieces.decode("utf-8", "surrogatepass").split()
    out: list[str] = []
    for piece in split:
        if piece.isalnum():
            out.append(piece)
        else:
            out.extend(WORD.findall(piece))
    return out


def analyze(text: str) -> tuple[list[str], int]:
    """The index terms of ``text`` (its words, stopwords dropped, stemmed, in order), and how
    many words it has in all."""
    found = words(text)
    return [t for w in found if (t := _TERMS[w])], len(found)


def terms(text: str) -> list[str]:
    """The index terms of ``text``: its words, stopwords dropped, stemmed, in order."""
    return analyze(text)[0]


def scores(
    query: Collection[str],
    passages: Sequence[Sequence[str]],
    *,
    k1: float = 1.2,
    b: float = 0.75,
) -> list[float]:
    """The BM25 score of each passage (a list of terms) for the query terms.

    Each distinct query term counts once; a passage without any of them scores 0.
    """
    if not passages:
        return []
    wanted = set(query)
    counts = [Counter(t for t in passage if t in wanted) for passage in passages]
    lengths = [len(passage) for passage in passages]
    average = sum(lengths) / len(lengths) or 1.0
    n = len(passages)
    idf = {}
    for term in wanted:
        df = sum(1 for c in counts if term in c)
        idf[term] = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
    out = []
    for tf, length in zip(counts, lengths, strict=True):
        norm = k1 * (1.0 - b + b * length / average)
        out.append(sum(idf[t] * f * (k1 + 1.0) / (f + norm) for t, f in tf.items()))
    return out
