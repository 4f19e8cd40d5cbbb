"""Reciprocal rank fusion: one ranking from several, by rank alone.

Cormack, Clarke & Buettcher (2009): ``score(d) = sum over lists of 1 / (k + rank(d))`` with
1-based ranks; a document absent from a list gets nothing from it. Scores of different kinds
(cosine, BM25) need no calibration because only ranks count.

>>> rrf([["a", "b"], ["b", "c"]], k=60)
[('b', 0.0325...), ('a', 0.0163...), ('c', 0.0161...)]
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def rrf(rankings: Sequence[Sequence[K]], *, k: int = 60) -> list[tuple[K, float]]:
    """Fuse ``rankings`` (each best first, no repeats) into ``(key, score)``, best first.

    Equal scores keep the order in which their keys first appear (earlier lists first).
    """
    scores: dict[K, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])
